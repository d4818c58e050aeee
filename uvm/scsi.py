"""virtio-scsi disks: controller x LUN slots, reference-counted host attach, separate guest mount.

Following hcsshim's internal/uvm/scsi: attaching on the host (QMP blockdev-add + device_add into a
free slot) and mounting in the guest (the agent waits for the device at its SCSI address, then
mounts it or exposes the block device) are separate steps. The same (path, read-only) attached
twice shares its slot with a reference count; the last release unplugs it. A read-write disk is
exclusive. Adding a mapped disk = host attach then guest mount; a failure at any step rolls back
the earlier ones. Removing = guest unmount, guest unplug, host detach.

The host chooses every guest path: the guest must mount where it was told (or, told none, nowhere),
and a different answer is a protocol error (the attach is rolled back, then the link dropped). A
guest path is taken from the start of its add, so two adds at one path cannot both record it.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from schemas import agent as proto
from schemas import agent_models as models
from schemas.validation import guest_text
from uvm import errors
from uvm.lifecycle import VmState

if TYPE_CHECKING:
    from uvm.parts import VmServices

LUNS_PER_CONTROLLER = 64
QCOW2_MAGIC = b"QFI\xfb"


@dataclass
class ScsiSlot:
    """One attached disk: where it sits and who uses it."""

    controller: int
    lun: int
    path: str
    readonly: bool
    refs: int = 1
    device: str | None = None  # /dev/sdX in the guest, once seen there
    broken: bool = False  # its detach failed: QEMU may still hold it, so the slot is never reused


@dataclass
class MappedDisk:
    """A host image attached to the UVM and mounted at guest_path (or exposed as a block device)."""

    slot: ScsiSlot
    guest_path: str | None
    fstype: str
    options: tuple[str, ...] = field(default_factory=tuple)

    @property
    def device(self) -> str | None:
        return self.slot.device


def image_format(path: Path) -> str:
    """raw or qcow2, from the file's first bytes."""
    with path.open("rb") as f:
        return "qcow2" if f.read(4) == QCOW2_MAGIC else "raw"


def check_image(path: Path | str, readonly: bool) -> Path:
    """The absolute path of a usable disk image file. Raises DiskError naming what is wrong."""
    p = Path(path).absolute()
    if not p.is_file():
        raise errors.DiskError(f"disk {p}: {'not a regular file' if p.exists() else 'not found'}", path=str(p))
    if not os.access(p, os.R_OK if readonly else os.R_OK | os.W_OK):
        raise errors.DiskError(f"disk {p}: not {'readable' if readonly else 'writable'}", path=str(p))
    if p.stat().st_size == 0:
        raise errors.DiskError(f"disk {p}: empty file, not a disk image", path=str(p))
    return p


class ScsiManager:
    def __init__(self, vm: VmServices, controllers: int, luns: int = LUNS_PER_CONTROLLER) -> None:
        self.vm = vm
        self.controllers = controllers
        self.luns = luns
        self.slots: dict[tuple[int, int], ScsiSlot] = {}
        self.mounts: dict[str, MappedDisk] = {}  # guest path -> disk
        self.disks: list[MappedDisk] = []  # every mapped disk, mounted or exposed as a block device
        self._mounting: set[str] = set()  # guest paths of adds still under way
        self._lock = asyncio.Lock()

    # -- bookkeeping (no I/O) -------------------------------------------------------------------

    def _find(self, path: str, readonly: bool) -> ScsiSlot | None:
        for slot in self.slots.values():
            if slot.path == path and not slot.broken:
                if slot.readonly and readonly:
                    return slot
                raise errors.DiskError(f"disk {path}: already attached {'read-only' if slot.readonly else 'read-write'} "
                                       f"at {slot.controller}:{slot.lun}; a read-write disk is exclusive", path=path)
        return None

    def _free_location(self, path: str) -> tuple[int, int]:
        for c in range(self.controllers):
            for lun in range(self.luns):
                if (c, lun) not in self.slots:
                    return c, lun
        raise errors.NoAvailableLocationError(
            f"disk {path}: no available SCSI location ({self.controllers} controller(s) x {self.luns} LUNs in use)",
            path=path)

    def by_controller(self) -> dict[int, list[ScsiSlot]]:
        out: dict[int, list[ScsiSlot]] = {c: [] for c in range(self.controllers)}
        for (c, _), slot in sorted(self.slots.items()):
            out[c].append(slot)
        return out

    # -- host attach / detach -------------------------------------------------------------------

    async def attach(self, path: Path | str, readonly: bool) -> ScsiSlot:
        """Attach on the host (or add a reference). Raises DiskError / NoAvailableLocationError."""
        p = check_image(path, readonly)
        async with self._lock:
            slot = self._find(str(p), readonly)
            if slot is not None:
                slot.refs += 1
                return slot
            c, lun = self._free_location(str(p))
            backend = self.vm.require_backend("attach_scsi")
            await backend.attach_scsi(c, lun, str(p), readonly, await asyncio.to_thread(image_format, p))
            slot = ScsiSlot(c, lun, str(p), readonly)
            self.slots[(c, lun)] = slot
            return slot

    async def release(self, slot: ScsiSlot) -> None:
        """Drop a reference; at zero: unplug in the guest, then detach on the host."""
        async with self._lock:
            if self.slots.get((slot.controller, slot.lun)) is not slot:
                raise errors.DiskError(f"disk {slot.path}: not attached", path=slot.path)
            slot.refs -= 1
            if slot.refs > 0:
                return
            try:
                if self.vm.agent is not None and self.vm.state is VmState.RUNNING:
                    await self.vm.agent_client("scsi unplug").request(
                        proto.SCSI_UNPLUG, {"controller": slot.controller, "lun": slot.lun}, models.Empty)
                await self.vm.require_backend("detach_scsi").detach_scsi(slot.controller, slot.lun)
            except BaseException:
                if self.vm.state is VmState.RUNNING:  # QEMU may still hold the node: never hand the slot out again
                    slot.broken = True
                else:
                    del self.slots[(slot.controller, slot.lun)]
                raise
            del self.slots[(slot.controller, slot.lun)]

    # -- mapped disks ----------------------------------------------------------------------------

    async def add_mapped_disk(self, path: Path | str, guest_path: str | None, readonly: bool = False,
                              fstype: str = "ext4", options: tuple[str, ...] = ()) -> MappedDisk:
        """Attach path and mount it at guest_path (None: expose the block device only). Raises
        DiskError, NoAvailableLocationError, or GuestProtocolError if the guest answers with another
        path (the link is dropped); nothing of the disk is left attached when it raises."""
        if guest_path is not None:
            if guest_path in self.mounts or guest_path in self._mounting:
                raise errors.DiskError(f"guest path {guest_path}: a disk is mounted there already",
                                       guest_path=guest_path)
            self._mounting.add(guest_path)
        try:
            return await self._add_mapped_disk(path, guest_path, readonly, fstype, options)
        finally:
            if guest_path is not None:
                self._mounting.discard(guest_path)

    async def _add_mapped_disk(self, path: Path | str, guest_path: str | None, readonly: bool, fstype: str,
                               options: tuple[str, ...]) -> MappedDisk:
        slot = await self.attach(path, readonly)
        client = None
        try:
            client = self.vm.agent_client("scsi mount")
            res = await client.request(proto.SCSI_MOUNT, {
                "controller": slot.controller, "lun": slot.lun, "path": guest_path, "fstype": fstype,
                "options": list(options), "readonly": readonly}, models.ScsiMountResult)
            if res.path != guest_path:
                told = "to mount it nowhere" if guest_path is None else f"to mount it at {guest_path}"
                answered = "no path" if res.path is None else f"path {guest_text(res.path)}"
                raise errors.GuestProtocolError(
                    f"agent link {client.conn.name}: scsi mount of disk {slot.path}: told {told}, the guest "
                    f"answered {answered}", vm_id=client.conn.name, method=proto.SCSI_MOUNT)
        except BaseException as e:
            try:
                await asyncio.shield(self.release(slot))  # roll back the host attach
            except errors.UvmError:
                pass
            if isinstance(e, errors.GuestProtocolError) and client is not None:
                client.conn.fail(e)  # (after the rollback: a dropped link stops the VM, and its unplug with it)
            if isinstance(e, errors.AgentError):
                raise errors.DiskError(f"disk {slot.path}: {e.message}", path=slot.path) from None
            raise
        slot.device = res.device
        disk = MappedDisk(slot, res.path, fstype, tuple(options))
        if res.path is not None:
            self.mounts[res.path] = disk
        self.disks.append(disk)
        return disk

    async def remove_mapped_disk(self, disk: MappedDisk) -> None:
        if not any(d is disk for d in self.disks):
            raise errors.DiskError(f"disk {disk.slot.path}: not mapped (removed already?)", path=disk.slot.path)
        if disk.guest_path is not None:
            if self.mounts.get(disk.guest_path) is not disk:
                raise errors.DiskError(f"guest path {disk.guest_path}: no such mapped disk", guest_path=disk.guest_path)
            try:
                await self.vm.agent_client("scsi unmount").request(proto.SCSI_UNMOUNT, {"path": disk.guest_path}, models.Empty)
            except errors.AgentError as e:
                raise errors.DiskError(f"disk {disk.slot.path}: {e.message}", path=disk.slot.path) from None
            del self.mounts[disk.guest_path]
        self.disks = [d for d in self.disks if d is not disk]
        await self.release(disk.slot)
