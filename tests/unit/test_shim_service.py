"""shim.containerd.service: uvm's errors as containerd's status codes, runtime options, and the task service's edge
behaviour over a real ttrpc connection (no VM is booted: every call here fails or answers before one)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from google.protobuf import any_pb2, empty_pb2
from google.protobuf.message import Message

from schemas import shim_options
from schemas.containerd import runtimeoptions_pb2
from schemas.containerd import shim_pb2 as pb
from schemas.shim_options import OptionsError
from shim.containerd.events import Publisher
from shim.containerd.service import SERVICE, TaskService, config_path_from, to_status
from shim.containerd.ttrpc import Client, Code, TtrpcError
from tests.unit.ttrpc_harness import served
from uvm import errors

pytestmark = pytest.mark.timeout(10)


# -- to_status -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("error", "code"), [
    (errors.NotFoundError("container c: not found"), Code.NOT_FOUND),
    (errors.AgentNotFoundError("not_found", "process 7: not found"), Code.NOT_FOUND),
    (errors.AlreadyExistsError("exec e1: already exists"), Code.ALREADY_EXISTS),
    (errors.AgentAlreadyExistsError("exists", "container c: exists"), Code.ALREADY_EXISTS),
    (errors.InvalidArgumentError("signal 99: out of range"), Code.INVALID_ARGUMENT),
    (errors.InvalidIdError("invalid_id", "id ../x"), Code.INVALID_ARGUMENT),
    (errors.ConfigError("memory_mib: too much"), Code.INVALID_ARGUMENT),
    (OptionsError("config /x: uvm.cpus: bad"), Code.INVALID_ARGUMENT),
    (errors.StateError("task t: not started"), Code.FAILED_PRECONDITION),
    (errors.StillRunningError("task t: still running"), Code.FAILED_PRECONDITION),
    (errors.NotRunningError("process: not running"), Code.FAILED_PRECONDITION),
    (errors.AgentStillRunningError("still_running", "process 7: running"), Code.FAILED_PRECONDITION),
    (errors.AgentUnsupportedError("unsupported", "pause: not supported"), Code.UNIMPLEMENTED),
    (errors.WaitTimeoutError("wait: 5s passed"), Code.DEADLINE_EXCEEDED),
    (errors.UvmError("something else"), Code.UNKNOWN),
    (errors.VmDiedError("vm died"), Code.UNKNOWN),
    (errors.LinkError("link down"), Code.UNKNOWN),
])
def test_to_status(error: Exception, code: Code) -> None:
    status = to_status(error)
    assert isinstance(status, TtrpcError)
    assert status.code == code
    assert status.message == str(error)


# -- config_path_from ----------------------------------------------------------------------------------


def options_any(config_path: str, type_url: str = "runtimeoptions.v1.Options") -> any_pb2.Any:
    return any_pb2.Any(type_url=type_url, value=runtimeoptions_pb2.Options(config_path=config_path).SerializeToString())


def test_config_path_from_runtime_options() -> None:
    assert config_path_from(options_any("/x")) == "/x"
    assert config_path_from(options_any("/x", type_url="type.googleapis.com/runtimeoptions.v1.Options")) == "/x"


def test_config_path_from_nothing() -> None:
    assert config_path_from(None) is None
    assert config_path_from(options_any("")) is None
    assert config_path_from(options_any("/x", type_url="io.containerd.runc.v1.Options")) is None


def test_config_path_from_undecodable_options() -> None:
    with pytest.raises(TtrpcError) as info:
        config_path_from(any_pb2.Any(type_url="runtimeoptions.v1.Options", value=b"\xff\xff"))
    assert info.value.code == Code.INVALID_ARGUMENT


# -- the service over ttrpc ------------------------------------------------------------------------------


@dataclass
class Shim:
    service: TaskService
    client: Client
    dir: Path

    async def call(self, method: str, request: Message, response_type: type[Message] = empty_pb2.Empty) -> Message:
        return await self.client.call(SERVICE, method, request, response_type, timeout=5.0)

    async def status_of(self, method: str, request: Message) -> TtrpcError:
        with pytest.raises(TtrpcError) as info:
            await self.call(method, request)
        return info.value


@pytest.fixture
async def shim(sock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Shim]:
    # No configuration file from this machine: the defaults, unless a test names one.
    monkeypatch.delenv("UVMSHIM_CONFIG", raising=False)
    monkeypatch.setattr(shim_options, "DEFAULT_PATH", sock_dir / "no-such-config.toml")
    publisher = Publisher(f"unix://{sock_dir / 'no-containerd.sock'}", "ns")
    service = TaskService("ns", "shim-1", publisher)
    try:
        async with served(service, sock_dir) as client:
            yield Shim(service, client, sock_dir)
    finally:
        await service.close()


UNKNOWN_TASK_CALLS: list[tuple[str, Message]] = [
    ("State", pb.StateRequest(id="nope")),
    ("Start", pb.StartRequest(id="nope")),
    ("Delete", pb.DeleteRequest(id="nope")),
    ("Pids", pb.PidsRequest(id="nope")),
    ("Pause", pb.PauseRequest(id="nope")),
    ("Resume", pb.ResumeRequest(id="nope")),
    ("Kill", pb.KillRequest(id="nope", signal=9)),
    ("Exec", pb.ExecProcessRequest(id="nope", exec_id="e1")),
    ("ResizePty", pb.ResizePtyRequest(id="nope", width=80, height=24)),
    ("CloseIO", pb.CloseIORequest(id="nope", stdin=True)),
    ("Update", pb.UpdateTaskRequest(id="nope")),
    ("Wait", pb.WaitRequest(id="nope")),
    ("Stats", pb.StatsRequest(id="nope")),
]


@pytest.mark.parametrize(("method", "request_message"), UNKNOWN_TASK_CALLS, ids=[m for m, _ in UNKNOWN_TASK_CALLS])
async def test_unknown_task_is_not_found(shim: Shim, method: str, request_message: Message) -> None:
    status = await shim.status_of(method, request_message)
    assert status.code == Code.NOT_FOUND
    assert "task nope" in status.message


async def test_checkpoint_is_unimplemented(shim: Shim) -> None:
    status = await shim.status_of("Checkpoint", pb.CheckpointTaskRequest(id="t", path="/cp"))
    assert status.code == Code.UNIMPLEMENTED


async def test_unknown_method_is_unimplemented(shim: Shim) -> None:
    status = await shim.status_of("Frobnicate", pb.StateRequest(id="t"))
    assert status.code == Code.UNIMPLEMENTED


async def test_connect_reports_the_shim_pid(shim: Shim) -> None:
    resp = await shim.call("Connect", pb.ConnectRequest(id="t"), pb.ConnectResponse)
    assert isinstance(resp, pb.ConnectResponse)
    assert resp.shim_pid == os.getpid()
    assert resp.task_pid == 0
    assert resp.version


@pytest.mark.parametrize("now", [False, True])
async def test_shutdown_without_a_task_requests_shutdown(shim: Shim, now: bool) -> None:
    assert not shim.service.shutdown_requested.is_set()
    await shim.call("Shutdown", pb.ShutdownRequest(id="t", now=now))
    assert shim.service.shutdown_requested.is_set()


async def test_create_without_config_json_is_an_invalid_argument(shim: Shim) -> None:
    bundle = shim.dir / "bundle"
    bundle.mkdir()
    status = await shim.status_of("Create", pb.CreateTaskRequest(id="t1", bundle=str(bundle)))
    assert status.code == Code.INVALID_ARGUMENT
    assert "config.json" in status.message
    assert str(bundle) in status.message
    assert not shim.service.pod.tasks
    # Nothing was created: the task is still unknown, and a new Create is allowed.
    assert (await shim.status_of("State", pb.StateRequest(id="t1"))).code == Code.NOT_FOUND
    assert (await shim.status_of("Create", pb.CreateTaskRequest(id="t1", bundle=str(bundle)))).code == \
        Code.INVALID_ARGUMENT


async def test_create_with_a_malformed_config_json_is_an_invalid_argument(shim: Shim) -> None:
    bundle = shim.dir / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text("{not json")
    status = await shim.status_of("Create", pb.CreateTaskRequest(id="t1", bundle=str(bundle)))
    assert status.code == Code.INVALID_ARGUMENT
    assert "config.json" in status.message
    assert not shim.service.pod.tasks


async def test_create_with_a_bad_config_file_from_runtime_options(shim: Shim) -> None:
    config = shim.dir / "uvmshim.toml"
    config.write_text("[uvm]\ngpu = true\n")
    bundle = shim.dir / "bundle"
    bundle.mkdir()
    req = pb.CreateTaskRequest(id="t1", bundle=str(bundle), options=options_any(str(config)))
    status = await shim.status_of("Create", req)
    assert status.code == Code.INVALID_ARGUMENT
    assert str(config) in status.message
    assert "gpu" in status.message
    assert not shim.service.pod.tasks


async def test_create_with_undecodable_runtime_options(shim: Shim) -> None:
    bundle = shim.dir / "bundle"
    bundle.mkdir()
    options = any_pb2.Any(type_url="runtimeoptions.v1.Options", value=b"\xff\xff")
    status = await shim.status_of("Create", pb.CreateTaskRequest(id="t1", bundle=str(bundle), options=options))
    assert status.code == Code.INVALID_ARGUMENT


async def test_create_from_a_checkpoint_is_unimplemented(shim: Shim) -> None:
    status = await shim.status_of("Create", pb.CreateTaskRequest(id="t1", bundle=str(shim.dir), checkpoint="/cp"))
    assert status.code == Code.UNIMPLEMENTED
    assert not shim.service.pod.tasks


async def test_service_close_without_a_task_is_prompt(sock_dir: Path) -> None:
    service = TaskService("ns", "shim-1", Publisher(str(sock_dir / "none.sock"), "ns"), config_path="/x.toml")
    assert service.config_path == "/x.toml"
    await service.close()
    await service.close()
