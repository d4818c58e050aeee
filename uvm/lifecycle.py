"""The VM states, and the stop escalation of shared/DESIGN.md for anything with the lifecycle contract
(UVM, container): shutdown, wait_timeout(grace), then terminate, wait_timeout(grace)."""

from __future__ import annotations

import enum
from typing import Protocol, TypeVar

from uvm import errors


class VmState(enum.Enum):
    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"  # shutdown/terminate requested, not exited yet
    STOPPED = "stopped"
    CLOSED = "closed"


T_co = TypeVar("T_co", covariant=True)


class Stoppable(Protocol[T_co]):
    async def shutdown(self) -> None: ...

    async def terminate(self) -> None: ...

    async def wait_timeout(self, timeout: float) -> T_co: ...


async def stop_escalating(thing: Stoppable[T_co], grace: float) -> T_co:
    """Ask it to stop, force it after grace seconds; its exit. Raises WaitTimeoutError if even the
    forced stop did not finish within another grace (and whatever its wait raises, e.g. VmDiedError)."""
    try:
        await thing.shutdown()
        return await thing.wait_timeout(grace)
    except errors.WaitTimeoutError:
        pass
    await thing.terminate()
    return await thing.wait_timeout(grace)
