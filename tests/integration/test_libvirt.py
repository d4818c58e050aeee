"""The libvirt backend with a real libvirtd (started by the fixture when it is not running)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from schemas import oci
from schemas.uvm_config import Share, UvmConfig
from tests.conftest import assert_no_leftovers, libvirt_image_dir
from uvm import errors
from uvm.container import Rootfs
from uvm.demo import busybox_rootfs
from uvm.lifecycle import VmState
from uvm.scratch import create_scratch
from uvm.vm import UtilityVM

pytestmark = pytest.mark.vm


async def until(condition: Callable[[], bool], timeout: float = 120) -> None:
    """Wait for condition (the backend's watchdog polls once a second), failing after timeout seconds."""
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110 (counters the watchdog bumps: nothing to await)
            await asyncio.sleep(0.1)


def domains() -> list[str]:
    out = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"], capture_output=True,
                         text=True, check=True).stdout
    return [d for d in out.split() if d.startswith("uvmshim-")]


async def test_libvirt_lifecycle_command_disk_shutdown(libvirtd: list[str], make_config: Callable[..., UvmConfig],
                                                       suite_dir: Path, tmp_path: Path) -> None:
    vm = UtilityVM(make_config(backend="libvirt", boot_timeout=120))
    try:
        await vm.start()
        assert vm.hello is not None and f"uvmshim-{vm.id}" in domains()
        # libvirt's own confinement is in force: QEMU as libvirt's user, under QEMU's seccomp sandbox
        # (qemu.conf's seccomp_sandbox), with no capability in effect.
        assert vm.backend is not None and vm.backend.pid is not None
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{vm.backend.pid}/status").read_text().splitlines())
        assert int(fields["Uid"].split()[1]) != 0 and fields["Seccomp"].strip() == "2", fields
        assert int(fields["CapEff"], 16) == 0, fields["CapEff"]
        res = await vm.run(["sh", "-c", "ls /sys/bus/pci/devices | wc -l; hostname"])
        assert res.exit_status == 0 and res.stdout.split()[1].decode() == vm.id
        open_to_qemu(tmp_path)
        img = create_scratch(tmp_path / "s.img", size_gb=1).path
        disk = await vm.add_scsi_disk(img, "/mnt/s")
        assert (await vm.run(["sh", "-c", "echo ok > /mnt/s/f && cat /mnt/s/f"])).stdout == b"ok\n"
        await vm.remove_scsi_disk(disk)
        assert vm.backend is not None and await vm.backend.scsi_inventory() == {"nodes": [], "devices": []}
        await vm.shutdown()
        exit_info = await vm.wait_timeout(60)
        assert exit_info.reason == "shutdown"
    finally:
        await vm.close()
    assert f"uvmshim-{vm.id}" not in domains()
    assert_no_leftovers(suite_dir)


def open_to_qemu(path: Path) -> None:
    """QEMU runs as libvirt-qemu under libvirt: path and its parents up to /tmp must let it through."""
    path.chmod(0o755)
    for parent in path.parents:
        if parent == Path("/tmp"):
            break
        parent.chmod(parent.stat().st_mode | 0o005)


async def test_libvirt_container_from_a_9p_share(libvirtd: list[str], make_config: Callable[..., UvmConfig],
                                                 suite_dir: Path, tmp_path: Path) -> None:
    """A <filesystem> passthrough share: the rootfs of a container, read by the guest over virtio-9p."""
    open_to_qemu(tmp_path)
    busybox_rootfs(tmp_path)
    vm = UtilityVM(make_config(backend="libvirt", boot_timeout=120, shares=[
        Share(tag="rootfs", host_path=tmp_path, readonly=True)]))
    try:
        await vm.start()
        spec = oci.default_spec(["sh", "-c", "echo from $(hostname) over 9p; touch /x 2>/dev/null || echo ro"],
                                env=["PATH=/bin"], hostname="c9p")
        c = await vm.create_container("c9p", spec, Rootfs(share="rootfs", path="busybox"))
        await c.start()
        assert c.init.stdout is not None
        out = await asyncio.wait_for(c.init.stdout.read_all(), 60)
        assert out == b"from c9p over 9p\nro\n"
        assert (await c.wait_timeout(60)).exit_code == 0
        await c.close()
    finally:
        await vm.close()
    assert f"uvmshim-{vm.id}" not in domains()
    assert_no_leftovers(suite_dir)


async def test_libvirt_qemu_killed_behind_its_back(libvirtd: list[str], make_config: Callable[..., UvmConfig],
                                                   suite_dir: Path) -> None:
    vm = UtilityVM(make_config(backend="libvirt", boot_timeout=120))
    try:
        await vm.start()
        assert vm.backend is not None and vm.backend.pid is not None
        waiter = asyncio.create_task(vm.wait())
        os.kill(vm.backend.pid, signal.SIGKILL)
        with pytest.raises(errors.VmDiedError, match="died"):
            await asyncio.wait_for(waiter, 60)
        assert vm.state is VmState.STOPPED
    finally:
        await vm.close()
    assert f"uvmshim-{vm.id}" not in domains()
    assert_no_leftovers(suite_dir)


async def test_libvirt_restarted_under_a_running_vm(libvirtd: list[str], make_config: Callable[..., UvmConfig],
                                                    suite_dir: Path) -> None:
    """A lost connection to libvirtd is not the VM's death: the backend reconnects and goes on."""
    from uvm.testing import stop_daemon, wait_for_libvirtd

    if "libvirtd" not in libvirtd:
        pytest.skip("libvirtd ran before the suite: not the suite's to restart")
    vm = UtilityVM(make_config(backend="libvirt", boot_timeout=120))
    try:
        await vm.start()
        backend = vm.backend
        assert backend is not None
        await asyncio.to_thread(stop_daemon, "libvirtd")
        await until(lambda: getattr(backend, "disconnects", 0) >= 1)  # the backend's poll met the closed connection
        assert vm.state is VmState.RUNNING and getattr(backend, "reconnects", 0) == 0
        await vm.ping()
        subprocess.run(["libvirtd", "-d"], check=True)
        await asyncio.to_thread(wait_for_libvirtd)
        await until(lambda: getattr(backend, "reconnects", 0) >= 1)
        assert (getattr(backend, "disconnects", 0), getattr(backend, "reconnects", 0)) == (1, 1)
        await vm.shutdown()  # through the new connection, whose lifecycle event ends the VM
        assert (await vm.wait_timeout(60)).reason == "shutdown"
    finally:
        await vm.close()
    assert f"uvmshim-{vm.id}" not in domains()
    assert_no_leftovers(suite_dir)


async def test_libvirt_bad_input(libvirtd: list[str], make_config: Callable[..., UvmConfig], suite_dir: Path,
                                 tmp_path: Path) -> None:
    with pytest.raises(errors.StartError, match="cannot connect to libvirt.*libvirtd"):
        await UtilityVM(make_config(backend="libvirt", libvirt_uri="qemu+unix:///system?socket=/nonexistent")).start()
    assert_no_leftovers(suite_dir)
    first = UtilityVM(make_config(backend="libvirt", boot_timeout=120))
    await first.start()
    try:
        # Same id, different run directory: the domain name is what collides.
        other = make_config(backend="libvirt", id=first.id, run_dir=suite_dir / "run2")
        with pytest.raises(errors.AlreadyExistsError, match="already exists"):
            await UtilityVM(other).start()
        hidden = create_scratch(tmp_path / "hidden.img", size_gb=1).path  # in a 0700 directory
        open_to_qemu(tmp_path)  # its parents let QEMU through (never rely on an earlier test having opened them:
        tmp_path.chmod(0o700)  # any pytest run resets /tmp/pytest-of-<user> to 0700), tmp_path itself does not
        with pytest.raises(errors.DiskError, match=f"libvirt runs QEMU as libvirt-qemu \\(uid \\d+\\), which cannot "
                                                   f"reach it: {tmp_path} \\(mode 0700"):
            await first.add_scsi_disk(hidden, "/mnt/hidden")
        assert first.backend is not None and await first.backend.scsi_inventory() == {"nodes": [], "devices": []}
    finally:
        await first.close()
        shutil.rmtree(suite_dir / "run2", ignore_errors=True)
    assert f"uvmshim-{first.id}" not in domains()  # (only this test's: other users' domains are theirs)
    assert_no_leftovers(suite_dir)


async def test_leftover_of_a_dead_shim_is_found_and_destroyed(libvirtd: list[str], make_config: Callable[..., UvmConfig],
                                                            suite_dir: Path) -> None:
    from uvm.backends.libvirt import destroy_leftover

    vm = UtilityVM(make_config(backend="libvirt", boot_timeout=120))
    try:
        await vm.start()
        assert f"uvmshim-{vm.id}" in domains()
        # What `delete` does after the shim that owned the VM died: find the domain by id, destroy it.
        assert await asyncio.to_thread(destroy_leftover, vm.id) is True
        with pytest.raises(errors.VmDiedError):
            await asyncio.wait_for(vm.wait(), 60)
        assert await asyncio.to_thread(destroy_leftover, vm.id) is False
    finally:
        await vm.close()
    assert f"uvmshim-{vm.id}" not in domains()
    assert_no_leftovers(suite_dir)


async def test_libvirt_from_a_checkout_under_a_0700_directory(libvirtd: list[str], make_config: Callable[..., UvmConfig],
                                                            suite_dir: Path, image_dir: Path) -> None:
    """A root user's clone lands under /root (0700), where libvirt's QEMU user cannot read the image: the
    backend publishes it where that user can, and a share still out of its reach is named in the error."""
    home = Path(tempfile.mkdtemp(prefix="uvmt-home-", dir="/tmp"))  # 0700, as /root
    try:
        await boot_from_a_private_checkout(make_config, suite_dir, image_dir, home)
    finally:
        shutil.rmtree(home)
    assert_no_leftovers(suite_dir)


async def boot_from_a_private_checkout(make_config: Callable[..., UvmConfig], suite_dir: Path, image_dir: Path,
                                       home: Path) -> None:
    checkout_image = home / "uvmshim" / "images" / "out"
    shutil.copytree(image_dir, checkout_image)
    assert home.stat().st_mode & 0o777 == 0o700
    vm = UtilityVM(make_config(backend="libvirt", boot_timeout=120, image=checkout_image))
    try:
        await vm.start()
        assert (await vm.run(["true"])).exit_status == 0
        assert vm.backend is not None and str(libvirt_image_dir(suite_dir)) in str(vm.backend.spec.rootfs)
    finally:
        await vm.close()
    private_share = home / "share"
    private_share.mkdir()
    with pytest.raises(errors.StartError, match=f"which cannot reach the share s1 {private_share}: {home} \\(mode 0700"):
        await UtilityVM(make_config(backend="libvirt", boot_timeout=120, image=checkout_image,
                                    shares=[Share(tag="s1", host_path=private_share)])).start()
