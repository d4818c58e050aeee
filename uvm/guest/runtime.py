"""Processes and containers in the guest: the hcsshim guest runtime's verbs over crun (stdlib only).

* ``GuestProcess``: one process with streamed stdio (pipes or a pty), in the UVM itself or in a
  container. Its exit is pushed to the host once the output streams the host reads have ended (so
  the host has all of that output before it learns of the exit); a stream the host does not read,
  or a pipe something else keeps open past ``EXIT_GRACE_S``, does not hold the exit back.
* ``Container``: a crun container whose bundle the agent writes under /run/uvmshim/containers.
  crun runs as a short-lived helper (create, start, exec --detach, pause, resume, update, delete);
  the container's processes are reparented to the agent (PID 1), which reaps them and so knows
  their exit status first hand.
* OOM kills are pushed from memory.events (epoll on the cgroup file: no polling).

Errors are the six of hcsshim's guest runtime (already exists, does not exist, still running,
not running, not stopped, invalid container id), plus invalid argument.
"""

from __future__ import annotations

import os
import time

from schemas import agent as proto
from schemas import wirejson
from uvm.guest import procs
from uvm.guest.errors import RequestError, spawn_failed
from uvm.guest.net import NetworkMixin
from uvm.guest.procs import set_pipe_size, write_file
from uvm.guest.streams import InStream, OutStream

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
    from collections.abc import Callable
    from typing import Any

    from uvm.guest.services import AgentServices
else:
    import _signal as signal

CONTAINERS_DIR = "/run/uvmshim/containers"
SHARES_DIR = "/run/uvmshim/shares"
CGROUP_ROOT = "/sys/fs/cgroup"
CGROUP_PARENT = "uvmshim"
SHARE_MODULES = ["modprobe", "-a", "9pnet_virtio", "9p"]
EXIT_GRACE_S = 2.0
FREEZE_WAIT_S = 10.0  # a pause answers once the cgroup is frozen, or fails (thawed again) after this
TIOCSWINSZ = 0x5414
TIOCSCTTY = 0x540E
EPOLLPRI = 0x002
EPOLLERR = 0x008
MAX_REMEMBERED_EXITS = 1024


def err(code: str, message: str) -> RequestError:
    return RequestError(code, message)


def valid_id(cid: object) -> str:
    if not isinstance(cid, str) or not cid or len(cid) > 64 or cid[0] in ".-_" or not all(
            c.isascii() and (c.isalnum() or c in "_.-") for c in cid):
        raise err(proto.E_INVALID_ID, f"invalid container id {cid!r}")
    return cid


def check_sid(value: object, name: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= 0xFFFFFFFF:
        raise err(proto.E_INVALID, f"{name} must be a stream id (1..2^32-1) or null")
    return value


def check_process(p: object) -> dict[str, Any]:
    """The OCI Process fields the guest uses, checked (the host validated it strictly already)."""
    if not isinstance(p, dict):
        raise err(proto.E_INVALID, "process must be an object")
    args = p.get("args")
    if not isinstance(args, list) or not args or not all(isinstance(a, str) for a in args):
        raise err(proto.E_INVALID, "process.args must be a non-empty list of strings")
    env = p.get("env", [])
    if not isinstance(env, list) or not all(isinstance(e, str) and "=" in e for e in env):
        raise err(proto.E_INVALID, "process.env must be a list of NAME=value strings")
    cwd = p.get("cwd", "/")
    if not isinstance(cwd, str) or not cwd.startswith("/"):
        raise err(proto.E_INVALID, f"process.cwd must be an absolute path, not {cwd!r}")
    return p


def crun_message(log: str) -> str:
    """The last error line of a crun log (text or JSON lines), without crun's decoration."""
    lines = [ln for ln in log.strip().splitlines() if ln.strip()]
    if not lines:
        return ""
    last = lines[-1]
    if last.startswith("{"):
        try:
            msg = wirejson.loads(last).get("msg")
            if isinstance(msg, str):
                return msg
        except (ValueError, AttributeError):
            pass
    return last


def read_file(path: str) -> str:
    with open(path) as f:
        return f.read()


def read_kv(path: str) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in read_file(path).splitlines():
            k, _, v = line.partition(" ")
            if v.strip().lstrip("-").isdigit():
                out[k] = int(v)
    except OSError:
        pass
    return out


def read_int(path: str) -> int | None:
    try:
        v = read_file(path).strip()
    except OSError:
        return None
    return int(v) if v.isdigit() else None


class GuestProcess:
    def __init__(self, rt: Runtime, container: str | None, pid: int) -> None:
        self.rt = rt
        self.container = container
        self.pid = pid
        self.status: int | None = None
        self.exited_at: float | None = None
        self.exit_sent = False
        self.outs: list[OutStream] = []
        self.stdin: InStream | None = None
        self.pty: int | None = None
        self.on_exit: Callable[[GuestProcess], None] | None = None

    def attach_streams(self, stdin_sid: int | None, stdout_sid: int | None, stderr_sid: int | None,
                       fds: dict[str, int], pty: int | None) -> None:
        """Take ownership of the parent's ends (fds: stdin/stdout/stderr) or of the pty master."""
        agent = self.rt.agent
        if pty is not None:
            self.pty = pty
            if stdout_sid is not None:
                out = OutStream(agent, stdout_sid, pty, self.stream_ended, owns_fd=False)
                self.outs.append(out)
                agent.streams[stdout_sid] = out
            if stdin_sid is not None:
                self.stdin = InStream(agent, stdin_sid, pty, owns_fd=False, eof_byte=b"\x04")
                agent.streams[stdin_sid] = self.stdin
            return
        for sid, name in ((stdout_sid, "stdout"), (stderr_sid, "stderr")):
            if sid is not None:
                out = OutStream(agent, sid, fds[name], self.stream_ended, pipe=True)
                self.outs.append(out)
                agent.streams[sid] = out
        if stdin_sid is not None:
            self.stdin = InStream(agent, stdin_sid, fds["stdin"])
            agent.streams[stdin_sid] = self.stdin

    def stream_ended(self) -> None:
        self.maybe_report_exit()

    def exited(self, status: int) -> None:
        self.status = status
        self.exited_at = time.monotonic()
        self.rt.unreported.add(self)
        if self.stdin is not None:
            self.stdin.shut()
        self.maybe_report_exit()

    def maybe_report_exit(self, now: float | None = None) -> None:
        if self.status is None or self.exit_sent:
            return
        pending = [o for o in self.outs if not o.ended]
        # Streams still relaying (the host reads them) end before the exit is reported, so the host
        # has all the output first; a stream the host does not read (no credit left) does not hold
        # the exit back, nor does a pipe that something else keeps open past EXIT_GRACE_S.
        relaying = [o for o in pending if o.credit > 0]
        if relaying and (now is None or self.exited_at is None or now - self.exited_at < EXIT_GRACE_S):
            return
        self.exit_sent = True
        self.rt.unreported.discard(self)
        exit_status, sig = procs.decode_status(self.status)
        self.rt.agent.notify({"event": proto.EVENT_EXIT, "container": self.container, "pid": self.pid,
                              "exit_status": exit_status, "signal": sig, "at": time.time()})
        if self.on_exit is not None:
            self.on_exit(self)
        if not pending:
            self.release()

    def release(self) -> None:
        """Forget the streams and the pty (all output ended, or the owner is deleted)."""
        for out in self.outs:
            out.end()
        if self.stdin is not None:
            self.stdin.shut()
        if self.pty is not None:
            os.close(self.pty)
            self.pty = None
        self.outs = []
        self.stdin = None

    def signal(self, sig: int) -> bool:
        if self.status is not None:
            return False
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            return False
        return True

    def resize(self, width: int, height: int) -> None:
        if self.pty is None:
            raise err(proto.E_INVALID, f"process {self.pid} has no terminal to resize")
        import fcntl
        import struct

        fcntl.ioctl(self.pty, TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))


class Container:
    def __init__(self, cid: str, bundle: str) -> None:
        self.id = cid
        self.bundle = bundle
        self.state = "creating"
        self.init: GuestProcess | None = None
        self.execs: dict[int, GuestProcess] = {}
        self.created_at = time.time()
        self.oom_fd: int | None = None
        self.oom_kills = 0
        self.exec_seq = 0
        self.overlay = False

    @property
    def cgroup(self) -> str:
        return f"{CGROUP_ROOT}/{CGROUP_PARENT}/{self.id}"

    def describe(self) -> dict[str, Any]:
        init = self.init
        d: dict[str, Any] = {"id": self.id, "status": self.state, "pid": init.pid if init else 0,
                             "bundle": self.bundle, "created": self.created_at, "exit_status": None, "signal": None}
        if init is not None and init.status is not None:
            d["exit_status"], d["signal"] = procs.decode_status(init.status)
        return d


# -- disks ---------------------------------------------------------------------------------------

SCSI_DEVICE_WAIT_S = 10.0
FSTYPES = ("ext4", "erofs")


def scsi_hosts() -> list[str]:
    """virtio-scsi host numbers in probe order (the order of the controllers on QEMU's command line)."""
    try:
        hosts = [h for h in os.listdir("/sys/class/scsi_host") if h.startswith("host")]
    except OSError:
        return []
    return [h[4:] for h in sorted(hosts, key=lambda h: int(h[4:]))]


def scsi_block_device(controller: int, lun: int) -> str | None:
    hosts = scsi_hosts()
    if controller >= len(hosts):
        return None
    base = f"/sys/bus/scsi/devices/{hosts[controller]}:0:0:{lun}/block"
    try:
        names = os.listdir(base)
    except OSError:
        return None
    return f"/dev/{names[0]}" if names else None


def check_slot(params: dict[str, Any]) -> tuple[int, int]:
    c, lun = params.get("controller"), params.get("lun")
    if not isinstance(c, int) or isinstance(c, bool) or not 0 <= c < 4:
        raise err(proto.E_INVALID, f"controller {c!r} out of range 0..3")
    if not isinstance(lun, int) or isinstance(lun, bool) or not 0 <= lun < 256:
        raise err(proto.E_INVALID, f"lun {lun!r} out of range 0..255")
    return c, lun


def check_guest_path(path: object) -> str:
    if not isinstance(path, str) or not path.startswith("/") or ".." in path.split("/") or path == "/":
        raise err(proto.E_INVALID, f"mount path {path!r} must be an absolute path below /")
    return path


class DiskMixin:
    """scsi_mount / scsi_unmount / scsi_unplug (one-time waits are bounded and block the loop briefly)."""

    agent: AgentServices
    disk_modules_loaded = False

    def ensure_disk_modules(self) -> None:
        if self.disk_modules_loaded:
            return
        status, out = self.agent.run_blocking(["modprobe", "-a", "crc32c_generic", "virtio_scsi", "sd_mod", "ext4",
                                               "erofs", "overlay"])
        if status != 0:
            raise err(proto.E_INTERNAL, f"loading disk modules: {out.strip()}")
        self.disk_modules_loaded = True

    def scsi_mount(self, req_id: int, params: dict[str, Any]) -> dict[str, Any]:
        controller, lun = check_slot(params)
        path = params.get("path")
        if path is not None:
            path = check_guest_path(path)
        fstype = params.get("fstype", "ext4")
        if fstype not in FSTYPES:
            raise err(proto.E_INVALID, f"filesystem {fstype!r} not supported (one of {', '.join(FSTYPES)})")
        options = params.get("options") or []
        if not isinstance(options, list) or not all(isinstance(o, str) and o and "," not in o for o in options):
            raise err(proto.E_INVALID, "options must be a list of mount options")
        readonly = bool(params.get("readonly", False))
        self.ensure_disk_modules()
        deadline = time.monotonic() + SCSI_DEVICE_WAIT_S
        device = scsi_block_device(controller, lun)
        while device is None or not os.path.exists(device):
            if time.monotonic() > deadline:
                raise err(proto.E_NOT_FOUND, f"no disk appeared at SCSI {controller}:0:0:{lun} "
                                             f"within {SCSI_DEVICE_WAIT_S:.0f}s")
            time.sleep(0.01)
            device = scsi_block_device(controller, lun)
        if path is None:
            return {"device": device, "path": None}
        os.makedirs(path, exist_ok=True)
        opts = [*options, "ro" if readonly else "rw"]
        status, out = self.agent.run_blocking(["mount", "-t", fstype, "-o", ",".join(opts), device, path])
        if status != 0:
            raise err(proto.E_INVALID, f"mount {device} ({fstype}) on {path}: {out.strip()}")
        return {"device": device, "path": path}

    def scsi_unmount(self, req_id: int, params: dict[str, Any]) -> dict[str, Any]:
        path = check_guest_path(params.get("path"))
        status, out = self.agent.run_blocking(["umount", path])
        if status != 0:
            code = proto.E_NOT_FOUND if "not mounted" in out or "Invalid argument" in out else proto.E_INVALID
            raise err(code, f"umount {path}: {out.strip()}")
        return {}

    def scsi_unplug(self, req_id: int, params: dict[str, Any]) -> dict[str, Any]:
        controller, lun = check_slot(params)
        hosts = scsi_hosts()
        if controller >= len(hosts):
            return {}
        try:
            write_file(f"/sys/bus/scsi/devices/{hosts[controller]}:0:0:{lun}/delete", "1")
        except FileNotFoundError:
            pass  # not there (never appeared, or removed already)
        except OSError as e:
            raise err(proto.E_INTERNAL, f"unplug SCSI {controller}:0:0:{lun}: {e}") from None
        return {}


class Runtime(DiskMixin, NetworkMixin):
    def __init__(self, agent: AgentServices) -> None:
        self.agent = agent
        self.containers: dict[str, Container] = {}
        self.processes: dict[tuple[str, int], GuestProcess] = {}  # (container or "", pid)
        self.remembered_exits: dict[int, int] = {}  # pid -> status of pids reaped before we knew them
        self.cgroups_ready = False
        self.mounted_shares: set[str] = set()
        self.share_modules_loaded = False
        self.unreported: set[GuestProcess] = set()  # exited, exit not yet reported (grace timers)
        self.freezing: dict[int, tuple[Container, float]] = {}  # pause request -> (container, deadline)

    # -- reaping --------------------------------------------------------------------------------

    def on_reaped(self, pid: int, status: int) -> bool:
        """A reaped pid: True if it was one of ours."""
        for key in ((c, pid) for c in ["", *self.containers]):
            proc = self.processes.get(key)
            if proc is not None and proc.status is None:
                proc.exited(status)
                return True
        self.remembered_exits[pid] = status
        if len(self.remembered_exits) > MAX_REMEMBERED_EXITS:
            del self.remembered_exits[next(iter(self.remembered_exits))]
        return False

    def adopt(self, container: str | None, pid: int) -> GuestProcess:
        proc = GuestProcess(self, container, pid)
        self.processes[(container or "", pid)] = proc
        return proc

    def after_adopt(self, proc: GuestProcess) -> None:
        """A pid learnt from a pid file may have exited (and been reaped) already."""
        status = self.remembered_exits.pop(proc.pid, None)
        if status is not None:
            proc.exited(status)

    def tick(self, now: float) -> None:
        for proc in list(self.unreported):
            proc.maybe_report_exit(now)
        for req_id in list(self.freezing):
            self.check_frozen(req_id)

    # -- stdio set-up -----------------------------------------------------------------------------

    def stdio_params(self, params: dict[str, Any]) -> tuple[int | None, int | None, int | None, bool]:
        sids = (check_sid(params.get("stdin"), "stdin"), check_sid(params.get("stdout"), "stdout"),
                check_sid(params.get("stderr"), "stderr"))
        terminal = params.get("terminal", False)
        if not isinstance(terminal, bool):
            raise err(proto.E_INVALID, "terminal must be a boolean")
        if terminal and sids[2] is not None:
            raise err(proto.E_INVALID, "a terminal process has no separate stderr")
        used = [s for s in sids if s is not None]
        if len(set(used)) != len(used) or any(s in self.agent.streams for s in used):
            raise err(proto.E_INVALID, "stream ids must be distinct and not in use")
        return sids[0], sids[1], sids[2], terminal

    @staticmethod
    def make_pipes(sids: tuple[int | None, int | None, int | None]) -> tuple[dict[str, int], dict[str, int]]:
        """(child ends, parent ends) for stdin/stdout/stderr; /dev/null where no stream is wanted."""
        child: dict[str, int] = {}
        parent: dict[str, int] = {}
        for name, sid in zip(("stdin", "stdout", "stderr"), sids, strict=True):
            if sid is None:
                child[name] = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
                continue
            r, w = os.pipe2(os.O_CLOEXEC)
            set_pipe_size(r)
            if name == "stdin":
                child[name], parent[name] = r, w
            else:
                child[name], parent[name] = w, r
        return child, parent

    @staticmethod
    def close_all(*fd_maps: dict[str, int]) -> None:
        for m in fd_maps:
            for fd in m.values():
                try:
                    os.close(fd)
                except OSError:
                    pass

    # -- processes in the UVM itself ----------------------------------------------------------------

    def exec_in_uvm(self, req_id: int, params: dict[str, Any]) -> dict[str, Any]:
        spec = check_process(params.get("process"))
        stdin_sid, stdout_sid, stderr_sid, terminal = self.stdio_params(params)
        env = dict(e.split("=", 1) for e in spec.get("env", []))
        env.setdefault("PATH", procs.DEFAULT_PATH)
        pty: int | None = None
        if terminal:  # the slave is the process's stdin/stdout/stderr, the master our end of both
            pty, slave = os.openpty()
            os.set_inheritable(pty, False)
            size = spec.get("consoleSize") or {}
            if size:
                import fcntl
                import struct

                fcntl.ioctl(pty, TIOCSWINSZ, struct.pack("HHHH", int(size.get("height", 24)),
                                                         int(size.get("width", 80)), 0, 0))
            child, parent = {"stdin": slave, "stdout": slave, "stderr": slave}, {"pty": pty}
        else:
            child, parent = self.make_pipes((stdin_sid, stdout_sid, stderr_sid))
        try:
            pid = procs.spawn(spec["args"], env, spec.get("cwd", "/"), child["stdin"], child["stdout"],
                              child["stderr"], ctty=terminal)
        except procs.SpawnError as e:
            self.close_all(parent)
            raise spawn_failed(e.errno, str(e)) from None
        finally:
            self.close_all({"slave": child["stdin"]} if terminal else child)
        proc = self.adopt(None, pid)
        proc.attach_streams(stdin_sid, stdout_sid, None if terminal else stderr_sid, parent, pty)
        proc.on_exit = self.forget_uvm_process
        return {"pid": pid}

    def forget_uvm_process(self, proc: GuestProcess) -> None:
        self.processes.pop(("", proc.pid), None)

    def find_process(self, params: dict[str, Any]) -> GuestProcess | None:
        container = params.get("container")
        pid = params.get("pid")
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            raise err(proto.E_INVALID, "pid must be a positive integer")
        if container is not None:
            c = self.get(container)
            if c.init is not None and c.init.pid == pid:
                return c.init
            return c.execs.get(pid)
        return self.processes.get(("", pid))

    def signal_process(self, req_id: int, params: dict[str, Any]) -> dict[str, Any]:
        sig = params.get("signal")
        if not isinstance(sig, int) or isinstance(sig, bool) or not 1 <= sig <= 64:
            raise err(proto.E_INVALID, f"signal {sig!r} out of range 1..64")
        proc = self.find_process(params)
        if proc is None:
            if params.get("pid") in self.remembered_exits or params.get("container") is None:
                return {"delivered": False}
            raise err(proto.E_NOT_FOUND, f"process {params.get('pid')} does not exist")
        return {"delivered": proc.signal(sig)}

    def resize_console(self, req_id: int, params: dict[str, Any]) -> dict[str, Any]:
        w, h = params.get("width"), params.get("height")
        if not all(isinstance(v, int) and 0 < v < 65536 for v in (w, h)):
            raise err(proto.E_INVALID, "width and height must be 1..65535")
        proc = self.find_process(params)
        if proc is None:
            raise err(proto.E_NOT_FOUND, f"process {params.get('pid')} does not exist")
        if proc.status is not None:
            raise err(proto.E_NOT_RUNNING, f"process {proc.pid} has exited")
        proc.resize(w, h)  # type: ignore[arg-type]
        return {}

    # -- containers -----------------------------------------------------------------------------

    def get(self, cid: object) -> Container:
        c = self.containers.get(valid_id(cid))
        if c is None:
            raise err(proto.E_NOT_FOUND, f"container {cid} does not exist")
        return c

    def ensure_cgroups(self) -> None:
        if self.cgroups_ready:
            return
        try:
            write_file(f"{CGROUP_ROOT}/cgroup.subtree_control", "+cpu +memory +pids +io")
            os.makedirs(f"{CGROUP_ROOT}/{CGROUP_PARENT}", exist_ok=True)
            write_file(f"{CGROUP_ROOT}/{CGROUP_PARENT}/cgroup.subtree_control", "+cpu +memory +pids +io")
        except OSError as e:
            raise err(proto.E_INTERNAL, f"cgroup set-up: {e}") from None
        self.cgroups_ready = True

    def prepare_template(self, req_id: int, params: dict[str, Any]) -> dict[str, Any]:
        """Do now what every container's first request would: cgroups, kernel modules, crun paged in.

        Nothing container-specific: a VM saved after this is a template every clone can start from."""
        if self.containers or self.processes:
            raise err(proto.E_INVALID, "prepare_template: the VM already runs containers or processes")
        self.ensure_cgroups()
        self.ensure_disk_modules()
        self.ensure_net_modules()
        for argv in (SHARE_MODULES, ["crun", "--version"]):
            status, out = self.agent.run_blocking(argv)
            if status != 0:
                raise err(proto.E_INTERNAL, f"prepare_template: {' '.join(argv)}: {out.strip()}")
        self.share_modules_loaded = True
        # Modules a clone's first requests import (resume_clone, create, tty consoles): loaded here,
        # once, they are in every clone's memory already.
        import _socket  # noqa: F401
        import binascii  # noqa: F401
        import fcntl  # noqa: F401
        import struct  # noqa: F401
        return {}

    def create_container(self, req_id: int, params: dict[str, Any]) -> None:
        cid = valid_id(params.get("id"))
        if cid in self.containers:
            raise err(proto.E_ALREADY_EXISTS, f"container {cid} already exists")
        spec = params.get("spec")
        if not isinstance(spec, dict):
            raise err(proto.E_INVALID, "spec must be an OCI runtime spec object")
        process = check_process(spec.get("process"))
        rootfs = params.get("rootfs")
        if not isinstance(rootfs, dict):
            raise err(proto.E_INVALID, "rootfs must be {share, path}, {path} or {layers, scratch}")
        sids = self.stdio_params(params)
        if sids[3] != bool(process.get("terminal", False)):
            raise err(proto.E_INVALID, "terminal must match spec.process.terminal")
        layered = "layers" in rootfs
        if layered:
            self.check_layers(rootfs)  # mounted below, once the bundle exists
        else:
            root_path = self.rootfs_path(rootfs)
        spec = dict(spec)
        self.mount_sources(spec, params.get("mount_sources"))
        self.ensure_cgroups()
        bundle = f"{CONTAINERS_DIR}/{cid}"
        procs.remove_tree(bundle)
        os.makedirs(bundle, mode=0o700)
        if layered:
            root_path = self.mount_overlay(cid, rootfs, f"{bundle}/rootfs")
        c = Container(cid, bundle)
        c.overlay = layered
        self.containers[cid] = c
        spec["root"] = {"path": root_path, "readonly": bool((spec.get("root") or {}).get("readonly", False))}
        linux = dict(spec.get("linux") or {})
        linux["cgroupsPath"] = f"/{CGROUP_PARENT}/{cid}"
        spec["linux"] = linux
        write_file(f"{bundle}/config.json", wirejson.dumps(spec).decode())

        def created(ok: bool, message: str, pid: int | None, pty: int | None, parent: dict[str, int]) -> None:
            if not ok or pid is None:
                self.close_all(parent)
                self.discard(c)
                self.agent.reply_error(req_id, proto.E_INVALID, f"create container {cid}: {message}")
                return
            c.state = proto.CREATED
            c.init = self.adopt(cid, pid)
            c.init.attach_streams(sids[0], sids[1], sids[2], parent, pty)
            c.init.on_exit = lambda p: self.init_exited(c)
            self.watch_oom(c)
            self.agent.reply(req_id, {"pid": pid})  # before any exit notification of this pid
            self.after_adopt(c.init)

        self.crun_with_stdio(["create", "--bundle", bundle, "--pid-file", f"{bundle}/init.pid"], cid, bundle,
                             "init", sids, created)

    def rootfs_path(self, rootfs: dict[str, Any]) -> str:
        path = rootfs.get("path")
        if not isinstance(path, str):
            raise err(proto.E_INVALID, "rootfs.path must be a string")
        share = rootfs.get("share")
        if share is None:
            if not path.startswith("/") or not os.path.isdir(path):
                raise err(proto.E_INVALID, f"rootfs {path!r} is not a directory in the UVM")
            return path
        full = self.share_path(share, path, "rootfs.path")
        if not os.path.isdir(full):
            raise err(proto.E_INVALID, f"rootfs {path!r} is not a directory in share {share}")
        return full

    def share_path(self, share: Any, path: Any, what: str) -> str:
        """Where path inside the 9p share tag is in the UVM (the share mounted on first use)."""
        if not isinstance(share, str) or not share or "/" in share or share in (".", ".."):
            raise err(proto.E_INVALID, f"invalid share tag {share!r}")
        if not isinstance(path, str) or path.startswith("/") or ".." in path.split("/"):
            raise err(proto.E_INVALID, f"{what} {path!r} must be a relative path inside the share")
        mnt = f"{SHARES_DIR}/{share}"
        if share not in self.mounted_shares:
            self.mount_share(share, mnt)
        return f"{mnt}/{path}" if path else mnt

    def mount_sources(self, spec: dict[str, Any], sources: Any) -> None:
        """Point the spec mounts named in sources ([{index, share, path}]) at their paths in the shares."""
        if sources is None:
            return
        mounts = spec.get("mounts")
        if not isinstance(sources, list) or not isinstance(mounts, list):
            raise err(proto.E_INVALID, "mount_sources must be a list, with spec.mounts a list")
        rewritten = list(mounts)
        for entry in sources:
            index = entry.get("index") if isinstance(entry, dict) else None
            if type(index) is not int or not 0 <= index < len(mounts) or not isinstance(mounts[index], dict):
                raise err(proto.E_INVALID, f"mount_sources: {entry!r} names no spec mount")
            full = self.share_path(entry.get("share"), entry.get("path"), "mount_sources path")
            if not os.path.lexists(full):
                raise err(proto.E_INVALID, f"mount {mounts[index].get('destination')}: {full} is missing in the UVM")
            rewritten[index] = {**mounts[index], "source": full}
        spec["mounts"] = rewritten

    def check_layers(self, rootfs: dict[str, Any]) -> None:
        layers, scratch = rootfs.get("layers"), rootfs.get("scratch")
        if not isinstance(layers, list) or not layers or not all(isinstance(x, str) for x in layers):
            raise err(proto.E_INVALID, "rootfs.layers must be a non-empty list of paths in the UVM")
        for p in [*layers, scratch]:
            check_guest_path(p)
            if not os.path.isdir(p):
                raise err(proto.E_INVALID, f"rootfs layer/scratch {p} is not a directory in the UVM")

    def mount_overlay(self, cid: str, rootfs: dict[str, Any], target: str) -> str:
        """Read-only layers (top-most first) + upper/work in the scratch under <scratch>/<cid>/."""
        self.ensure_disk_modules()
        upper, work = f"{rootfs['scratch']}/{cid}/upper", f"{rootfs['scratch']}/{cid}/work"
        for d in (upper, work, target):
            os.makedirs(d, exist_ok=True)
        opts = f"lowerdir={':'.join(rootfs['layers'])},upperdir={upper},workdir={work}"
        status, out = self.agent.run_blocking(["mount", "-t", "overlay", "-o", opts, "overlay", target])
        if status != 0:
            procs.remove_tree(target.rsplit("/", 1)[0])
            raise err(proto.E_INVALID, f"overlay rootfs for {cid}: {out.strip()}")
        return target

    def mount_share(self, tag: str, mnt: str) -> None:
        """Mount the 9p share tag (loading 9p on first use). Blocking: shares are mounted once."""
        os.makedirs(mnt, exist_ok=True)
        steps = [] if self.share_modules_loaded else [SHARE_MODULES]
        steps.append(["mount", "-t", "9p", "-o", "trans=virtio,version=9p2000.L,msize=262144,cache=none", tag, mnt])
        for argv in steps:
            status, out = self.agent.run_blocking(argv)
            if status != 0:
                raise err(proto.E_INVALID, f"share {tag}: {' '.join(argv[:1])} failed: {out.strip()}")
        self.mounted_shares.add(tag)
        self.share_modules_loaded = True

    def crun_with_stdio(self, args: list[str], cid: str, bundle: str, tag: str,
                        sids: tuple[int | None, int | None, int | None, bool],
                        done: Callable[[bool, str, int | None, int | None, dict[str, int]], None]) -> None:
        """Run crun (create / exec --detach) with the process's stdio, then read its pid (and pty)."""
        terminal = sids[3]
        pid_file = args[args.index("--pid-file") + 1]
        console = None
        # crun's stdio is the process's: its own errors go to a log file instead.
        log_file = f"{bundle}/crun-{tag}.log"
        argv = ["crun", f"--log=file:{log_file}", *args]
        if terminal:
            console = ConsoleSocket(f"{bundle}/{tag}.console")
            argv[3:3] = ["--console-socket", console.path]
            child: dict[str, int] = {k: os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC) for k in ("stdin", "stdout", "stderr")}
            parent: dict[str, int] = {}
        else:
            child, parent = self.make_pipes(sids[:3])
        argv.append(cid)

        def finished(status: int, output: str) -> None:
            self.close_all(child)
            pty = console.receive() if console is not None else None
            if console is not None:
                console.close()
            if status != 0:
                if pty is not None:
                    os.close(pty)
                try:
                    output = read_file(log_file)[-2000:]
                except OSError:
                    pass
                done(False, crun_message(output) or f"crun exited {status}", None, None, parent)
                return
            try:
                pid = int(read_file(pid_file).strip())
            except (OSError, ValueError) as e:
                done(False, f"no pid file: {e}", None, pty, parent)
                return
            if terminal and pty is None:
                done(False, "crun sent no terminal", None, None, parent)
                return
            done(True, "", pid, pty, parent)

        try:
            self.agent.run_helper(argv, finished, stdio=(child["stdin"], child["stdout"], child["stderr"]))
        except Exception:
            self.close_all(child, parent)
            if console is not None:
                console.close()
            raise

    def init_exited(self, c: Container) -> None:
        c.state = proto.STOPPED
        if c.oom_fd is not None:
            self.check_oom(c)

    def start_container(self, req_id: int, params: dict[str, Any]) -> None:
        c = self.get(params.get("id"))
        if c.state != proto.CREATED:
            code = proto.E_NOT_STOPPED if c.state in (proto.RUNNING, proto.PAUSED) else proto.E_NOT_RUNNING
            raise err(code, f"container {c.id} is {c.state}, not created")
        c.state = "starting"

        def started(status: int, output: str) -> None:
            if status != 0:
                c.state = proto.CREATED if c.init and c.init.status is None else proto.STOPPED
                self.agent.reply_error(req_id, proto.E_INVALID, f"start container {c.id}: {output.strip()}")
                return
            if c.state == "starting":
                c.state = proto.RUNNING
            self.agent.reply(req_id, {"pid": c.init.pid if c.init else 0})

        self.agent.run_helper(["crun", "start", c.id], started)

    def exec_in_container(self, req_id: int, params: dict[str, Any]) -> None:
        c = self.get(params.get("container"))
        if c.state not in (proto.RUNNING, proto.PAUSED):
            raise err(proto.E_NOT_RUNNING, f"container {c.id} is {c.state}: cannot exec")
        process = check_process(params.get("process"))
        sids = self.stdio_params(params)
        if sids[3] != bool(process.get("terminal", False)):
            process = {**process, "terminal": sids[3]}
        c.exec_seq += 1
        tag = f"exec{c.exec_seq}"
        pfile = f"{c.bundle}/{tag}.json"
        write_file(pfile, wirejson.dumps(process).decode())

        def execd(ok: bool, message: str, pid: int | None, pty: int | None, parent: dict[str, int]) -> None:
            if not ok or pid is None:
                self.close_all(parent)
                code = proto.E_NOT_FOUND if "No such file" in message or "executable file not found" in message \
                    else proto.E_INVALID
                self.agent.reply_error(req_id, code, f"exec in container {c.id}: {message}")
                return
            proc = self.adopt(c.id, pid)
            c.execs[pid] = proc
            proc.attach_streams(sids[0], sids[1], sids[2], parent, pty)
            self.agent.reply(req_id, {"pid": pid})  # before any exit notification of this pid
            self.after_adopt(proc)

        self.crun_with_stdio(["exec", "--detach", "--pid-file", f"{c.bundle}/{tag}.pid", "--process", pfile],
                             c.id, c.bundle, tag, sids, execd)

    def kill_container(self, req_id: int, params: dict[str, Any]) -> dict[str, Any]:
        c = self.get(params.get("id"))
        sig = params.get("signal")
        if not isinstance(sig, int) or isinstance(sig, bool) or not 1 <= sig <= 64:
            raise err(proto.E_INVALID, f"signal {sig!r} out of range 1..64")
        if c.state in (proto.STOPPED, "creating") or c.init is None:
            raise err(proto.E_NOT_RUNNING, f"container {c.id} is {c.state}")
        if params.get("all"):
            if sig == signal.SIGKILL:
                try:
                    write_file(f"{c.cgroup}/cgroup.kill", "1")
                    return {}
                except OSError:
                    pass
            for pid in self.cgroup_pids(c):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            return {}
        c.init.signal(sig)
        return {}

    def cgroup_pids(self, c: Container) -> list[int]:
        try:
            return [int(x) for x in read_file(f"{c.cgroup}/cgroup.procs").split()]
        except (OSError, ValueError):
            return []

    def pause_container(self, req_id: int, params: dict[str, Any]) -> None:
        self._freeze(req_id, params, pause=True)

    def resume_container(self, req_id: int, params: dict[str, Any]) -> None:
        self._freeze(req_id, params, pause=False)

    def _freeze(self, req_id: int, params: dict[str, Any], pause: bool) -> None:
        c = self.get(params.get("id"))
        want_from, to, verb = (proto.RUNNING, proto.PAUSED, "pause") if pause else (proto.PAUSED, proto.RUNNING, "resume")
        if c.state != want_from:
            raise err(proto.E_NOT_RUNNING, f"container {c.id} is {c.state}: cannot {verb}")

        def done(status: int, output: str) -> None:
            if status != 0:
                self.agent.reply_error(req_id, proto.E_INTERNAL, f"{verb} container {c.id}: {output.strip()}")
                return
            if c.state == want_from:
                c.state = to
            if pause:
                # crun writes cgroup.freeze and returns; a task busy in the kernel (a 9p call, say) is
                # frozen only when it leaves it. Paused means frozen: answer once cgroup.events says so.
                self.freezing[req_id] = (c, time.monotonic() + FREEZE_WAIT_S)
                self.check_frozen(req_id)
            else:
                self.agent.reply(req_id, {})

        self.agent.run_helper(["crun", verb, c.id], done)

    def check_frozen(self, req_id: int) -> None:
        """Answer a pause whose cgroup is frozen now; past its deadline, thaw it and answer an error."""
        c, deadline = self.freezing[req_id]
        if read_kv(f"{c.cgroup}/cgroup.events").get("frozen", 1) == 1:  # no such file: the cgroup is gone
            del self.freezing[req_id]
            self.agent.reply(req_id, {})
        elif time.monotonic() > deadline:
            del self.freezing[req_id]
            try:
                write_file(f"{c.cgroup}/cgroup.freeze", "0")
            except OSError:
                pass
            if c.state == proto.PAUSED:
                c.state = proto.RUNNING
            self.agent.reply_error(req_id, proto.E_INTERNAL,
                                   f"pause container {c.id}: not frozen after {FREEZE_WAIT_S:g}s (thawed again)")

    def container_state(self, req_id: int, params: dict[str, Any]) -> dict[str, Any]:
        return self.get(params.get("id")).describe()

    def list_containers(self, req_id: int, params: dict[str, Any]) -> dict[str, Any]:
        return {"containers": [c.describe() for c in self.containers.values() if c.state != "creating"]}

    def container_processes(self, req_id: int, params: dict[str, Any]) -> dict[str, Any]:
        c = self.get(params.get("id"))
        return {"pids": self.cgroup_pids(c) if c.state != proto.STOPPED else []}

    def update_container(self, req_id: int, params: dict[str, Any]) -> None:
        c = self.get(params.get("id"))
        res = params.get("resources")
        if not isinstance(res, dict):
            raise err(proto.E_INVALID, "resources must be an OCI LinuxResources object")
        if c.state not in (proto.RUNNING, proto.PAUSED, proto.CREATED):
            raise err(proto.E_NOT_RUNNING, f"container {c.id} is {c.state}")
        c.exec_seq += 1
        rfile = f"{c.bundle}/resources{c.exec_seq}.json"
        write_file(rfile, wirejson.dumps(res).decode())

        def done(status: int, output: str) -> None:
            if status != 0:
                self.agent.reply_error(req_id, proto.E_INVALID, f"update container {c.id}: {output.strip()}")
            else:
                self.agent.reply(req_id, {})

        self.agent.run_helper(["crun", "update", "--resources", rfile, c.id], done)

    def container_stats(self, req_id: int, params: dict[str, Any]) -> dict[str, Any]:
        c = self.get(params.get("id"))
        cg = c.cgroup
        cpu = read_kv(f"{cg}/cpu.stat")
        mem = read_kv(f"{cg}/memory.stat")
        events = read_kv(f"{cg}/memory.events")
        io: dict[str, int] = {"rbytes": 0, "wbytes": 0, "rios": 0, "wios": 0}
        try:
            for line in read_file(f"{cg}/io.stat").splitlines():
                for field in line.split()[1:]:
                    k, _, v = field.partition("=")
                    if k in io and v.isdigit():
                        io[k] += int(v)
        except OSError:
            pass
        return {
            "cpu_usage_usec": cpu.get("usage_usec", 0), "cpu_user_usec": cpu.get("user_usec", 0),
            "cpu_system_usec": cpu.get("system_usec", 0),
            "memory_usage": read_int(f"{cg}/memory.current") or 0,
            "memory_limit": read_int(f"{cg}/memory.max"),
            "memory_anon": mem.get("anon", 0), "memory_file": mem.get("file", 0),
            "oom_events": events.get("oom", 0), "oom_kills": events.get("oom_kill", 0),
            "pids_current": read_int(f"{cg}/pids.current") or 0, "pids_limit": read_int(f"{cg}/pids.max"),
            **{f"io_{k}": v for k, v in io.items()},
        }

    def delete_container(self, req_id: int, params: dict[str, Any]) -> None:
        c = self.get(params.get("id"))
        if c.state in (proto.RUNNING, proto.PAUSED, "starting"):
            raise err(proto.E_STILL_RUNNING, f"container {c.id} is {c.state}: stop it first")
        if c.state == "creating":
            raise err(proto.E_NOT_STOPPED, f"container {c.id} is still being created")

        def deleted(status: int, output: str) -> None:
            self.discard(c)
            if status != 0 and "does not exist" not in output:
                self.agent.log(f"crun delete {c.id}: {output.strip()}")
            self.agent.reply(req_id, {})

        self.agent.run_helper(["crun", "delete", "--force", c.id], deleted)

    def discard(self, c: Container) -> None:
        """Forget a container: its streams, processes, OOM watch and bundle."""
        for proc in [c.init, *c.execs.values()]:
            if proc is not None:
                proc.release()
                self.processes.pop((c.id, proc.pid), None)
        if c.oom_fd is not None:
            self.agent.poller.unregister(c.oom_fd)
            os.close(c.oom_fd)
            c.oom_fd = None
        self.containers.pop(c.id, None)
        if c.overlay:
            # Files are never removed through a still-mounted overlay (remove_tree does not enter a
            # mount point): that would delete them from the scratch.
            status, out = self.agent.run_blocking(["umount", f"{c.bundle}/rootfs"])
            if status != 0:
                self.agent.log(f"container {c.id}: umount rootfs: {out.strip()}; detaching it lazily")
                self.agent.run_blocking(["umount", "-l", f"{c.bundle}/rootfs"])
        if not procs.remove_tree(c.bundle):
            self.agent.log(f"container {c.id}: bundle {c.bundle} left in place")
        try:
            os.rmdir(c.cgroup)
        except OSError:
            pass

    # -- OOM ------------------------------------------------------------------------------------

    def watch_oom(self, c: Container) -> None:
        try:
            fd = os.open(f"{c.cgroup}/memory.events", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            self.agent.log(f"container {c.id}: no memory.events ({e}): OOM kills will not be reported")
            return
        c.oom_fd = fd
        c.oom_kills = self.read_oom_kills(fd)
        self.agent.poller.register(fd, EPOLLPRI | EPOLLERR, lambda _fd, _mask: self.check_oom(c))

    @staticmethod
    def read_oom_kills(fd: int) -> int:
        os.lseek(fd, 0, os.SEEK_SET)
        for line in os.read(fd, 4096).decode().splitlines():
            k, _, v = line.partition(" ")
            if k == "oom_kill":
                return int(v)
        return 0

    def check_oom(self, c: Container) -> None:
        if c.oom_fd is None:
            return
        kills = self.read_oom_kills(c.oom_fd)
        if kills > c.oom_kills:
            c.oom_kills = kills
            self.agent.notify({"event": proto.EVENT_OOM, "container": c.id, "oom_kills": kills, "at": time.time()})


class ConsoleSocket:
    """The --console-socket crun sends a container's pty master on (SCM_RIGHTS)."""

    def __init__(self, path: str) -> None:
        import _socket

        self.path = path
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self.sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(1)
        self.sock.setblocking(False)

    def receive(self) -> int | None:
        """The pty master fd crun sent (crun has exited, so it is queued), or None."""
        import _socket

        try:
            fd, _ = self.sock._accept()  # type: ignore[attr-defined]
        except (BlockingIOError, OSError):
            return None
        conn = _socket.socket(fileno=fd)
        try:
            conn.settimeout(1.0)
            _, ancdata, _, _ = conn.recvmsg(4096, _socket.CMSG_LEN(4 * 4))
        except OSError:
            return None
        finally:
            conn.close()
        fds: list[int] = []
        for level, kind, data in ancdata:
            if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
                fds += [int.from_bytes(data[i:i + 4], "little") for i in range(0, len(data) - len(data) % 4, 4)]
        for extra in fds[1:]:
            os.close(extra)
        if fds:
            os.set_inheritable(fds[0], False)
            return fds[0]
        return None

    def close(self) -> None:
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass
