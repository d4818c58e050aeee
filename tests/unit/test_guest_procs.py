"""The guest's process and file helpers (uvm.guest.procs), run on the host."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from uvm.guest import procs


def test_remove_tree_removes_files_dirs_and_symlinks_without_following_them(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("k")
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "f").write_text("x")
    (tree / "a" / "g").write_text("y")
    (tree / "link").symlink_to(outside)
    (tree / "dangling").symlink_to(tmp_path / "nothing")
    assert procs.remove_tree(str(tree))
    assert not tree.exists() and (outside / "keep").read_text() == "k"
    assert procs.remove_tree(str(tree))  # already gone
    f = tmp_path / "file"
    f.write_text("z")
    assert procs.remove_tree(str(f)) and not f.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_remove_tree_does_not_enter_a_mount_point(tmp_path: Path) -> None:
    """A container's rootfs still mounted in its bundle: its files must survive the bundle's removal."""
    bundle = tmp_path / "bundle"
    rootfs = bundle / "rootfs"
    rootfs.mkdir(parents=True)
    (bundle / "config.json").write_text("{}")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "uvmtest", str(rootfs)], check=True)
    try:
        (rootfs / "precious").write_text("p")
        assert not procs.remove_tree(str(bundle))
        assert (rootfs / "precious").read_text() == "p"
        assert not (bundle / "config.json").exists()
    finally:
        subprocess.run(["umount", str(rootfs)], check=True)
    assert procs.remove_tree(str(bundle)) and not bundle.exists()


def test_find_program_follows_the_given_path(tmp_path: Path) -> None:
    prog = tmp_path / "prog"
    prog.write_text("#!/bin/sh\n")
    prog.chmod(0o755)
    (tmp_path / "plain").write_text("")
    assert procs.find_program("prog", {"PATH": f"/nonexistent:{tmp_path}"}) == f"{tmp_path}/prog"
    assert procs.find_program("./rel/prog", {}) == "./rel/prog"
    for name, env in (("prog", {"PATH": "/nonexistent"}), ("plain", {"PATH": str(tmp_path)})):
        with pytest.raises(procs.SpawnError, match=f"exec {name}: No such file"):
            procs.find_program(name, env)
