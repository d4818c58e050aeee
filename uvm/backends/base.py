"""The backend Protocol: what the UtilityVM needs from a hypervisor, and nothing more.

Slot allocation, the agent protocol and the lifecycle contract live above this, once; a backend
only starts and stops a hypervisor, opens the agent channel and reports how the hypervisor ended.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from typing import Protocol

from uvm.builder import LaunchSpec
from uvm.errors import AlreadyExistsError, StartError


def create_run_dir(spec: LaunchSpec, mode: int) -> None:
    """The VM's own run directory (sockets, logs). Raises AlreadyExistsError if it exists (id in use)."""
    try:
        spec.run_dir.parent.mkdir(parents=True, exist_ok=True)
        spec.run_dir.mkdir(mode=mode)
    except FileExistsError:
        raise AlreadyExistsError(f"VM {spec.vm_id}: run directory {spec.run_dir} exists (id in use?)",
                                 vm_id=spec.vm_id) from None
    except OSError as e:
        raise StartError(f"VM {spec.vm_id}: cannot create {spec.run_dir}: {e.strerror}", vm_id=spec.vm_id) from None


@dataclass(frozen=True)
class HypervisorExit:
    """How the hypervisor ended: process status and the shutdown reason it reported, if any."""

    exit_status: int | None  # process exit code
    signal: int | None  # terminating signal of the hypervisor process
    shutdown_reason: str | None  # QMP SHUTDOWN reason: guest-shutdown, guest-reset, host-qmp-quit, ...
    detail: str = ""  # the hypervisor's own last words (stderr tail)

    def describe(self) -> str:
        if self.signal is not None:
            how = f"killed by signal {self.signal}"
        else:
            how = f"exited with status {self.exit_status}"
        if self.shutdown_reason:
            how += f" after {self.shutdown_reason}"
        if self.detail:
            how += f": {self.detail}"
        return how


class Backend(Protocol):
    name: str

    @property
    def pid(self) -> int | None: ...

    async def launch(self, spec: LaunchSpec) -> None:
        """Start the hypervisor. Raises StartError (nothing left running) if it does not come up."""

    async def connect_agent(self) -> socket.socket:
        """Open the host end of the agent channel: a connected, non-blocking stream socket."""

    async def request_powerdown(self) -> None:
        """Ask the guest to power off through the platform (ACPI); returns at once."""

    async def terminate(self) -> None:
        """Force the hypervisor to stop; returns at once (exit is observed by wait_exit)."""

    async def wait_exit(self) -> HypervisorExit:
        """Wait until the hypervisor has exited."""

    async def attach_scsi(self, controller: int, lun: int, path: str, readonly: bool, fmt: str) -> None:
        """Hot-plug the image at path as a SCSI disk at controller:lun. Raises DiskError (nothing left)."""

    async def detach_scsi(self, controller: int, lun: int) -> None:
        """Unplug the disk at controller:lun and release its host side. Raises DiskError."""

    async def scsi_inventory(self) -> dict[str, list[str]]:
        """{"devices": [...], "nodes": [...]}: what the hypervisor has attached (for checks)."""

    def console_tail(self, lines: int = 30) -> str:
        """The last lines the guest printed on its console."""

    async def aclose(self) -> None:
        """Stop the hypervisor if needed and release every host resource. Idempotent."""


async def connect_unix(path: str) -> socket.socket:
    """A non-blocking stream socket connected to the unix socket at path (for AgentConnection.open)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, path)
    except BaseException:
        sock.close()
        raise
    return sock
