"""Read-only image layers as erofs disk images, built once per layer and cached.

A committed snapshot (a directory of the host, e.g. containerd's overlayfs snapshotter's
``snapshots/<n>/fs``) never changes, so its erofs image is built the first time a container uses
it and reused by every later one: the entry's name is a digest of the directory's identity (its
path, device, inode and change time), so a new snapshot that reuses a path is a new entry. An entry
is built under a temporary name and renamed into place (never half-written), under an exclusive lock
of its key (two first uses at once build it once: the second waits and finds it). Each use touches
the entry's mtime; the cache is bounded in bytes and pruned least recently used first, after each
build. Whiteouts (character devices 0/0), opaque directories' xattrs, owners, modes and mtimes are
kept, so overlayfs in the guest reads the layers as the host's overlayfs would.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from uvm.errors import UvmError

log = logging.getLogger(__name__)

MKFS_TIMEOUT_S = 1800
# A file whose size is this much larger than what it occupies is refused: erofs-utils writes holes as data.
SPARSE_SLACK = 256 << 20
USED_RECENTLY_S = 120  # an entry handed out this recently is never pruned (it is about to be attached)
SUFFIX = ".erofs"


class LayerError(UvmError):
    """A layer could not be converted (unreadable, a huge sparse file, mkfs.erofs failed, no space)."""


@dataclass
class CacheCounters:
    built: int = 0
    reused: int = 0
    pruned: int = 0


def layer_key(layer: Path) -> str:
    """The cache entry's name for a committed layer directory: its identity, not its content (reading
    the content would cost what building costs)."""
    try:
        st = os.stat(layer)
    except OSError as e:
        raise LayerError(f"layer {layer}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise LayerError(f"layer {layer}: not a directory")
    ident = f"{os.path.realpath(layer)}\0{st.st_dev}\0{st.st_ino}\0{st.st_ctime_ns}"
    return hashlib.sha256(ident.encode()).hexdigest()[:40]


def check_layer(layer: Path, free_bytes: int) -> int:
    """Walk the layer before converting it: the bytes erofs will hold. Raises LayerError naming the file
    for a huge sparse file (erofs-utils would write its holes out) or a layer larger than the space left."""
    total = 0
    for top, _dirs, files in os.walk(layer, onerror=_walk_error(layer)):
        for name in files:
            path = os.path.join(top, name)
            try:
                st = os.lstat(path)
            except OSError as e:
                raise LayerError(f"layer {layer}: cannot read {path}: {e.strerror}") from None
            if not stat.S_ISREG(st.st_mode):
                continue
            if st.st_size > st.st_blocks * 512 + SPARSE_SLACK:
                raise LayerError(f"layer {layer}: {path} is a sparse file of {st.st_size} bytes with "
                                 f"{st.st_blocks * 512} allocated: its holes would be written out in full")
            total += st.st_size
    if total > free_bytes:
        raise LayerError(f"layer {layer}: {total} bytes do not fit in the {free_bytes} bytes free for the layer cache")
    return total


def _walk_error(layer: Path) -> Callable[[OSError], None]:
    def fail(e: OSError) -> None:
        raise LayerError(f"layer {layer}: cannot read {e.filename}: {e.strerror}")
    return fail


class LayerCache:
    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.counters = CacheCounters()

    def entry(self, layer: Path) -> Path:
        return self.root / f"{layer_key(layer)}{SUFFIX}"

    def image_for(self, layer: Path) -> Path:
        """The layer's erofs image, built when missing. Blocking (mkfs.erofs): run it in a thread.
        Raises LayerError naming the layer; nothing half-built is ever left as an entry."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = layer_key(layer)
        image = self.root / f"{key}{SUFFIX}"
        lock = os.open(self.root / f"{key}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if image.exists():
                os.utime(image)
                self.counters.reused += 1
                return image
            self._build(layer, image)
            self.counters.built += 1
        finally:
            os.close(lock)
        with contextlib.suppress(OSError):
            self.prune(keep=image)
        return image

    def _build(self, layer: Path, image: Path) -> None:
        vfs = os.statvfs(self.root)
        size = check_layer(layer, vfs.f_bavail * vfs.f_frsize)
        tmp = image.with_name(f".{image.name}.{os.getpid()}.tmp")
        started = time.monotonic()
        try:
            try:
                res = subprocess.run(["mkfs.erofs", "--quiet", "--preserve-mtime", str(tmp), str(layer)],
                                     capture_output=True, text=True, timeout=MKFS_TIMEOUT_S, check=False)
            except subprocess.TimeoutExpired:
                raise LayerError(f"layer {layer}: mkfs.erofs took more than {MKFS_TIMEOUT_S}s") from None
            except OSError as e:
                raise LayerError(f"layer {layer}: cannot run mkfs.erofs: {e.strerror}") from None
            if res.returncode != 0:
                detail = (res.stderr or res.stdout).strip()[-2000:] or f"exit {res.returncode}"
                raise LayerError(f"layer {layer}: mkfs.erofs failed: {detail}")
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.rename(tmp, image)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        log.info("layer %s: erofs image %s built (%d bytes of files) in %.2fs", layer, image.name, size,
                 time.monotonic() - started)

    def prune(self, keep: Path | None = None) -> list[Path]:
        """Remove the least recently used entries while the cache holds more than max_bytes (never keep,
        nor one handed out in the last USED_RECENTLY_S: it may be about to be attached). Running UVMs keep
        the images they have open."""
        entries = []
        for path in self.root.glob(f"*{SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):
                st = path.stat()
                entries.append((st.st_mtime, st.st_blocks * 512, path))
        total = sum(size for _, size, _ in entries)
        removed = []
        now = time.time()
        for mtime, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            if path == keep or now - mtime < USED_RECENTLY_S:
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                (self.root / f"{path.name[:-len(SUFFIX)]}.lock").unlink(missing_ok=True)
                log.info("layer cache: removed %s, least recently used beyond %d bytes", path.name, self.max_bytes)
                removed.append(path)
                self.counters.pruned += 1
            total -= size
        return removed
