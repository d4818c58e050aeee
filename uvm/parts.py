"""What a VM's parts may use of their VM: a narrow interface that UtilityVM implements.

A container (uvm/container.py) and the SCSI manager (uvm/scsi.py) are given their VM as a ``VmServices``,
not as a UtilityVM: neither imports uvm/vm.py (which imports them), and neither reaches into the VM's
private members. What they get is what they need: the VM's id and state, its agent while it runs, its
hypervisor backend for hot-plugging, its process table, exec in a container, and forgetting a closed
container.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from schemas import oci
    from uvm.backends.base import Backend
    from uvm.lifecycle import VmState
    from uvm.link import AgentClient
    from uvm.process import Process, ProcessTable


class VmServices(Protocol):
    id: str
    state: VmState
    agent: AgentClient | None  # the agent's client while the link is up
    processes: ProcessTable

    def agent_client(self, op: str) -> AgentClient:
        """The agent of the running VM. Raises NotRunningError (op names the caller) or ClosedError."""
        ...

    def require_backend(self, op: str) -> Backend:
        """The hypervisor backend of the running VM. Raises NotRunningError or ClosedError."""
        ...

    async def exec_in(self, container: str | None, spec: oci.Process, *, stdin: bool, stdout: bool,
                      stderr: bool) -> Process:
        """A process started in a container (None: in the UVM itself), with streamed stdio."""
        ...

    def forget_container(self, container_id: str) -> None:
        """A closed container leaves the VM's books (its processes with it)."""
        ...

    def host_figures(self) -> tuple[int, float]:
        """(resident bytes, CPU seconds) of the hypervisor process on the host."""
        ...
