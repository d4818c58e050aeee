"""create-scratch on the host: sizes, the cache, and bad input leaving nothing behind."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from uvm import errors
from uvm.scratch import DEFAULT_SIZE_GB, GB, create_scratch, ext4_size, fsck


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_default_scratch_is_sparse_and_clean(tmp_path: Path) -> None:
    s = create_scratch(tmp_path / "s.img")
    assert s.size_bytes == DEFAULT_SIZE_GB * GB and not s.from_cache
    assert (tmp_path / "s.img").stat().st_size == 20 * GB
    assert s.allocated_bytes <= 1 << 20, f"{s.allocated_bytes} bytes on disk"
    assert ext4_size(s.path) == 20 * GB
    ok, out = fsck(s.path)
    assert ok, out
    assert leftovers(tmp_path) == ["s.img"]


def test_cache_is_filled_then_cloned(tmp_path: Path) -> None:
    cache = tmp_path / "cache.img"
    a = create_scratch(tmp_path / "a.img", cache_path=cache)
    assert not a.from_cache and cache.exists()
    b = create_scratch(tmp_path / "b.img", cache_path=cache)
    assert b.from_cache and b.allocated_bytes <= 1 << 20
    assert fsck(b.path)[0]
    assert leftovers(tmp_path) == ["a.img", "b.img", "cache.img"]


def test_non_default_size_ignores_the_cache(tmp_path: Path) -> None:
    s = create_scratch(tmp_path / "s.img", size_gb=2, cache_path=tmp_path / "cache.img")
    assert ext4_size(s.path) == 2 * GB and not (tmp_path / "cache.img").exists()


@pytest.mark.parametrize("size", [0, -1, 1.5, True])
def test_bad_sizes(tmp_path: Path, size: object) -> None:
    with pytest.raises(errors.ConfigError, match="size"):
        create_scratch(tmp_path / "s.img", size_gb=size)  # type: ignore[arg-type]
    assert leftovers(tmp_path) == []


def test_size_over_the_free_space(tmp_path: Path) -> None:
    st = os.statvfs(tmp_path)
    too_big = st.f_bavail * st.f_frsize // GB + 10
    with pytest.raises(errors.UvmError, match="free"):
        create_scratch(tmp_path / "s.img", size_gb=too_big)
    assert leftovers(tmp_path) == []


def test_thin_provisioning_may_exceed_the_free_space(tmp_path: Path) -> None:
    """A container's scratch (check_space=False): sparse, so its size is a ceiling, not a reservation."""
    st = os.statvfs(tmp_path)
    size_gb = st.f_bavail * st.f_frsize // GB + 2
    s = create_scratch(tmp_path / "thin.img", size_gb=size_gb, check_space=False)
    assert s.size_bytes == size_gb * GB and s.allocated_bytes < 64 << 20
    assert fsck(s.path)[0]


def test_a_seed_directory_is_copied_in(tmp_path: Path) -> None:
    seed = tmp_path / "seed"
    (seed / "c1" / "upper").mkdir(parents=True)
    (seed / "c1" / "upper" / "f").write_text("kept\n")
    s = create_scratch(tmp_path / "seeded.img", size_gb=1, seed=seed)
    assert fsck(s.path)[0]
    out = subprocess.run(["debugfs", "-R", "cat /c1/upper/f", str(s.path)], capture_output=True, check=True)
    assert out.stdout == b"kept\n"


def test_existing_dest_and_missing_directory(tmp_path: Path) -> None:
    (tmp_path / "s.img").write_text("mine")
    with pytest.raises(errors.UvmError, match="already exists"):
        create_scratch(tmp_path / "s.img")
    assert (tmp_path / "s.img").read_text() == "mine"
    with pytest.raises(errors.UvmError, match="does not exist"):
        create_scratch(tmp_path / "nodir" / "s.img")
    assert leftovers(tmp_path) == ["s.img"]


def test_corrupt_cache_is_refused(tmp_path: Path) -> None:
    cache = tmp_path / "cache.img"
    cache.write_bytes(b"\0" * 8192)
    with pytest.raises(errors.UvmError, match="corrupt"):
        create_scratch(tmp_path / "s.img", cache_path=cache)
    assert leftovers(tmp_path) == ["cache.img"]
