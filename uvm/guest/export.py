"""A directory of the UVM as a POSIX tar stream on stdout: how a container's writable layer (the overlay's
upper directory on its scratch disk) goes back to the host's snapshot when the task ends.

Run in the UVM itself (not in a container) as ``python3 … export.py DIR``. The stream holds what overlayfs
needs to read the layer again on the host: regular files, directories, symlinks, hard links, fifos, the
whiteouts of deleted lower files (character devices 0/0), and the extended attributes that carry meaning
(``trusted.overlay.opaque`` of a directory that replaced a lower one, file capabilities, ``user.*``) as
PAX ``SCHILY.xattr.*`` records. Sockets are skipped (a socket file is meaningless once its process is
gone); other device nodes are sent as they are and the host decides. The host validates every entry:
this side is as untrusted as any guest. Stdlib only.
"""

from __future__ import annotations

import os
import stat
import sys
import tarfile

XATTR_PREFIXES = ("trusted.overlay.opaque", "user.", "security.capability")


def xattrs(path: str) -> dict[str, str]:
    found: dict[str, str] = {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return found
    for name in names:
        if not name.startswith(XATTR_PREFIXES):
            continue
        try:
            value = os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            continue
        # PAX records are text: values travel as latin-1 so every byte survives the round trip.
        found[f"SCHILY.xattr.{name}"] = value.decode("latin-1")
    return found


def add(out: tarfile.TarFile, path: str, arcname: str) -> bool:
    st = os.lstat(path)
    if stat.S_ISSOCK(st.st_mode):
        return False
    info = out.gettarinfo(path, arcname=arcname)  # a second name of an inode becomes a hard link
    info.uname = info.gname = ""
    extra = xattrs(path)
    if extra:
        info.pax_headers = extra
    if info.isreg():
        with open(path, "rb") as f:
            out.addfile(info, f)
    else:
        out.addfile(info)
    return True


def export(root: str, out: tarfile.TarFile) -> int:
    """Every entry below root (root itself as "."), parents before children. Returns how many were written."""
    count = 0
    for top, dirs, files in os.walk(root):
        links = [d for d in dirs if os.path.islink(os.path.join(top, d))]  # symlinks to directories: entries
        dirs[:] = sorted(d for d in dirs if d not in links)
        rel_top = os.path.relpath(top, root)
        count += add(out, top, rel_top)
        for name in sorted(files + links):
            count += add(out, os.path.join(top, name), os.path.normpath(os.path.join(rel_top, name)))
    return count


EXIT_NO_DIR = 3  # the directory does not exist (a scratch whose upper directory never reached its disk)


def main() -> None:
    if len(sys.argv) != 2:
        print("usage: export.py DIR", file=sys.stderr)
        sys.exit(2)
    if not os.path.isdir(sys.argv[1]):
        print(f"{sys.argv[1]}: no such directory", file=sys.stderr)
        sys.exit(EXIT_NO_DIR)
    with tarfile.open(fileobj=sys.stdout.buffer, mode="w|", format=tarfile.PAX_FORMAT) as out:
        n = export(sys.argv[1], out)
    sys.stdout.buffer.flush()
    print(f"exported {n} entries", file=sys.stderr)


if __name__ == "__main__":
    main()
