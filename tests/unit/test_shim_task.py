"""shim.containerd.task.Task over a UtilityVM on the fake backend and a FakeGuest that plays the container runtime:
the orderings and releases containerd relies on, with no QEMU (the e2e suite runs the same with one)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from google.protobuf.message import Message

from schemas import agent as proto
from schemas.framing import DATA
from schemas.shim_options import ShimOptions
from schemas.uvm_config import UvmConfig
from shim.containerd import leftovers
from shim.containerd.task import EXEC_FAILED_STATUS, INIT, Task
from tests.unit.test_shim_stdio import writer_can_connect
from uvm import errors
from uvm.testing import ErrorReply, FakeBackendFactory, FakeGuest, Request, make_test_config
from uvm.vm import UtilityVM

T = TypeVar("T")
DEADLINE = 5.0
INIT_PID = 100


async def within(aw: Awaitable[T], timeout: float = DEADLINE) -> T:
    return await asyncio.wait_for(aw, timeout)


class Runtime:
    """The guest's container runtime, in the FakeGuest: containers start, execs get pids, a kill ends
    every process of the container with an exit notification (as the real agent does)."""

    def __init__(self, guest: FakeGuest) -> None:
        self.guest = guest
        self.running: set[int] = set()
        self.next_pid = INIT_PID + 1
        self.tasks: set[asyncio.Task[None]] = set()
        guest.handlers.update({
            proto.CREATE: self.create, proto.START: lambda req: {"pid": INIT_PID}, proto.EXEC: self.exec,
            proto.KILL: self.kill, proto.DELETE: lambda req: {},
        })

    def create(self, req: Request) -> dict[str, Any]:
        self.running.add(INIT_PID)
        return {"pid": INIT_PID}

    def exec(self, req: Request) -> dict[str, Any]:
        pid, self.next_pid = self.next_pid, self.next_pid + 1
        self.running.add(pid)
        return {"pid": pid}

    def kill(self, req: Request) -> dict[str, Any]:
        for pid in sorted(self.running) if req.params.get("all") else [INIT_PID]:
            self.exit_later(pid, None, req.params["signal"])
        return {}

    def exit_later(self, pid: int, status: int | None, sig: int | None = None) -> None:
        self.running.discard(pid)
        note = {"event": proto.EVENT_EXIT, "container": "t1", "pid": pid, "exit_status": status, "signal": sig,
                "at": time.time()}
        task = asyncio.get_running_loop().create_task(self.guest.notify(note))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


class Harness:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.factory = FakeBackendFactory(guest=self._guest)
        self.runtimes: list[Runtime] = []
        self.events: list[tuple[str, Message]] = []
        bundle = tmp / "bundle"
        (bundle / "rootfs").mkdir(parents=True)
        (bundle / "rootfs" / "bin").mkdir()
        (bundle / "config.json").write_text(json.dumps({"ociVersion": "1.0.2", "root": {"path": "rootfs"},
                                                        "process": {"args": ["sh"], "cwd": "/"},
                                                        "linux": {"namespaces": [{"type": "network"}]}}))
        self.task = Task("t1", bundle, "ns", ShimOptions(stop_grace_s=0.5), self._publish, vm_factory=self._vm)

    def _guest(self) -> FakeGuest:
        guest = FakeGuest()
        self.runtimes.append(Runtime(guest))
        return guest

    def _vm(self, config: UvmConfig) -> UtilityVM:
        test_config = make_test_config(self.tmp, id=config.id, shares=config.shares, console_log=config.console_log)
        return UtilityVM(test_config, backend_factory=self.factory)

    def _publish(self, topic: str, event: Message) -> None:
        self.events.append((topic, event))

    @property
    def topics(self) -> list[str]:
        return [t for t, _ in self.events]

    @property
    def runtime(self) -> Runtime:
        return self.runtimes[-1]

    async def create(self) -> None:
        await within(self.task.create([], "", "", "", False))


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    harness = Harness(tmp_path)
    try:
        yield harness
    finally:
        await within(harness.task.teardown())
        assert all(b.closed for b in harness.factory.backends)


async def test_task_start_goes_out_before_an_exit_that_comes_first(h: Harness) -> None:
    """A fast init can exit before the guest answers start: containerd must still see start, then exit."""
    await h.create()
    guest = h.factory.last.guest
    guest.handlers[proto.START] = lambda req: None  # answered below, after the exit
    start = asyncio.create_task(h.task.start(INIT))
    req = (await within(guest.wait_for_requests(len(guest.requests) + 1)))[-1]
    assert req.method == proto.START
    h.runtime.exit_later(INIT_PID, 0)
    await asyncio.sleep(0.1)
    assert "/tasks/exit" not in h.topics
    with pytest.raises(errors.StillRunningError):  # no Delete while Start is in flight
        await h.task.delete(INIT)
    await guest.respond(req.id, {"pid": INIT_PID})
    assert await within(start) == h.factory.last.pid  # the task's pid is the hypervisor's, as Kata's
    exited = await within(h.task.wait(INIT))
    assert exited.status == 0
    assert h.topics == ["/tasks/create", "/tasks/start", "/tasks/exit"]
    await within(h.task.delete(INIT))
    assert h.topics[-1] == "/tasks/delete"


async def _input_reaches_the_guest(h: Harness, path: str, data: bytes) -> None:
    guest = h.factory.last.guest
    writer = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(writer, data)
        await within(guest.wait_until(lambda: data in b"".join(f.payload for f in guest.stream_frames()
                                                               if f.type == DATA)))
    finally:
        os.close(writer)


async def test_the_stdin_fifos_get_a_reader_at_the_start_not_the_create(h: Harness) -> None:
    """Until a process starts, its stdin FIFO has no reader, so a client's input cannot run out before the
    client's create call returned and it installed the CloseIO it sends at that end (containerd#4489: a
    short line piped into `ctr task exec ... cat` hung). Init and exec alike."""
    fifos = {name: str(h.tmp / f"init-{name}") for name in ("stdin", "stdout", "e1-stdin", "e1-stdout")}
    for path in fifos.values():
        os.mkfifo(path)
    await within(h.task.create([], fifos["stdin"], fifos["stdout"], "", False))
    assert not writer_can_connect(fifos["stdin"])
    await within(h.task.start(INIT))
    await _input_reaches_the_guest(h, fifos["stdin"], b"input of the init")
    await within(h.task.exec_add("e1", json.dumps({"args": ["cat"], "cwd": "/"}).encode(), False,
                                 fifos["e1-stdin"], fifos["e1-stdout"], ""))
    assert not writer_can_connect(fifos["e1-stdin"])
    await within(h.task.start("e1"))
    await _input_reaches_the_guest(h, fifos["e1-stdin"], b"input of the exec")


async def test_a_failed_exec_start_releases_a_wait_already_waiting(h: Harness) -> None:
    """CRI waits on an exec before it starts it: a Start that fails must not leave that Wait parked."""
    await h.create()
    await within(h.task.start(INIT))
    await within(h.task.exec_add("e1", json.dumps({"args": ["/nope"], "cwd": "/"}).encode(), False, "", "", ""))
    waiter = asyncio.create_task(h.task.wait("e1"))
    h.factory.last.guest.handlers[proto.EXEC] = lambda req: ErrorReply(proto.E_NOT_FOUND, "exec /nope: No such file")
    with pytest.raises(errors.AgentNotFoundError):
        await within(h.task.start("e1"))
    assert (await within(waiter)).status == EXEC_FAILED_STATUS
    with pytest.raises(errors.StateError):
        await h.task.start("e1")
    await within(h.task.delete("e1"))


async def test_delete_of_the_task_releases_a_running_exec_and_its_exit_comes_first(h: Harness) -> None:
    await h.create()
    await within(h.task.start(INIT))
    await within(h.task.exec_add("e1", json.dumps({"args": ["sleep", "99"], "cwd": "/"}).encode(), False, "", "", ""))
    exec_pid = await within(h.task.start("e1"))
    waiter = asyncio.create_task(h.task.wait("e1"))
    h.runtime.exit_later(INIT_PID, 0)  # the init ends; the exec (no pid namespace of its own) goes on
    await within(h.task.wait(INIT))
    assert exec_pid in h.runtime.running and not waiter.done()
    await within(h.task.delete(INIT))
    assert (await within(waiter)).status == 137
    exits = [e.id for t, e in h.events if t == "/tasks/exit"]
    assert exits == ["t1", "e1"]
    assert h.topics[-1] == "/tasks/delete"


async def test_a_delete_cancelled_midway_still_releases_the_vm_and_only_then_forgets_it(h: Harness) -> None:
    """A Delete past its ttrpc deadline (or a containerd gone) must not leave the VM behind."""
    await h.create()
    await within(h.task.start(INIT))
    h.runtime.exit_later(INIT_PID, 0)
    await within(h.task.wait(INIT))
    guest = h.factory.last.guest
    guest.handlers[proto.DELETE] = lambda req: None  # the guest is slow to delete
    delete = asyncio.create_task(h.task.delete(INIT))
    req = (await within(guest.wait_for_requests(len(guest.requests) + 1)))[-1]
    assert req.method == proto.DELETE
    assert (h.task.state_dir / leftovers.STATE_FILE).exists()
    delete.cancel()
    with pytest.raises(asyncio.CancelledError):
        await delete
    backend = h.factory.last
    assert not backend.closed
    await guest.respond(req.id, {})
    await within(h.task.teardown())  # the teardown went on: it ends, the VM is gone, then the record
    assert backend.closed
    assert not (h.task.state_dir / leftovers.STATE_FILE).exists()


@pytest.mark.parametrize("size", [(80, 24), (0, 0)])
async def test_resize_of_a_process_without_a_terminal_is_a_no_op(h: Harness, size: tuple[int, int]) -> None:
    await h.create()
    await within(h.task.resize(INIT, *size))


def spec_with(**fields: Any) -> Any:
    from schemas import oci

    return oci.Spec.model_validate({"process": {"args": ["sh"]}, **fields})


@pytest.mark.parametrize("fields, shape", [
    ({}, (256, 1)),
    ({"linux": {"resources": {"memory": {"limit": 512 << 20}}}}, (768, 1)),
    ({"linux": {"resources": {"memory": {"limit": (100 << 20) + 1}, "cpu": {"quota": 150000, "period": 100000}}}},
     (357, 3)),
    ({"linux": {"resources": {"memory": {"limit": -1}, "cpu": {"quota": 50000}}}}, (256, 2)),  # period: 100 ms
    ({"annotations": {"io.uvmshim.uvm.memory_mib": "1024", "io.uvmshim.uvm.cpus": "2"},
      "linux": {"resources": {"memory": {"limit": 512 << 20}}}}, (1024, 2)),
])
def test_the_uvm_is_sized_for_the_container(fields: dict[str, Any], shape: tuple[int, int],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """As Kata: the configured size plus the container's memory limit and CPU quota; annotations win."""
    from shim.containerd.task import uvm_shape

    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert uvm_shape(spec_with(**fields), ShimOptions()) == {"memory_mib": shape[0], "cpus": shape[1]}


def test_the_uvm_stays_within_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """A memory limit above the host's memory (Kubernetes lets limits overcommit; 2^63 means no limit to
    some tools) and a quota above its CPUs give a UVM of the host's size."""
    from shim.containerd.task import uvm_shape
    from uvm.builder import host_memory_mib

    monkeypatch.setattr("os.cpu_count", lambda: 2)
    spec = spec_with(linux={"resources": {"memory": {"limit": (1 << 63) - 1}, "cpu": {"quota": 800000, "period": 100000}}})
    assert uvm_shape(spec, ShimOptions()) == {"memory_mib": host_memory_mib(), "cpus": 2}


@pytest.mark.parametrize("fields, problem", [
    ({"annotations": {"io.uvmshim.uvm.memory_mib": "lots"}}, "io.uvmshim.uvm.memory_mib='lots'"),
    ({"annotations": {"io.uvmshim.uvm.cpus": "0"}}, "io.uvmshim.uvm.cpus='0'"),
    ({"linux": {"resources": {"pids": {"limit": "many"}}}}, "linux.resources"),
])
def test_a_uvm_shape_that_cannot_be_is_refused_by_name(fields: dict[str, Any], problem: str) -> None:
    from shim.containerd.task import uvm_shape

    with pytest.raises(errors.InvalidArgumentError) as e:
        uvm_shape(spec_with(**fields), ShimOptions())
    assert problem in str(e.value)


async def test_a_task_boots_its_uvm_with_the_shape_and_a_bad_one_leaves_nothing(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    configs: list[UvmConfig] = []
    factory = h.task._vm_factory

    def vm(config: UvmConfig) -> UtilityVM:
        configs.append(config)
        return factory(config)

    h.task._vm_factory = vm
    spec = json.loads((h.task.bundle / "config.json").read_text())
    spec["linux"]["resources"] = {"memory": {"limit": 64 << 20}}
    (h.task.bundle / "config.json").write_text(json.dumps(spec))
    try:
        await h.create()
        assert configs[0].memory_mib == 256 + 64
        assert configs[0].network_namespace == "new"  # a network namespace without a path: a fresh one
    finally:
        await within(h.task.teardown())
    bad = Harness(tmp_path / "bad")
    spec["annotations"] = {"io.uvmshim.uvm.memory_mib": "-5"}
    (bad.task.bundle / "config.json").write_text(json.dumps(spec))
    with pytest.raises(errors.InvalidArgumentError, match="memory_mib"):
        await bad.create()
    assert not bad.factory.backends and bad.task.vm is None
    assert sorted(p.name for p in bad.task.bundle.iterdir()) == ["config.json", "rootfs"]


async def test_a_spec_without_a_network_namespace_is_refused_as_the_hosts_network(tmp_path: Path) -> None:
    """ctr run --net-host, a hostNetwork pod: the spec has no network namespace; a VM cannot share the host's."""
    h = Harness(tmp_path)
    spec = json.loads((h.task.bundle / "config.json").read_text())
    spec["linux"]["namespaces"] = [{"type": "pid"}]
    (h.task.bundle / "config.json").write_text(json.dumps(spec))
    with pytest.raises(errors.InvalidArgumentError, match="asks for the host's network"):
        await h.create()
    assert not h.factory.backends and h.task.vm is None


async def test_the_tasks_pid_is_the_hypervisors_and_pids_are_the_guests(h: Harness) -> None:
    """As Kata: Create, Start and State name the hypervisor's pid (whose /proc/<pid>/ns/net is the UVM's
    network namespace); the guest's pids stay the processes' own (Pids lists them)."""
    await h.create()
    qemu_pid = h.factory.last.pid
    assert h.task.state(INIT).pid == qemu_pid and qemu_pid != INIT_PID
    assert await within(h.task.start(INIT)) == qemu_pid
    assert h.events[0][1].pid == qemu_pid  # TaskCreate
    assert h.task.container is not None and h.task.container.init.pid == INIT_PID  # the guest's, for Pids
