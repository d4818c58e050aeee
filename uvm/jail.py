"""Confining QEMU: the boundary around the hypervisor, as Firecracker's jailer and libvirt draw it.

Under emulation QEMU is no security boundary (its own security document says so), and the guest is
untrusted: a QEMU bug must not hand the host to a container. So each UVM's QEMU runs

* as a uid and gid of its own, leased for the VM's life from a range that no account uses (a lock
  file per uid, held by the shim and inherited by QEMU, so two live VMs never share one and a crash
  frees it), dropped by ``setpriv`` before QEMU's exec (QEMU's own ``-runas`` is killed by the
  seccomp filter below), with no supplementary group but /dev/kvm's when KVM runs the guest;
* with no capability at all, or, when the VM has a 9p share, only the four 9p's passthrough security
  model needs (CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FOWNER, CAP_FSETID) as ambient capabilities; never
  CAP_MKNOD (a guest's mknod on a share fails), CAP_SYS_ADMIN, CAP_NET_ADMIN or CAP_SETUID;
  no_new_privs set;
* in a mount namespace of its own whose root (pivot_root) is a small tmpfs holding only what it
  needs: /usr read-only (its binary, libraries and firmware), /dev/null, /dev/urandom (and /dev/kvm),
  its kernel, initramfs and root image, its shares (recursive and slave: mounts made later under a
  share's host directory reach it), a template's memory file, and a proc of its own that shows only
  its own processes (9p passthrough needs /proc/self/fd); nothing else of the host (no /etc, /home,
  /root, /tmp, other VMs' files);
* under QEMU's full ``-sandbox`` (on, obsolete, elevateprivileges, spawn, resourcecontrol: deny).

Everything else reaches QEMU as an open file descriptor: the QMP, agent and console sockets (bound
and listened on by the shim), taps, hot-plugged disks (QMP add-fd) and a template's saved state
(getfd, ``migrate fd:``). The shim stays the only privileged process.

``enter`` runs in the forked child before exec (``preexec_fn``): only system calls, through ctypes,
on paths the parent worked out (``JailPlan``).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import pwd
import random
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from uvm.errors import ConfigError

log = logging.getLogger("uvm.jail")

SHARE_CAPABILITIES = ("chown", "dac_override", "fowner", "fsetid")  # what 9p passthrough needs, and no more
SECCOMP = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
DEFAULT_UID_RANGE = (2147418112, 2147483647)  # 0x7fff0000-0x7fffffff: 65536 ids no account uses
JAIL_DIR = "jail"  # in the run directory: the mount point of the jail's root (in QEMU's namespace only)
UID_LOCK_DIR = Path("/run/uvmshim/uids")  # one lock file per leased uid, for every shim on the host

CLONE_NEWNS = 0x00020000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SLAVE = 0x80000
MNT_DETACH = 0x2
SYS_PIVOT_ROOT = 155  # x86_64

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class Bind:
    """A host path bound into the jail at the same path: a file or a directory, read-only or not; a
    share recursively and as a slave (mounts made later under its host directory reach the jail too)."""

    path: str
    directory: bool
    readonly: bool = True
    recursive: bool = False


@dataclass(frozen=True)
class JailPlan:
    """Everything the child does before exec, worked out by the parent."""

    root: str  # the directory the jail's tmpfs is mounted on (the run directory's JAIL_DIR)
    binds: tuple[Bind, ...]
    symlinks: tuple[tuple[str, str], ...] = (("bin", "usr/bin"), ("lib", "usr/lib"), ("lib64", "usr/lib64"),
                                            ("sbin", "usr/sbin"))
    netns_fd: int | None = None  # entered first (QEMU's network namespace)


def plan(run_dir: Path, files: Sequence[Path], shares: Sequence[tuple[Path, bool]], writable: Sequence[Path] = (),
         kvm: bool = False, netns_fd: int | None = None) -> JailPlan:
    """The jail for a VM: files (kernel, initramfs, root image) read-only, shares (path, read-only?),
    writable files (a template's memory file). Not the run directory: its sockets and logs reach QEMU as
    descriptors. Raises ConfigError naming a path that does not exist."""
    binds = [Bind("/usr", True)]
    for optional in ("/etc/ld.so.cache",):
        if os.path.exists(optional):
            binds.append(Bind(optional, False))
    binds += [Bind("/dev/null", False, readonly=False), Bind("/dev/urandom", False)]
    if kvm:
        binds.append(Bind("/dev/kvm", False, readonly=False))
    for path in files:
        binds.append(Bind(str(path), False))
    for path in writable:
        binds.append(Bind(str(path), False, readonly=False))
    for path, readonly in shares:
        binds.append(Bind(str(path), True, readonly=readonly, recursive=True))
    for b in binds:
        if not os.path.exists(b.path):
            raise ConfigError(f"jail: {b.path} does not exist (QEMU would not find it inside its jail)", path=b.path)
    return JailPlan(root=str(run_dir / JAIL_DIR), binds=tuple(binds), netns_fd=netns_fd)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"jail: {what}: {os.strerror(err)}")


def _bytes(s: str | None) -> bytes | None:
    return s.encode() if s is not None else None


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(_libc.mount(_bytes(source), _bytes(target), _bytes(fstype), ctypes.c_ulong(flags), _bytes(data)),
           f"mount {source or fstype} on {target}")


def enter(jail: JailPlan) -> None:
    """In the forked child (one thread), before exec: into the network namespace, then a mount namespace of
    its own whose root is the jail. Writes what failed to stderr (QEMU's log) and raises OSError."""
    try:
        if jail.netns_fd is not None:
            _check(_libc.setns(jail.netns_fd, 0x40000000), "setns (network)")
        _check(_libc.unshare(CLONE_NEWNS), "unshare (mount namespace)")
        _mount(None, "/", None, MS_REC | MS_SLAVE)  # nothing made here reaches the host; the host's reach here
        root = jail.root
        _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
        for bind in jail.binds:
            target = root + bind.path
            if bind.directory:
                os.makedirs(target, exist_ok=True)
            else:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                os.close(os.open(target, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600))
            _mount(bind.path, target, None, MS_BIND | (MS_REC if bind.recursive else 0))
            flags = MS_BIND | MS_REMOUNT | MS_NOSUID | (MS_RDONLY if bind.readonly else 0)
            if not bind.path.startswith("/dev/"):
                flags |= MS_NODEV
            _mount(None, target, None, flags)
            if bind.recursive:
                _mount(None, target, None, MS_REC | MS_SLAVE)
        for name, target in jail.symlinks:
            os.symlink(target, f"{root}/{name}")
        # QEMU's 9p passthrough changes modes through /proc/self/fd (fchmodat cannot refuse to follow a
        # symlink): a proc of its own, which shows it nothing but its own processes.
        os.mkdir(f"{root}/proc")
        try:
            _mount("proc", f"{root}/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=invisible,subset=pid")
        except OSError:  # kernels before 5.8
            _mount("proc", f"{root}/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=2")
        os.mkdir(f"{root}/.old")
        _check(_libc.syscall(SYS_PIVOT_ROOT, root.encode(), f"{root}/.old".encode()), "pivot_root")
        os.chdir("/")
        _check(_libc.umount2(b"/.old", MNT_DETACH), "detach the host's root")
        os.rmdir("/.old")
        _mount(None, "/", None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)  # the jail's own root
    except OSError as e:
        with contextlib.suppress(OSError):
            os.write(2, f"uvmshim jail: {e.strerror or e}\n".encode())
        raise


# -- who QEMU runs as ------------------------------------------------------------------------------


@dataclass
class UidLease:
    """A uid (and gid of the same number) of the range, held by an flock on its lock file until released;
    QEMU inherits the descriptor, so a VM that outlives its shim still holds its uid."""

    uid: int
    fd: int
    path: Path
    groups: tuple[int, ...] = field(default=())

    def release(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            os.close(self.fd)
            self.fd = -1


def check_range(first: int, last: int) -> None:
    """Raises ConfigError when the range is empty, reaches root or the overflow ids, or overlaps a real
    account (its files would be QEMU's, and QEMU's its)."""
    if not 0 < first <= last < 0xFFFFFFFE:
        raise ConfigError(f"confine_uid_range {first}-{last}: needs 0 < first <= last < 4294967294")
    for entry in pwd.getpwall():
        if first <= entry.pw_uid <= last:
            raise ConfigError(f"confine_uid_range {first}-{last}: overlaps the account {entry.pw_name} (uid "
                              f"{entry.pw_uid}); choose a range no account uses", uid=entry.pw_uid)


def lease_uid(first: int, last: int, lock_dir: Path) -> UidLease:
    """A free uid of first..last (started at a random one). Raises ConfigError when every uid of the range
    is held by a live VM."""
    check_range(first, last)
    lock_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    count = last - first + 1
    start = random.randrange(count)
    for n in range(count):
        uid = first + (start + n) % count
        path = lock_dir / f"{uid}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return UidLease(uid, fd, path)
    raise ConfigError(f"confine_uid_range {first}-{last}: all {count} uids are in use by running VMs")


def setpriv_argv(uid: int, groups: Sequence[int], capabilities: Sequence[str]) -> list[str]:
    """setpriv's arguments that become uid/gid uid with only those groups, only those capabilities
    (ambient, so they survive the exec of a non-root QEMU; none left in the bounding set beyond them),
    no_new_privs, and death with the parent."""
    caps = "-all" + "".join(f",+{c}" for c in capabilities)
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}",
            f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups",
            f"--inh-caps={caps}", f"--ambient-caps={caps}", f"--bounding-set={caps}", "--no-new-privs",
            "--pdeathsig", "KILL", "--"]


def kvm_groups(kvm: bool) -> tuple[int, ...]:
    """The group /dev/kvm is accessible through, when KVM runs the guest (else none)."""
    if not kvm:
        return ()
    try:
        st = os.stat("/dev/kvm")
    except OSError:
        return ()
    return (st.st_gid,) if st.st_mode & 0o060 == 0o060 else ()


_setpriv_checked: str | None = None


def check_setpriv() -> None:
    """Raises ConfigError when setpriv is missing or too old for --ambient-caps (util-linux < 2.31)."""
    global _setpriv_checked
    if _setpriv_checked is not None:
        return
    path = shutil.which("setpriv")
    if path is None:
        raise ConfigError("confine: setpriv (util-linux) is not installed; QEMU cannot drop its privileges")
    try:
        out = subprocess.run([path, "--help"], capture_output=True, timeout=10, check=False).stdout.decode()
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ConfigError(f"confine: {path} --help: {e}") from None
    if "--ambient-caps" not in out:
        raise ConfigError(f"confine: {path} has no --ambient-caps (util-linux older than 2.31); upgrade util-linux")
    _setpriv_checked = path


def chown_tree(path: Path, uid: int) -> None:
    """path (a VM's run directory, just made) and what is in it, owned by the VM's uid and gid."""
    os.chown(path, uid, uid)
    for entry in path.iterdir():
        with contextlib.suppress(FileNotFoundError):
            os.chown(entry, uid, uid, follow_symlinks=False)

