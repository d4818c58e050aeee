"""The UtilityVM lifecycle contract on real VMs (QEMU under TCG here)."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from pydantic import ValidationError

from schemas.uvm_config import Share, UvmConfig
from tests.conftest import assert_no_leftovers
from tests.kvm_check import kvm_runs_guests
from uvm import errors
from uvm.lifecycle import VmState
from uvm.vm import UtilityVM

pytestmark = pytest.mark.vm


@pytest.fixture
async def vm(make_config: Callable[..., UvmConfig], suite_dir: Path) -> AsyncIterator[UtilityVM]:
    v = UtilityVM(make_config())
    await v.start()
    try:
        yield v
    finally:
        await v.close()
        assert_no_leftovers(suite_dir)


async def test_boot_hello_and_commands(vm: UtilityVM) -> None:
    assert vm.state is VmState.RUNNING
    assert vm.hello is not None and vm.hello.version == 1
    assert {"ping", "shutdown", "run"} <= set(vm.hello.capabilities)
    # What the probe concluded is what an independent check finds on this host: KVM where it runs guests.
    assert vm.spec is not None and vm.spec.accel == ("kvm" if kvm_runs_guests(vm.spec.kernel) else "tcg")
    boot = vm.hello.boot  # the guest's own steps, by its uptime; the host's launch comes first
    assert boot is not None and 0 < boot.init < boot.exec < boot.agent <= vm.hello.uptime, vm.hello
    assert vm.launch_seconds is not None and vm.boot_seconds is not None and 0 < vm.launch_seconds < vm.boot_seconds
    assert (await vm.run(["sh", "-c", "echo ${UVM_BOOT_UPTIMES:-unset}"])).stdout == b"unset\n"  # not for children

    res = await vm.run(["uname", "-r"])
    assert res.exit_status == 0 and res.stdout.decode().strip() == vm.hello.kernel
    assert (await vm.run(["hostname"])).stdout.decode().strip() == vm.id

    res = await vm.run(["sh", "-c", "echo out; echo err >&2; exit 7"])
    assert (res.exit_status, res.signal, res.stdout, res.stderr) == (7, None, b"out\n", b"err\n")

    data = os.urandom(100_000)
    res = await vm.run(["cat"], stdin=data)
    assert res.exit_status == 0 and res.stdout == data

    res = await vm.run(["sleep", "30"], timeout=0.5)
    assert res.timed_out and res.signal == signal.SIGKILL and res.exit_status is None

    res = await vm.run(["sh", "-c", "pwd; echo $FOO"], cwd="/tmp", env={"FOO": "bar", "PATH": "/usr/bin"})
    assert res.stdout == b"/tmp\nbar\n"

    with pytest.raises(errors.AgentNotFoundError, match="no-such-program"):
        await vm.run(["no-such-program"])
    with pytest.raises(errors.AgentInvalidArgumentError, match="cwd"):
        await vm.run(["true"], cwd="relative")
    await vm.ping(42)

    # guest_lockdown (default confidentiality): kernel memory and tracing closed to what runs in the guest
    res = await vm.run(["sh", "-c", "mount -t securityfs none /sys/kernel/security && cat /sys/kernel/security/lockdown;"
                                    " umount /sys/kernel/security; mount -t tracefs none /mnt && ls /mnt | wc -l; umount /mnt"])
    assert res.stdout.decode().split() == ["none", "integrity", "[confidentiality]", "0"], res  # tracefs: no files



async def test_paths_with_commas(make_config: Callable[..., UvmConfig], suite_dir: Path) -> None:
    """QEMU ends an option's value at a ',': paths holding one (a share, the run directory, the
    console log) are passed escaped, and the VM boots and uses them."""
    share = suite_dir / "share,with,commas"
    share.mkdir()
    (share / "f").write_text("through 9p\n")
    v = UtilityVM(make_config(shares=[Share(tag="c", host_path=share)], run_dir=suite_dir / "run,dir",
                              console_log=suite_dir / "console,log"))
    await v.start()
    try:
        res = await v.run(["sh", "-c", "modprobe -a 9pnet_virtio 9p && mount -t 9p -o trans=virtio c /mnt && cat /mnt/f"
                                        " && umount /mnt"])
        assert (res.exit_status, res.stdout) == (0, b"through 9p\n"), res
        assert (suite_dir / "run,dir" / v.id / "agent.sock").exists()
    finally:
        await v.close()
    assert (suite_dir / "console,log").stat().st_size > 0
    (suite_dir / "console,log").unlink()
    assert not list((suite_dir / "run,dir").iterdir())
    assert_no_leftovers(suite_dir)


async def test_output_over_the_cap_is_truncated_not_fatal(vm: UtilityVM) -> None:
    res = await vm.run(["sh", "-c", "head -c 600000 /dev/zero; echo done >&2"])
    assert res.exit_status == 0 and res.truncated
    assert len(res.stdout) == 256 * 1024 and res.stderr == b"done\n"


async def test_shutdown_returns_at_once_then_wait(vm: UtilityVM, suite_dir: Path) -> None:
    await vm.shutdown()
    assert vm.state is VmState.STOPPING  # returned before the VM is gone
    waiters = [asyncio.create_task(vm.wait()) for _ in range(5)]
    results = await asyncio.gather(*waiters)
    assert all(r is results[0] for r in results)
    assert results[0].reason == "shutdown" and results[0].hypervisor.shutdown_reason == "guest-shutdown"
    assert vm.state is VmState.STOPPED
    assert not (suite_dir / "run" / vm.id).exists()  # resources released before wait() returned
    await vm.shutdown()  # stopping a stopped VM is not an error
    await vm.terminate()
    assert (await vm.wait()) is results[0]
    with pytest.raises(errors.NotRunningError):
        await vm.run(["true"])


async def test_terminate(vm: UtilityVM) -> None:
    await vm.terminate()
    exit_info = await vm.wait_timeout(30)
    assert exit_info.reason == "terminated" and exit_info.success


async def test_wait_timeout_leaves_vm_running(vm: UtilityVM) -> None:
    with pytest.raises(errors.WaitTimeoutError):
        await vm.wait_timeout(0.2)
    assert vm.state is VmState.RUNNING
    res = await vm.run(["true"])
    assert res.exit_status == 0


async def test_sigkill_of_qemu_releases_every_waiter_with_vm_died(vm: UtilityVM) -> None:
    assert vm.backend is not None and vm.backend.pid is not None
    waiters = [asyncio.create_task(vm.wait()) for _ in range(3)]
    pending_run = asyncio.create_task(vm.run(["sleep", "60"]))
    await asyncio.sleep(0.3)
    os.kill(vm.backend.pid, signal.SIGKILL)
    for w in waiters:
        with pytest.raises(errors.VmDiedError, match="signal 9"):
            await w
    with pytest.raises((errors.VmDiedError, errors.LinkError)):
        await pending_run
    assert vm.state is VmState.STOPPED
    with pytest.raises(errors.NotRunningError):
        await vm.run(["true"])


async def test_guest_panic_is_a_death_not_a_shutdown(vm: UtilityVM) -> None:
    with pytest.raises((errors.VmDiedError, errors.LinkError)):
        await vm.run(["sh", "-c", "echo c > /proc/sysrq-trigger"])
    with pytest.raises(errors.VmDiedError) as info:
        await vm.wait_timeout(60)
    # QEMU exits 0 after a guest panic (-no-reboot): only the reported reason tells it from a shutdown.
    assert "guest-reset" in str(info.value)
    assert "Kernel Offset" in info.value.console_tail or "panic" in info.value.console_tail.lower()


async def test_close_is_idempotent_and_final(make_config: Callable[..., UvmConfig], suite_dir: Path) -> None:
    vm = UtilityVM(make_config())
    with pytest.raises(errors.NotRunningError):
        await vm.wait()
    await vm.start()
    await asyncio.gather(vm.close(), vm.close())
    await vm.close()
    assert vm.state is VmState.CLOSED
    for op in (vm.start(), vm.shutdown(), vm.terminate(), vm.wait(), vm.run(["true"])):
        with pytest.raises(errors.ClosedError):
            await op
    assert_no_leftovers(suite_dir)


# -- bad input: a clear error, nothing left behind ------------------------------------------------


async def test_missing_and_unreadable_image_files(make_config: Callable[..., UvmConfig], suite_dir: Path,
                                                  tmp_path: Path) -> None:
    with pytest.raises(errors.ConfigError, match=r"kernel .*/nope: not found"):
        await UtilityVM(make_config(kernel=tmp_path / "nope")).start()
    (tmp_path / "dir").mkdir()
    with pytest.raises(errors.ConfigError, match=r"rootfs .*/dir: not a regular file"):
        await UtilityVM(make_config(rootfs=tmp_path / "dir")).start()
    with pytest.raises(errors.ConfigError, match="no manifest.json"):
        await UtilityVM(make_config(image=tmp_path)).start()
    assert_no_leftovers(suite_dir)


async def test_memory_and_unknown_fields(make_config: Callable[..., UvmConfig], suite_dir: Path) -> None:
    with pytest.raises(ValidationError, match="memory_mib"):
        make_config(memory_mib=0)
    with pytest.raises(ValidationError, match="memroy"):
        make_config(memroy=256)
    with pytest.raises(errors.ConfigError, match=r"memory_mib 1000000: more than this host has"):
        await UtilityVM(make_config(memory_mib=1_000_000)).start()
    assert_no_leftovers(suite_dir)


async def test_kernel_that_qemu_refuses(make_config: Callable[..., UvmConfig], suite_dir: Path,
                                        tmp_path: Path) -> None:
    bogus = tmp_path / "vmlinux"
    bogus.write_bytes(b"not a kernel" * 100)
    with pytest.raises(errors.StartError, match="QEMU exited with status 1") as info:
        await UtilityVM(make_config(kernel=bogus)).start()
    assert "kernel" in str(info.value).lower()
    assert_no_leftovers(suite_dir)


async def test_qmp_socket_that_never_appears(make_config: Callable[..., UvmConfig], suite_dir: Path,
                                             tmp_path: Path) -> None:
    fake = tmp_path / "fake-qemu"
    fake.write_text("#!/bin/sh\necho \"$$\" > \"$(dirname \"$0\")/pid\"\nexec sleep 600\n")
    fake.chmod(0o755)
    # (unconfined: the fake writes its pid next to itself, outside any jail)
    vm = UtilityVM(make_config(qemu_binary=str(fake), accel="tcg", launch_timeout=1.5, confine=False))
    with pytest.raises(errors.BootTimeoutError, match="the qemu backend did not bring the hypervisor up within the "
                                                       "launch timeout of 1.5s"):
        await vm.start()
    pid = int((tmp_path / "pid").read_text())
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    assert_no_leftovers(suite_dir)


async def test_guest_that_never_says_hello(make_config: Callable[..., UvmConfig], suite_dir: Path) -> None:
    # The kernel runs `sleep 600` as init instead of the agent's init: QEMU runs, nobody answers.
    vm = UtilityVM(make_config(kernel_args="rdinit=/bin/sleep -- 600", boot_timeout=12))
    with pytest.raises(errors.BootTimeoutError, match="did not answer") as info:
        await vm.start()
    assert "console tail" in str(info.value)
    assert vm.state is VmState.STOPPED
    assert_no_leftovers(suite_dir)


async def test_duplicate_vm_id(make_config: Callable[..., UvmConfig], vm: UtilityVM) -> None:
    with pytest.raises(errors.AlreadyExistsError, match=vm.id):
        await UtilityVM(make_config(id=vm.id)).start()
    assert (await vm.run(["true"])).exit_status == 0
