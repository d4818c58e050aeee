"""uvm/upper.py: a container's writable layer received from the (untrusted) guest as a tar stream, and
uvm/guest/export.py, the guest's side, run here on the host's Python."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from uvm.upper import UpperError, receive

EXPORT = Path(__file__).resolve().parents[2] / "uvm/guest/export.py"
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="whiteouts, owners and trusted xattrs need root")


def export(src: Path) -> bytes:
    res = subprocess.run([sys.executable, "-I", "-S", str(EXPORT), str(src)], capture_output=True, check=True)
    return res.stdout


def upper_with_old_file(tmp_path: Path) -> Path:
    upper = tmp_path / "snap" / "fs"
    upper.mkdir(parents=True)
    (upper / "old").write_text("old\n")
    return upper


def untouched(upper: Path) -> bool:
    left = sorted(p.name for p in upper.parent.iterdir())
    return sorted(os.listdir(upper)) == ["old"] and left == ["fs"]


def tar_of(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def entry(name: str, kind: bytes = tarfile.REGTYPE, **attrs: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    for k, v in attrs.items():
        setattr(info, k, v)
    return info


ROOT = (entry(".", tarfile.DIRTYPE), None)


@root_only
def test_round_trip_keeps_what_overlayfs_needs(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d" / "e").mkdir(parents=True)
    (src / "f").write_text("hello\n")
    os.chmod(src / "f", 0o4755)
    os.link(src / "f", src / "f2")
    os.symlink("/etc/passwd", src / "link")
    os.symlink("d", src / "dirlink")
    os.mknod(src / "gone", stat.S_IFCHR | 0o600, 0)
    os.mkfifo(src / "fifo")
    os.setxattr(src / "d", "trusted.overlay.opaque", b"y")
    os.setxattr(src / "f", "user.note", b"\x00\xffbinary")
    os.setxattr(src / "f", "trusted.overlay.origin", b"host-internal")
    os.chown(src / "d" / "e", 1234, 5678)
    os.utime(src / "d" / "e", (1_000_000, 1_000_000))
    upper = upper_with_old_file(tmp_path)

    got = receive(io.BytesIO(export(src)), upper, 1 << 20)

    assert sorted(os.listdir(upper)) == ["d", "dirlink", "f", "f2", "fifo", "gone", "link"]
    assert (upper / "f").read_text() == "hello\n" and stat.S_IMODE(os.stat(upper / "f").st_mode) == 0o4755
    assert os.stat(upper / "f").st_ino == os.stat(upper / "f2").st_ino
    assert os.readlink(upper / "link") == "/etc/passwd" and os.readlink(upper / "dirlink") == "d"
    gone = os.lstat(upper / "gone")
    assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == 0
    assert stat.S_ISFIFO(os.lstat(upper / "fifo").st_mode)
    assert os.getxattr(upper / "d", "trusted.overlay.opaque") == b"y"
    assert os.getxattr(upper / "f", "user.note") == b"\x00\xffbinary"
    assert "trusted.overlay.origin" not in os.listxattr(upper / "f")
    e = os.stat(upper / "d" / "e")
    assert (e.st_uid, e.st_gid, int(e.st_mtime)) == (1234, 5678, 1_000_000)
    assert got.entries == 9 and got.bytes == 6 and not got.skipped
    assert sorted(p.name for p in upper.parent.iterdir()) == ["fs"], "the old tree is removed"


@root_only
def test_device_nodes_are_left_out_and_named(tmp_path: Path) -> None:
    upper = upper_with_old_file(tmp_path)
    data = tar_of(ROOT, (entry("sda", tarfile.BLKTYPE, devmajor=8, devminor=0), None),
                  (entry("mem", tarfile.CHRTYPE, devmajor=1, devminor=1), None), (entry("ok"), b"x"))
    got = receive(io.BytesIO(data), upper, 1 << 20)
    assert sorted(got.skipped) == ["mem", "sda"] and os.listdir(upper) == ["ok"]


HOSTILE = {
    "absolute": tar_of(ROOT, (entry("/etc/evil"), b"x")),
    "dotdot": tar_of(ROOT, (entry("a/../../evil"), b"x")),
    "through a symlink": tar_of(ROOT, (entry("a", tarfile.SYMTYPE, linkname="/tmp"), None), (entry("a/evil"), b"x")),
    "parent never sent": tar_of(ROOT, (entry("nodir/evil"), b"x")),
    "twice": tar_of(ROOT, (entry("a"), b"x"), (entry("a"), b"y")),
    "hard link outside": tar_of(ROOT, (entry("h", tarfile.LNKTYPE, linkname="/etc/shadow"), None)),
    "hard link to a directory": tar_of(ROOT, (entry("d", tarfile.DIRTYPE), None),
                                       (entry("h", tarfile.LNKTYPE, linkname="d"), None)),
    "too many bytes": tar_of(ROOT, (entry("big"), b"x" * 5000)),
    "root not a directory": tar_of((entry("."), b"x")),
    "empty": b"",
    "truncated": tar_of(ROOT, (entry("f"), b"x" * 3000))[:2000],
    "garbage": b"\x00\x01not a tar" * 100,
}


@root_only
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_stream_changes_nothing(tmp_path: Path, case: str) -> None:
    upper = upper_with_old_file(tmp_path)
    with pytest.raises(UpperError):
        receive(io.BytesIO(HOSTILE[case]), upper, 4096)
    assert untouched(upper)
    assert not Path("/tmp/evil").exists() and not Path("/etc/evil").exists()


@root_only
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=4096), cut=st.integers(min_value=0, max_value=3000))
def test_fuzzed_streams_raise_only_upper_error(tmp_path: Path, data: bytes, cut: int) -> None:
    base = tmp_path / f"f{abs(hash((data, cut)))}"
    upper = upper_with_old_file(base)
    stream = tar_of(ROOT, (entry("a"), data))
    stream = stream[:cut] + data + stream[cut:]  # a valid stream with arbitrary bytes spliced in
    try:
        receive(io.BytesIO(stream), upper, 1 << 20)
    except UpperError:
        assert untouched(upper)
    assert sorted(p.name for p in upper.parent.iterdir()) == ["fs"]
