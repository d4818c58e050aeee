"""A process in the UVM or in one of its containers, and the ProcessHost both of them are (seed cow).

The process's stdio are streams on the agent link (``uvm.streams``); its exit comes as a
notification pushed by the guest after its output ended, so ``wait()`` returns once all of the
output is in the host's stream buffers. If the UVM dies, every process is reported exited with a
non-success status (``vm_died``) and every waiter is released.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import signal as signals
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from schemas import agent as proto
from schemas import agent_models as models
from uvm import errors
from uvm.streams import InboundStream, OutboundStream, remember

if TYPE_CHECKING:
    from schemas import oci
    from uvm.link import AgentClient

IO_GRACE_S = 5.0


@dataclass(frozen=True)
class ProcessExit:
    exit_status: int | None  # the process's exit status, if it exited
    signal: int | None  # the signal that ended it, if one did
    at: float  # time.time() of the exit, as the guest saw it
    vm_died: bool = False  # the UVM died under it: the real status is unknown

    @property
    def exit_code(self) -> int:
        """The shell's convention: the status, or 128 + the signal (255 if the UVM died)."""
        if self.vm_died:
            return 255
        if self.exit_status is not None:
            return self.exit_status
        return 128 + (self.signal or 0)

    @property
    def success(self) -> bool:
        return not self.vm_died and self.exit_status == 0


class ProcessState(enum.Enum):
    RUNNING = "running"
    EXITED = "exited"
    CLOSED = "closed"


class Process:
    """One process: signal it, wait for it, read its output, write its input."""

    def __init__(self, client: AgentClient, container: str | None, pid: int, terminal: bool,
                 stdin: OutboundStream | None, stdout: InboundStream | None, stderr: InboundStream | None) -> None:
        self._client = client
        self.container = container
        self.pid = pid
        self.terminal = terminal
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self.state = ProcessState.RUNNING
        self._exit: asyncio.Future[ProcessExit] = asyncio.get_running_loop().create_future()
        self._table: ProcessTable | None = None  # set by the table that routes its exit

    def __repr__(self) -> str:
        where = f"container {self.container}" if self.container else "UVM"
        return f"<Process {self.pid} in {where} {self.state.value}>"

    @property
    def where(self) -> str:
        return f"process {self.pid} in " + (f"container {self.container}" if self.container else "the UVM")

    def _exited(self, exit_info: ProcessExit) -> None:
        """Called once by the owner when the exit notification (or the VM's death) arrives."""
        if not self._exit.done():
            self._exit.set_result(exit_info)
            if self.state is ProcessState.RUNNING:
                self.state = ProcessState.EXITED
            if exit_info.vm_died:
                for s in (self.stdin, self.stdout, self.stderr):
                    if s is not None:
                        s.fail(errors.LinkError(f"{self.where}: the UVM died"))
            elif self.stdin is not None:  # the guest dropped the process's stdin: no credit will come
                self.stdin.fail(errors.StateError(f"{self.where}: has exited"))

    @property
    def exited(self) -> bool:
        return self._exit.done()

    @property
    def exit_info(self) -> ProcessExit:
        """Raises NotExitedError until the process exited."""
        if not self._exit.done():
            raise errors.NotExitedError(f"{self.where}: has not exited", pid=self.pid)
        return self._exit.result()

    @property
    def exit_code(self) -> int:
        """The exit code; raises NotExitedError until the process exited."""
        return self.exit_info.exit_code

    def _check_open(self, op: str) -> None:
        if self.state is ProcessState.CLOSED:
            raise errors.ClosedError(f"{self.where}: {op}: closed", pid=self.pid)

    async def signal(self, sig: int) -> bool:
        """Send signal sig; True if it was delivered (False once the process has exited)."""
        self._check_open("signal")
        if not isinstance(sig, int) or not 1 <= sig <= 64:
            raise errors.InvalidArgumentError(f"{self.where}: signal {sig!r} is out of range 1..64", pid=self.pid)
        if self.exited:
            return False
        try:
            res = await self._client.request(proto.SIGNAL, {"container": self.container, "pid": self.pid,
                                                            "signal": sig}, models.SignalResult)
        except errors.LinkError:
            if self.exited:
                return False
            raise
        return res.delivered

    async def kill(self) -> bool:
        """SIGKILL; True if it was delivered."""
        return await self.signal(signals.SIGKILL)

    async def wait(self) -> ProcessExit:
        """The exit, once the process exited and its output streams ended.

        Output the caller reads arrives before the exit, so it is all in the host's buffers when
        this returns. A stream nobody reads (or one kept open by a leftover child) does not block
        the wait for more than IO_GRACE_S after the exit; close_stdout() ends that wait at once.
        """
        exit_info = await asyncio.shield(self._exit)
        streams = [s for s in (self.stdout, self.stderr) if s is not None and not s.ended]
        if streams:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(s.wait_ended() for s in streams)), IO_GRACE_S)
        return exit_info

    async def wait_timeout(self, timeout: float) -> ProcessExit:
        """wait(), raising WaitTimeoutError after timeout seconds (the process keeps running)."""
        try:
            return await asyncio.wait_for(self.wait(), timeout)
        except TimeoutError:
            raise errors.WaitTimeoutError(f"{self.where}: still running after {timeout:g}s", pid=self.pid) from None

    async def resize_console(self, width: int, height: int) -> None:
        """Set the terminal size. Raises InvalidArgumentError for a process without a terminal."""
        self._check_open("resize_console")
        if not self.terminal:
            raise errors.InvalidArgumentError(f"{self.where}: has no terminal to resize", pid=self.pid)
        if not (0 < width < 65536 and 0 < height < 65536):
            raise errors.InvalidArgumentError(f"{self.where}: size {width}x{height} out of range", pid=self.pid)
        if self.exited:
            raise errors.NotRunningError(f"{self.where}: has exited", pid=self.pid)
        await self._client.request(proto.RESIZE, {"container": self.container, "pid": self.pid,
                                                  "width": width, "height": height}, models.Empty)

    async def write_stdin(self, data: bytes) -> None:
        if self.stdin is None:
            raise errors.StateError(f"{self.where}: was started without stdin", pid=self.pid)
        await self.stdin.write(data)

    def close_stdin(self) -> None:
        """EOF to the process (after what was written). Idempotent."""
        if self.stdin is not None:
            self.stdin.close()

    def close_stdout(self) -> None:
        """Stop reading stdout: the process gets EPIPE on its next write."""
        if self.stdout is not None:
            self.stdout.close()

    def close_stderr(self) -> None:
        if self.stderr is not None:
            self.stderr.close()

    async def communicate(self, stdin: bytes = b"") -> tuple[bytes, bytes, ProcessExit]:
        """Write stdin (then EOF), read all output, wait: (stdout, stderr, exit)."""
        async def feed() -> None:
            if self.stdin is not None:
                if stdin:
                    await self.stdin.write(stdin)
                self.stdin.close()

        async def drain(stream: InboundStream | None) -> bytes:
            return await stream.read_all() if stream is not None else b""

        _, out, err = await asyncio.gather(feed(), drain(self.stdout), drain(self.stderr))
        return out, err, await self.wait()

    def close(self) -> None:
        """Release the host side (streams); the process itself is not stopped. Idempotent."""
        if self.state is ProcessState.CLOSED:
            return
        self.state = ProcessState.CLOSED
        conn = self._client.conn
        for s in (self.stdout, self.stderr):
            if s is not None:
                s.close()
        if self.stdin is not None:
            self.stdin.close()
        for s2 in (self.stdin, self.stdout, self.stderr):
            if s2 is not None:
                conn.forget_stream(s2.sid)
        if self._table is not None and self.exited:
            self._table.discard(self)


class ProcessHost(Protocol):
    """What can run processes: the UVM itself, or a container in it (seed cow's ProcessHost)."""

    async def create_process(self, spec: oci.Process, *, stdin: bool = False, stdout: bool = True,
                             stderr: bool = True) -> Process: ...

    async def open_process(self, pid: int) -> Process: ...


class ProcessTable:
    """The processes of one UVM, keyed (container or "", pid); routes exit notifications."""

    MAX_EARLY = 256

    def __init__(self) -> None:
        self._procs: dict[tuple[str, int], Process] = {}
        self._early: dict[tuple[str, int], ProcessExit] = {}

    def add(self, proc: Process) -> None:
        """Route proc's exit from now on. Raises GuestProtocolError if the guest gave the pid of a
        process that has not exited (an exited one's pid may be reused: its entry is replaced)."""
        key = (proc.container or "", proc.pid)
        old = self._procs.get(key)
        if old is not None and not old.exited:
            raise errors.GuestProtocolError(f"the guest gave pid {proc.pid} again while {old.where} still runs")
        self._procs[key] = proc
        proc._table = self
        early = self._early.pop(key, None)
        if early is not None:
            proc._exited(early)

    def get(self, container: str | None, pid: int) -> Process | None:
        return self._procs.get((container or "", pid))

    def discard(self, proc: Process) -> None:
        """Forget proc (closed and exited: nobody can ask for it any more)."""
        key = (proc.container or "", proc.pid)
        if self._procs.get(key) is proc:
            del self._procs[key]

    def on_exit(self, event: models.ExitEvent) -> Process | None:
        key = (event.container or "", event.pid)
        info = ProcessExit(event.exit_status, event.signal, event.at)
        proc = self._procs.get(key)
        if proc is None or proc.exited:
            # The exec answer may still be on its way (an exited entry is an earlier process with that pid).
            remember(self._early, key, info, self.MAX_EARLY)
            return None
        proc._exited(info)
        if proc.state is ProcessState.CLOSED:
            self.discard(proc)
        return proc

    def remove_container(self, container: str) -> None:
        """The container is deleted: a process of it that did not report its exit was killed with it."""
        now = time.time()
        for key in [k for k in self._procs if k[0] == container]:
            self._procs.pop(key)._exited(ProcessExit(None, signals.SIGKILL, now))
        for key in [k for k in self._early if k[0] == container]:
            del self._early[key]

    def vm_died(self) -> None:
        now = time.time()
        for proc in self._procs.values():
            proc._exited(ProcessExit(None, signals.SIGKILL, now, vm_died=True))

    def __iter__(self) -> Iterator[Process]:
        return iter(list(self._procs.values()))
