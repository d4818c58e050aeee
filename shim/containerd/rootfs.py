"""A task's root filesystem on the host, which the UVM then sees over virtio-9p.

Two cases, as containerd presents them:
* `ctr run --rootfs DIR`: no mounts in the create request; config.json's root.path is the host DIR.
* image-based runs: the snapshotter's mounts (overlay, or a bind for the native snapshotter) arrive in
  CreateTaskRequest.rootfs; they are mounted on <bundle>/rootfs, as runc's shim does, and unmounted
  at delete (or by the `delete` action when the shim died).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from uvm import errors

MOUNT_TIMEOUT_S = 30


@dataclass(frozen=True)
class HostMount:
    type: str
    source: str
    options: tuple[str, ...]


def mount_points_under(path: Path) -> list[Path]:
    """Mount points at or below path in our mount namespace, deepest first."""
    top = str(path.resolve())
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            # Field 5 is the mount point, with space, tab, newline and backslash escaped as \ooo.
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split(" ")[4])
            if point == top or point.startswith(f"{top}/"):
                found.append(Path(point))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def is_mountpoint(path: Path) -> bool:
    return path.resolve() in mount_points_under(path)


def run_mount(argv: list[str], what: str) -> None:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=MOUNT_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise errors.InvalidArgumentError(f"{what}: {e}") from None
    if res.returncode != 0:
        raise errors.InvalidArgumentError(f"{what}: {res.stderr.strip() or f'exit {res.returncode}'}")


def mount_all(mounts: list[HostMount], target: Path) -> None:
    """Mount containerd's rootfs mounts on target, in order. Raises InvalidArgumentError (all undone)."""
    done = 0
    try:
        for m in mounts:
            if m.type not in ("overlay", "bind", "rbind") and not m.type.startswith("ext"):
                raise errors.InvalidArgumentError(f"rootfs mount type {m.type!r} is not supported (overlay, bind, ext4)")
            opts = [o for o in m.options if o not in ("bind", "rbind")]
            argv = ["mount", "-t", m.type, m.source, str(target)] if m.type not in ("bind", "rbind") else \
                ["mount", "--rbind" if m.type == "rbind" or "rbind" in m.options else "--bind", m.source, str(target)]
            if opts:
                argv[1:1] = ["-o", ",".join(opts)]
            run_mount(argv, f"rootfs mount {m.type} {m.source} on {target}")
            done += 1
    except BaseException:
        for _ in range(done):
            unmount(target)
        raise


def unmount(target: Path) -> bool:
    """Unmount everything on target (lazily if busy). True if something was mounted there."""
    if not target.exists():
        return False
    found = False
    while is_mountpoint(target):
        found = True
        res = subprocess.run(["umount", str(target)], capture_output=True, timeout=MOUNT_TIMEOUT_S, check=False)
        if res.returncode != 0:
            subprocess.run(["umount", "-l", str(target)], capture_output=True, timeout=MOUNT_TIMEOUT_S, check=False)
            if is_mountpoint(target):
                raise errors.UvmError(f"mount {target}: cannot unmount: {res.stderr.decode().strip()}")
    return found


def host_root(bundle: Path, root_path: str) -> Path:
    """The directory to share into the UVM: root.path, absolute or relative to the bundle.

    Raises InvalidArgumentError when it is not a non-empty directory."""
    root = Path(root_path) if os.path.isabs(root_path) else bundle / root_path
    if not root.is_dir():
        raise errors.InvalidArgumentError(f"rootfs {root}: not a directory (set root.path or use a snapshotter)")
    if not any(root.iterdir()):
        raise errors.InvalidArgumentError(f"rootfs {root}: is empty: no usable root filesystem in the bundle")
    return root


# -- bind mounts of host paths --------------------------------------------------------------------
# A spec mount of type bind (`ctr run --mount type=bind,src=...`, Kubernetes volumes) names a host path
# the guest cannot see. Each is bind-mounted on the host under one staging directory (<state>/binds/<n>,
# n its index in spec.mounts; read-only ones remounted read-only there, so a hostile guest cannot write
# through them), which is shared into the UVM as one more 9p share; the guest rewrites each source to its
# path in that share before crun runs. A file source is bind-mounted on an empty file, so the guest sees
# only that file, not its siblings. Entries a guest adds to the staging directory (writable when some
# bind is) are removed with it, once nothing is mounted below it.

BINDS_DIR = "binds"
MAX_BINDS = 64


@dataclass(frozen=True)
class BindMount:
    index: int  # in spec.mounts
    destination: str
    source: Path  # on the host
    readonly: bool
    recursive: bool


def is_bind(mount_type: str | None, options: list[str] | None) -> bool:
    opts = options or []
    return mount_type in ("bind", "rbind") or "bind" in opts or "rbind" in opts


def bind_mounts(mounts: list[tuple[str, str | None, str | None, list[str] | None]], bundle: Path) -> list[BindMount]:
    """The bind mounts among spec mounts given as (destination, source, type, options); a relative source
    is relative to the bundle, as runc reads it. Raises InvalidArgumentError naming a mount whose source
    is missing or not a directory or regular file."""
    binds = []
    for index, (destination, source, mount_type, options) in enumerate(mounts):
        if not is_bind(mount_type, options):
            continue
        what = f"mount {destination}: bind source {source!r}"
        if not source:
            raise errors.InvalidArgumentError(f"mount {destination}: a bind mount needs a source")
        path = Path(source) if os.path.isabs(source) else bundle / source
        if not (path.is_dir() or path.is_file()):
            problem = "is not a directory or regular file" if path.exists() else "does not exist"
            raise errors.InvalidArgumentError(f"{what} {problem} on the host")
        opts = options or []
        binds.append(BindMount(index, destination, path, readonly="ro" in opts or "rro" in opts,
                               recursive=mount_type == "rbind" or "rbind" in opts))
    if len(binds) > MAX_BINDS:
        raise errors.InvalidArgumentError(f"{len(binds)} bind mounts: at most {MAX_BINDS} are supported")
    return binds


def stage_binds(binds: list[BindMount], stage: Path) -> None:
    """Bind-mount each source on stage/<index>. Raises InvalidArgumentError (everything undone).

    Each bind is made rprivate at once: a bind of a source on a shared mount (systemd's /) is otherwise
    a peer of it, and unmounting a copy of one of its submounts would unmount the user's original. A
    read-only bind is read-only all the way down (every submount an rbind copied), so a hostile guest
    cannot write through any of it."""
    unstage_binds(stage)  # a dead shim's, in the same bundle
    try:
        stage.mkdir(mode=0o700)
        for b in binds:
            target = stage / str(b.index)
            if b.source.is_dir():
                target.mkdir()
            else:
                target.touch(mode=0o600)
    except OSError as e:
        shutil.rmtree(stage, ignore_errors=True)
        raise errors.InvalidArgumentError(f"bind mounts: {e.filename}: {e.strerror}") from None
    try:
        for b in binds:
            target = stage / str(b.index)
            what = f"mount {b.destination}: bind {b.source}"
            run_mount(["mount", "--rbind" if b.recursive else "--bind", str(b.source), str(target)], what)
            run_mount(["mount", "--make-rprivate", str(target)], f"{what}: private")
            if b.readonly:
                for point in mount_points_under(target):
                    run_mount(["mount", "-o", "remount,bind,ro", str(point)], f"{what}: {point} read-only")
    except BaseException:
        unstage_binds(stage)
        raise


def unstage_binds(stage: Path) -> bool:
    """Unmount and remove what stage_binds made (whatever a failure left of it). True if there was something.
    Nothing is removed while anything is still mounted below stage: the sources are the user's files."""
    if not stage.is_dir():
        return False
    for point in mount_points_under(stage):  # deepest first: each a leaf when its turn comes
        unmount(point)
    left = mount_points_under(stage)
    if left:
        raise errors.UvmError(f"bind mounts: cannot unmount {left[0]}: leaving {stage} in place")
    shutil.rmtree(stage)
    return True
