"""SCSI hot-plug of scratch and mapped disks, and layered container rootfs, in a real UVM."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio

from schemas import oci
from schemas.uvm_config import UvmConfig
from uvm import errors
from uvm.container import Rootfs
from uvm.scratch import create_scratch, fsck
from uvm.vm import UtilityVM

pytestmark = [pytest.mark.vm, pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def vm(make_config_module: Callable[..., UvmConfig]) -> AsyncIterator[UtilityVM]:
    v = UtilityVM(make_config_module(memory_mib=384))
    await v.start()
    try:
        yield v
    finally:
        await v.close()


@pytest.fixture(scope="module")
def disk_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("disks")


def ext4_from_dir(dest: Path, src: Path, size_mb: int = 64) -> Path:
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(src), str(dest), f"{size_mb}M"], check=True)
    return dest


async def sh(vm: UtilityVM, script: str) -> str:
    res = await vm.run(["sh", "-c", script])
    assert res.exit_status == 0, (script, res.stderr)
    return res.stdout.decode()


async def inventory(vm: UtilityVM) -> dict[str, list[str]]:
    assert vm.backend is not None
    return await vm.backend.scsi_inventory()


async def test_scratch_write_detach_reattach(vm: UtilityVM, disk_dir: Path) -> None:
    scratch = create_scratch(disk_dir / "scratch1.img", size_gb=1).path
    disk = await vm.add_scsi_disk(scratch, "/mnt/scratch")
    assert disk.device is not None and disk.device.startswith("/dev/sd")
    assert vm.mapped_disks()[0] == [disk]
    await sh(vm, "echo persisted > /mnt/scratch/file && sync")
    await vm.remove_scsi_disk(disk)
    assert await inventory(vm) == {"nodes": [], "devices": []}
    assert "scratch" not in await sh(vm, "cat /proc/mounts")
    ok, out = fsck(scratch)
    assert ok, out
    disk = await vm.add_scsi_disk(scratch, "/mnt/scratch")
    assert await sh(vm, "cat /mnt/scratch/file") == "persisted\n"
    await vm.remove_scsi_disk(disk)


async def test_reference_counting_and_exclusive_rw(vm: UtilityVM, disk_dir: Path) -> None:
    layer = create_scratch(disk_dir / "shared.img", size_gb=1).path
    a = await vm.scsi.attach(layer, readonly=True)
    b = await vm.scsi.attach(layer, readonly=True)
    assert a is b and a.refs == 2
    with pytest.raises(errors.DiskError, match="exclusive"):
        await vm.scsi.attach(layer, readonly=False)
    await vm.scsi.release(a)
    assert len((await inventory(vm))["devices"]) == 1
    await vm.scsi.release(a)
    assert await inventory(vm) == {"nodes": [], "devices": []}
    with pytest.raises(errors.DiskError, match="not attached"):
        await vm.scsi.release(a)
    rw = await vm.scsi.attach(layer, readonly=False)
    with pytest.raises(errors.DiskError, match="exclusive"):
        await vm.scsi.attach(layer, readonly=False)
    await vm.scsi.release(rw)


async def test_filling_every_lun(vm: UtilityVM, disk_dir: Path) -> None:
    files = []
    for i in range(vm.scsi.luns + 1):
        f = disk_dir / f"lun{i}.img"
        with f.open("wb") as fh:
            fh.truncate(1 << 20)
        files.append(f)
    slots = [await vm.scsi.attach(f, readonly=True) for f in files[:-1]]
    assert sorted(s.lun for s in slots) == list(range(vm.scsi.luns))
    with pytest.raises(errors.NoAvailableLocationError, match="no available SCSI location"):
        await vm.scsi.attach(files[-1], readonly=True)
    for s in slots:
        await vm.scsi.release(s)
    assert await inventory(vm) == {"nodes": [], "devices": []}


async def test_guest_mount_failure_rolls_back(vm: UtilityVM, disk_dir: Path) -> None:
    junk = disk_dir / "junk.img"
    junk.write_bytes(b"\x01" * (4 << 20))  # not a filesystem
    with pytest.raises(errors.DiskError, match="mount"):
        await vm.add_scsi_disk(junk, "/mnt/junk")
    assert await inventory(vm) == {"nodes": [], "devices": []}
    assert vm.scsi.slots == {} and vm.mapped_disks()[0] == []
    assert "/mnt/junk" not in await sh(vm, "cat /proc/mounts")


async def test_bad_disk_input(vm: UtilityVM, disk_dir: Path) -> None:
    with pytest.raises(errors.DiskError, match="not found"):
        await vm.add_scsi_disk(disk_dir / "missing.img", "/mnt/x")
    with pytest.raises(errors.DiskError, match="not a regular file"):
        await vm.add_scsi_disk(disk_dir, "/mnt/x")
    empty = disk_dir / "empty.img"
    empty.touch()
    with pytest.raises(errors.DiskError, match="empty"):
        await vm.add_scsi_disk(empty, "/mnt/x")
    assert await inventory(vm) == {"nodes": [], "devices": []}


async def test_container_on_two_layers_and_a_scratch(vm: UtilityVM, disk_dir: Path, busybox_rootfs: Path,
                                                     tmp_path: Path) -> None:
    base = ext4_from_dir(disk_dir / "layer-base.img", busybox_rootfs)
    top_dir = tmp_path / "top"
    (top_dir / "etc").mkdir(parents=True)
    (top_dir / "etc" / "motd").write_text("from the top layer\n")
    top = ext4_from_dir(disk_dir / "layer-top.img", top_dir, 8)
    scratch = create_scratch(disk_dir / "cscratch.img", size_gb=1).path
    d_base = await vm.add_scsi_disk(base, "/run/layers/base", readonly=True)
    d_top = await vm.add_scsi_disk(top, "/run/layers/top", readonly=True)
    d_scratch = await vm.add_scsi_disk(scratch, "/run/scratch")
    rootfs = Rootfs(layers=("/run/layers/top", "/run/layers/base"), scratch="/run/scratch")
    spec = oci.default_spec(["sh", "-c", "cat /etc/motd; ls /bin/busybox; echo written > /newfile; rm /etc/motd"],
                            env=["PATH=/bin"])
    c = await vm.create_container("layered", spec, rootfs)
    await c.start()
    assert c.init.stdout is not None
    out = await c.init.stdout.read_all()
    assert (await c.wait_timeout(60)).exit_code == 0
    assert out == b"from the top layer\n/bin/busybox\n"
    await c.close()
    for d in (d_scratch, d_top, d_base):
        await vm.remove_scsi_disk(d)
    assert await inventory(vm) == {"nodes": [], "devices": []}
    ok, report = fsck(scratch)
    assert ok, report
    got = subprocess.run(["debugfs", "-R", "cat /layered/upper/newfile", str(scratch)], capture_output=True, check=True)
    assert got.stdout == b"written\n"
    listing = subprocess.run(["debugfs", "-R", "ls -l /layered/upper/etc", str(scratch)], capture_output=True,
                             text=True, check=True).stdout
    assert "motd" in listing  # the deletion is a whiteout in the scratch; the layer is untouched
    shutil.rmtree(top_dir)


async def test_disk_exposed_as_a_block_device(vm: UtilityVM, disk_dir: Path) -> None:
    img = create_scratch(disk_dir / "raw.img", size_gb=1).path
    disk = await vm.add_scsi_disk(img, None)
    assert disk.guest_path is None and disk.device is not None
    assert await sh(vm, f"test -b {disk.device} && blockdev --getsize64 {disk.device}") == f"{1 << 30}\n"
    assert vm.mapped_disks()[0] == [disk]
    await vm.remove_scsi_disk(disk)
    assert await inventory(vm) == {"nodes": [], "devices": []} and vm.mapped_disks()[0] == []
    with pytest.raises(errors.DiskError, match="not mapped"):
        await vm.remove_scsi_disk(disk)  # detaching something no longer attached


async def test_a_host_disk_that_fills_up_is_an_error_in_the_guest_not_a_paused_vm(vm: UtilityVM, disk_dir: Path
                                                                                  ) -> None:
    """A thinly provisioned scratch on a 48 MiB filesystem: writing 96 MiB fails in the guest (QEMU reports the
    host's ENOSPC to it instead of pausing the whole VM), and the VM keeps answering."""
    small = disk_dir / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(small)], check=True)
    try:
        scratch = create_scratch(small / "thin.img", size_gb=1, check_space=False).path
        disk = await vm.add_scsi_disk(scratch, "/mnt/thin")
        res = await vm.run(["sh", "-c", "dd if=/dev/zero of=/mnt/thin/big bs=1M count=96 conv=fsync"], timeout=120)
        assert res.exit_status != 0, res.stderr
        assert await sh(vm, "echo alive") == "alive\n"
        with contextlib.suppress(errors.DiskError):  # (the guest's ext4 may refuse a clean unmount now)
            await vm.remove_scsi_disk(disk)
    finally:
        subprocess.run(["umount", "-l", str(small)], check=True)
