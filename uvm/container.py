"""A container in a UVM: the host side of the guest runtime, with the lifecycle contract.

``start`` runs the init process; ``shutdown`` sends it SIGTERM and ``terminate`` SIGKILLs every
process of the container, both returning at once; ``wait``/``wait_timeout`` follow the init
process; ``close`` terminates if needed, deletes the container in the guest and releases the
host side. Wrong-state calls raise the precise error (not running, still running, closed).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import signal as signals
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from schemas import agent as proto
from schemas import agent_models as models
from schemas import oci
from uvm import errors
from uvm.process import Process, ProcessExit

if TYPE_CHECKING:
    from uvm.parts import VmServices

log = logging.getLogger("uvm.container")

CLOSE_GRACE_S = 10.0


class ContainerState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    CLOSED = "closed"


@dataclass(frozen=True)
class Rootfs:
    """Where a container's root comes from: a subdirectory of a 9p share, a path in the UVM, or
    read-only layers (mounted disks, top-most first) with a writable scratch, assembled as overlayfs
    in the guest (upper/work under <scratch>/<container id>, so containers can share a scratch)."""

    path: str = ""
    share: str | None = None
    layers: tuple[str, ...] = ()
    scratch: str | None = None

    def wire(self) -> dict[str, Any]:
        if self.layers:
            return {"layers": list(self.layers), "scratch": self.scratch}
        return {"share": self.share, "path": self.path}


@dataclass(frozen=True)
class SharedSource:
    """The source of a spec mount given as a path inside a 9p share of the UVM (a host directory or file
    bind-mounted into a shared directory): the guest rewrites the mount's source to where it sees it."""

    share: str
    path: str = ""

    def wire(self, index: int) -> dict[str, Any]:
        return {"index": index, "share": self.share, "path": self.path}


@dataclass(frozen=True)
class ContainerStatistics:
    container: models.ContainerStats
    vm_rss_bytes: int  # the hypervisor process's resident memory on the host
    vm_cpu_seconds: float  # its user + system CPU time on the host


class Container:
    def __init__(self, vm: VmServices, cid: str, init: Process) -> None:
        self.vm = vm
        self.id = cid
        self.init = init
        self.state = ContainerState.CREATED
        self.oom_kills = 0

    def __repr__(self) -> str:
        return f"<Container {self.id} {self.state.value} init={self.init.pid}>"

    @property
    def _client(self) -> Any:
        return self.vm.agent_client(f"container {self.id}")

    def _check(self, op: str, *allowed: ContainerState) -> None:
        if self.state is ContainerState.CLOSED:
            raise errors.ClosedError(f"container {self.id}: {op}: closed", container=self.id)
        if self.init.exited:
            self.state = ContainerState.STOPPED
        if allowed and self.state not in allowed:
            if self.state is ContainerState.STOPPED:
                raise errors.NotRunningError(f"container {self.id}: {op}: not running (stopped)", container=self.id)
            raise errors.StateError(f"container {self.id}: {op}: container is {self.state.value}", container=self.id)

    async def start(self) -> None:
        """Run the init process. Raises StateError unless the container is created."""
        self._check("start", ContainerState.CREATED)
        await self._client.request(proto.START, {"id": self.id}, models.PidResult)
        if self.state is ContainerState.CREATED:
            self.state = ContainerState.RUNNING

    async def shutdown(self) -> None:
        """SIGTERM to the init process; returns at once. No error if already stopped."""
        await self._kill("shutdown", signals.SIGTERM, all_processes=False)

    async def terminate(self) -> None:
        """SIGKILL to every process of the container; returns at once. No error if already stopped."""
        await self._kill("terminate", signals.SIGKILL, all_processes=True)

    async def _kill(self, op: str, sig: int, all_processes: bool) -> None:
        self._check(op)
        if self.state is ContainerState.STOPPED:
            return
        if self.state is ContainerState.CREATED and not all_processes:
            sig = signals.SIGKILL  # a created init waits for start: only SIGKILL ends it
        try:
            await self._client.request(proto.KILL, {"id": self.id, "signal": sig, "all": all_processes}, models.Empty)
        except errors.AgentNotRunningError:
            pass  # it stopped meanwhile

    async def kill(self, sig: int, all_processes: bool = False) -> None:
        """Any signal to the init (or every process). Raises NotRunningError when stopped."""
        self._check("kill", ContainerState.CREATED, ContainerState.RUNNING, ContainerState.PAUSED)
        if not 1 <= sig <= 64:
            raise errors.InvalidArgumentError(f"container {self.id}: signal {sig} is out of range 1..64")
        await self._client.request(proto.KILL, {"id": self.id, "signal": sig, "all": all_processes}, models.Empty)

    async def wait(self) -> ProcessExit:
        """The init process's exit (all its output delivered first)."""
        self._check("wait")
        exit_info = await self.init.wait()
        if self.state is not ContainerState.CLOSED:
            self.state = ContainerState.STOPPED
        return exit_info

    async def wait_timeout(self, timeout: float) -> ProcessExit:
        self._check("wait_timeout")
        exit_info = await self.init.wait_timeout(timeout)
        if self.state is not ContainerState.CLOSED:
            self.state = ContainerState.STOPPED
        return exit_info

    async def pause(self) -> None:
        self._check("pause", ContainerState.RUNNING)
        await self._client.request(proto.PAUSE, {"id": self.id}, models.Empty)
        self.state = ContainerState.PAUSED

    async def resume(self) -> None:
        self._check("resume", ContainerState.PAUSED)
        await self._client.request(proto.RESUME, {"id": self.id}, models.Empty)
        self.state = ContainerState.RUNNING

    async def guest_state(self) -> models.ContainerState:
        self._check("state")
        return await self._client.request(proto.STATE, {"id": self.id}, models.ContainerState)  # type: ignore[no-any-return]

    async def statistics(self) -> ContainerStatistics:
        """cgroup v2 figures of the container, plus the VM's own (its hypervisor on the host)."""
        self._check("statistics")
        stats = await self._client.request(proto.STATS, {"id": self.id}, models.ContainerStats)
        rss, cpu = self.vm.host_figures()
        return ContainerStatistics(stats, rss, cpu)

    async def process_list(self) -> list[int]:
        self._check("process_list")
        res = await self._client.request(proto.PROCESSES, {"id": self.id}, models.PidList)
        return list(res.pids)

    async def update(self, resources: oci.LinuxResources) -> None:
        """Change cgroup limits (OCI linux.resources)."""
        self._check("update", ContainerState.CREATED, ContainerState.RUNNING, ContainerState.PAUSED)
        await self._client.request(proto.UPDATE, {"id": self.id, "resources": resources.wire()}, models.Empty)

    modify = update

    async def create_process(self, spec: oci.Process, *, stdin: bool = False, stdout: bool = True,
                             stderr: bool = True) -> Process:
        """Exec a process in the running container (with streamed stdio)."""
        self._check("create_process", ContainerState.RUNNING)  # a paused container's processes are frozen
        return await self.vm.exec_in(self.id, spec, stdin=stdin, stdout=stdout, stderr=stderr)

    async def open_process(self, pid: int) -> Process:
        self._check("open_process")
        proc = self.vm.processes.get(self.id, pid)
        if proc is None:
            raise errors.NotFoundError(f"container {self.id}: no process {pid}", container=self.id, pid=pid)
        return proc

    async def close(self) -> None:
        """Terminate if running, delete the container in the guest, release the host side. Idempotent."""
        if self.state is ContainerState.CLOSED:
            return
        try:
            if self.vm.state.value == "running":
                if not self.init.exited:
                    self.init.close_stdout()  # nobody will read it any more
                    self.init.close_stderr()
                    await self.terminate()
                    try:
                        await self.init.wait_timeout(CLOSE_GRACE_S)
                    except errors.WaitTimeoutError:
                        pass
                try:
                    async with asyncio.timeout(CLOSE_GRACE_S):  # a guest that never answers does not hold us
                        await self._client.request(proto.DELETE, {"id": self.id}, models.Empty)
                except (errors.AgentNotFoundError, errors.LinkError, errors.NotRunningError):
                    pass
                except TimeoutError:
                    log.warning("container %s: the guest did not delete it within %gs", self.id, CLOSE_GRACE_S)
        finally:
            self.state = ContainerState.CLOSED
            self.init.close()
            for proc in list(self.vm.processes):
                if proc.container == self.id:
                    proc.close()
            self.vm.forget_container(self.id)
