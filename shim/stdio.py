"""containerd's stdio FIFOs relayed to a process's streams on the agent link.

containerd (through `ctr`) gives each process up to three FIFO paths, all opened when the process is
created, so a bad path fails the create and no open ever blocks. stdout and stderr are opened
read-write: a reader that comes and goes (a detached client) never turns our writes into EPIPE.
stdin is opened read-only and non-blocking, and write-only too, as runc's shim does: that writer of
ours keeps the process's stdin open across clients that come and go (`ctr task attach`, a detached
`ctr run`); only CloseIO closes it, and the process sees EOF once every client's writer is gone too.
Output is copied with backpressure: the agent link's credits stop the guest when containerd's reader
is slow, and a reader that stalls for OUTPUT_STALL_S drops the rest of that output rather than
holding the task's exit forever.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os

from uvm import errors
from uvm.process import Process
from uvm.streams import InboundStream

log = logging.getLogger("uvmshim.stdio")

CHUNK = 64 * 1024
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
        return os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise errors.InvalidArgumentError(f"{what} {path}: cannot open: {e.strerror}") from None


def open_fifo_writer(path: str, what: str) -> int:
    """Open an output FIFO read-write and non-blocking. Raises InvalidArgumentError naming the path."""
    try:
        return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise errors.InvalidArgumentError(f"{what} {path}: cannot open: {e.strerror}") from None


class ProcessIO:
    """The FIFOs of one containerd process and the tasks copying between them and the process."""

    def __init__(self, name: str, stdin: str, stdout: str, stderr: str, terminal: bool) -> None:
        self.name = name
        self.stdin_path = stdin
        self.stdout_path = stdout
        self.stderr_path = "" if terminal else stderr  # a terminal merges stderr into stdout
        self.terminal = terminal
        self._out_fds: list[int] = []
        self._in_fd: int | None = None
        self._in_hold: int | None = None  # our own writer on the stdin FIFO, until CloseIO
        self._copies: list[asyncio.Task[None]] = []
        self._stdin_copy: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def wants(self) -> tuple[bool, bool, bool]:
        """Which of stdin, stdout, stderr the process needs as streams."""
        return bool(self.stdin_path), bool(self.stdout_path), bool(self.stderr_path)

    def open(self) -> None:
        """Open the output FIFOs now, so a bad path fails the create. Raises InvalidArgumentError."""
        try:
            for path, what in ((self.stdout_path, "stdout"), (self.stderr_path, "stderr")):
                if path:
                    self._out_fds.append(open_fifo_writer(path, f"{self.name}: {what}"))
            if self.stdin_path:
                self._in_fd = open_fifo_reader(self.stdin_path, f"{self.name}: stdin")
                self._in_hold = os.open(self.stdin_path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a reader is open
        except BaseException:
            self._close_fds()
            raise

    def attach(self, proc: Process) -> None:
        """Start copying: the FIFOs opened by open() to/from the process's streams."""
        fds = iter(self._out_fds)
        for stream in (proc.stdout, proc.stderr if not self.terminal else None):
            if stream is not None:
                self._copies.append(asyncio.create_task(self._copy_out(stream, next(fds)), name=f"{self.name}-out"))
        if self._in_fd is not None and proc.stdin is not None:
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
        if self._in_hold is not None:
            os.close(self._in_hold)
            self._in_hold = None
        if self._stdin_copy is None and proc is not None:
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
