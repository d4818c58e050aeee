"""An image-based container's root filesystem on block devices (shim/containerd/blockroot.py), through a
real containerd: erofs layers (cached per layer), a scratch ext4, overlayfs in the guest, and what the
container wrote back in containerd's snapshot when the task ends (whiteouts and opaque directories too),
also after QEMU was killed, through a helper UVM."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim.containerd_env import PrivateContainerd, build_busybox_image_tar
from tests.integration.ctr import RUNTIME, assert_clean, qemu_processes, run, wait_status
from tests.integration.ctr import nothing_outlives_its_test as _nothing_outlives_its_test

pytestmark = pytest.mark.vm

IMAGE = "docker.io/library/uvmlayers:1"
EROFS_MAGIC = (0xE0F5E1E2).to_bytes(4, "little")
LAYER = {"data/lower.txt": b"lower\n", "data/keep/a": b"a\n"}


@pytest.fixture(scope="module")
def env(containerd_env: tuple[PrivateContainerd, Path], tmp_path_factory: pytest.TempPathFactory
        ) -> tuple[PrivateContainerd, Path]:
    ctd, _ = containerd_env
    ctd.import_image(build_busybox_image_tar(tmp_path_factory.mktemp("img") / "layers.tar", IMAGE, [LAYER]))
    return containerd_env


@pytest.fixture(autouse=True)
def nothing_outlives_its_test(env: tuple[PrivateContainerd, Path]) -> Iterator[None]:
    yield from _nothing_outlives_its_test(env)


def cache_dir(ctd: PrivateContainerd) -> Path:
    """tests/conftest.py's private_config puts the layer cache beside the shim's config."""
    config = Path(os.environ["UVMSHIM_CONFIG"])
    return config.parent / "layers"


def cache_entries(ctd: PrivateContainerd) -> dict[str, int]:
    """The layer cache's erofs images: name -> inode (a rebuilt entry is a new file)."""
    d = cache_dir(ctd)
    return {p.name: p.stat().st_ino for p in d.glob("*.erofs")} if d.exists() else {}


def snapshot_dirs(ctd: PrivateContainerd, key: str) -> tuple[Path, list[Path]]:
    """The container's active snapshot: (upper directory, lower directories top-most first)."""
    out = ctd.ctr("snapshots", "mounts", "/mnt", key).stdout.decode()
    upper = re.search(r"upperdir=([^,\s]+)", out)
    lower = re.search(r"lowerdir=([^,\s]+)", out)
    assert upper and lower, out
    return Path(upper.group(1)), [Path(p) for p in lower.group(1).split(":")]


def remove(ctd: PrivateContainerd, cid: str) -> None:
    """The task (killed) and the container gone, and nothing of them left (its shim waited for)."""
    run(ctd, "task", "rm", "-f", cid)
    run(ctd, "container", "rm", cid)
    assert_clean(ctd, cid)


def shim_log_count(ctd: PrivateContainerd, text: str) -> int:
    return ctd.log_path.read_text(errors="replace").count(text)


def test_writes_whiteouts_and_opaque_directories_reach_the_snapshot(env: tuple[PrivateContainerd, Path]) -> None:
    ctd, _ = env
    script = ("cat /data/new.txt 2>/dev/null || echo first; echo new > /data/new.txt; rm /data/lower.txt; "
              "rm -r /data/keep; mkdir /data/keep; echo b > /data/keep/b; ls /data/keep")
    res = run(ctd, "run", *RUNTIME, IMAGE, "blk1", "sh", "-c", script)
    try:
        assert (res.returncode, res.stdout) == (0, b"first\nb\n"), res.stderr
        upper, lowers = snapshot_dirs(ctd, "blk1")
        assert len(lowers) == 2
        assert (upper / "data/new.txt").read_bytes() == b"new\n"
        whiteout = os.lstat(upper / "data/lower.txt")
        assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == 0, "a deleted lower file is a whiteout"
        assert os.getxattr(upper / "data/keep", "trusted.overlay.opaque") == b"y"
        assert sorted(os.listdir(upper / "data/keep")) == ["b"]
        assert not (upper.parent / "uvmshim-scratch.ext4").exists(), "the scratch outlived its task"
        # containerd mounts the snapshot as runc would: the container's view, on the host.
        mnt = upper.parent.parent.parent / "view-blk1"
        mnt.mkdir()
        try:
            subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                            f"lowerdir={upper}:{':'.join(map(str, lowers))}", str(mnt)], check=True)
            try:
                assert sorted(os.listdir(mnt / "data")) == ["keep", "new.txt"]
                assert sorted(os.listdir(mnt / "data/keep")) == ["b"]
            finally:
                subprocess.run(["umount", str(mnt)], check=True)
        finally:
            mnt.rmdir()
        # A second task of the same container starts from what the first one wrote.
        res = run(ctd, "task", "start", "blk1")
        assert res.stdout.startswith(b"new\n"), (res.stdout, res.stderr)
    finally:
        remove(ctd, "blk1")


def test_a_second_container_reuses_the_cached_layers(env: tuple[PrivateContainerd, Path]) -> None:
    ctd, _ = env
    assert run(ctd, "run", "--rm", *RUNTIME, IMAGE, "blk2", "cat", "/data/lower.txt").stdout == b"lower\n"
    before = cache_entries(ctd)
    built = shim_log_count(ctd, "erofs image")
    assert len(before) >= 2, before
    res = run(ctd, "run", "--rm", *RUNTIME, IMAGE, "blk3", "cat", "/data/lower.txt")
    assert (res.returncode, res.stdout) == (0, b"lower\n"), res.stderr
    assert cache_entries(ctd) == before, "a layer was converted again"
    assert shim_log_count(ctd, "erofs image") == built
    assert_clean(ctd, "blk2", "blk3")  # (a shim ends after containerd's Shutdown, which ctr does not wait for)


def test_two_first_uses_at_once_build_a_layer_once(env: tuple[PrivateContainerd, Path], tmp_path: Path) -> None:
    ctd, _ = env
    ref = "docker.io/library/uvmlayers:twice"
    ctd.import_image(build_busybox_image_tar(tmp_path / "t.tar", ref, [{"only-here": b"%d\n" % os.getpid()}]))
    before = cache_entries(ctd)
    results: dict[str, subprocess.CompletedProcess[bytes]] = {}

    def go(name: str) -> None:
        results[name] = run(ctd, "run", "--rm", *RUNTIME, ref, name, "cat", "/only-here")

    threads = [threading.Thread(target=go, args=(n,)) for n in ("blk4", "blk5")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, res in results.items():
        assert (res.returncode, res.stdout) == (0, b"%d\n" % os.getpid()), (name, res.stderr)
    after = cache_entries(ctd)
    assert set(before) < set(after) and len(after) - len(before) == 1, (before, after)
    assert {k: after[k] for k in before} == before
    assert_clean(ctd, "blk4", "blk5")


def test_fsynced_data_survives_qemu_killed(env: tuple[PrivateContainerd, Path]) -> None:
    ctd, _ = env
    ctd.ctr("run", "-d", *RUNTIME, IMAGE, "blk6", "sleep", "1000")
    try:
        wait_status(ctd, "blk6", "RUNNING")
        res = run(ctd, "task", "exec", "--exec-id", "w", "blk6", "sh", "-c",
                  "echo durable > /data/durable.txt && sync && rm /data/lower.txt && sync")
        assert res.returncode == 0, res.stderr
        for pid in qemu_processes(ctd, "blk6"):
            os.kill(pid, 9)
        wait_status(ctd, "blk6", "STOPPED")
        res = run(ctd, "task", "rm", "blk6")
        assert res.returncode == 0, res.stderr
        upper, _ = snapshot_dirs(ctd, "blk6")
        assert (upper / "data/durable.txt").read_bytes() == b"durable\n"
        assert stat.S_ISCHR(os.lstat(upper / "data/lower.txt").st_mode)
        assert not (upper.parent / "uvmshim-scratch.ext4").exists()
    finally:
        remove(ctd, "blk6")


def test_read_only_root(env: tuple[PrivateContainerd, Path]) -> None:
    ctd, _ = env
    res = run(ctd, "run", "--rm", "--read-only", *RUNTIME, IMAGE, "blk7", "sh", "-c",
              "cat /data/lower.txt; touch /data/x && echo wrote")
    assert res.stdout == b"lower\n" and res.returncode != 0, (res.stdout, res.stderr)
    assert_clean(ctd, "blk7")


def test_a_full_layer_cache_names_the_layer_and_keeps_no_entry(env: tuple[PrivateContainerd, Path],
                                                               tmp_path: Path) -> None:
    ctd, _ = env
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(tiny)], check=True)
    try:
        config = tmp_path / "tiny.toml"
        config.write_text(f'layer_cache_dir = "{tiny}"\n')
        res = run(ctd, "run", "--rm", *RUNTIME, "--runtime-config-path", str(config), IMAGE, "blk8", "true")
        assert res.returncode != 0
        err = res.stderr.decode()
        assert "layer /" in err and ("No space" in err or "do not fit" in err), err
        assert not list(tiny.glob(".*.tmp")), list(tiny.iterdir())
        for entry in tiny.glob("*.erofs"):  # the layers that fitted are whole: none is half-written
            with entry.open("rb") as f:
                f.seek(1024)
                assert f.read(4) == EROFS_MAGIC, entry
        assert len(list(tiny.glob("*.erofs"))) < 2
    finally:
        run(ctd, "container", "rm", "blk8")
        assert_clean(ctd, "blk8")
        subprocess.run(["umount", str(tiny)], check=True)


def test_a_huge_sparse_file_in_a_layer_is_refused_by_name(env: tuple[PrivateContainerd, Path],
                                                          tmp_path: Path) -> None:
    ctd, _ = env
    ref = "docker.io/library/uvmlayers:sparse"
    ctd.import_image(build_busybox_image_tar(tmp_path / "s.tar", ref, [{"big": b"x"}]))
    ctd.ctr("container", "create", *RUNTIME, ref, "blk9", "true")
    try:
        _, lowers = snapshot_dirs(ctd, "blk9")
        os.truncate(lowers[0] / "big", 64 << 30)  # the layer now holds a 64 GiB file of holes
        res = run(ctd, "task", "start", "blk9")
        assert res.returncode != 0
        err = res.stderr.decode()
        assert f"layer {lowers[0]}" in err and "sparse file" in err and "big" in err, err
    finally:
        run(ctd, "task", "rm", "-f", "blk9")
        run(ctd, "container", "rm", "blk9")
        run(ctd, "image", "rm", ref)
    assert_clean(ctd, "blk9")
