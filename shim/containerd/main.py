"""`containerd-shim-uvm-v1`: the containerd runtime v2 shim for io.containerd.uvm.v1.

containerd runs it three ways (shared/reference/containerd-shim-v2.md):
* `start`: bind the task service's socket, spawn the serving daemon (detached, stdio on /dev/null,
  the listening socket inherited), write the bundle's `address` file, print ONLY the address.
* serve (`... serve`, our own daemon): the ttrpc task service until Shutdown; logs go to the
  bundle's `log` FIFO, which containerd copies into its own log. runuvm's `create` may also give
  it -log FILE (the daemon's log), -vm-log FILE (its UVM's log records) and -vm-console FILE (the
  UVM's serial console).
* `delete`: after every disconnect; kills whatever VM a dead shim left, unmounts the rootfs, and
  prints a serialized DeleteResponse. Idempotent.

`start` and `delete` import only what they need: containerd waits on them for every container.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

USAGE = """usage: containerd-shim-uvm-v1 -namespace NS -address SOCK -publish-binary BIN -id ID [-bundle DIR] [-debug] ACTION

ACTION: start | delete

containerd runtime v2 shim for io.containerd.uvm.v1: runs each container in its own utility VM.
containerd runs it; see README.md for the containerd configuration that registers the runtime.
"""
SOCKET_DIR = Path("/run/containerd/s")
VALUE_FLAGS = ("namespace", "address", "publish-binary", "id", "bundle", "socket-fd", "config",
               "log", "vm-log", "vm-console")  # the last three: serve only (runuvm create)
BOOL_FLAGS = ("debug", "v", "version")
GO_TRUE = ("1", "t", "T", "TRUE", "true", "True")  # strconv.ParseBool, as Go's flag package
GO_FALSE = ("0", "f", "F", "FALSE", "false", "False")


class UsageError(Exception):
    pass


@dataclass
class Flags:
    namespace: str = ""
    address: str = ""
    publish_binary: str = ""
    id: str = ""
    bundle: str = ""
    socket_fd: str = ""
    config: str = ""
    log: str = ""
    vm_log: str = ""
    vm_console: str = ""
    debug: bool = False
    version: bool = False
    action: str = ""


def parse_flags(argv: list[str]) -> Flags:
    """Go's flag syntax, as containerd uses it: -name value, -name=value, --name, then the action."""
    flags = Flags()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("-") or arg in ("-", "--"):
            if arg == "--":
                i += 1
            rest = argv[i:]
            if len(rest) != 1:
                raise UsageError(f"expected one action (start, delete), got {rest or 'none'}")
            flags.action = rest[0]
            return flags
        name, eq, value = arg.lstrip("-").partition("=")
        if name in BOOL_FLAGS:
            if eq and value not in GO_TRUE + GO_FALSE:
                raise UsageError(f"invalid boolean value {value!r} for -{name}")
            setattr(flags, "version" if name == "v" else name, value in GO_TRUE if eq else True)
        elif name in VALUE_FLAGS:
            if not eq:
                i += 1
                if i == len(argv):
                    raise UsageError(f"flag -{name} needs a value")
                value = argv[i]
            setattr(flags, name.replace("-", "_"), value)
        else:
            raise UsageError(f"unknown flag -{name}")
        i += 1
    if flags.version:
        return flags
    raise UsageError("missing action (start, delete)")


def socket_path(flags: Flags, group: str | None = None) -> Path:
    """As runc's shim: a short path (unix sockets: 108 bytes) unique per containerd, namespace and group (the
    pod's sandbox id for a pod's tasks: shim/containerd/pod.py's group_of; else the task's own id)."""
    key = f"{flags.address}/{flags.namespace}/{group or flags.id}"  # no '/' in namespaces and ids
    return SOCKET_DIR / f"uvm-{hashlib.sha256(key.encode()).hexdigest()[:40]}.sock"


def bundle_group(task_id: str, bundle: Path | None = None) -> str:
    """The task's group from its bundle's config.json annotations (the task's own id when it has none)."""
    from shim.containerd.pod import group_of

    try:
        spec = json.loads(((bundle or Path.cwd()) / "config.json").read_text())
    except (OSError, ValueError):
        return task_id
    annotations = spec.get("annotations") if isinstance(spec, dict) else None
    return group_of(annotations if isinstance(annotations, dict) else None, task_id)


def _runtime_config_path(data: bytes) -> str | None:
    """ConfigPath from the runtime options containerd writes on our stdin (a serialized Any)."""
    if not data:
        return None
    from google.protobuf import any_pb2
    from google.protobuf.message import DecodeError

    from schemas.containerd.runtime_options import config_path

    try:
        return config_path(any_pb2.Any.FromString(data))
    except DecodeError:
        raise UsageError("the runtime options on stdin do not decode") from None


def _socket_alive(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def spawn_server(sock_path: Path, flags: Flags, config: str | None, cwd: Path | None = None) -> int:
    """Bind the task service's socket and spawn the serving daemon on it (detached: own session,
    stdio on /dev/null, cwd: its state directory); the daemon's pid. The socket is gone again if this fails."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(sock_path))
        os.chmod(sock_path, 0o600)  # root's alone, as runc's shim makes its own since CVE-2020-15257
        listener.listen(64)
        argv = [sys.executable, "-m", "shim.containerd.main", "-namespace", flags.namespace, "-address", flags.address,
                "-publish-binary", flags.publish_binary, "-id", flags.id, "-socket-fd", str(listener.fileno())]
        argv += ["-debug"] * flags.debug + (["-config", config] if config else [])
        for flag, value in (("-log", flags.log), ("-vm-log", flags.vm_log), ("-vm-console", flags.vm_console)):
            argv += [flag, value] if value else []
        argv.append("serve")
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                pass_fds=(listener.fileno(),), start_new_session=True, cwd=cwd)
        return proc.pid
    except BaseException:
        with contextlib.suppress(OSError):
            sock_path.unlink()
        raise
    finally:
        listener.close()


def action_start(flags: Flags) -> int:
    stdin = b"" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.buffer.read()
    explicit = _runtime_config_path(stdin)
    if explicit or os.environ.get("UVMSHIM_CONFIG") or Path("/etc/uvmshim/config.toml").exists():
        # Validate now, so a bad file fails `ctr run` with its message (pydantic only costs this path).
        from schemas.shim_options import OptionsError, find_config, load_options

        try:
            path = find_config(explicit)
            load_options(path)
        except OptionsError as e:
            print(f"containerd-shim-uvm-v1: {e}", file=sys.stderr)
            return 1
        explicit = str(path) if path else None
    sock_path = socket_path(flags, bundle_group(flags.id))
    address = f"unix://{sock_path}"
    SOCKET_DIR.mkdir(parents=True, exist_ok=True, mode=0o711)
    if sock_path.exists():
        if _socket_alive(sock_path):  # the shim of this task's pod (its sandbox's) serves: this task joins it
            Path("address").write_text(address)
            print(address, end="")
            return 0
        sock_path.unlink()
    spawn_server(sock_path, flags, explicit)
    Path("address").write_text(address)
    print(address, end="")
    return 0


def action_delete(flags: Flags) -> int:
    """Clean up after the task (a dead shim's VM included) and report it as killed."""
    from google.protobuf import timestamp_pb2

    from schemas.containerd import shim_pb2
    from shim.containerd import leftovers

    bundle = Path(flags.bundle or os.getcwd())
    for what in leftovers.clean(bundle):
        print(f"containerd-shim-uvm-v1 delete {flags.id}: {what}", file=sys.stderr)
    sock_path = socket_path(flags, bundle_group(flags.id, bundle))
    if sock_path.exists() and not _socket_alive(sock_path):
        sock_path.unlink()
    exited_at = timestamp_pb2.Timestamp()
    exited_at.FromNanoseconds(time.time_ns())
    resp = shim_pb2.DeleteResponse(pid=0, exit_status=128 + signal.SIGKILL, exited_at=exited_at)
    sys.stdout.buffer.write(resp.SerializeToString())
    sys.stdout.flush()
    return 0


VM_LOGGERS = ("uvm", "qemu.qmp")  # the UVM's own records: lifecycle, backend, agent link, the guest's log


def _setup_logging(flags: Flags) -> None:
    """The daemon's log: -log FILE (appended to), else the bundle's `log` FIFO (containerd reads it into
    its own log), else nowhere. -vm-log FILE gets the UVM's records as well."""
    if flags.log:
        stream = open(flags.log, "a", buffering=1)
    else:
        try:
            fd = os.open("log", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            os.set_blocking(fd, True)
            stream = os.fdopen(fd, "w", buffering=1)
        except OSError as e:
            if e.errno not in (errno.ENXIO, errno.ENOENT):
                raise
            stream = open(os.devnull, "w")
    formatter = logging.Formatter("uvmshim %(asctime)s %(levelname)s %(name)s: %(message)s")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if flags.debug else logging.INFO)
    if flags.vm_log:
        vm_handler = logging.FileHandler(flags.vm_log)
        vm_handler.setFormatter(formatter)
        for name in VM_LOGGERS:
            logging.getLogger(name).addHandler(vm_handler)
    # Whatever the daemon prints by accident must not reach a closed pipe.
    sys.stderr = stream


def _dump_tasks() -> None:
    import asyncio
    import io

    out = io.StringIO()
    for task in asyncio.all_tasks():
        task.print_stack(limit=8, file=out)
    logging.getLogger("uvmshim.main").warning("SIGUSR1: asyncio tasks\n%s", out.getvalue())


async def serve(flags: Flags) -> None:
    import asyncio

    from shim.containerd.events import Publisher
    from shim.containerd.service import TaskService
    from shim.containerd.ttrpc import Server

    log = logging.getLogger("uvmshim.main")
    events_address = os.environ.get("TTRPC_ADDRESS") or (f"{flags.address}.ttrpc" if flags.address else "")
    publisher = Publisher(events_address, flags.namespace)
    service = TaskService(flags.namespace, flags.id, publisher, config_path=flags.config or None,
                          state_dir=Path.cwd(), console_log=Path(flags.vm_console) if flags.vm_console else None)
    server = Server()
    service.register(server)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.shutdown_requested.set)
    loop.add_signal_handler(signal.SIGUSR1, _dump_tasks)  # `kill -USR1`: what is every task waiting on
    listener = socket.socket(fileno=int(flags.socket_fd))
    sock_name = listener.getsockname()
    await server.serve_socket(listener)
    log.info("serving task %s/%s on %s", flags.namespace, flags.id, sock_name)
    try:
        await service.shutdown_requested.wait()
        await asyncio.sleep(0)  # let the Shutdown reply be written
    finally:
        await service.close()
        await server.close()
        with contextlib.suppress(OSError):
            os.unlink(sock_name)
    log.info("shim for task %s/%s exits", flags.namespace, flags.id)


def action_serve(flags: Flags) -> int:
    import asyncio

    if not flags.socket_fd:
        raise UsageError("serve is started by `start` with -socket-fd")
    _setup_logging(flags)
    asyncio.run(serve(flags))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    try:
        flags = parse_flags(args)
        if flags.version:
            print("containerd-shim-uvm-v1 (uvmshim) 0.1.0")
            return 0
        actions = {"start": action_start, "delete": action_delete, "serve": action_serve}
        if flags.action not in actions:
            raise UsageError(f"unknown action {flags.action!r} (start, delete)")
        if flags.action != "serve" and not (flags.namespace and flags.id):
            raise UsageError("-namespace and -id are required")
        return actions[flags.action](flags)
    except UsageError as e:
        print(f"containerd-shim-uvm-v1: {e}", file=sys.stderr)
        print(USAGE, end="", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
