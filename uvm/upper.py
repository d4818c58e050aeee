"""A container's writable layer coming back from its UVM: the tar stream of uvm/guest/export.py applied as
the host's overlay upper directory (containerd's active snapshot), so the snapshot holds what the container
wrote, as it would under runc: new and changed files, whiteouts for deleted lower files, opaque directories.

The guest is untrusted, so every entry is checked before anything is made: a relative name without ``..``
whose parent is a directory this stream made (no entry can reach through a symlink), no name twice, hard
links only to regular files already received, character devices only as whiteouts (0/0; other device nodes
are left out and named in the result), only meaningful xattrs, and a bound on entries and bytes. The tree is
built in a new directory beside the upper one and then exchanged with it in one rename (``RENAME_EXCHANGE``):
the snapshot is either what it was or the new tree, never a mix; the old tree is removed afterwards.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import stat
import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO

from uvm.errors import UvmError

MAX_ENTRIES = 2_000_000
XATTR_PREFIXES = ("trusted.overlay.opaque", "user.", "security.capability")
XATTR_MAX = 64 * 1024
RENAME_EXCHANGE = 2
AT_FDCWD = -100
COPY_CHUNK = 1 << 20


class UpperError(UvmError):
    """The writable layer could not be brought back (a malformed or hostile stream, no space, I/O)."""


@dataclass
class Received:
    entries: int = 0
    bytes: int = 0
    skipped: list[str] = field(default_factory=list)  # device nodes left out


def _exchange(a: Path, b: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(a))


def _member_path(name: str) -> PurePosixPath | None:
    """The entry's path relative to the tree (None: the tree's root), or UpperError."""
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or "\0" in name:
        raise UpperError(f"entry {name!r}: not a relative path inside the layer")
    return None if p.parts in ((), (".",)) else PurePosixPath(*[x for x in p.parts if x != "."])


class _Builder:
    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.dirs: set[PurePosixPath] = set()
        self.seen: set[PurePosixPath] = set()
        self.regular: set[PurePosixPath] = set()
        self.dir_times: list[tuple[Path, float]] = []
        self.got = Received()

    def add(self, tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        self.got.entries += 1
        if self.got.entries > MAX_ENTRIES:
            raise UpperError(f"more than {MAX_ENTRIES} entries")
        rel = _member_path(m.name)
        if rel is None:
            if not m.isdir():
                raise UpperError(f"entry {m.name!r}: the layer's root must be a directory")
            self._attrs(self.root, m)
            self.dir_times.append((self.root, m.mtime))
            return
        if rel in self.seen:
            raise UpperError(f"entry {m.name!r} comes twice")
        parent = rel.parent
        if parent != PurePosixPath(".") and parent not in self.dirs:
            raise UpperError(f"entry {m.name!r}: its parent is not a directory of the layer")
        path = self.root / rel
        if m.isdir():
            os.mkdir(path, 0o700)
            self.dirs.add(rel)
            self.dir_times.append((path, m.mtime))
        elif m.isreg():
            self._file(tar, m, path)
            self.regular.add(rel)
        elif m.issym():
            os.symlink(m.linkname, path)
        elif m.islnk():
            target = _member_path(m.linkname)
            if target is None or target not in self.regular:
                raise UpperError(f"entry {m.name!r}: hard link to {m.linkname!r}, not a file received before")
            os.link(self.root / target, path, follow_symlinks=False)
            self.seen.add(rel)
            return  # the inode's owner, mode and xattrs came with its first name
        elif m.isfifo():
            os.mkfifo(path, 0o600)
        elif m.ischr() and m.devmajor == 0 and m.devminor == 0:
            os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(0, 0))  # an overlay whiteout
        elif m.ischr() or m.isblk():
            self.got.skipped.append(str(rel))  # a device node the container made: never made on the host
            return
        else:
            raise UpperError(f"entry {m.name!r}: unsupported type {m.type!r}")
        self.seen.add(rel)
        self._attrs(path, m)
        if not m.isdir():
            os.utime(path, (m.mtime, m.mtime), follow_symlinks=False)

    def _file(self, tar: tarfile.TarFile, m: tarfile.TarInfo, path: Path) -> None:
        self.got.bytes += m.size
        if self.got.bytes > self.max_bytes:
            raise UpperError(f"more than {self.max_bytes} bytes of files")
        src = tar.extractfile(m)
        assert src is not None
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as dst:
            left = m.size
            while left > 0:
                chunk = src.read(min(COPY_CHUNK, left))
                if not chunk:
                    raise UpperError(f"entry {m.name!r}: the stream ended inside the file")
                dst.write(chunk)
                left -= len(chunk)
            dst.flush()
            os.fsync(dst.fileno())

    def _attrs(self, path: Path, m: tarfile.TarInfo) -> None:
        os.chown(path, m.uid, m.gid, follow_symlinks=False)  # before the mode: chown clears set-id bits
        if not m.issym():
            os.chmod(path, m.mode & 0o7777)
        for key, value in m.pax_headers.items():
            if not key.startswith("SCHILY.xattr."):
                continue
            name = key[len("SCHILY.xattr."):]
            raw = value.encode("latin-1", errors="strict") if isinstance(value, str) else bytes(value)
            if not name.startswith(XATTR_PREFIXES) or len(raw) > XATTR_MAX:
                continue
            if name.startswith("trusted.overlay.opaque") and not m.isdir():
                continue
            os.setxattr(path, name, raw, follow_symlinks=False)

    def finish(self) -> None:
        for path, mtime in reversed(self.dir_times):  # children first: making them touched their parent
            os.utime(path, (mtime, mtime), follow_symlinks=False)


def receive(stream: IO[bytes], upper: Path, max_bytes: int) -> Received:
    """Make upper exactly the tree in the tar stream (read to its end). Blocking: run it in a thread.
    Raises UpperError naming what was wrong; upper is then untouched and nothing else is left."""
    if not upper.is_dir():
        raise UpperError(f"upper directory {upper} does not exist")
    tmp = upper.with_name(f".{upper.name}.uvmshim-new")
    shutil.rmtree(tmp, ignore_errors=True)  # a previous attempt's, interrupted by a crash
    os.mkdir(tmp, 0o700)
    try:
        builder = _Builder(tmp, max_bytes)
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for m in tar:
                    builder.add(tar, m)
        except (tarfile.TarError, UnicodeError, ValueError) as e:
            raise UpperError(f"the layer's stream is not a valid tar: {e}") from None
        except OSError as e:
            raise UpperError(f"writing the layer beside {upper}: {e.strerror or e}") from None
        if builder.got.entries == 0:
            raise UpperError("the layer's stream is empty")
        builder.finish()
        try:
            fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
            os.fsync(fd)
            os.close(fd)
            _exchange(tmp, upper)
        except OSError as e:
            raise UpperError(f"putting the layer in place at {upper}: {e.strerror or e}") from None
        return builder.got
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)  # the new tree when it failed, the old one when it was exchanged
