"""A VM's run directory is locked for the VM's life: one that no live process holds is what a crash left
(shim, QEMU and containerd killed together, so no `delete` action ran) and is reclaimed; one that a live
VM holds is refused by name."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from uvm import errors
from uvm.backends.base import create_run_dir, remove_run_dir
from uvm.builder import LaunchSpec, build
from uvm.testing import make_test_config


def spec_in(tmp_path: Path) -> LaunchSpec:
    spec = build(make_test_config(tmp_path, id="vm1"))
    return dataclasses.replace(spec, run_dir=tmp_path / "run" / "vm1")


def test_a_fresh_run_directory_is_made_locked_and_removed(tmp_path: Path) -> None:
    spec = spec_in(tmp_path)
    fd = create_run_dir(spec, 0o700)
    assert spec.run_dir.is_dir() and spec.run_dir.stat().st_mode & 0o777 == 0o700
    with pytest.raises(errors.AlreadyExistsError, match="a running VM holds it"):
        create_run_dir(spec, 0o700)
    remove_run_dir(spec.run_dir, fd)
    assert not spec.run_dir.exists()
    remove_run_dir(spec.run_dir, create_run_dir(spec, 0o700))  # free again


def test_a_directory_a_crash_left_is_emptied_and_reused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spec = spec_in(tmp_path)
    spec.run_dir.mkdir(parents=True)
    (spec.run_dir / "qmp.sock").write_text("")  # what the dead VM left
    (spec.run_dir / "sub").mkdir()
    (spec.run_dir / "sub" / "f").write_text("x")
    fd = create_run_dir(spec, 0o700)
    try:
        assert list(spec.run_dir.iterdir()) == []
        assert "left by a VM that no longer runs" in caplog.text
    finally:
        remove_run_dir(spec.run_dir, fd)


def test_the_lock_held_by_another_process_refuses_the_id(tmp_path: Path) -> None:
    """A child that inherited the descriptor (QEMU does) keeps the directory locked after its creator
    closed its own copy: a VM that outlives its shim still owns its id."""
    spec = spec_in(tmp_path)
    fd = create_run_dir(spec, 0o700)
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE,
                             pass_fds=(fd,))
    try:
        os.close(fd)
        with pytest.raises(errors.AlreadyExistsError, match="id in use"):
            create_run_dir(spec, 0o700)
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait()
    remove_run_dir(spec.run_dir, create_run_dir(spec, 0o700))  # its holder is gone: reclaimed
