"""An image-based task's root filesystem on block devices (the `rootfs = "block"` option, the default), as
hcsshim and firecracker-containerd give theirs: each read-only layer of containerd's overlayfs snapshot as an
erofs disk (built once per layer, uvm/layers.py), a scratch ext4 disk for the writable layer, overlayfs
assembled in the guest. Metadata-heavy work then runs at the guest's block-device speed instead of one 9p
round trip per lookup, and no share of the snapshot is mounted in the guest (a UVM with such a container
can be migrated).

containerd's view is kept: the scratch starts as a copy of the snapshot's upper directory, and when the task
ends its upper directory comes back (uvm/guest/export.py → uvm/upper.py) as the snapshot's new upper
directory, whiteouts and opaque directories included, before the task's Delete returns. The scratch lives in
the snapshot's own directory (``snapshots/<n>/uvmshim-scratch.ext4``, removed with the snapshot), so what
the container fsync'ed survives QEMU's death: if the UVM is gone when the task ends, a helper UVM boots with
the scratch attached to bring the layer back. When that fails too the scratch is kept and the error names it.

Anything but an overlay of committed layers (a plain host directory, a bind of a single layer, another
snapshotter's mounts) stays on 9p.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path

from schemas import oci
from shim.containerd.rootfs import HostMount
from uvm import errors
from uvm.container import Rootfs
from uvm.layers import LayerCache, LayerError
from uvm.lifecycle import VmState
from uvm.scratch import ScratchError, create_scratch
from uvm.scsi import MappedDisk
from uvm.ssh import write_all
from uvm.streams import InboundStream
from uvm.upper import Received, UpperError, receive
from uvm.vm import UtilityVM

log = logging.getLogger(__name__)

SCRATCH_NAME = "uvmshim-scratch.ext4"
SEED_NAME = "uvmshim-seed"
GUEST_LAYERS = "/run/uvmshim/layers"
GUEST_SCRATCH = "/run/uvmshim/scratch"
GUEST_EXPORT = ["/usr/bin/python3", "-I", "-S", "-B", "/opt/uvmshim/uvm/guest/export.py"]
EXPORT_CHUNK = 1 << 20
EXPORT_IDLE_S = 120.0
EXIT_NO_DIR = 3  # uvm/guest/export.py's: the directory is not there
STDERR_CAP = 16 * 1024


@dataclass(frozen=True)
class Snapshot:
    """containerd's overlayfs snapshot of a task: its committed layers (top-most first) and, for an active
    snapshot, the upper directory the container writes (None for a view)."""

    lowers: tuple[Path, ...]
    upper: Path | None

    @property
    def scratch(self) -> Path | None:
        return self.upper.parent / SCRATCH_NAME if self.upper is not None else None


def snapshot_of(mounts: Sequence[HostMount]) -> Snapshot | None:
    """The layers of one overlay mount with absolute lowerdirs (and an upperdir beside a workdir), as
    containerd's overlayfs snapshotter gives them; None for anything else (that stays on 9p)."""
    if len(mounts) != 1 or mounts[0].type != "overlay":
        return None
    opts: dict[str, str] = {}
    for o in mounts[0].options:
        key, _, value = o.partition("=")
        opts[key] = value
    lowers = tuple(Path(p) for p in opts.get("lowerdir", "").split(":") if p)
    if not lowers or not all(p.is_absolute() for p in lowers):
        return None
    upper = opts.get("upperdir")
    if upper is not None and (not Path(upper).is_absolute() or "workdir" not in opts):
        return None
    return Snapshot(lowers, Path(upper) if upper else None)


class PodLayers:
    """The layer disks mounted in one UVM, shared by its containers: each erofs image is attached and
    mounted once (at GUEST_LAYERS/<digest>) and detached when its last container lets it go."""

    def __init__(self) -> None:
        self.disks: dict[Path, tuple[MappedDisk, int]] = {}
        self._lock = asyncio.Lock()

    async def acquire(self, vm: UtilityVM, image: Path) -> str:
        async with self._lock:
            held = self.disks.get(image)
            if held is None:
                guest = f"{GUEST_LAYERS}/{hashlib.sha256(str(image).encode()).hexdigest()[:24]}"
                held = (await vm.add_scsi_disk(image, guest, readonly=True, fstype="erofs"), 0)
            self.disks[image] = (held[0], held[1] + 1)
            assert held[0].guest_path is not None
            return held[0].guest_path

    async def release(self, vm: UtilityVM, image: Path) -> None:
        async with self._lock:
            held = self.disks.get(image)
            if held is None:
                return
            if held[1] > 1:
                self.disks[image] = (held[0], held[1] - 1)
                return
            del self.disks[image]
            if vm.state is VmState.RUNNING:
                await vm.remove_scsi_disk(held[0])


# A running helper UVM (the same image, no network, no shares) for the time of the `async with`: shared by the
# tasks that need one at once (a pod whose UVM died), stopped once the last of them is done.
HelperVm = Callable[[], AbstractAsyncContextManager[UtilityVM]]


class BlockRootfs:
    """One task's block root filesystem: prepare() before the container's create, save() once its processes
    are gone (the writable layer back into the snapshot), release() at the task's end."""

    def __init__(self, task_id: str, snapshot: Snapshot, cache: LayerCache, layers: PodLayers, scratch_gb: int,
                 work_dir: Path, helper_vm: HelperVm) -> None:
        self.task_id = task_id
        self.snapshot = snapshot
        self.cache = cache
        self.layers = layers
        self.scratch_gb = scratch_gb
        # Where the scratch lives: beside the snapshot's upper directory, or (a view: nothing comes back) in
        # the task's own directory.
        self.scratch = snapshot.scratch or work_dir / SCRATCH_NAME
        self.helper_vm = helper_vm
        self.acquired: list[Path] = []
        self.scratch_disk: MappedDisk | None = None
        self.saved = snapshot.upper is None  # a view has nothing to bring back
        self._save_lock: asyncio.Lock | None = None
        self.reused = False  # the scratch was left by a previous task (its writes not yet in the snapshot)

    @property
    def guest_scratch(self) -> str:
        return f"{GUEST_SCRATCH}/{self.task_id}"

    @property
    def guest_upper(self) -> str:
        return f"{self.guest_scratch}/{self.task_id}/upper"  # uvm/guest/runtime.py's mount_overlay

    async def prepare(self, vm: UtilityVM) -> Rootfs:
        """The layers' images (built when new), attached; the scratch made and attached. Raises LayerError,
        ScratchError, DiskError (what was done is undone by release())."""
        images = [await asyncio.to_thread(self.cache.image_for, lower) for lower in self.snapshot.lowers]
        guest_layers = []
        for image in images:
            guest_layers.append(await self.layers.acquire(vm, image))
            self.acquired.append(image)
        await asyncio.to_thread(self._make_scratch)
        self.scratch_disk = await vm.add_scsi_disk(self.scratch, self.guest_scratch)
        return Rootfs(layers=tuple(guest_layers), scratch=self.guest_scratch)

    def _make_scratch(self) -> None:
        """A sparse ext4 holding <task id>/upper = a copy of the snapshot's upper directory (hard links into a
        staging tree, then mkfs.ext4 -d): what an earlier task of the same container wrote is still there."""
        if self.scratch.exists():
            # A previous task of this container whose layer did not come back (its shim was killed, or the
            # copy failed and said so): the scratch holds the newest writes, so this task continues on it.
            log.warning("task %s: continuing on %s, left by a previous task whose writable layer did not come "
                        "back to %s", self.task_id, self.scratch, self.snapshot.upper)
            self.reused = True
            return
        upper = self.snapshot.upper
        if upper is None or not any(os.scandir(upper)):
            create_scratch(self.scratch, self.scratch_gb, cache_path=self.cache.root / "scratch.ext4", check_space=False)
            return
        stage = upper.parent / SEED_NAME
        shutil.rmtree(stage, ignore_errors=True)
        try:
            (stage / self.task_id).mkdir(parents=True, mode=0o700)
            res = subprocess.run(["cp", "-a", "-l", "--", str(upper), str(stage / self.task_id / "upper")],
                                 capture_output=True, text=True, check=False)
            if res.returncode != 0:
                raise ScratchError(f"task {self.task_id}: staging the writable layer {upper}: {res.stderr.strip()}",
                                   path=str(upper))
            create_scratch(self.scratch, self.scratch_gb, seed=stage, check_space=False)
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def unused(self) -> None:
        """No container was created on it: a scratch made for this task holds nothing new."""
        if not self.reused:
            self.saved = True

    async def save(self, vm: UtilityVM | None) -> None:
        """Bring the writable layer back into the snapshot's upper directory (once): from vm when it runs,
        else through a helper UVM that mounts the scratch. Raises UpperError naming the kept scratch."""
        if self._save_lock is None:
            self._save_lock = asyncio.Lock()
        async with self._save_lock:  # (the pod's end and the task's own Delete may both ask)
            if not self.saved:
                await self._save(vm)

    async def _save(self, vm: UtilityVM | None) -> None:
        if self.snapshot.upper is None:
            return
        if not self.scratch.exists():
            raise UpperError(f"task {self.task_id}: its scratch {self.scratch} is gone: the writable layer is lost")
        if vm is not None and vm.state is VmState.RUNNING and self.scratch_disk is not None:
            try:
                await export_layer(vm, self.guest_upper, self.snapshot.upper, self._limit())
                self.saved = True
                return
            except errors.UvmError as e:
                if vm.state is VmState.RUNNING:
                    raise UpperError(f"task {self.task_id}: bringing its writable layer back to {self.snapshot.upper}"
                                     f" failed ({e.message}); it is kept in {self.scratch}") from None
                log.warning("task %s: its UVM died while its writable layer came back; a helper UVM retries",
                            self.task_id)
        await self._save_through_helper()
        self.saved = True

    async def _save_through_helper(self) -> None:
        assert self.snapshot.upper is not None
        log.info("task %s: its UVM is gone; a helper UVM brings the writable layer back from %s", self.task_id,
                 self.scratch)
        try:
            async with self.helper_vm() as vm:
                disk = await vm.add_scsi_disk(self.scratch, self.guest_scratch)
                try:
                    await export_layer(vm, self.guest_upper, self.snapshot.upper, self._limit())
                finally:
                    if vm.state is VmState.RUNNING:
                        with contextlib.suppress(errors.UvmError):
                            await vm.remove_scsi_disk(disk)
        except errors.UvmError as e:
            raise UpperError(f"task {self.task_id}: bringing its writable layer back to {self.snapshot.upper} "
                             f"failed ({e.message}); it is kept in {self.scratch}") from None

    def _limit(self) -> int:
        return self.scratch_gb << 30

    async def release(self, vm: UtilityVM | None) -> None:
        """Detach the scratch and the layers (when the UVM still runs) and remove the scratch once its
        layer is saved. Idempotent."""
        running = vm is not None and vm.state is VmState.RUNNING
        if self.scratch_disk is not None:
            disk, self.scratch_disk = self.scratch_disk, None
            if running:
                assert vm is not None
                try:
                    await vm.remove_scsi_disk(disk)
                except errors.UvmError as e:
                    log.warning("task %s: detaching its scratch: %s", self.task_id, e.message)
        while self.acquired:
            image = self.acquired.pop()
            if vm is not None:
                try:
                    await self.layers.release(vm, image)
                except errors.UvmError as e:
                    log.warning("task %s: detaching layer %s: %s", self.task_id, image.name, e.message)
        if self.saved:
            self.scratch.unlink(missing_ok=True)


async def export_layer(vm: UtilityVM, guest_dir: str, upper: Path, max_bytes: int) -> None:
    """Stream guest_dir of vm as a tar (uvm/guest/export.py) into upper (uvm/upper.py's receive, in a thread
    reading a pipe this side fills). A guest silent for EXPORT_IDLE_S is given up on. Raises UpperError, or
    the VM's errors."""
    proc = await vm.create_process(oci.Process(args=[*GUEST_EXPORT, guest_dir]), stdin=False, stdout=True,
                                   stderr=True)
    assert proc.stdout is not None and proc.stderr is not None
    r, w = os.pipe()
    reader: asyncio.Future[Received] = asyncio.ensure_future(asyncio.to_thread(_receive_fd, r, upper, max_bytes))
    stderr = asyncio.ensure_future(_tail(proc.stderr, STDERR_CAP))
    try:
        try:
            while chunk := await asyncio.wait_for(proc.stdout.read(EXPORT_CHUNK), EXPORT_IDLE_S):
                await asyncio.to_thread(write_all, w, chunk)
        except BrokenPipeError:
            pass  # the receiver refused the stream: its error says why
        except TimeoutError:
            raise UpperError(f"exporting {guest_dir}: the UVM sent nothing for {EXPORT_IDLE_S:.0f}s") from None
        finally:
            os.close(w)
            w = -1
        received: Received | UpperError
        try:
            received = await reader
        except UpperError as e:
            received = e
        status = await proc.wait_timeout(EXPORT_IDLE_S)
        err = (await stderr).decode(errors="replace").strip()
        if status.exit_code == EXIT_NO_DIR:  # nothing of it reached the scratch's disk: the snapshot stays as is
            log.info("%s: the writable layer's directory never reached its scratch: nothing to bring back", upper)
            return
        if not status.success:
            raise UpperError(f"exporting {guest_dir} in the UVM failed (exit {status.exit_code}): {err!r}")
        if isinstance(received, UpperError):
            raise received
        got = received
        if got.skipped:
            log.warning("%s: device nodes left out of the snapshot: %s", upper, ", ".join(got.skipped[:20]))
        log.info("%s: writable layer back (%d entries, %d bytes)", upper, got.entries, got.bytes)
    finally:
        if w >= 0:
            os.close(w)
        if not proc.exited:
            with contextlib.suppress(errors.UvmError):
                await proc.kill()
        proc.close()
        stderr.cancel()
        if not reader.done():  # the thread ends by itself: its pipe's writer is closed
            await asyncio.gather(reader, return_exceptions=True)


async def _tail(stream: InboundStream, cap: int) -> bytes:
    """The last cap bytes of a stream, read to its end (a guest cannot make the host hold more)."""
    kept = b""
    while chunk := await stream.read():
        kept = (kept + chunk)[-cap:]
    return kept


def _receive_fd(fd: int, upper: Path, max_bytes: int) -> Received:
    with os.fdopen(fd, "rb") as stream:
        return receive(stream, upper, max_bytes)


__all__ = ["BlockRootfs", "LayerError", "PodLayers", "Snapshot", "UpperError", "export_layer", "snapshot_of"]
