"""The uvm error hierarchy: one root, precise leaves, each carrying structured context.

Third-party exceptions (OSError, qemu.qmp errors, pydantic's ValidationError) are translated to
these at the boundary where they happen, with what failed and on what.
"""

from __future__ import annotations

from typing import Any


class UvmError(Exception):
    """Root of every error uvmshim raises. ``context`` names the operation and object."""

    def __init__(self, message: str, **context: Any) -> None:
        super().__init__(message)
        self.message = message
        self.context = context

    def __str__(self) -> str:
        return self.message


class ConfigError(UvmError):
    """The configuration cannot describe a VM on this host (bad value, missing file, too much memory)."""


class StartError(UvmError):
    """The VM did not start; nothing of it is left running. ``console_tail`` says how far it got."""

    def __init__(self, message: str, console_tail: str = "", **context: Any) -> None:
        if console_tail:
            message = f"{message}\n--- console tail ---\n{console_tail}"
        super().__init__(message, **context)
        self.console_tail = console_tail


class BootTimeoutError(StartError):
    """start() passed its deadline before the agent answered hello."""


class StateError(UvmError):
    """The object is in the wrong state for the operation."""


class NotRunningError(StateError):
    pass


class AlreadyStoppedError(StateError):
    pass


class StillRunningError(StateError):
    pass


class AlreadyExistsError(UvmError):
    pass


class NotFoundError(UvmError):
    pass


class ClosedError(StateError):
    """The object was closed; it cannot be used any more."""


class NotExitedError(StateError):
    """The process has not exited yet (exit_code asked too early)."""


class WaitTimeoutError(UvmError, TimeoutError):
    """wait_timeout() expired; the thing waited for is still running."""


class VmDiedError(UvmError):
    """The VM stopped without being asked to (hypervisor crash or kill, guest panic)."""

    def __init__(self, message: str, console_tail: str = "", **context: Any) -> None:
        if console_tail:
            message = f"{message}\n--- console tail ---\n{console_tail}"
        super().__init__(message, **context)
        self.console_tail = console_tail


class DiskError(UvmError):
    """A disk could not be attached, mounted, unmounted or detached (context: path, slot)."""


class NoAvailableLocationError(DiskError):
    """Every controller x LUN slot is in use."""


class LinkError(UvmError):
    """The agent link is down (closed, VM gone); pending calls fail with this."""


class GuestProtocolError(LinkError):
    """The guest sent something outside the protocol; the link was dropped."""


class AgentError(UvmError):
    """The agent answered a request with an error. ``code`` is the wire code."""

    def __init__(self, code: str, message: str, **context: Any) -> None:
        super().__init__(message, **context)
        self.code = code


class AgentNotFoundError(AgentError, NotFoundError):
    pass


class InvalidArgumentError(UvmError):
    """A caller's argument is out of range or malformed (signal number, size, spec)."""


class AgentInvalidArgumentError(AgentError, InvalidArgumentError):
    pass


class AgentUnsupportedError(AgentError):
    pass


class AgentAlreadyExistsError(AgentError, AlreadyExistsError):
    pass


class AgentStillRunningError(AgentError, StillRunningError):
    pass


class AgentNotRunningError(AgentError, NotRunningError):
    pass


class NotStoppedError(AgentError, StateError):
    """hcsshim's "not stopped": the container must be stopped (or created) first."""


class InvalidIdError(AgentError, InvalidArgumentError):
    """The container id is not acceptable (path characters, length)."""


class TemplateError(UvmError):
    """A template could not be built, saved or loaded (the VM falls back to a cold boot where it can)."""


class NetworkError(UvmError):
    """A container's network could not be read or connected to its UVM (context: netns, link, step)."""
