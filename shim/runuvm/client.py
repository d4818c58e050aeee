"""A Python client of the `runuvm` command line, mirroring go-runhcs: each method runs the CLI and
parses its JSON; a failure raises RunuvmCommandError with the exit status and runuvm's message
(read from its JSON log line, since the client always passes --log-format json)."""

from __future__ import annotations

import builtins
import json
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class RunuvmCommandError(Exception):
    def __init__(self, args: list[str], status: int, message: str) -> None:
        super().__init__(f"runuvm {' '.join(args)}: {message} (exit {status})")
        self.args_ = args
        self.status = status
        self.message = message


@dataclass(frozen=True)
class ContainerState:
    """runc's state: what `runuvm state` and `runuvm list --format json` print."""

    id: str
    pid: int
    status: str
    bundle: str
    rootfs: str
    created: str
    owner: str = ""
    oci_version: str = ""

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ContainerState:
        return cls(id=d["id"], pid=d["pid"], status=d["status"], bundle=d["bundle"], rootfs=d.get("rootfs", ""),
                   created=d["created"], owner=d.get("owner", ""), oci_version=d.get("ociVersion", ""))


@dataclass
class CreateOpts:
    """go-runhcs's CreateOpts: create's (and run's) options beyond the bundle."""

    pid_file: Path | None = None
    shim_log: Path | None = None
    vm_log: Path | None = None
    vm_console: Path | None = None
    console_socket: Path | None = None

    def args(self) -> builtins.list[str]:
        pairs = (("--pid-file", self.pid_file), ("--shim-log", self.shim_log), ("--vm-log", self.vm_log),
                 ("--vm-console", self.vm_console), ("--console-socket", self.console_socket))
        return [arg for flag, value in pairs if value is not None for arg in (flag, str(value))]


class ConsoleSocket:
    """A unix socket to pass as --console-socket, and the terminal master runuvm sends to it (go-runc's
    NewTempConsoleSocket / ReceiveMaster). Use as a context manager; the received fd is the caller's."""

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="runuvm-console-")
        self.path = Path(self._dir) / "console.sock"
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._listener.bind(str(self.path))
        self._listener.listen(1)

    def receive_master(self, timeout: float = 600) -> int:
        """The terminal's master fd, once runuvm's create sends it. Raises TimeoutError, or OSError if
        runuvm closed the connection without sending one (its create failed)."""
        self._listener.settimeout(timeout)
        conn, _ = self._listener.accept()
        with conn:
            conn.settimeout(timeout)
            _, fds, _, _ = socket.recv_fds(conn, 4096, 1)
        if not fds:
            raise OSError(f"console socket {self.path}: runuvm sent no terminal")
        return fds[0]

    def close(self) -> None:
        self._listener.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> ConsoleSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Runuvm:
    """Options common to every command (go-runhcs's Runhcs struct)."""

    root: Path | None = None
    log: Path | None = None
    debug: bool = False
    command: list[str] = field(default_factory=lambda: _default_command())

    def _run(self, *args: str, input: bytes | None = None, timeout: float = 600) -> bytes:
        argv = [*self.command, "--log-format", "json"]
        if self.root is not None:
            argv += ["--root", str(self.root)]
        if self.log is not None:
            argv += ["--log", str(self.log)]
        if self.debug:
            argv.append("--debug")
        res = subprocess.run([*argv, *args], input=input, capture_output=True, timeout=timeout, check=False)
        if res.returncode != 0:
            raise RunuvmCommandError(list(args), res.returncode, _message(res.stderr))
        return res.stdout

    def create(self, cid: str, bundle: Path, opts: CreateOpts | None = None) -> None:
        self._run("create", cid, "--bundle", str(bundle), *(opts or CreateOpts()).args())

    def run(self, cid: str, bundle: Path, opts: CreateOpts | None = None, input: bytes | None = None) -> bytes:
        """create + start + wait + delete in the foreground: the container's output, its stdin from input.
        A non-zero exit code raises RunuvmCommandError with that status."""
        return self._run("run", cid, "--bundle", str(bundle), *(opts or CreateOpts()).args(), input=input)

    def run_detached(self, cid: str, bundle: Path, opts: CreateOpts | None = None) -> None:
        self._run("run", "--detach", cid, "--bundle", str(bundle), *(opts or CreateOpts()).args())

    def start(self, cid: str) -> None:
        self._run("start", cid)

    def exec(self, cid: str, args: builtins.list[str] | None = None, process_file: Path | None = None, detach: bool = False,
             pid_file: Path | None = None, tty: bool = False, console_socket: Path | None = None) -> bytes:
        """A process in the container; its output (foreground). Non-zero exit: RunuvmCommandError. A detached
        terminal (tty and detach) goes to console_socket (see ConsoleSocket)."""
        opts = ["--detach"] * detach + ["--tty"] * tty + (["--pid-file", str(pid_file)] if pid_file else [])
        opts += ["--process", str(process_file)] if process_file else []
        opts += ["--console-socket", str(console_socket)] if console_socket else []
        return self._run("exec", *opts, cid, *([] if process_file else ["--", *(args or [])]))

    def kill(self, cid: str, signal: str | int = "SIGTERM", all_processes: bool = False) -> None:
        self._run("kill", cid, str(signal), *(["--all"] if all_processes else []))

    def delete(self, cid: str, force: bool = False) -> None:
        self._run("delete", cid, *(["--force"] if force else []))

    def list(self) -> builtins.list[ContainerState]:
        return [ContainerState.from_json(d) for d in json.loads(self._run("list", "--format", "json"))]

    def state(self, cid: str) -> ContainerState:
        return ContainerState.from_json(json.loads(self._run("state", cid)))

    def ps(self, cid: str) -> builtins.list[int]:
        pids: builtins.list[int] = json.loads(self._run("ps", cid, "--format", "json"))
        return pids

    def pause(self, cid: str) -> None:
        self._run("pause", cid)

    def resume(self, cid: str) -> None:
        self._run("resume", cid)

    def resize_tty(self, cid: str, width: int, height: int, pid: int | None = None) -> None:
        self._run("resize-tty", cid, str(width), str(height), *(["--pid", str(pid)] if pid else []))

    def create_scratch(self, dest: Path) -> None:
        self._run("create-scratch", str(dest))

    def create_scratch_with_opts(self, dest: Path, size_gb: int, cache_path: Path | None = None) -> None:
        self._run("create-scratch", str(dest), "--size-gb", str(size_gb),
                  *(["--cache-path", str(cache_path)] if cache_path else []))


def _default_command() -> list[str]:
    exe = shutil.which("runuvm") or str(Path(sys.executable).parent / "runuvm")
    return [exe]


def _message(stderr: bytes) -> str:
    """runuvm's error: the msg of its JSON line, else the last line of stderr."""
    lines = stderr.decode(errors="replace").strip().splitlines()
    for line in reversed(lines):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "msg" in rec:
            return str(rec["msg"])
    return lines[-1] if lines else "failed"
