"""One conformance suite for every backend: the fake (in memory), qemu (microvm over QMP) and libvirt.

Each case runs the lifecycle contract of shared/DESIGN.md, disk attach/detach, death detection
when the hypervisor process is killed, and checks that close releases everything.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from schemas.uvm_config import UvmConfig
from tests.conftest import assert_no_leftovers
from uvm import errors
from uvm.lifecycle import VmState
from uvm.scratch import create_scratch
from uvm.testing import FakeBackend, FakeBackendFactory, make_test_config
from uvm.vm import UtilityVM

# "clone": the qemu backend starting from a template (built on first use, then cloned).
BACKENDS = ["fake", pytest.param("qemu", marks=pytest.mark.vm), pytest.param("clone", marks=pytest.mark.vm),
            pytest.param("libvirt", marks=pytest.mark.vm)]


@pytest.fixture(params=BACKENDS)
def new_vm(request: pytest.FixtureRequest, make_config: Callable[..., UvmConfig], tmp_path: Path,
           suite_dir: Path) -> Callable[[], UtilityVM]:
    kind = request.param
    if kind == "fake":
        factory = FakeBackendFactory()
        return lambda: UtilityVM(make_test_config(tmp_path, run_dir=suite_dir / "run"), backend_factory=factory)
    if kind == "libvirt":
        request.getfixturevalue("libvirtd")
        return lambda: UtilityVM(make_config(backend="libvirt", boot_timeout=120))
    if kind == "clone":
        return lambda: UtilityVM(make_config(start="template"))
    return lambda: UtilityVM(make_config())


@pytest.fixture
async def vm(new_vm: Callable[[], UtilityVM], suite_dir: Path) -> AsyncIterator[UtilityVM]:
    v = new_vm()
    await v.start()
    assert v.started_from == ("template" if v.config.start == "template" else "cold"), v.start_note
    try:
        yield v
    finally:
        await v.close()
        assert v.state is VmState.CLOSED
        assert_no_leftovers(suite_dir)


def kill_hypervisor(vm: UtilityVM) -> None:
    if isinstance(vm.backend, FakeBackend):
        vm.backend.crash(signal=signal.SIGKILL)
        return
    assert vm.backend is not None and vm.backend.pid is not None
    os.kill(vm.backend.pid, signal.SIGKILL)


def disk_dir(tmp_path: Path) -> Path:
    """A directory QEMU can reach also when libvirt runs it as its own user."""
    d = tmp_path / "disks"
    d.mkdir(mode=0o755)
    for p in (tmp_path, *tmp_path.parents):
        if p == Path("/tmp"):
            break
        p.chmod(p.stat().st_mode | 0o005)
    return d


async def test_start_run_shutdown_wait(vm: UtilityVM) -> None:
    assert vm.state is VmState.RUNNING and vm.hello is not None
    res = await vm.run(["echo", "hi"])
    assert (res.exit_status, res.stdout) == (0, b"hi\n")
    await vm.shutdown()
    waiters = [asyncio.create_task(vm.wait()) for _ in range(3)]
    results = await asyncio.wait_for(asyncio.gather(*waiters), 60)
    assert all(r is results[0] for r in results) and results[0].reason == "shutdown"
    await vm.shutdown()
    await vm.terminate()


async def test_terminate_and_wait_timeout(vm: UtilityVM) -> None:
    with pytest.raises(errors.WaitTimeoutError):
        await vm.wait_timeout(0.2)
    assert vm.state is VmState.RUNNING
    await vm.terminate()
    assert (await vm.wait_timeout(60)).reason == "terminated"


async def test_hypervisor_killed_is_a_death(vm: UtilityVM) -> None:
    waiter = asyncio.create_task(vm.wait())
    kill_hypervisor(vm)
    with pytest.raises(errors.VmDiedError):
        await asyncio.wait_for(waiter, 60)
    with pytest.raises(errors.NotRunningError):
        await vm.run(["true"])


async def test_disk_attach_detach(vm: UtilityVM, tmp_path: Path) -> None:
    img = create_scratch(disk_dir(tmp_path) / "s.img", size_gb=1).path
    disk = await vm.add_scsi_disk(img, "/mnt/conformance")
    assert vm.mapped_disks()[0] == [disk]
    assert vm.backend is not None and len((await vm.backend.scsi_inventory())["devices"]) == 1
    await vm.remove_scsi_disk(disk)
    assert await vm.backend.scsi_inventory() == {"nodes": [], "devices": []}


async def test_close_releases_everything(new_vm: Callable[[], UtilityVM], suite_dir: Path) -> None:
    v = new_vm()
    await v.start()
    await asyncio.gather(v.close(), v.close())
    assert v.state is VmState.CLOSED
    with pytest.raises(errors.ClosedError):
        await v.run(["true"])
    assert_no_leftovers(suite_dir)


