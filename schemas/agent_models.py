"""Host-side validation of what the guest sends (the guest is untrusted).

Every guest payload is parsed into one of these strict models before the host uses it: unknown
fields, wrong types, out-of-range numbers and oversized strings are rejected, and the caller
drops the link.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Self

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from schemas import agent as proto


def _b64(limit: int) -> BeforeValidator:
    def decode(value: object) -> bytes:
        if not isinstance(value, str):
            raise ValueError("expected base64 text")
        if len(value) > (limit * 4) // 3 + 4:  # cheap, before decoding; loose by up to 2 bytes
            raise ValueError(f"more than {limit} bytes")
        try:
            data = base64.b64decode(value, validate=True)
        except binascii.Error as e:
            raise ValueError(f"invalid base64: {e}") from None
        if len(data) > limit:
            raise ValueError(f"more than {limit} bytes")
        return data

    return BeforeValidator(decode)


class GuestModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _check_exit(exit_status: int | None, signal: int | None, *, ended: bool) -> None:
    """The guest reads both from one waitpid status: a process exits with a status or is ended by a
    signal (a kill, the OOM killer), never both; and one that ended has one of them."""
    if exit_status is not None and signal is not None:
        raise ValueError("exit_status and signal both set: a process exits or is ended by a signal, not both")
    if ended and exit_status is None and signal is None:
        raise ValueError("exit_status and signal both null: an ended process has one of them")


Text = Annotated[str, Field(max_length=4096)]


class ErrorBody(GuestModel):
    code: Annotated[str, Field(max_length=64)]
    message: Annotated[str, Field(max_length=proto.MAX_ERROR_MESSAGE)]


Uptime = Annotated[float, Field(ge=0, le=1e9)]


class BootUptimes(GuestModel):
    """The guest's uptime (s) at each step of its boot: /init started (the kernel's part done), /init
    executed the agent (modules loaded, root mounted), the agent's main() ran (Python started, agent
    imported). Only for the boot that made this kernel: a clone's are its template's."""

    init: Uptime
    exec: Uptime
    agent: Uptime


class HelloResult(GuestModel):
    version: Annotated[int, Field(ge=1, le=1000)]
    capabilities: Annotated[list[Annotated[str, Field(max_length=64)]], Field(max_length=64)]
    agent: Text
    kernel: Text
    uptime: Uptime
    boot: BootUptimes | None = None  # absent when /init did not record them


class PingResult(GuestModel):
    seq: Annotated[int, Field(ge=0, le=2**63)]


class Empty(GuestModel):
    pass


class RunResult(GuestModel):
    exit_status: Annotated[int, Field(ge=0, le=255)] | None
    signal: Annotated[int, Field(ge=1, le=64)] | None
    stdout: Annotated[bytes, _b64(proto.MAX_RUN_OUTPUT)]
    stderr: Annotated[bytes, _b64(proto.MAX_RUN_OUTPUT)]
    truncated: bool
    timed_out: bool

    @model_validator(mode="after")
    def _one_outcome(self) -> Self:
        _check_exit(self.exit_status, self.signal, ended=True)
        return self


class LogEvent(GuestModel):
    event: Annotated[str, Field(pattern=f"^{proto.EVENT_LOG}$")]
    level: Annotated[str, Field(pattern="^(debug|info|warning|error)$")]
    message: Text


Pid = Annotated[int, Field(ge=1, le=2**22)]
ContainerId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
Counter = Annotated[int, Field(ge=0, le=2**63)]
Timestamp = Annotated[float, Field(ge=0, le=1e11)]


class ScsiMountResult(GuestModel):
    device: Annotated[str, Field(pattern=r"^/dev/sd[a-z]{1,3}$")]
    path: Text | None


class PidResult(GuestModel):
    pid: Pid


class SignalResult(GuestModel):
    delivered: bool


class ContainerState(GuestModel):
    id: ContainerId
    status: Annotated[str, Field(pattern="^(created|running|paused|stopped|starting)$")]
    pid: Annotated[int, Field(ge=0, le=2**22)]
    bundle: Text
    created: Timestamp
    exit_status: Annotated[int, Field(ge=0, le=255)] | None  # both null while the init has not exited
    signal: Annotated[int, Field(ge=1, le=64)] | None

    @model_validator(mode="after")
    def _at_most_one_outcome(self) -> Self:
        _check_exit(self.exit_status, self.signal, ended=False)
        return self


class ContainerList(GuestModel):
    containers: Annotated[list[ContainerState], Field(max_length=4096)]


class PidList(GuestModel):
    pids: Annotated[list[Pid], Field(max_length=65536)]


class ContainerStats(GuestModel):
    cpu_usage_usec: Counter
    cpu_user_usec: Counter
    cpu_system_usec: Counter
    memory_usage: Counter
    memory_limit: Counter | None
    memory_anon: Counter
    memory_file: Counter
    oom_events: Counter
    oom_kills: Counter
    pids_current: Counter
    pids_limit: Counter | None
    io_rbytes: Counter
    io_wbytes: Counter
    io_rios: Counter
    io_wios: Counter


class ExitEvent(GuestModel):
    event: Annotated[str, Field(pattern=f"^{proto.EVENT_EXIT}$")]
    container: ContainerId | None
    pid: Pid
    exit_status: Annotated[int, Field(ge=0, le=255)] | None
    signal: Annotated[int, Field(ge=1, le=64)] | None
    at: Timestamp

    @model_validator(mode="after")
    def _one_outcome(self) -> Self:
        _check_exit(self.exit_status, self.signal, ended=True)
        return self


class OomEvent(GuestModel):
    event: Annotated[str, Field(pattern=f"^{proto.EVENT_OOM}$")]
    container: ContainerId
    oom_kills: Counter
    at: Timestamp
