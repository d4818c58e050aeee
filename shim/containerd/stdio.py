"""containerd's stdio FIFOs relayed to a process's streams on the agent link.

containerd (through `ctr`) gives each process up to three FIFO paths. The outputs are opened when
the process is created, so a bad path fails the create and no open ever blocks; stdout and stderr are
opened read-write: a reader that comes and goes (a detached client) never turns our writes into EPIPE.
stdin is only checked at the create and opened when the process starts (ProcessIO.attach_stdin says
why), read-only and non-blocking, and write-only too, as runc's shim does: that writer of ours keeps the
process's stdin open across clients that come and go (`ctr task attach`, a detached `ctr run`); only
CloseIO closes it, and the process sees EOF once every client's writer is gone too.
A path may also be a terminal (runuvm's --console-socket: the slave of a pty whose master the caller
got), opened O_NOCTTY so it never becomes the daemon's controlling terminal.
Output is copied with backpressure: the agent link's credits stop the guest when containerd's reader
is slow, and a reader that stalls for OUTPUT_STALL_S drops the rest of that output rather than
holding the task's exit forever.

As runc's shim, an output may also be a URI: `file:///path` appends stdout and stderr to that file, and
`binary:///path/to/logger?key=value` starts that logging binary for the process with the process's
stdout on its fd 3, stderr on fd 4 and fd 5 to close (or write to) once it is ready, CONTAINER_ID and
CONTAINER_NAMESPACE in its environment (`ctr run --log-uri`, nerdctl's logging drivers); the stdout URI
decides for both outputs. The logger is stopped with the process's stdio: its input closed, a moment
to finish, then SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import signal
import stat
import sys
from urllib.parse import parse_qsl, unquote, urlsplit

from uvm import errors
from uvm.process import Process
from uvm.streams import InboundStream

log = logging.getLogger("uvmshim.stdio")

CHUNK = 64 * 1024
# Every stdio path is opened so: no open waits for the other end, none leaks into children, and a
# terminal never becomes the daemon's controlling terminal.
OPEN_FLAGS = os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
OUTPUT_STALL_S = 10.0  # a FIFO nobody drains for this long: the rest of that output is dropped


async def fd_ready(fd: int, write: bool, timeout: float | None = None) -> None:
    """Wait until fd is writable (or readable); TimeoutError after timeout seconds."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    (loop.add_writer if write else loop.add_reader)(fd, wake)
    try:
        await asyncio.wait_for(ready, timeout)
    finally:
        (loop.remove_writer if write else loop.remove_reader)(fd)


async def write_all(fd: int, data: bytes, stall_timeout: float = OUTPUT_STALL_S) -> None:
    """Write everything to a non-blocking fd. Raises TimeoutError when no byte fits for stall_timeout."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            await fd_ready(fd, write=True, timeout=stall_timeout)


async def read_some(fd: int, n: int = CHUNK) -> bytes:
    """Up to n bytes from a non-blocking fd, waiting for readiness first; b"" at end of file.

    On a FIFO opened by open_fifo_reader, readiness (data, or EPOLLHUP once a writer came and went)
    is only reported after a writer connected: Linux does not report HUP to a reader that has never
    seen a writer, so waiting first tells "no client yet" apart from end of file."""
    while True:
        await fd_ready(fd, write=False)
        try:
            return os.read(fd, n)
        except BlockingIOError:
            continue


def open_fifo_reader(path: str, what: str) -> int:
    """Open a FIFO for reading without waiting for its writer. Raises InvalidArgumentError naming it."""
    try:
        return os.open(path, os.O_RDONLY | OPEN_FLAGS)
    except OSError as e:
        raise errors.InvalidArgumentError(f"{what} {path}: cannot open: {e.strerror}") from None


def check_stdin(path: str, what: str) -> None:
    """The stdin path names a FIFO or a terminal, checked without opening it (opening it connects the
    client's writer: see ProcessIO.attach_stdin). Raises InvalidArgumentError naming the path."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise errors.InvalidArgumentError(f"{what} {path}: cannot open: {e.strerror}") from None
    if not (stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)):
        raise errors.InvalidArgumentError(f"{what} {path}: not a FIFO or a terminal")


def open_fifo_writer(path: str, what: str) -> int:
    """Open an output FIFO read-write and non-blocking. Raises InvalidArgumentError naming the path."""
    try:
        return os.open(path, os.O_RDWR | OPEN_FLAGS)
    except OSError as e:
        raise errors.InvalidArgumentError(f"{what} {path}: cannot open: {e.strerror}") from None


LOGGER_READY_TIMEOUT_S = 10.0
LOGGER_EOF_GRACE_S = 1.0  # a logger that exits by itself at the end of its input is not signalled
LOGGER_TERM_TIMEOUT_S = 12.0  # runc's shim: SIGTERM, then SIGKILL after this long
# fds 3, 4, 5 of the logger: dup2 of descriptors passed at 10 and above, so none is overwritten early
_LOGGER_EXEC = ("import os, sys\n"
                "for new, old in enumerate(sys.argv[1:4], 3):\n"
                "    os.dup2(int(old), new, inheritable=True)\n"
                "    os.close(int(old))\n"
                "os.execv(sys.argv[4], sys.argv[4:])\n")


def parse_output(value: str, what: str) -> tuple[str, str]:
    """A containerd stdio string as (scheme, path): a FIFO path (or fifo://), file:// or binary://.
    Raises InvalidArgumentError naming an unknown scheme or a relative path."""
    if "://" not in value:
        return "fifo", value
    uri = urlsplit(value)
    path = unquote(uri.path)
    if uri.scheme not in ("fifo", "file", "binary"):
        raise errors.InvalidArgumentError(f"{what} {value}: unknown stdio scheme {uri.scheme!r} "
                                          "(a FIFO path, file:// or binary://)")
    if not path.startswith("/"):
        raise errors.InvalidArgumentError(f"{what} {value}: the path must be absolute")
    return uri.scheme, path


def open_log_file(path: str, what: str) -> int:
    """file://: the file opened for appending (created with its directory, as runc's shim does)."""
    try:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise errors.InvalidArgumentError(f"{what} {path}: cannot open: {e.strerror}") from None


def check_executable(path: str, what: str) -> None:
    if not os.access(path, os.X_OK) or os.path.isdir(path):
        raise errors.InvalidArgumentError(f"{what}: {path} is not an executable file")


class Logger:
    """A binary:// logging process; the write ends of its stdout and stderr pipes are ours until stop."""

    def __init__(self, proc: asyncio.subprocess.Process, stdout: int, stderr: int, what: str) -> None:
        self.proc = proc
        self.stdout = stdout
        self.stderr = stderr
        self.what = what

    @classmethod
    async def start(cls, uri: str, path: str, container_id: str, namespace: str, what: str) -> Logger:
        """Start the logger and wait until it is ready. Raises InvalidArgumentError (nothing left)."""
        check_executable(path, f"{what} {uri}")
        args = [x for kv in parse_qsl(urlsplit(uri).query, keep_blank_values=True) for x in kv]
        pipes = [os.pipe2(os.O_CLOEXEC) for _ in range(3)]  # stdout, stderr: it reads; ready: it writes
        ours = [pipes[0][1], pipes[1][1], pipes[2][0]]
        theirs = [pipes[0][0], pipes[1][0], pipes[2][1]]
        try:
            child = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in theirs]
            theirs += child
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-S", "-E", "-c", _LOGGER_EXEC, *map(str, child), path, *args, pass_fds=child,
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
                env={"CONTAINER_ID": container_id, "CONTAINER_NAMESPACE": namespace})
        except OSError as e:
            for fd in ours + theirs:
                os.close(fd)
            raise errors.InvalidArgumentError(f"{what} {uri}: cannot start the logger: {e}") from None
        for fd in theirs:  # the logger has its own copies
            os.close(fd)
        ready = ours[2]
        logger = cls(proc, ours[0], ours[1], f"{what} {uri}")
        try:
            # Ready: it wrote to fd 5 or closed it (exiting counts: as runc's shim, EOF is ready too).
            await fd_ready(ready, write=False, timeout=LOGGER_READY_TIMEOUT_S)
            return logger
        except TimeoutError:
            await logger.stop()
            raise errors.InvalidArgumentError(f"{logger.what}: not ready after {LOGGER_READY_TIMEOUT_S:g}s") from None
        except BaseException:
            await logger.stop()
            raise
        finally:
            os.close(ready)

    def close_input(self) -> None:
        for fd in (self.stdout, self.stderr):
            if fd >= 0:
                os.close(fd)
        self.stdout = self.stderr = -1

    async def stop(self) -> None:
        """Close its input (if still ours), let it finish, then SIGTERM, then SIGKILL."""
        self.close_input()
        for sig, grace in ((None, LOGGER_EOF_GRACE_S), (signal.SIGTERM, LOGGER_TERM_TIMEOUT_S), (signal.SIGKILL, None)):
            if sig is not None and self.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(sig)
            try:
                await asyncio.wait_for(asyncio.shield(self.proc.wait()), grace)
                return
            except TimeoutError:
                log.warning("%s: logger still running %gs after %s", self.what, grace,
                            sig.name if sig is not None else "the end of its input")


class ProcessIO:
    """The FIFOs of one containerd process and the tasks copying between them and the process."""

    def __init__(self, name: str, stdin: str, stdout: str, stderr: str, terminal: bool, *,
                 container_id: str = "", namespace: str = "") -> None:
        self.name = name
        self.container_id = container_id or name  # what a binary:// logger is told (runc: the exec id for an exec)
        self.namespace = namespace
        self._logger: Logger | None = None
        self.stdin_path = stdin
        self.stdout_path = stdout
        self.stderr_path = "" if terminal else stderr  # a terminal merges stderr into stdout
        self.terminal = terminal
        self._out_fds: list[int] = []
        self._in_fd: int | None = None
        self._in_hold: int | None = None  # our own writer on the stdin FIFO, until CloseIO
        self._copies: list[asyncio.Task[None]] = []
        self._stdin_copy: asyncio.Task[None] | None = None
        self._eof_requested = False  # CloseIO came
        self._closed = False

    @property
    def wants(self) -> tuple[bool, bool, bool]:
        """Which of stdin, stdout, stderr the process needs as streams."""
        return bool(self.stdin_path), bool(self.stdout_path), bool(self.stderr_path)

    async def open(self) -> None:
        """Open the outputs now (FIFOs, a file, or a started logger), so a bad one fails the create.
        Raises InvalidArgumentError."""
        try:
            scheme, target = parse_output(self.stdout_path, f"{self.name}: stdout") if self.stdout_path else ("", "")
            for path, what in ((self.stdout_path, "stdout"), (self.stderr_path, "stderr")):
                if not path:
                    continue
                if scheme == "file":
                    self._out_fds.append(open_log_file(target, f"{self.name}: {what}"))
                elif scheme == "binary":
                    if self._logger is None:
                        self._logger = await Logger.start(self.stdout_path, target, self.container_id, self.namespace,
                                                          f"{self.name}: stdout")
                    self._out_fds.append(os.dup(self._logger.stdout if what == "stdout" else self._logger.stderr))
                else:
                    fifo = parse_output(path, f"{self.name}: {what}")[1]
                    self._out_fds.append(open_fifo_writer(fifo, f"{self.name}: {what}"))
            if self._logger is not None:  # only the dups above feed it now: closing them ends its input
                self._logger.close_input()
            if self.stdin_path:
                check_stdin(self.stdin_path, f"{self.name}: stdin")
        except BaseException:
            self._close_fds()
            await self._stop_logger()
            raise

    async def _stop_logger(self) -> None:
        if self._logger is not None:
            logger, self._logger = self._logger, None
            await logger.stop()

    def attach(self, proc: Process) -> None:
        """Start copying the process's output to the FIFOs opened by open() (at the create of a container's
        init: whatever it prints is relayed from its first byte)."""
        fds = iter(self._out_fds)
        for stream in (proc.stdout, proc.stderr if not self.terminal else None):
            if stream is not None:
                self._copies.append(asyncio.create_task(self._copy_out(stream, next(fds)), name=f"{self.name}-out"))

    def open_stdin(self) -> None:
        """Open the stdin FIFO, when the process starts, not at its create. Raises InvalidArgumentError
        naming the path if it cannot be opened. Idempotent.

        Until then the FIFO has no reader, so a client's write waits (containerd's fifo package opens it
        in the background): ctr's input cannot reach its end before its Exec or NewTask call has returned
        and it has installed the closer that sends CloseIO at that end (containerd#4489). Opened at create,
        as runc's shim opens an init's, a short input piped into `ctr task exec` (or `ctr run`) fitted in
        the FIFO at once; ctr reached its end of file while the call was still returning, never sent
        CloseIO, and the process waited for input forever (2 hangs in 6 runs of a ctr comparison)."""
        if self._in_fd is not None or not self.stdin_path or self._closed:
            return
        self._in_fd = open_fifo_reader(self.stdin_path, f"{self.name}: stdin")
        if not self._eof_requested:  # ours, until CloseIO; a reader is open now, so no ENXIO
            self._in_hold = os.open(self.stdin_path, os.O_WRONLY | OPEN_FLAGS)

    def attach_stdin(self, proc: Process) -> None:
        """Start feeding the stdin FIFO (opened now if open_stdin was not called) to the started process.
        Raises InvalidArgumentError as open_stdin. Idempotent."""
        if self._stdin_copy is not None or proc.stdin is None:
            return
        self.open_stdin()
        if self._in_fd is not None:
            self._stdin_copy = asyncio.create_task(self._copy_in(proc, self._in_fd), name=f"{self.name}-stdin")

    async def _copy_out(self, stream: InboundStream, fd: int) -> None:
        try:
            while data := await stream.read(CHUNK):
                await write_all(fd, data)
        except TimeoutError:
            log.warning("%s: output reader stalled for %gs: dropping the rest", self.name, OUTPUT_STALL_S)
            stream.close()
        except errors.UvmError as e:  # the link or the VM went away: the exit reports it
            log.debug("%s: output ended: %s", self.name, e)
        except OSError as e:
            if e.errno != errno.EPIPE:
                log.warning("%s: writing output: %s", self.name, e)
            stream.close()
        finally:
            # As runc's shim closes its writer once the process's pipe ends: the reader sees end of file.
            # CRI's ExecSync waits for that after the exit (its attach is done only then).
            if fd in self._out_fds:
                self._out_fds.remove(fd)
                os.close(fd)

    async def _copy_in(self, proc: Process, fd: int) -> None:
        try:
            while data := await read_some(fd):
                await proc.write_stdin(data)
        except (errors.UvmError, OSError) as e:  # the process exited or the VM died: nothing to feed
            log.debug("%s: stdin ended: %s", self.name, e)
        finally:
            proc.close_stdin()

    async def close_stdin(self, proc: Process | None) -> None:
        """CloseIO: no more input. What clients wrote is still delivered: the copy closes the process's
        stdin at the FIFO's end of file, once the clients' writers are closed too (ctr calls CloseIO
        before it closes its own)."""
        self._eof_requested = True  # a CloseIO before the start: the FIFO is opened without our writer
        if self._in_hold is not None:
            os.close(self._in_hold)
            self._in_hold = None
        if not self.stdin_path and proc is not None:  # no FIFO: nothing to deliver first
            proc.close_stdin()

    async def drained(self) -> None:
        """Every byte of output the process wrote is in containerd's FIFOs (or was dropped)."""
        if self._copies:
            await asyncio.gather(*(asyncio.shield(c) for c in self._copies), return_exceptions=True)

    def _close_fds(self) -> None:
        for fd in self._out_fds:
            os.close(fd)
        self._out_fds.clear()
        for in_fd in (self._in_fd, self._in_hold):
            if in_fd is not None:
                os.close(in_fd)
        self._in_fd = self._in_hold = None

    async def close(self) -> None:
        """Stop every copy and close the FIFOs. Idempotent."""
        if self._closed:
            return
        self._closed = True
        tasks = [t for t in (*self._copies, self._stdin_copy) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._close_fds()
        await asyncio.shield(self._stop_logger())
