"""`make bench` rootfs section (issue: container rootfs I/O): the metadata-heavy workloads run in a container
on its root filesystem, against the same commands in the same container on an ext4 disk on virtio-scsi
(the floor) and on a 9p share as today's 9p rootfs mounts it, all in one UVM; runc's figure beside them is
the same busybox commands on a host overlayfs (what runc's container sees).

The container's rootfs is what the shim gives an image-based task (shim/containerd/blockroot.py): the layer
as an erofs disk from the layer cache, the writable layer on a scratch ext4, overlayfs in the guest. Timings
come from the guest's /proc/uptime (10 ms steps) around each command, so no exec round trip is counted;
caches are dropped in the UVM (and on the host for runc) before the find + stat and the reads.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from schemas import oci
from schemas.uvm_config import Share, UvmConfig
from shim.containerd.blockroot import BlockRootfs, PodLayers, Snapshot
from uvm.container import SharedSource
from uvm.demo import busybox_rootfs
from uvm.layers import LayerCache
from uvm.scratch import create_scratch
from uvm.vm import UtilityVM

FILES = 2000
DIRS = 40
TAR_IN_IMAGE = "/bench/files.tar"
# Each workload: a shell command run in the directory under test ($D); the first word is its name.
WORKLOADS = {
    "untar": 'mkdir -p "$D/t" && tar -xf ' + TAR_IN_IMAGE + ' -C "$D/t"',
    "find_stat": 'find "$D/t" -type f -exec stat -c %s {} + >/dev/null',
    "rm": 'rm -rf "$D/t"',
    "write64": 'dd if=/dev/zero of="$D/big" bs=1M count=64 conv=fsync 2>/dev/null',
    "read64": 'dd if="$D/big" of=/dev/null bs=1M 2>/dev/null; rm -f "$D/big"',
}
DROP_BEFORE = {"find_stat", "read64"}
TARGETS = {"rootfs": "/work", "ext4": "/ext4", "9p": "/ninep"}


def files_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(FILES):
            info = tarfile.TarInfo(f"d{i % DIRS:02d}/f{i:04d}")
            info.size, info.mtime, info.mode = 1024, 1_700_000_000, 0o644
            tar.addfile(info, io.BytesIO(bytes([i % 251]) * 1024))
    return buf.getvalue()


def layer_dir(tmp: Path) -> Path:
    """A committed layer as containerd's overlayfs snapshotter holds one: busybox and the tar of files."""
    fs = tmp / "snapshots" / "1" / "fs"
    fs.parent.mkdir(parents=True)
    shutil.copytree(busybox_rootfs(tmp / "bb"), fs, symlinks=True)
    (fs / "bench").mkdir()
    (fs / "bench" / "files.tar").write_bytes(files_tar())
    (fs / "work").mkdir()
    (fs / "ext4").mkdir()
    (fs / "ninep").mkdir()
    return fs


def timed_script(target: str, name: str) -> str:
    return (f'D={target}; a=$(cut -d" " -f1 /proc/uptime); {WORKLOADS[name]}; s=$?; '
            f'b=$(cut -d" " -f1 /proc/uptime); echo "$a $b $s"')


async def run_in(container: Any, script: str) -> tuple[float, int]:
    proc = await container.create_process(oci.Process(args=["/bin/sh", "-c", script]), stdout=True, stderr=True)
    out, err, _ = await proc.communicate()
    proc.close()
    a, b, status = out.decode().split()
    if int(status) != 0:
        raise RuntimeError(f"{script!r} failed: {err.decode()!r}")
    return float(b) - float(a), int(status)


def host_overlay_figures(layer: Path, tmp: Path, rounds: int) -> dict[str, float]:
    """runc's view: the same busybox commands on a host overlayfs of the same layer."""
    upper, work, mnt = tmp / "ru", tmp / "rw", tmp / "rm"
    for d in (upper, work, mnt):
        d.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={layer},upperdir={upper},workdir={work}",
                    str(mnt)], check=True)
    out: dict[str, list[float]] = {k: [] for k in WORKLOADS}
    try:
        for _ in range(rounds):
            for name, cmd in WORKLOADS.items():
                if name in DROP_BEFORE:
                    subprocess.run(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"], check=True)
                script = cmd.replace(TAR_IN_IMAGE, str(mnt) + TAR_IN_IMAGE)
                t0 = time.perf_counter()
                subprocess.run(["busybox", "sh", "-c", script], check=True, env={**os.environ, "D": str(mnt / "work")})
                out[name].append(time.perf_counter() - t0)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    return {k: min(v) for k, v in out.items()}


async def figures(run_dir: Path, state_dir: Path, rounds: int = 2) -> dict[str, Any]:
    """Best of `rounds` for each workload on each target, and the ratios the issue asks for."""
    tmp = Path(tempfile.mkdtemp(prefix="uvmrootfs-", dir="/var/tmp"))  # on disk, as containerd's snapshots are
    vm: UtilityVM | None = None
    block: BlockRootfs | None = None
    try:
        layer = layer_dir(tmp)
        upper = tmp / "snapshots" / "2" / "fs"
        upper.mkdir(parents=True)
        share = tmp / "share"
        share.mkdir()
        ext4 = create_scratch(tmp / "ext4.img", size_gb=4).path
        cache = LayerCache(tmp / "layers", 1 << 30)
        t0 = time.perf_counter()
        cache.image_for(layer)
        convert_s = time.perf_counter() - t0
        vm = UtilityVM(UvmConfig(run_dir=run_dir, state_dir=state_dir, boot_timeout=120, memory_mib=512,
                                 shares=[Share(tag="bench", host_path=share)]))
        await vm.start()
        disk = await vm.add_scsi_disk(ext4, "/run/bench-ext4")

        @contextlib.asynccontextmanager
        async def helper() -> AsyncIterator[UtilityVM]:
            raise RuntimeError("no helper UVM in the bench")
            yield vm

        block = BlockRootfs("bench", Snapshot((layer,), upper), cache, PodLayers(), 4, tmp, helper)
        rootfs = await block.prepare(vm)
        spec = oci.default_spec(["/bin/sleep", "100000"])
        spec.mounts += [oci.Mount(destination="/ext4", type="bind", source=disk.guest_path or "", options=["rbind"]),
                        oci.Mount(destination="/ninep", type="bind", source="share", options=["rbind"])]
        container = await vm.create_container("bench", spec, rootfs, stdout=False, stderr=False,
                                              mount_sources={len(spec.mounts) - 1: SharedSource("bench", "")})
        await container.start()
        out: dict[str, dict[str, list[float]]] = {t: {k: [] for k in WORKLOADS} for t in TARGETS}
        for _ in range(rounds):
            for target, path in TARGETS.items():
                for name in WORKLOADS:
                    if name in DROP_BEFORE:
                        await vm.run(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"])
                    took, _ = await run_in(container, timed_script(path, name))
                    out[target][name].append(took)
        best = {t: {k: min(v) for k, v in w.items()} for t, w in out.items()}
        await container.kill(9, True)
        await container.wait()
        await container.close()
        best["runc"] = host_overlay_figures(layer, tmp, rounds)
        ratios = {f"{t}/ext4": {k: best[t][k] / max(best["ext4"][k], 0.01) for k in WORKLOADS}
                  for t in ("rootfs", "9p", "runc")}
        return {"best_s": best, "ratios": ratios, "layer_convert_s": convert_s, "rounds": rounds}
    finally:
        if vm is not None:
            if block is not None:
                block.saved = True
                await block.release(vm)
            await vm.close()
        shutil.rmtree(tmp, ignore_errors=True)


def print_figures(f: dict[str, Any]) -> None:
    best, ratios = f["best_s"], f["ratios"]
    print(f"rootfs I/O in one UVM (best of {f['rounds']}; the layer's erofs image built in "
          f"{f['layer_convert_s']:.2f}s, once per layer):")
    print(f"  {'workload':<10} {'rootfs':>8} {'ext4':>8} {'9p':>8} {'runc':>8}   rootfs/ext4 (target <= 1.5x)  9p/ext4")
    for k in WORKLOADS:
        print(f"  {k:<10} {best['rootfs'][k]:>7.2f}s {best['ext4'][k]:>7.2f}s {best['9p'][k]:>7.2f}s "
              f"{best['runc'][k]:>7.2f}s   {ratios['rootfs/ext4'][k]:>5.2f}x{'':<22} {ratios['9p/ext4'][k]:>5.2f}x")
    print(f"  (the streaming rows: rootfs against today's 9p, {best['rootfs']['write64'] / max(best['9p']['write64'], 0.01):.2f}x"
          f" write, {best['rootfs']['read64'] / max(best['9p']['read64'], 0.01):.2f}x read)")
