"""The UtilityVM lifecycle contract over FakeBackend and FakeGuest: no QEMU, every state and verb."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import types
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from schemas import agent as proto
from schemas import agent_models as models
from schemas import oci
from uvm import errors
from uvm import vm as vm_module
from uvm.backends.base import HypervisorExit
from uvm.lifecycle import VmState
from uvm.testing import (
    ErrorReply,
    FakeBackend,
    FakeBackendFactory,
    FakeGuest,
    Hangup,
    Request,
    hello_result,
    make_test_config,
)
from uvm.vm import UtilityVM

T = TypeVar("T")
DEADLINE = 5.0  # a hang is a failure, not a stuck test run


async def within(aw: Awaitable[T], timeout: float = DEADLINE) -> T:
    return await asyncio.wait_for(aw, timeout)


@pytest.fixture
def factory() -> FakeBackendFactory:
    return FakeBackendFactory()


@pytest.fixture
async def new_vm(tmp_path: Path, factory: FakeBackendFactory) -> AsyncIterator[Callable[..., UtilityVM]]:
    """Make (unstarted) VMs over the factory's fake backends; every one is closed at the end."""
    made: list[UtilityVM] = []

    def make(**config: Any) -> UtilityVM:
        v = UtilityVM(make_test_config(tmp_path, **config), backend_factory=factory)
        made.append(v)
        return v

    yield make
    for v in made:
        await within(v.close())


@pytest.fixture
async def vm(tmp_path: Path, factory: FakeBackendFactory) -> AsyncIterator[UtilityVM]:
    v = UtilityVM(make_test_config(tmp_path), backend_factory=factory)
    await within(v.start())
    try:
        yield v
    finally:
        await within(v.close())
        assert factory.last.closed, "close() did not release the backend"


def backend_of(factory: FakeBackendFactory) -> FakeBackend:
    return factory.last


# -- start -----------------------------------------------------------------------------------------------


async def test_start_returns_once_the_agent_answered_hello(vm: UtilityVM, factory: FakeBackendFactory) -> None:
    backend = backend_of(factory)
    assert vm.state is VmState.RUNNING
    assert vm.hello == models.HelloResult(**hello_result())
    assert vm.boot_seconds is not None and 0 <= vm.boot_seconds < DEADLINE
    assert backend.calls[:2] == ["launch", "connect_agent"]
    assert backend.launched_spec is vm.spec
    assert vm.spec is not None and vm.spec.accel == "tcg" and vm.spec.vm_id == "vm1"
    assert [r.method for r in backend.guest.requests] == ["hello"]
    assert repr(vm) == f"<UtilityVM vm1 running pid={backend.pid}>"


async def test_start_twice_is_a_state_error(vm: UtilityVM) -> None:
    with pytest.raises(errors.StateError, match="VM vm1: start: already running"):
        await vm.start()


async def test_context_manager_starts_and_closes(tmp_path: Path, factory: FakeBackendFactory) -> None:
    async with UtilityVM(make_test_config(tmp_path), backend_factory=factory) as v:
        assert (await v.run(["echo", "in", "ctx"])).stdout == b"in ctx\n"
    assert v.state is VmState.CLOSED
    backend = backend_of(factory)
    assert backend.closed and "terminate" in backend.calls
    assert backend.exit_info == HypervisorExit(0, None, "host-qmp-quit")


async def test_config_error_starts_nothing(tmp_path: Path, factory: FakeBackendFactory) -> None:
    v = UtilityVM(make_test_config(tmp_path, kernel=tmp_path / "no-kernel"), backend_factory=factory)
    with pytest.raises(errors.ConfigError, match="kernel .*no-kernel: not found"):
        await v.start()
    assert factory.backends == []
    assert v.state is VmState.CREATED
    await v.close()


async def test_launch_failure_is_a_start_error_and_releases_the_backend(
    tmp_path: Path, factory: FakeBackendFactory,
) -> None:
    factory.options["launch_error"] = errors.StartError("VM vm1: cannot run qemu: Permission denied")
    v = UtilityVM(make_test_config(tmp_path), backend_factory=factory)
    with pytest.raises(errors.StartError, match="cannot run qemu: Permission denied"):
        await within(v.start())
    backend = backend_of(factory)
    assert "connect_agent" not in backend.calls
    assert backend.closed
    assert v.state is VmState.STOPPED
    await v.close()


class PortThiefFactory(FakeBackendFactory):
    """The first ``steals`` launches fail as QEMU does when the ssh port was taken after the builder chose it."""

    def __init__(self, steals: int) -> None:
        super().__init__()
        self.steals = steals

    def __call__(self, spec: Any) -> FakeBackend:
        backend = super().__call__(spec)
        if len(self.backends) <= self.steals:
            backend.launch_error = errors.StartError(
                f"VM {spec.vm_id}: QEMU exited with status 1: qemu-system-x86_64: -netdev user,id=net0,hostfwd="
                f"tcp:127.0.0.1:{spec.ssh_port}-:22: {vm_module.HOSTFWD_REFUSED} 'tcp:127.0.0.1:{spec.ssh_port}-:22'")
        return backend


@pytest.mark.parametrize(("steals", "started"), [(1, True), (vm_module.SSH_PORT_ATTEMPTS, False)])
async def test_an_ssh_port_taken_before_qemu_binds_it_is_replaced(tmp_path: Path, steals: int, started: bool) -> None:
    factory = PortThiefFactory(steals)
    v = UtilityVM(make_test_config(tmp_path, ssh_port=0), backend_factory=factory)
    try:
        if started:
            await within(v.start())
            launched = factory.last.launched_spec
            assert v.state is VmState.RUNNING and v.spec is not None and launched is not None
            assert len(factory.backends) == 2 and v.spec.ssh_port == launched.ssh_port
        else:
            with pytest.raises(errors.StartError, match=vm_module.HOSTFWD_REFUSED):
                await within(v.start())
            assert len(factory.backends) == steals and v.state is VmState.STOPPED
        assert all(b.closed for b in factory.backends[:steals])
    finally:
        await within(v.close())
    assert all(b.closed for b in factory.backends)


async def test_an_ssh_port_the_user_chose_is_not_replaced(tmp_path: Path) -> None:
    factory = PortThiefFactory(1)
    port = vm_module.builder.loopback_port(0)
    v = UtilityVM(make_test_config(tmp_path, ssh_port=port), backend_factory=factory)
    with pytest.raises(errors.StartError, match=vm_module.HOSTFWD_REFUSED):
        await within(v.start())
    assert len(factory.backends) == 1
    await v.close()


async def test_boot_timeout_tears_down_and_carries_the_console_tail(
    tmp_path: Path, factory: FakeBackendFactory,
) -> None:
    guest = FakeGuest()
    guest.handlers["hello"] = lambda req: None  # the agent never answers
    factory.guest = guest
    v = UtilityVM(make_test_config(tmp_path, boot_timeout=0.2), backend_factory=factory)
    with pytest.raises(errors.BootTimeoutError) as info:
        await within(v.start())
    assert "did not answer within the boot timeout of 0.2s (counted from the hypervisor up" in str(info.value)
    assert "fake: booting vm1" in info.value.console_tail
    assert "--- console tail ---" in str(info.value)
    backend = backend_of(factory)
    assert "terminate" in backend.calls and backend.closed and not backend.running
    assert v.state is VmState.STOPPED
    await v.close()


async def test_a_hypervisor_that_never_comes_up_fails_at_the_launch_timeout_naming_it(tmp_path: Path) -> None:
    factory = FakeBackendFactory(launch_gate=asyncio.Event())  # never set
    v = UtilityVM(make_test_config(tmp_path, launch_timeout=0.1), backend_factory=factory)
    with pytest.raises(errors.BootTimeoutError, match="the fake backend did not bring the hypervisor up within the "
                                                       "launch timeout of 0.1s"):
        await within(v.start())
    assert backend_of(factory).closed
    await v.close()


async def test_the_boot_timeout_counts_from_the_hypervisor_up(tmp_path: Path) -> None:
    """A hypervisor slow to come up (libvirt re-probing QEMU for ~85 s on each domain start) does not eat
    the guest's boot timeout: the agent's deadline starts when the launch returned."""
    gate = asyncio.Event()
    factory = FakeBackendFactory(launch_gate=gate)
    v = UtilityVM(make_test_config(tmp_path, boot_timeout=2.0), backend_factory=factory)
    start = asyncio.create_task(v.start())
    await asyncio.sleep(2.5)  # longer than the boot timeout, all of it in the launch
    assert not start.done()
    gate.set()
    await within(start)
    assert v.state is VmState.RUNNING and v.launch_seconds is not None and v.launch_seconds >= 2.5
    await v.close()


async def test_hypervisor_crash_during_boot_is_a_start_error(tmp_path: Path, factory: FakeBackendFactory) -> None:
    guest = FakeGuest()
    guest.handlers["hello"] = lambda req: None
    factory.guest = guest
    v = UtilityVM(make_test_config(tmp_path), backend_factory=factory)
    start = asyncio.create_task(v.start())
    await within(guest.wait_for_requests(1))
    backend_of(factory).crash(9)
    with pytest.raises(errors.StartError, match="VM vm1: QEMU killed by signal 9 during boot"):
        await within(start)
    assert v.state is VmState.STOPPED and backend_of(factory).closed
    await v.close()


async def test_cancelled_start_leaves_nothing_running(tmp_path: Path, factory: FakeBackendFactory) -> None:
    guest = FakeGuest()
    guest.handlers["hello"] = lambda req: None
    factory.guest = guest
    v = UtilityVM(make_test_config(tmp_path), backend_factory=factory)
    start = asyncio.create_task(v.start())
    await within(guest.wait_for_requests(1))
    start.cancel()
    with pytest.raises(asyncio.CancelledError):
        await start
    backend = backend_of(factory)
    assert not backend.running and backend.closed
    assert v.state is VmState.STOPPED
    await v.close()


# -- operations --------------------------------------------------------------------------------------------


async def test_run_returns_status_and_output(vm: UtilityVM, factory: FakeBackendFactory) -> None:
    res = await within(vm.run(["echo", "hello", "world"]))
    assert (res.exit_status, res.stdout, res.stderr) == (0, b"hello world\n", b"")
    res = await within(vm.run(["cat"], stdin=b"piped\x00bytes", env={"A": "1"}, cwd="/root", timeout=3))
    assert res.stdout == b"piped\x00bytes"
    assert (await within(vm.run(["false"]))).exit_status == 1
    last = backend_of(factory).guest.requests[-2]
    assert last.params["env"] == {"A": "1"} and last.params["cwd"] == "/root" and last.params["timeout"] == 3


async def test_run_of_a_missing_program_is_not_found(vm: UtilityVM) -> None:
    with pytest.raises(errors.AgentNotFoundError, match="run: /no/such: No such file or directory"):
        await within(vm.run(["/no/such"]))
    assert vm.state is VmState.RUNNING
    await within(vm.ping(3))


async def test_concurrent_runs_in_one_vm(vm: UtilityVM) -> None:
    results = await within(asyncio.gather(*(vm.run(["echo", str(i)]) for i in range(20))))
    assert [r.stdout for r in results] == [f"{i}\n".encode() for i in range(20)]


# -- shutdown ------------------------------------------------------------------------------------------------


async def test_shutdown_then_wait_reports_shutdown(vm: UtilityVM, factory: FakeBackendFactory) -> None:
    backend = backend_of(factory)
    await within(vm.shutdown())
    assert vm.state.value == "stopping"  # shutdown() asks and returns at once
    exit_info = await within(vm.wait())
    assert exit_info.reason == "shutdown" and exit_info.success
    assert exit_info.hypervisor == HypervisorExit(0, None, "guest-shutdown")
    assert vm.state is VmState.STOPPED
    assert backend.guest.shutdown_acknowledged
    assert "terminate" not in backend.calls and "request_powerdown" not in backend.calls
    assert backend.closed  # wait() returned after the resources were released
    assert await within(vm.wait()) == exit_info  # every wait sees the same result


async def test_every_waiter_sees_the_same_shutdown(vm: UtilityVM) -> None:
    waiters = [asyncio.create_task(vm.wait()) for _ in range(5)]
    await asyncio.sleep(0)
    await vm.shutdown()
    results = await within(asyncio.gather(*waiters))
    assert {r.reason for r in results} == {"shutdown"} and len({id(r) for r in results}) == 1


async def test_shutdown_falls_back_to_acpi_when_the_agent_refuses(vm: UtilityVM, factory: FakeBackendFactory) -> None:
    backend = backend_of(factory)
    backend.guest.handlers["shutdown"] = lambda req: ErrorReply("internal", "cannot")
    await within(vm.shutdown())
    assert backend.calls[-1] == "request_powerdown"
    assert (await within(vm.wait())).reason == "shutdown"


async def test_shutdown_falls_back_to_acpi_when_the_link_is_down(vm: UtilityVM, factory: FakeBackendFactory) -> None:
    backend = backend_of(factory)
    backend.guest.handlers["shutdown"] = lambda req: Hangup()
    await within(vm.shutdown())
    assert "request_powerdown" in backend.calls
    assert (await within(vm.wait())).reason == "shutdown"


async def test_shutdown_falls_back_to_acpi_when_the_agent_is_silent(
    vm: UtilityVM, factory: FakeBackendFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(vm_module, "SHUTDOWN_REQUEST_TIMEOUT_S", 0.05)
    backend = backend_of(factory)
    backend.guest.handlers["shutdown"] = lambda req: None
    await within(vm.shutdown())
    assert "request_powerdown" in backend.calls
    assert (await within(vm.wait())).reason == "shutdown"


async def test_guest_ignoring_shutdown_keeps_running_until_terminated(
    tmp_path: Path, factory: FakeBackendFactory,
) -> None:
    guest = FakeGuest()
    guest.handlers["shutdown"] = lambda req: ErrorReply("internal", "busy")
    factory.guest = guest
    factory.options["acpi_works"] = False
    async with UtilityVM(make_test_config(tmp_path), backend_factory=factory) as v:
        await v.shutdown()
        with pytest.raises(errors.WaitTimeoutError):
            await v.wait_timeout(0.1)
        assert v.state is VmState.STOPPING
        await v.terminate()
        assert (await within(v.wait())).reason == "terminated"


async def test_guest_powering_off_on_its_own_is_poweroff(vm: UtilityVM, factory: FakeBackendFactory) -> None:
    backend_of(factory).guest_poweroff()
    exit_info = await within(vm.wait())
    assert exit_info.reason == "poweroff" and exit_info.success


# -- terminate -----------------------------------------------------------------------------------------------


async def test_terminate_then_wait_reports_terminated(vm: UtilityVM, factory: FakeBackendFactory) -> None:
    await within(vm.terminate())
    exit_info = await within(vm.wait())
    assert exit_info.reason == "terminated" and exit_info.success
    assert exit_info.hypervisor.shutdown_reason == "host-qmp-quit"
    assert vm.state is VmState.STOPPED
    assert "terminate" in backend_of(factory).calls


async def test_terminate_overrides_a_pending_shutdown(tmp_path: Path, factory: FakeBackendFactory) -> None:
    factory.options["shutdown_delay"] = 10.0  # the guest takes its time to power off
    async with UtilityVM(make_test_config(tmp_path), backend_factory=factory) as v:
        await v.shutdown()
        await v.terminate()
        assert (await within(v.wait())).reason == "terminated"


# -- unrequested exits ---------------------------------------------------------------------------------------


async def test_crash_raises_vm_died_in_every_concurrent_waiter(vm: UtilityVM, factory: FakeBackendFactory) -> None:
    backend = backend_of(factory)
    backend.console_lines.append("Kernel panic - not syncing: fake")
    waiters = [asyncio.create_task(vm.wait()) for _ in range(5)]
    await asyncio.sleep(0)
    backend.crash(signal=9)
    results = await within(asyncio.gather(*waiters, return_exceptions=True))
    assert all(isinstance(r, errors.VmDiedError) for r in results), results
    died = results[0]
    assert isinstance(died, errors.VmDiedError)
    assert str(died).startswith("VM vm1 died: QEMU killed by signal 9")
    assert "Kernel panic - not syncing: fake" in died.console_tail
    assert vm.state is VmState.STOPPED and backend.closed
    # Later waits see the same death, never a success.
    with pytest.raises(errors.VmDiedError, match="killed by signal 9"):
        await within(vm.wait())
    with pytest.raises(errors.VmDiedError):
        await within(vm.wait_timeout(1))


async def test_crash_fails_a_pending_run(vm: UtilityVM, factory: FakeBackendFactory) -> None:
    backend = backend_of(factory)
    backend.guest.handlers["run"] = lambda req: None
    run = asyncio.create_task(vm.run(["sleep", "100"]))
    await within(backend.guest.wait_for_requests(2))
    backend.crash()
    with pytest.raises((errors.LinkError, errors.VmDiedError)):
        await within(run)
    with pytest.raises(errors.VmDiedError):
        await within(vm.wait())


@pytest.mark.parametrize(("hv", "described"), [
    (HypervisorExit(0, None, "guest-reset"), "exited with status 0 after guest-reset"),
    (HypervisorExit(1, None, None, "qemu: fatal: something"), "exited with status 1: qemu: fatal: something"),
    (HypervisorExit(None, 6, None), "killed by signal 6"),
    (HypervisorExit(1, None, "guest-shutdown"), "exited with status 1 after guest-shutdown"),
])
async def test_other_unrequested_exits_are_deaths(vm: UtilityVM, factory: FakeBackendFactory, hv: HypervisorExit,
                                                  described: str) -> None:
    backend_of(factory).exit(hv)
    with pytest.raises(errors.VmDiedError, match=f"VM vm1 died: QEMU {described}"):
        await within(vm.wait())


async def test_unrequested_exit_while_stopping_after_shutdown_is_still_a_death(
    tmp_path: Path, factory: FakeBackendFactory,
) -> None:
    factory.options["shutdown_delay"] = 10.0
    async with UtilityVM(make_test_config(tmp_path), backend_factory=factory) as v:
        await v.shutdown()
        backend_of(factory).crash(9)
        with pytest.raises(errors.VmDiedError):
            await within(v.wait())


# -- wait_timeout --------------------------------------------------------------------------------------------


async def test_wait_timeout_expiry_leaves_the_vm_running(vm: UtilityVM, factory: FakeBackendFactory) -> None:
    with pytest.raises(errors.WaitTimeoutError, match="VM vm1: still running after 0.05s") as info:
        await within(vm.wait_timeout(0.05))
    assert isinstance(info.value, TimeoutError)
    assert vm.state is VmState.RUNNING and backend_of(factory).running
    await within(vm.ping(9))
    await vm.shutdown()
    assert (await vm.wait_timeout(DEADLINE)).reason == "shutdown"


# -- verbs in the wrong state --------------------------------------------------------------------------------


async def test_shutdown_and_terminate_on_a_stopped_vm_are_no_ops(vm: UtilityVM, factory: FakeBackendFactory) -> None:
    await vm.terminate()
    first = await within(vm.wait())
    calls = list(backend_of(factory).calls)
    await vm.shutdown()
    await vm.terminate()
    await vm.shutdown()
    assert backend_of(factory).calls == calls
    assert vm.state is VmState.STOPPED
    assert await within(vm.wait()) == first


@pytest.mark.parametrize("op", ["run", "ping"])
async def test_operations_after_stop_are_not_running(vm: UtilityVM, op: str) -> None:
    await vm.shutdown()
    await within(vm.wait())
    with pytest.raises(errors.NotRunningError, match=f"VM vm1: {op}: VM is stopped"):
        await (vm.run(["true"]) if op == "run" else vm.ping())


async def test_run_while_stopping_is_not_running(tmp_path: Path, factory: FakeBackendFactory) -> None:
    factory.options["shutdown_delay"] = 10.0
    async with UtilityVM(make_test_config(tmp_path), backend_factory=factory) as v:
        await v.shutdown()
        with pytest.raises(errors.NotRunningError, match="VM vm1: run: VM is stopping"):
            await v.run(["true"])


@pytest.mark.parametrize("op", ["wait", "wait_timeout", "shutdown", "terminate", "run", "ping"])
async def test_verbs_before_start_are_not_running(
    new_vm: Callable[..., UtilityVM], factory: FakeBackendFactory, op: str,
) -> None:
    v = new_vm()
    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "wait": lambda: v.wait(), "wait_timeout": lambda: v.wait_timeout(1), "shutdown": lambda: v.shutdown(),
        "terminate": lambda: v.terminate(), "run": lambda: v.run(["true"]), "ping": lambda: v.ping()}
    with pytest.raises(errors.NotRunningError, match=f"VM vm1: {op.split('_')[0]}: not started"):
        await within(calls[op]())
    assert factory.backends == []
    assert v.state is VmState.CREATED


@pytest.mark.parametrize("op", ["start", "wait", "wait_timeout", "shutdown", "terminate", "run", "ping"])
async def test_verbs_after_close_are_closed_errors(vm: UtilityVM, op: str) -> None:
    await vm.close()
    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "start": lambda: vm.start(), "wait": lambda: vm.wait(), "wait_timeout": lambda: vm.wait_timeout(1),
        "shutdown": lambda: vm.shutdown(), "terminate": lambda: vm.terminate(),
        "run": lambda: vm.run(["true"]), "ping": lambda: vm.ping()}
    with pytest.raises(errors.ClosedError, match=f"VM vm1: {op.split('_')[0]}: closed"):
        await within(calls[op]())


# -- close ---------------------------------------------------------------------------------------------------


async def test_close_terminates_a_running_vm_and_is_idempotent(vm: UtilityVM, factory: FakeBackendFactory) -> None:
    backend = backend_of(factory)
    waiter = asyncio.create_task(vm.wait())
    await asyncio.sleep(0)
    await within(vm.close())
    assert vm.state is VmState.CLOSED
    assert not backend.running and backend.closed
    assert backend.calls.count("terminate") >= 1
    assert (await within(waiter)).reason == "terminated"  # a waiter sees the forced stop
    await within(vm.close())
    await within(vm.close())
    assert backend.calls.count("aclose") == 1


async def test_close_after_shutdown(vm: UtilityVM, factory: FakeBackendFactory) -> None:
    await vm.shutdown()
    await within(vm.close())
    assert vm.state is VmState.CLOSED and backend_of(factory).closed


async def test_close_never_started(new_vm: Callable[..., UtilityVM], factory: FakeBackendFactory) -> None:
    v = new_vm()
    await v.close()
    await v.close()
    assert v.state is VmState.CLOSED and factory.backends == []


async def test_concurrent_closes_share_one_teardown(vm: UtilityVM, factory: FakeBackendFactory) -> None:
    await within(asyncio.gather(*(vm.close() for _ in range(5))))
    assert backend_of(factory).calls.count("aclose") == 1


async def test_close_is_shielded_from_cancellation(vm: UtilityVM, factory: FakeBackendFactory) -> None:
    closing = asyncio.create_task(vm.close())
    await asyncio.sleep(0)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    await within(vm.close())  # the teardown went on and finished
    assert vm.state is VmState.CLOSED and backend_of(factory).closed


# -- bugs ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [
    {"extra": 1},
    {"boot": {"init": -1.0, "exec": 1.0, "agent": 2.0}},
    {"boot": {"init": "1.0", "exec": 1.0, "agent": 2.0}},
    {"boot": {"init": 1.0, "exec": 1.5, "agent": 2.0, "more": 3.0}},
    {"boot": {"init": 1.0, "exec": 1.5}},
    {"boot": [1.0, 1.5, 2.0]},
])
async def test_invalid_hello_start_error_names_the_protocol_problem(
    tmp_path: Path, factory: FakeBackendFactory, bad: dict[str, Any],
) -> None:
    factory.guest = FakeGuest(hello={**hello_result(), **bad})
    v = UtilityVM(make_test_config(tmp_path), backend_factory=factory)
    with pytest.raises(errors.StartError) as info:
        await within(v.start())
    await v.close()
    assert backend_of(factory).closed
    assert "invalid hello response" in str(info.value)


async def test_wait_after_a_failed_launch_does_not_hang(tmp_path: Path, factory: FakeBackendFactory) -> None:
    factory.options["launch_error"] = errors.StartError("VM vm1: cannot run qemu")
    v = UtilityVM(make_test_config(tmp_path), backend_factory=factory)
    with pytest.raises(errors.StartError):
        await v.start()
    try:
        with pytest.raises(errors.StateError):
            await asyncio.wait_for(v.wait(), 1.0)
    finally:
        await v.close()


async def test_close_during_start_leaves_nothing_running(tmp_path: Path, factory: FakeBackendFactory) -> None:
    guest = FakeGuest()
    guest.handlers["hello"] = lambda req: None
    factory.guest = guest
    v = UtilityVM(make_test_config(tmp_path), backend_factory=factory)
    start = asyncio.create_task(v.start())
    [hello] = await within(guest.wait_for_requests(1))
    try:
        await within(v.close())
        await guest.respond(hello.id, hello_result())  # the agent answers late
        await asyncio.gather(start, return_exceptions=True)
        assert v.state is VmState.CLOSED
        assert not backend_of(factory).running, "close() returned but the hypervisor is still running"
    finally:
        backend_of(factory).crash()  # whatever happened, stop the fake hypervisor
        await asyncio.gather(start, return_exceptions=True)
        await backend_of(factory).aclose()


def _traceback_length(exc: BaseException) -> int:
    n, tb = 0, exc.__traceback__
    while tb is not None:
        n, tb = n + 1, tb.tb_next
    return n


async def test_repeated_waits_on_a_dead_vm_do_not_grow_the_error(vm: UtilityVM, factory: FakeBackendFactory) -> None:
    backend_of(factory).crash()
    errs: list[errors.VmDiedError] = []
    for _ in range(100):
        try:
            await within(vm.wait())
        except errors.VmDiedError as e:
            errs.append(e)
    assert len(errs) == 100
    assert _traceback_length(errs[-1]) < 20


async def test_fake_backend_request_log_is_a_visible_record(vm: UtilityVM, factory: FakeBackendFactory) -> None:
    """The fakes' own contract, relied on above: guest requests and backend calls are recorded in order."""
    backend = backend_of(factory)
    await vm.ping(1)
    await vm.run(["true"])
    assert [r.method for r in backend.guest.requests] == ["hello", "ping", "run"]
    assert isinstance(backend.guest.requests[1], Request) and backend.guest.requests[1].params == {"seq": 1}
    assert backend.state == "running" and backend.pid is not None


# -- pids from the guest ---------------------------------------------------------------------------------


def exec_answers(vm: UtilityVM, factory: FakeBackendFactory, pids: list[int]) -> None:
    """The fake guest answers each exec with the next of pids."""
    it = iter(pids)
    factory.last.guest.handlers[proto.EXEC] = lambda req: {"pid": next(it)}


def exit_note(pid: int, status: int) -> dict[str, Any]:
    return {"event": proto.EVENT_EXIT, "container": None, "pid": pid, "exit_status": status, "signal": None,
            "at": time.time()}


async def test_a_pid_given_again_while_its_process_runs_drops_the_link_and_releases_both(
        vm: UtilityVM, factory: FakeBackendFactory) -> None:
    exec_answers(vm, factory, [500, 500])
    first = await within(vm.create_process(oci.Process(args=["sleep", "9"]), stdout=False, stderr=False))
    with pytest.raises(errors.GuestProtocolError, match="pid 500 again while process 500 in the UVM still runs"):
        await within(vm.create_process(oci.Process(args=["true"]), stdout=False, stderr=False))
    exit_info = await within(first.wait())  # the link is gone: the VM is terminated, its waiters released
    assert exit_info.vm_died and not exit_info.success


async def test_an_exited_and_closed_pid_may_come_again_and_its_early_exit_is_kept(
        vm: UtilityVM, factory: FakeBackendFactory) -> None:
    """pids wrap: the new process's exit may even arrive before the answer to its exec."""
    guest = factory.last.guest
    exec_answers(vm, factory, [700, 700])
    first = await within(vm.create_process(oci.Process(args=["true"]), stdout=False, stderr=False))
    await guest.notify(exit_note(700, 0))
    assert (await within(first.wait())).exit_code == 0
    first.close()
    assert vm.processes.get(None, 700) is None  # closed and exited: nothing kept for it
    held = guest.handlers[proto.EXEC]
    guest.handlers[proto.EXEC] = lambda req: None  # answer later
    second_task = asyncio.create_task(vm.create_process(oci.Process(args=["false"]), stdout=False, stderr=False))
    n = len(guest.requests)
    req = (await within(guest.wait_for_requests(n + 1)))[-1]
    assert req.method == proto.EXEC
    await guest.notify(exit_note(700, 1))  # the exit before the answer
    await guest.respond(req.id, held(req))
    second = await within(second_task)
    assert (await within(second.wait())).exit_code == 1
    assert vm.agent is not None and vm.state is VmState.RUNNING


async def test_oom_listeners_hear_each_increase_once_and_a_decrease_drops_the_link(
        vm: UtilityVM, factory: FakeBackendFactory) -> None:
    """A guest repeating its OOM notification cannot flood the listeners (and containerd's events)."""
    guest = factory.last.guest
    c = types.SimpleNamespace(id="c1", oom_kills=0)
    vm.containers["c1"] = c  # type: ignore[assignment]
    heard: list[int] = []
    vm.oom_listeners.append(lambda container, kills: heard.append(kills))
    for kills in (1, 1, 1, 2, 2):
        await guest.notify({"event": proto.EVENT_OOM, "container": "c1", "oom_kills": kills, "at": time.time()})
    assert (await within(vm.agent_client("ping").ping(1))).seq == 1  # every notification above was handled
    assert heard == [1, 2]
    await guest.notify({"event": proto.EVENT_OOM, "container": "c1", "oom_kills": 1, "at": time.time()})
    with pytest.raises(errors.GuestProtocolError, match="oom_kills went down from 2 to 1"):
        await within(vm.agent_client("ping").ping(2))
    del vm.containers["c1"]  # (a stand-in: the VM's teardown would close a real one)


def test_the_guest_log_budget_drops_a_flood_and_counts_what_it_dropped() -> None:
    budget = vm_module.LogBudget()
    results = [budget.take(1000.0) for _ in range(budget.BURST + 30)]
    assert results[:budget.BURST] == [0] * budget.BURST and results[budget.BURST:] == [None] * 30
    assert budget.take(1000.0 + 1.5 / budget.RATE) == 30  # a token later: the next line says how many went
    assert budget.take(1000.0 + 1.5 / budget.RATE) is None


async def test_a_guest_log_line_is_logged_on_one_line(vm: UtilityVM, factory: FakeBackendFactory,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """A newline in the guest's message cannot start a line of the host's log that looks like the host's."""
    with caplog.at_level(logging.DEBUG, logger=f"uvm.{vm.id}"):
        await factory.last.guest.notify({"event": proto.EVENT_LOG, "level": "warning",
                                         "message": "disk full\n2024-01-01 ERROR uvm.vm1: forged\x1b[2J"})
        await within(vm.ping())  # the notification was handled before this answer
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("guest: ")] == [
        r"guest: disk full\n2024-01-01 ERROR uvm.vm1: forged\x1b[2J"]


async def test_a_slot_whose_detach_failed_is_never_handed_out_again(
        vm: UtilityVM, factory: FakeBackendFactory, tmp_path: Path) -> None:
    """QEMU may still hold the node of a failed detach: a new disk at that slot would collide with it."""
    disks = []
    for name in ("a.img", "b.img"):
        (tmp_path / name).write_bytes(b"\0" * 4096)
        disks.append(tmp_path / name)
    first = await within(vm.add_scsi_disk(disks[0]))
    backend = factory.last
    real_detach = backend.detach_scsi

    async def failing_detach(controller: int, lun: int) -> None:
        raise errors.DiskError(f"detach {controller}:{lun}: QEMU did not report the device deleted")

    backend.detach_scsi = failing_detach  # type: ignore[method-assign]
    with pytest.raises(errors.DiskError, match="did not report"):
        await within(vm.remove_scsi_disk(first))
    backend.detach_scsi = real_detach  # type: ignore[method-assign]
    second = await within(vm.add_scsi_disk(disks[1]))
    assert (second.slot.controller, second.slot.lun) != (first.slot.controller, first.slot.lun)
    await within(vm.remove_scsi_disk(second))


def disk_images(tmp_path: Path, *names: str) -> list[Path]:
    images = []
    for name in names:
        (tmp_path / name).write_bytes(b"\0" * 4096)
        images.append(tmp_path / name)
    return images


@pytest.mark.parametrize(("asked", "answered", "told"), [
    ("/mnt/b", "/mnt/a", "told to mount it at /mnt/b, the guest answered path /mnt/a"),  # the first disk's
    ("/mnt/b", None, "told to mount it at /mnt/b, the guest answered no path"),
    ("/mnt/b", "/mnt/b/", "told to mount it at /mnt/b, the guest answered path /mnt/b/"),
    ("/mnt/b", "/mnt/x/../b", "told to mount it at /mnt/b, the guest answered path /mnt/x/../b"),
    ("/mnt/b", "/mnt/b\nERROR forged", r"told to mount it at /mnt/b, the guest answered path /mnt/b\nERROR forged"),
    (None, "/mnt/a", "told to mount it nowhere, the guest answered path /mnt/a"),
    (None, "/mnt/c", "told to mount it nowhere, the guest answered path /mnt/c"),
], ids=["another-disks-path", "no-path", "trailing-slash", "not-normalized", "newline", "unasked-taken", "unasked"])
async def test_a_mount_answered_with_another_path_drops_the_link_and_leaves_nothing_attached(
        vm: UtilityVM, factory: FakeBackendFactory, tmp_path: Path, asked: str | None, answered: str | None,
        told: str) -> None:
    """The host chooses where a disk is mounted. Taking the guest's word for it let a second disk's answer
    overwrite the first disk's record: the first could then never be removed, its slot never freed."""
    first_image, second_image = disk_images(tmp_path, "a.img", "b.img")
    first = await within(vm.add_scsi_disk(first_image, "/mnt/a"))
    backend = factory.last
    backend.guest.handlers[proto.SCSI_MOUNT] = lambda req: {"device": "/dev/sdb", "path": answered}
    with pytest.raises(errors.GuestProtocolError,
                       match=re.escape(f"agent link vm1: scsi mount of disk {second_image}: {told}")):
        await within(vm.add_scsi_disk(second_image, asked))
    # The second disk is unplugged in the guest and detached on the host; the first is recorded as it was.
    unplug = backend.guest.requests[-1]
    assert (unplug.method, unplug.params) == (proto.SCSI_UNPLUG, {"controller": 0, "lun": 1})
    assert backend.scsi == {(0, 0): (str(first_image), False)}
    assert vm.scsi.slots == {(0, 0): first.slot} and vm.scsi.mounts == {"/mnt/a": first}
    assert vm.scsi.disks == [first]
    # A guest that breaks the protocol loses its link, and the VM with it (after the rollback).
    with pytest.raises(errors.VmDiedError, match="the agent link was lost"):
        await within(vm.wait())
    assert backend.calls.index("detach_scsi 0:1") < backend.calls.index("terminate")


async def test_one_guest_path_is_given_to_one_of_two_concurrent_disks(
        vm: UtilityVM, factory: FakeBackendFactory, tmp_path: Path) -> None:
    """The path is taken when an add starts, not when the guest answers: the second add is refused at once."""
    first_image, second_image = disk_images(tmp_path, "a.img", "b.img")
    backend = factory.last
    honest = backend.guest.handlers[proto.SCSI_MOUNT]
    backend.guest.handlers[proto.SCSI_MOUNT] = lambda req: None  # held: answered below
    first_add = asyncio.create_task(vm.add_scsi_disk(first_image, "/mnt/a"))
    mount = (await within(backend.guest.wait_for_requests(2)))[-1]
    assert mount.method == proto.SCSI_MOUNT
    with pytest.raises(errors.DiskError, match="guest path /mnt/a: a disk is mounted there already"):
        await within(vm.add_scsi_disk(second_image, "/mnt/a"))
    assert [c for c in backend.calls if c.startswith("attach_scsi")] == [f"attach_scsi 0:0 {first_image} rw"]
    await backend.guest.respond(mount.id, {"device": "/dev/sda", "path": "/mnt/a"})
    first = await within(first_add)
    assert vm.scsi.mounts == {"/mnt/a": first}
    await within(vm.remove_scsi_disk(first))
    assert vm.scsi.slots == {} and backend.scsi == {}
    # Free again once the disk is gone, or once an add failed.
    backend.guest.handlers[proto.SCSI_MOUNT] = lambda req: ErrorReply(proto.E_INVALID, "mount: wrong fs type")
    with pytest.raises(errors.DiskError, match="wrong fs type"):
        await within(vm.add_scsi_disk(second_image, "/mnt/a"))
    backend.guest.handlers[proto.SCSI_MOUNT] = honest
    second = await within(vm.add_scsi_disk(second_image, "/mnt/a"))
    assert vm.scsi.mounts == {"/mnt/a": second} and list(backend.scsi) == [(0, 0)]


async def test_an_unusable_template_directory_falls_back_to_a_cold_boot(new_vm: Callable[..., UtilityVM],
                                                                        tmp_path: Path) -> None:
    not_a_dir = tmp_path / "templates"
    not_a_dir.write_text("a file where the template directory should be")
    v = new_vm(start="template", template_dir=not_a_dir)
    await within(v.start())
    assert v.state is VmState.RUNNING and v.started_from == "cold"
    assert v.start_note is not None and f"template directory {not_a_dir}" in v.start_note
