"""`runuvm`'s container commands (runc's verbs), as a client of the same task service containerd uses.

`create` spawns a shim daemon (shim.containerd.main serve) whose socket and files live in --root/<id>, and sends
it Create; every other command connects to that socket and sends one task-service call, so runuvm
and containerd exercise one code path. --root/<id>/runuvm.json keeps what `state`/`list` report
that the task service does not know (bundle, creation time). `run` and foreground `exec` relay the
caller's stdio through FIFOs in --root/<id>, exactly as containerd's client does. A detached process
with a terminal goes, as runc gives it, to the caller's --console-socket: the master of a host pty
whose slave is the process's stdio in the daemon (raw: the terminal in the UVM does the line
discipline); its size follows `resize-tty`.

Each command raises RunuvmError (a one-line message) for bad input; shim/runuvm/cli.py prints it and exits 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import json
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import sys
import tempfile
import time
import tty
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from google.protobuf import any_pb2, empty_pb2

from schemas.containerd import diag_pb2, runc_options_pb2, types_task_pb2
from schemas.containerd import shim_pb2 as pb
from shim.containerd.leftovers import process_cmdlines
from shim.containerd.main import Flags, spawn_server
from shim.containerd.stdio import fd_ready, read_some, write_all
from shim.containerd.ttrpc import Client, TtrpcError

T = TypeVar("T")

SERVICE = "containerd.task.v2.Task"
DIAG = "uvmshim.diag.v1.Diag"
CONTAINERD_SOCKETS = Path("/run/containerd/s")
NAMESPACE = "runuvm"
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
STATE = "runuvm.json"
SOCKET = "shim.sock"
CREATE_TIMEOUT_S = 600.0
CALL_TIMEOUT_S = 120.0
STATE_TIMEOUT_S = 10.0  # delete's look at the container: a shim that takes longer is not answering
FORCE_WAIT_S = 30.0  # delete --force: how long the SIGKILLed container may take to be reported exited
PROCESS_SPEC_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"
RESOURCES_URL = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"


class RunuvmError(Exception):
    """A command failed; the message names what and why, in one line."""


def default_root() -> Path:
    return Path("/run/uvmshim/runuvm") if os.geteuid() == 0 else Path(os.environ.get("XDG_RUNTIME_DIR", "/tmp")) / "runuvm"


def check_id(cid: str) -> str:
    if not ID_RE.fullmatch(cid) or ".." in cid:
        raise RunuvmError(f"invalid container id {cid!r}: use 1-64 of [A-Za-z0-9_.-], starting with a letter or digit")
    return cid


def parse_signal(text: str) -> int:
    """TERM, SIGTERM or 15."""
    if text.isdigit():
        num = int(text)
    else:
        name = text.upper() if text.upper().startswith("SIG") else f"SIG{text.upper()}"
        try:
            num = int(signal.Signals[name])
        except KeyError:
            raise RunuvmError(f"unknown signal {text!r}") from None
    if not 1 <= num <= 64:
        raise RunuvmError(f"signal {text!r} is out of range 1..64")
    return num


def rfc3339(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat().replace("+00:00", "Z")


def status_name(status: int) -> str:
    """runc's word for containerd's task status (containerd.v1.types.Status)."""
    try:
        return types_task_pb2.Status.Name(status).lower()
    except ValueError:
        return "unknown"


def read_bundle_spec(bundle: Path) -> dict[str, Any]:
    """config.json of a bundle, as JSON (the shim validates it fully). Raises RunuvmError naming the problem."""
    path = bundle / "config.json"
    try:
        spec = json.loads(path.read_text())
    except FileNotFoundError:
        raise RunuvmError(f"bundle {bundle}: no config.json") from None
    except OSError as e:
        raise RunuvmError(f"bundle {bundle}: config.json: {e.strerror}") from None
    except ValueError as e:
        raise RunuvmError(f"bundle {bundle}: config.json is not valid JSON: {e}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("process"), dict):
        raise RunuvmError(f"bundle {bundle}: config.json has no process")
    return spec


@dataclass
class CreateOptions:
    """runc's (and runhcs's) create options beyond the bundle: where the daemon logs (--shim-log), where
    its UVM's records go (--vm-log), the UVM's serial console (--vm-console), and the socket that gets a
    terminal's master (--console-socket)."""

    shim_log: Path | None = None
    vm_log: Path | None = None
    vm_console: Path | None = None
    console_socket: Path | None = None

    def daemon_flags(self, flags: Flags) -> Flags:
        """flags with the log and console files, each made (appended to) here first, so a path that cannot
        be written fails the create before a UVM boots. Raises RunuvmError naming it."""
        def made(option: str, path: Path | None) -> str:
            if path is None:
                return ""
            try:
                with open(path, "a"):
                    pass
            except OSError as e:
                raise RunuvmError(f"{option} {path}: {e.strerror}") from None
            return str(path.resolve())

        return dataclasses.replace(flags, log=made("--shim-log", self.shim_log), vm_log=made("--vm-log", self.vm_log),
                                   vm_console=made("--vm-console", self.vm_console))


def check_console(console_socket: Path | None, terminal: bool, detached: bool) -> None:
    """runc's rule: a detached process with a terminal needs --console-socket, and only such a process
    takes one. Raises RunuvmError."""
    if console_socket is not None and not terminal:
        raise RunuvmError("--console-socket: the process has no terminal to give (process.terminal is false "
                          "in config.json, or no -t)")
    if console_socket is not None and not detached:
        raise RunuvmError("--console-socket: not with a terminal relayed in the foreground (use -d)")
    if terminal and detached and console_socket is None:
        raise RunuvmError("the process has a terminal (process.terminal in config.json, or -t) and runs detached: "
                          "give --console-socket to receive it")


class Console:
    """A host pty for a process's terminal: the slave is its stdio in the daemon, the master goes to the
    --console-socket (as runc sends it: the name, and the fd as SCM_RIGHTS) once the process exists."""

    def __init__(self, socket_path: Path) -> None:
        self.conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.conn.connect(str(socket_path))  # now, so a bad socket fails before a UVM boots
        except OSError as e:
            self.conn.close()
            raise RunuvmError(f"--console-socket {socket_path}: {e.strerror}") from None
        self.socket_path = socket_path
        self.master, self.slave = os.openpty()
        os.set_inheritable(self.master, False)
        os.set_inheritable(self.slave, False)
        tty.setraw(self.slave)  # the terminal in the UVM echoes and edits: this one only passes bytes
        self.path = os.ttyname(self.slave)

    @property
    def stdio(self) -> Stdio:
        """The process's stdio in the daemon: the slave for input and output (a terminal merges stderr)."""
        return Stdio(self.path, self.path, "")

    def send(self) -> None:
        try:
            socket.send_fds(self.conn, [b"/dev/ptmx"], [self.master])
        except OSError as e:
            raise RunuvmError(f"--console-socket {self.socket_path}: sending the terminal: {e.strerror}") from None

    def close(self) -> None:
        """Our ends go; the daemon has its own slave, the receiver its master."""
        self.conn.close()
        for fd in (self.master, self.slave):
            os.close(fd)


@dataclass
class Stdio:
    """FIFOs a foreground run/exec relays: the paths for the shim, and our ends."""

    stdin: str
    stdout: str
    stderr: str


class Runuvm:
    def __init__(self, root: Path, debug: bool = False) -> None:
        self.root = root.resolve()  # compared with /proc/PID/cwd to find a container's daemon
        self.debug = debug

    # -- helpers ------------------------------------------------------------------------------------

    def _dir(self, cid: str) -> Path:
        return self.root / check_id(cid)

    def _saved(self, cid: str) -> dict[str, Any]:
        try:
            saved: dict[str, Any] = json.loads((self._dir(cid) / STATE).read_text())
        except (OSError, ValueError):
            raise RunuvmError(f"container {cid} does not exist") from None
        return saved

    async def _client(self, cid: str) -> Client:
        self._saved(cid)
        try:
            return await Client.connect_unix(str(self._dir(cid) / SOCKET))
        except TtrpcError:
            raise RunuvmError(f"container {cid}: its shim is not running (use `delete --force`)") from None

    async def _call(self, cid: str, method: str, req: Any, resp_type: Any, timeout: float | None = CALL_TIMEOUT_S) -> Any:
        async with await self._client(cid) as client:
            try:
                return await client.call(SERVICE, method, req, resp_type, timeout=timeout)
            except TtrpcError as e:
                raise RunuvmError(f"container {cid}: {e.message}") from None

    # -- lifecycle ----------------------------------------------------------------------------------

    async def create(self, cid: str, bundle: Path, pid_file: Path | None = None, stdio: Stdio | None = None,
                     terminal: bool = False, options: CreateOptions | None = None) -> int:
        """Boot the container's UVM and create the container; its pid (in the UVM)."""
        options = options or CreateOptions()
        d = self._dir(cid)
        bundle = bundle.resolve()
        spec = read_bundle_spec(bundle)
        if terminal or spec["process"].get("terminal"):
            terminal = True
        check_console(options.console_socket, terminal, detached=stdio is None)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            raise RunuvmError(f"container {cid} already exists") from None
        console = None
        try:
            flags = options.daemon_flags(Flags(namespace=NAMESPACE, id=cid, debug=self.debug))
            if options.console_socket is not None:
                console = Console(options.console_socket)
            (d / STATE).write_text(json.dumps({"id": cid, "bundle": str(bundle), "created": time.time()}))
            # The daemon works in --root/<id>: its state (uvmshim.json, the UVM's console log) goes there.
            spawn_server(d / SOCKET, flags, None, cwd=d)
            io = stdio or (console.stdio if console else Stdio("", "", ""))
            req = pb.CreateTaskRequest(id=cid, bundle=str(bundle), terminal=terminal, stdin=io.stdin,
                                       stdout=io.stdout, stderr=io.stderr)
            resp = await self._call(cid, "Create", req, pb.CreateTaskResponse, timeout=CREATE_TIMEOUT_S)
            if console is not None:
                console.send()
            if pid_file is not None:
                pid_file.write_text(str(resp.pid))
        except BaseException:
            await self._remove(cid)
            raise
        finally:
            if console is not None:
                console.close()
        return int(resp.pid)

    async def start(self, cid: str) -> int:
        return int((await self._call(cid, "Start", pb.StartRequest(id=cid), pb.StartResponse)).pid)

    async def state(self, cid: str) -> dict[str, Any]:
        """runc's state JSON: ociVersion, id, pid, status, bundle, rootfs, created, owner."""
        saved = self._saved(cid)
        try:
            st = await self._call(cid, "State", pb.StateRequest(id=cid), pb.StateResponse)
            status, pid = status_name(st.status), st.pid
        except RunuvmError:
            status, pid = "stopped", 0  # the shim is gone: so is its VM
        spec = read_bundle_spec(Path(saved["bundle"])) if Path(saved["bundle"], "config.json").exists() else {}
        root = str((spec.get("root") or {}).get("path", ""))
        return {"ociVersion": spec.get("ociVersion", "1.0.2"), "id": cid, "pid": pid, "status": status,
                "bundle": saved["bundle"], "rootfs": root if os.path.isabs(root) else str(Path(saved["bundle"], root)),
                "created": rfc3339(saved["created"]), "owner": ""}

    async def list_all(self) -> list[dict[str, Any]]:
        if not self.root.is_dir():
            return []
        return [await self.state(d.name) for d in sorted(self.root.iterdir()) if (d / STATE).exists()]

    async def kill(self, cid: str, sig: int, all_processes: bool = False, exec_id: str = "") -> None:
        await self._call(cid, "Kill", pb.KillRequest(id=cid, exec_id=exec_id, signal=sig, all=all_processes),
                         empty_pb2.Empty)

    async def pause(self, cid: str) -> None:
        await self._call(cid, "Pause", pb.PauseRequest(id=cid), empty_pb2.Empty)

    async def resume(self, cid: str) -> None:
        await self._call(cid, "Resume", pb.ResumeRequest(id=cid), empty_pb2.Empty)

    async def ps(self, cid: str) -> list[int]:
        resp = await self._call(cid, "Pids", pb.PidsRequest(id=cid), pb.PidsResponse)
        return [p.pid for p in resp.processes]

    async def resize(self, cid: str, width: int, height: int, exec_id: str = "") -> None:
        await self._call(cid, "ResizePty", pb.ResizePtyRequest(id=cid, exec_id=exec_id, width=width, height=height),
                         empty_pb2.Empty)

    async def exec_id_of(self, cid: str, pid: int | None) -> str:
        """The exec id of the process with this pid ("" for the init or no pid), from the Pids reply's
        ProcessDetails (as containerd's runc shim gives them). Raises RunuvmError if no process has it."""
        if pid is None:
            return ""
        st = await self._call(cid, "State", pb.StateRequest(id=cid), pb.StateResponse)
        if st.pid == pid:
            return ""
        resp = await self._call(cid, "Pids", pb.PidsRequest(id=cid), pb.PidsResponse)
        for p in resp.processes:
            if p.pid == pid and p.info.type_url == runc_options_pb2.ProcessDetails.DESCRIPTOR.full_name:
                details = runc_options_pb2.ProcessDetails.FromString(p.info.value)
                if details.exec_id:
                    return str(details.exec_id)
        if any(p.pid == pid for p in resp.processes):
            raise RunuvmError(f"container {cid}: resize-tty --pid {pid}: not the init nor an exec'd process")
        raise RunuvmError(f"container {cid}: resize-tty --pid {pid}: no such process in the container")

    async def update(self, cid: str, resources: dict[str, Any]) -> None:
        res = any_pb2.Any(type_url=RESOURCES_URL, value=json.dumps(resources).encode())
        await self._call(cid, "Update", pb.UpdateTaskRequest(id=cid, resources=res), empty_pb2.Empty)

    async def wait(self, cid: str, exec_id: str = "") -> int:
        resp = await self._call(cid, "Wait", pb.WaitRequest(id=cid, exec_id=exec_id), pb.WaitResponse, timeout=None)
        return int(resp.exit_status)

    def _close_io(self, cid: str, exec_id: str) -> Callable[[], Awaitable[None]]:
        """CloseIO(stdin) of a process, for when the caller's stdin ended (the process may be gone already)."""
        async def close_io() -> None:
            with contextlib.suppress(RunuvmError):
                await self._call(cid, "CloseIO", pb.CloseIORequest(id=cid, exec_id=exec_id, stdin=True), empty_pb2.Empty)
        return close_io

    async def delete(self, cid: str, force: bool = False) -> None:
        """Remove a stopped (or created) container; --force kills a running one first."""
        self._saved(cid)
        try:
            st = await self._call(cid, "State", pb.StateRequest(id=cid), pb.StateResponse, timeout=STATE_TIMEOUT_S)
        except RunuvmError as e:  # (a State past its deadline too)
            if not force and _daemon_pids(self._dir(cid) / SOCKET):
                raise RunuvmError(f"{e}; its shim is alive: use delete --force to tear it down") from None
            await self._remove(cid)  # its shim died (or --force): clean what it left
            return
        status = status_name(st.status)
        if status in ("running", "paused", "pausing"):
            if not force:
                raise RunuvmError(f"container {cid} is {status}: stop it first, or use delete --force")
            with contextlib.suppress(RunuvmError):
                await self.kill(cid, signal.SIGKILL, all_processes=True)
            try:  # bounded: a stuck guest must not hang --force (the shim's Shutdown ends the VM anyway)
                await asyncio.wait_for(self.wait(cid), FORCE_WAIT_S)
            except (RunuvmError, TimeoutError):
                pass
        try:
            await self._call(cid, "Delete", pb.DeleteRequest(id=cid), pb.DeleteResponse)
        except RunuvmError:
            if not force:
                raise
        await self._remove(cid)

    async def _remove(self, cid: str) -> None:
        """Stop the shim daemon (Shutdown, or SIGKILL via leftovers), remove --root/<id>."""
        from shim.containerd import leftovers

        d = self._dir(cid)
        sock = d / SOCKET
        asked = False
        with contextlib.suppress(TtrpcError, OSError):
            async with await Client.connect_unix(str(sock), timeout=2) as client:
                await client.call(SERVICE, "Shutdown", pb.ShutdownRequest(id=cid, now=True), empty_pb2.Empty, timeout=60)
                asked = True
        deadline = time.monotonic() + (30 if asked else 0)  # a shim that could not be asked is killed at once
        while _daemon_pids(sock) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for pid in _daemon_pids(sock):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if d.exists():
            leftovers.clean(d)
            shutil.rmtree(d, ignore_errors=True)

    # -- looking inside UVMs (hcsshim's shimdiag) -----------------------------------------------------

    def _shim_sockets(self) -> list[Path]:
        """Every shim daemon's socket: containerd's (/run/containerd/s/uvm-*) and ours (--root/*/shim.sock)."""
        found = sorted(CONTAINERD_SOCKETS.glob("uvm-*.sock"))
        if self.root.is_dir():
            found += sorted(d / SOCKET for d in self.root.iterdir() if (d / SOCKET).exists())
        return found

    async def uvm_list(self) -> list[dict[str, Any]]:
        """The UVMs of every reachable shim: address, namespace, task, VM id and state, QEMU pid."""
        out = []
        for sock in self._shim_sockets():
            try:
                async with await Client.connect_unix(str(sock), timeout=2) as client:
                    info = await client.call(DIAG, "Info", diag_pb2.InfoRequest(), diag_pb2.InfoResponse, timeout=10)
            except TtrpcError:
                continue  # a stale socket, or a shim without the diag service
            out.append({"address": str(sock), "namespace": info.namespace, "task": info.task_id, "vm": info.vm_id,
                        "state": info.vm_state, "pid": info.hypervisor_pid, "backend": info.backend,
                        "boot_seconds": round(info.boot_seconds, 3)})
        return out

    async def uvm_exec(self, vm: str, args: list[str], stdin: bytes = b"") -> tuple[int, bytes, bytes]:
        """Run a command in the UVM (by VM id or task id) itself: (exit code, stdout, stderr)."""
        if not args:
            raise RunuvmError("uvm exec: give a command")
        for entry in await self.uvm_list():
            if vm in (entry["vm"], entry["task"]) and entry["vm"]:
                async with await Client.connect_unix(entry["address"]) as client:
                    try:
                        res = await client.call(DIAG, "ExecInUvm", diag_pb2.ExecInUvmRequest(args=args, stdin=stdin),
                                                diag_pb2.ExecInUvmResponse, timeout=CALL_TIMEOUT_S)
                    except TtrpcError as e:
                        raise RunuvmError(f"uvm {vm}: {e.message}") from None
                return res.exit_code, res.stdout, res.stderr
        raise RunuvmError(f"uvm {vm}: no running UVM with that VM or task id (see `runuvm uvm list`)")

    # -- exec and run ---------------------------------------------------------------------------------

    async def exec(self, cid: str, args: list[str], process_file: Path | None, terminal: bool, detach: bool,
                   pid_file: Path | None, console_socket: Path | None = None) -> int:
        """Run a process in the container: its exit code (foreground), or 0 once started (-d). A detached
        terminal (-t -d) goes to console_socket, as runc's exec sends it."""
        saved = self._saved(cid)
        check_console(console_socket, terminal, detached=detach)
        if process_file is not None:
            try:
                process = json.loads(process_file.read_text())
            except (OSError, ValueError) as e:
                raise RunuvmError(f"process file {process_file}: {e}") from None
        else:
            if not args:
                raise RunuvmError("exec: give a command after --, or --process FILE")
            process = dict(read_bundle_spec(Path(saved["bundle"]))["process"])
            process["args"] = args
        process["terminal"] = terminal
        exec_id = f"exec-{secrets.token_hex(4)}"
        d = self._dir(cid)
        relay = None if detach else StdioRelay(d, exec_id, terminal)
        console = Console(console_socket) if console_socket is not None else None
        io = relay.paths if relay else console.stdio if console else Stdio("", "", "")
        spec = any_pb2.Any(type_url=PROCESS_SPEC_URL, value=json.dumps(process).encode())
        try:
            await self._call(cid, "Exec", pb.ExecProcessRequest(id=cid, exec_id=exec_id, terminal=terminal, spec=spec,
                                                                 stdin=io.stdin, stdout=io.stdout, stderr=io.stderr),
                             empty_pb2.Empty)
            if console is not None:
                console.send()
            pid = int((await self._call(cid, "Start", pb.StartRequest(id=cid, exec_id=exec_id), pb.StartResponse)).pid)
            if pid_file is not None:
                pid_file.write_text(str(pid))
            if relay is None:
                return 0
            return await relay.run(self.wait(cid, exec_id), self._close_io(cid, exec_id))
        finally:
            if console is not None:
                console.close()
            if relay is not None:
                relay.close()
                with contextlib.suppress(RunuvmError):
                    await self._call(cid, "Delete", pb.DeleteRequest(id=cid, exec_id=exec_id), pb.DeleteResponse)

    async def run(self, cid: str, bundle: Path, detach: bool, pid_file: Path | None, terminal: bool = False,
                  options: CreateOptions | None = None) -> int:
        """create + start; in the foreground relay stdio, wait, delete, and return the exit code."""
        if detach:
            await self.create(cid, bundle, pid_file, terminal=terminal, options=options)
            await self._or_delete(cid, self.start(cid))
            return 0
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        fifo_dir = Path(tempfile.mkdtemp(prefix=f".fifo-{check_id(cid)}-", dir=self.root))
        try:
            relay = StdioRelay(fifo_dir, "init", terminal)
            try:
                await self.create(cid, bundle, pid_file, relay.paths, terminal, options)
                code = await self._or_delete(cid, self._start_and_relay(cid, relay))
            finally:
                relay.close()
            await self.delete(cid, force=True)
            return code
        finally:
            shutil.rmtree(fifo_dir, ignore_errors=True)

    async def _start_and_relay(self, cid: str, relay: StdioRelay) -> int:
        await self.start(cid)
        return await relay.run(self.wait(cid), self._close_io(cid, ""))

    async def _or_delete(self, cid: str, work: Awaitable[T]) -> T:
        """work on a created container; if it fails (or is interrupted), the container goes, VM and all."""
        try:
            return await work
        except BaseException:
            with contextlib.suppress(RunuvmError, OSError):
                await asyncio.shield(self.delete(cid, force=True))
            raise


async def _copy_out(fd: int, dest: int, stop: asyncio.Event) -> None:
    """FIFO -> our stdout/stderr; once stop is set, return as soon as the FIFO is empty."""
    while True:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            if stop.is_set():
                return
            readable = asyncio.ensure_future(fd_ready(fd, write=False))
            stopped = asyncio.ensure_future(stop.wait())
            await asyncio.wait((readable, stopped), return_when=asyncio.FIRST_COMPLETED)
            for f in (readable, stopped):
                f.cancel()
            continue
        if not data:
            return
        await write_all(dest, data, stall_timeout=3600)


async def read_input(fd: int) -> bytes:
    """A chunk of our stdin without blocking the loop (regular files and /dev/null read directly)."""
    mode = os.fstat(fd).st_mode
    if stat.S_ISREG(mode) or (stat.S_ISCHR(mode) and os.major(os.fstat(fd).st_rdev) == 1):
        return os.read(fd, 65536)
    os.set_blocking(fd, False)
    try:
        return await read_some(fd)
    finally:
        os.set_blocking(fd, True)


def _daemon_pids(sock: Path) -> list[int]:
    """The shim daemon serving sock: a `shim.containerd.main` process working in the socket's directory."""
    return [pid for pid, cmdline in process_cmdlines() if b"shim.containerd.main" in cmdline and _cwd(pid) == str(sock.parent)]


def _cwd(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return None


class StdioRelay:
    """The caller's stdin/stdout/stderr relayed through FIFOs that the shim opens as containerd's."""

    def __init__(self, directory: Path, name: str, terminal: bool) -> None:
        self.paths = Stdio(*(str(directory / f"{name}-{s}") for s in ("stdin", "stdout", "stderr")))
        if terminal:
            self.paths.stderr = ""
        self._made: list[str] = []  # the FIFOs, removed by close()
        self._fds: list[int] = []
        try:
            for p in (self.paths.stdin, self.paths.stdout, self.paths.stderr):
                if p:
                    os.mkfifo(p, 0o600)
                    self._made.append(p)
            # Our read ends, non-blocking so opening never waits for the shim.
            for p in (self.paths.stdout, self.paths.stderr):
                if p:
                    self._fds.append(os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC))
        except BaseException:
            self.close()
            raise
        self._out = list(self._fds)

    async def run(self, waiter: Any, close_io: Callable[[], Awaitable[None]]) -> int:
        """Copy stdin in and output out until the process exited and its output is drained; its exit code.
        At the end of our stdin, close_io (CloseIO, as ctr does) gives the process its end of file."""
        stop = asyncio.Event()
        dests = [sys.stdout.fileno(), sys.stderr.fileno()]
        copies = [asyncio.create_task(_copy_out(fd, dest, stop)) for fd, dest in zip(self._out, dests, strict=False)]
        feeder = asyncio.create_task(self._copy_in(close_io)) if self.paths.stdin else None
        try:
            code = await waiter
            stop.set()  # Wait returned once the output was in the FIFOs: copy what is there, then stop
            await asyncio.gather(*copies)
            return int(code)
        finally:
            for t in (*copies, feeder):
                if t is not None:
                    t.cancel()
            await asyncio.gather(*(t for t in (*copies, feeder) if t is not None), return_exceptions=True)

    async def _copy_in(self, close_io: Callable[[], Awaitable[None]]) -> None:
        # The shim opened its read end during create/exec: this open does not block.
        fd = os.open(self.paths.stdin, os.O_WRONLY | os.O_CLOEXEC)
        try:
            while data := await read_input(sys.stdin.fileno()):
                await write_all(fd, data, stall_timeout=3600)
        finally:
            os.close(fd)
        await close_io()

    def close(self) -> None:
        """Close our ends and remove the FIFOs (the shim keeps what it opened; an exec's FIFOs in the
        container's directory would otherwise pile up until the container is deleted)."""
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        for p in self._made:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
        self._made.clear()

