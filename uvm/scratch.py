"""`create-scratch`: sparse ext4 scratch disks made on the host (seed go-runhcs CreateScratch).

The image is a sparse file formatted so the guest has nothing left to initialise: inode tables
and journal count as zeroed (``assume_storage_prezeroed``, e2fsprogs >= 1.47, on a fresh sparse
file that is true), and no blocks are reserved for online resize (their descriptors are the only
large non-zero area). A 20 GB scratch allocates ~0.3 MB. With a cache path and the default size,
the first call fills the cache and later calls clone it (reflink where the filesystem can, else a
sparse copy). Every failure leaves nothing behind: the image is built under a temporary name and
renamed into place last.
"""

from __future__ import annotations

import os
import struct
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from uvm.errors import ConfigError, UvmError

DEFAULT_SIZE_GB = 20
GB = 1 << 30
EXT4_MAGIC = 0xEF53
MKFS_OPTIONS = ["-q", "-F", "-t", "ext4", "-O", "^resize_inode", "-E", "lazy_itable_init=0,assume_storage_prezeroed=1",
                "-L", "scratch"]


class ScratchError(UvmError):
    """create-scratch failed (bad size, destination, cache or mkfs)."""


@dataclass(frozen=True)
class Scratch:
    path: Path
    size_bytes: int
    allocated_bytes: int  # what it occupies on the host's disk
    from_cache: bool


def _allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def ext4_size(path: Path) -> int | None:
    """The ext4 filesystem size recorded in path's superblock, or None if it is not ext4."""
    try:
        with path.open("rb") as f:
            f.seek(1024)
            sb = f.read(1024)
    except OSError:
        return None
    if len(sb) < 1024 or struct.unpack_from("<H", sb, 56)[0] != EXT4_MAGIC:
        return None
    blocks_lo, = struct.unpack_from("<I", sb, 4)
    log_block_size, = struct.unpack_from("<I", sb, 24)
    blocks_hi, = struct.unpack_from("<I", sb, 0x150)
    feature_incompat, = struct.unpack_from("<I", sb, 0x60)
    blocks: int = blocks_lo | ((blocks_hi << 32) if feature_incompat & 0x80 else 0)  # INCOMPAT_64BIT
    return blocks * (1024 << int(log_block_size))


def _check_dest(dest: Path) -> Path:
    dest = dest.absolute()
    if dest.exists() or dest.is_symlink():
        raise ScratchError(f"create-scratch: {dest} already exists", path=str(dest))
    if not dest.parent.is_dir():
        raise ScratchError(f"create-scratch: directory {dest.parent} does not exist", path=str(dest))
    return dest


def _check_size(size_gb: int, where: Path, check_space: bool = True) -> int:
    if isinstance(size_gb, bool) or not isinstance(size_gb, int) or size_gb <= 0:
        raise ConfigError(f"create-scratch: size {size_gb!r} GB must be a positive whole number")
    size = size_gb * GB
    if not check_space:
        return size
    st = os.statvfs(where)
    free = st.f_bavail * st.f_frsize
    if size > free:
        raise ScratchError(f"create-scratch: {size_gb} GB is more than the {free / GB:.1f} GB free on {where}")
    return size


def _format(tmp: Path, size: int, seed: Path | None = None) -> None:
    with tmp.open("wb") as f:
        f.truncate(size)
    populate = ["-d", str(seed)] if seed is not None else []  # the directory's tree copied in, xattrs included
    res = subprocess.run(["mkfs.ext4", *MKFS_OPTIONS, *populate, str(tmp)], capture_output=True, text=True,
                         check=False)
    if res.returncode != 0:
        raise ScratchError(f"create-scratch: mkfs.ext4 failed: {res.stderr.strip() or res.returncode}")


def _clone(src: Path, tmp: Path) -> None:
    res = subprocess.run(["cp", "--reflink=auto", "--sparse=always", str(src), str(tmp)],
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise ScratchError(f"create-scratch: cloning {src} failed: {res.stderr.strip()}")


def _build(dest: Path, make: Callable[[Path], None]) -> None:
    """Run make(tmp) on a temporary file next to dest and rename it into place; clean up on failure."""
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        make(tmp)
        os.link(tmp, dest)  # atomic, and refuses to replace a dest created meanwhile
    except FileExistsError:
        raise ScratchError(f"create-scratch: {dest} already exists", path=str(dest)) from None
    finally:
        tmp.unlink(missing_ok=True)


def create_scratch(dest: Path | str, size_gb: int = DEFAULT_SIZE_GB, cache_path: Path | str | None = None,
                   seed: Path | None = None, check_space: bool = True) -> Scratch:
    """Create a sparse ext4 scratch image at dest (holding a copy of the seed directory's tree, if given:
    never from the cache then). check_space=False provisions thinly: the size may exceed the free space
    (a container's scratch, whose disk reports ENOSPC to the guest when the host's fills up).

    Raises ConfigError (bad size) or ScratchError (dest exists, its directory is missing, not enough
    free space, a corrupt cache file, mkfs failure); nothing is left behind on failure.
    """
    dest = _check_dest(Path(dest))
    size = _check_size(size_gb, dest.parent, check_space)
    cache = Path(cache_path).absolute() if cache_path is not None else None
    if cache is None or size_gb != DEFAULT_SIZE_GB or seed is not None:
        _build(dest, lambda tmp: _format(tmp, size, seed))
        return Scratch(dest, size, _allocated(dest), from_cache=False)
    from_cache = cache.exists()
    if from_cache:
        if ext4_size(cache) != size:
            raise ScratchError(f"create-scratch: cache {cache} is not a {size_gb} GB ext4 image (corrupt?): "
                               f"remove it to rebuild", path=str(cache))
    else:
        if not cache.parent.is_dir():
            raise ScratchError(f"create-scratch: cache directory {cache.parent} does not exist", path=str(cache))
        try:
            _build(cache, lambda tmp: _format(tmp, size))
        except ScratchError as e:
            if not cache.exists():  # another caller filling the cache at the same time is fine
                raise ScratchError(f"create-scratch: filling the cache failed: {e}") from None
    _build(dest, lambda tmp: _clone(cache, tmp))
    return Scratch(dest, size, _allocated(dest), from_cache=from_cache)


def fsck(path: Path) -> tuple[bool, str]:
    """e2fsck -fn: (clean, output)."""
    res = subprocess.run(["e2fsck", "-fn", str(path)], capture_output=True, text=True, check=False)
    return res.returncode == 0, res.stdout + res.stderr

