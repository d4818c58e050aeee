"""uvm/layers.py (erofs images of committed layers, cached) and blockroot.snapshot_of (which rootfs mounts go
on block devices)."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from shim.containerd.blockroot import Snapshot, snapshot_of
from shim.containerd.rootfs import HostMount
from uvm.layers import LayerCache, LayerError, layer_key

EROFS_MAGIC = (0xE0F5E1E2).to_bytes(4, "little")
needs_mkfs = pytest.mark.skipif(shutil.which("mkfs.erofs") is None, reason="erofs-utils is not installed")


def layer(tmp_path: Path, name: str = "l1") -> Path:
    d = tmp_path / "snapshots" / name / "fs"
    (d / "etc").mkdir(parents=True)
    (d / "etc" / "hello").write_text("hi\n")
    return d


def is_erofs(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(1024)
        return f.read(4) == EROFS_MAGIC


@needs_mkfs
def test_a_layer_is_built_once_then_reused(tmp_path: Path) -> None:
    cache = LayerCache(tmp_path / "cache", 1 << 30)
    src = layer(tmp_path)
    first = cache.image_for(src)
    ino = first.stat().st_ino
    assert is_erofs(first) and first.parent == tmp_path / "cache"
    assert cache.image_for(src) == first and first.stat().st_ino == ino
    assert (cache.counters.built, cache.counters.reused) == (1, 1)
    other = cache.image_for(layer(tmp_path, "l2"))
    assert other != first, "another snapshot is another entry, even with the same content"


@needs_mkfs
def test_first_uses_at_once_build_once(tmp_path: Path) -> None:
    src = layer(tmp_path)
    caches = [LayerCache(tmp_path / "cache", 1 << 30) for _ in range(4)]
    results: list[Path] = []
    threads = [threading.Thread(target=lambda c=c: results.append(c.image_for(src))) for c in caches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1
    assert sum(c.counters.built for c in caches) == 1 and sum(c.counters.reused for c in caches) == 3


def test_a_huge_sparse_file_is_refused_by_name(tmp_path: Path) -> None:
    src = layer(tmp_path)
    with (src / "holes").open("wb") as f:
        f.truncate(8 << 30)
    cache = LayerCache(tmp_path / "cache", 1 << 30)
    with pytest.raises(LayerError, match=rf"layer {src}: {src}/holes is a sparse file of {8 << 30} bytes"):
        cache.image_for(src)
    assert not list((tmp_path / "cache").glob("*.erofs"))


def test_a_missing_layer_is_named(tmp_path: Path) -> None:
    with pytest.raises(LayerError, match=f"layer {tmp_path}/nope: No such file"):
        LayerCache(tmp_path / "cache", 1 << 30).image_for(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(LayerError, match="not a directory"):
        layer_key(tmp_path / "file")


@needs_mkfs
@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs")
def test_a_full_cache_leaves_no_half_written_entry(tmp_path: Path) -> None:
    src = layer(tmp_path)
    (src / "blob").write_bytes(os.urandom(2 << 20))
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    os.system(f"mount -t tmpfs -o size=1m tmpfs {tiny}")
    try:
        with pytest.raises(LayerError, match=rf"layer {src}: "):
            LayerCache(tiny, 1 << 30).image_for(src)
        assert not [p for p in tiny.iterdir() if not p.name.endswith(".lock")]
    finally:
        os.system(f"umount {tiny}")


@needs_mkfs
def test_prune_removes_least_recently_used_beyond_the_budget(tmp_path: Path) -> None:
    cache = LayerCache(tmp_path / "cache", 1 << 30)
    images = [cache.image_for(layer(tmp_path, f"l{i}")) for i in range(3)]
    old = time.time() - 3600
    for i, image in enumerate(images):
        os.utime(image, (old + i, old + i))
    size = images[0].stat().st_blocks * 512
    cache.max_bytes = 2 * size
    assert cache.prune() == [images[0]]
    cache.max_bytes = 0
    assert cache.prune(keep=images[2]) == [images[1]], "keep (the entry just handed out) stays"
    os.utime(images[2])
    assert cache.prune() == [], "an entry used in the last minutes may be about to be attached"


OVERLAY = HostMount("overlay", "overlay", ("index=off", "workdir=/s/3/work", "upperdir=/s/3/fs", "lowerdir=/s/2/fs:/s/1/fs"))


@pytest.mark.parametrize(("mounts", "expected"), [
    ([OVERLAY], Snapshot((Path("/s/2/fs"), Path("/s/1/fs")), Path("/s/3/fs"))),
    ([HostMount("overlay", "overlay", ("lowerdir=/s/2/fs:/s/1/fs",))], Snapshot((Path("/s/2/fs"), Path("/s/1/fs")), None)),
    ([HostMount("bind", "/s/1/fs", ("ro", "rbind"))], None),  # one layer's view: stays on 9p
    ([], None),  # ctr run --rootfs DIR
    ([OVERLAY, OVERLAY], None),
    ([HostMount("overlay", "overlay", ("lowerdir=relative/fs", "upperdir=/u", "workdir=/w"))], None),
    ([HostMount("overlay", "overlay", ("lowerdir=/l", "upperdir=/u"))], None),  # no workdir: not containerd's
    ([HostMount("ext4", "/dev/vdb", ())], None),
])
def test_which_rootfs_mounts_go_on_block_devices(mounts: list[HostMount], expected: Snapshot | None) -> None:
    assert snapshot_of(mounts) == expected
