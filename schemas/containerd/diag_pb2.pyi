from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("namespace", "task_id", "vm_id", "vm_state", "hypervisor_pid", "boot_seconds", "bundle", "backend")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    VM_STATE_FIELD_NUMBER: _ClassVar[int]
    HYPERVISOR_PID_FIELD_NUMBER: _ClassVar[int]
    BOOT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    task_id: str
    vm_id: str
    vm_state: str
    hypervisor_pid: int
    boot_seconds: float
    bundle: str
    backend: str
    def __init__(self, namespace: _Optional[str] = ..., task_id: _Optional[str] = ..., vm_id: _Optional[str] = ..., vm_state: _Optional[str] = ..., hypervisor_pid: _Optional[int] = ..., boot_seconds: _Optional[float] = ..., bundle: _Optional[str] = ..., backend: _Optional[str] = ...) -> None: ...

class ExecInUvmRequest(_message.Message):
    __slots__ = ("args", "stdin", "timeout_seconds")
    ARGS_FIELD_NUMBER: _ClassVar[int]
    STDIN_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    args: _containers.RepeatedScalarFieldContainer[str]
    stdin: bytes
    timeout_seconds: float
    def __init__(self, args: _Optional[_Iterable[str]] = ..., stdin: _Optional[bytes] = ..., timeout_seconds: _Optional[float] = ...) -> None: ...

class ExecInUvmResponse(_message.Message):
    __slots__ = ("exit_code", "stdout", "stderr", "truncated")
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    STDOUT_FIELD_NUMBER: _ClassVar[int]
    STDERR_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    exit_code: int
    stdout: bytes
    stderr: bytes
    truncated: bool
    def __init__(self, exit_code: _Optional[int] = ..., stdout: _Optional[bytes] = ..., stderr: _Optional[bytes] = ..., truncated: _Optional[bool] = ...) -> None: ...
