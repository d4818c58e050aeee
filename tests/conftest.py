"""Shared fixtures: a private run/state directory for the whole session, and a leak check at the end
(no QEMU process, socket or directory of the suite may be left)."""

from __future__ import annotations

import grp
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from schemas.uvm_config import UvmConfig, default_image_dir


def _qemu_processes_under(path: Path) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(path) in cmd and ("qemu" in cmd or "fake-qemu" in cmd):
            found.append(f"{pid}: {cmd[:200]}")
    return found


@pytest.fixture(scope="session")
def suite_dir() -> Iterator[Path]:
    """Short-pathed private directory (unix sockets live below it); checked for leaks at the end."""
    d = Path(tempfile.mkdtemp(prefix="uvmt-", dir="/tmp"))
    (d / "run").mkdir()
    (d / "state").mkdir()
    yield d
    leaked_files = sorted(str(p) for p in (d / "run").rglob("*"))
    leaked_procs = _qemu_processes_under(d)
    shutil.rmtree(d, ignore_errors=True)
    assert not leaked_procs, f"QEMU processes left behind: {leaked_procs}"
    assert not leaked_files, f"files left in the run directory: {leaked_files}"


@pytest.fixture(scope="session")
def image_dir() -> Path:
    d = default_image_dir()
    if not (d / "manifest.json").exists():
        pytest.fail(f"no guest image in {d}: run `make image` (make test does)")
    return d


def _config_factory(suite_dir: Path, image_dir: Path) -> Callable[..., UvmConfig]:
    def make(**kw: Any) -> UvmConfig:
        kw.setdefault("run_dir", suite_dir / "run")
        kw.setdefault("state_dir", suite_dir / "state")
        kw.setdefault("image", image_dir)
        kw.setdefault("boot_timeout", 60.0)
        return UvmConfig(**kw)

    return make


@pytest.fixture
def make_config(suite_dir: Path, image_dir: Path) -> Callable[..., UvmConfig]:
    return _config_factory(suite_dir, image_dir)


@pytest.fixture(scope="module")
def make_config_module(suite_dir: Path, image_dir: Path) -> Callable[..., UvmConfig]:
    return _config_factory(suite_dir, image_dir)


BUSYBOX = Path("/bin/busybox")


@pytest.fixture(scope="session")
def busybox_rootfs(suite_dir: Path) -> Path:
    """<suite>/shares/busybox: a busybox root filesystem for containers (shared over 9p as "shares")."""
    import subprocess

    root = suite_dir / "shares" / "busybox"
    (root / "bin").mkdir(parents=True)
    for d in ("proc", "sys", "dev", "tmp", "etc", "root"):
        (root / d).mkdir()
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    applets = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True, check=True).stdout.split()
    for a in applets:
        if a != "busybox":
            (root / "bin" / a).symlink_to("busybox")
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    return root


def _running(name: str) -> bool:
    return subprocess.run(["pgrep", "-x", name], capture_output=True, check=False).returncode == 0


@pytest.fixture(scope="session")
def libvirtd() -> Iterator[None]:
    """libvirtd and virtlogd: started here when not running, and then stopped here (only those).

    /dev/kvm gets udev's usual group kvm, mode 0660 for the run (this machine has no udev): with a
    root-only /dev/kvm, libvirt re-probes QEMU's capabilities on every domain start (~85 s here),
    because KVM looks usable to its probe (as root) and unusable for the qemu user.
    """
    kvm = Path("/dev/kvm")
    kvm_mode = kvm.stat() if kvm.exists() else None
    if kvm_mode is not None:
        os.chown(kvm, -1, grp.getgrnam("kvm").gr_gid)
        kvm.chmod(0o660)
    started = []
    for daemon in ("virtlogd", "libvirtd"):
        if not _running(daemon):
            subprocess.run([daemon, "-d"], check=True)
            started.append(daemon)
    deadline = time.monotonic() + 60
    while subprocess.run(["virsh", "-c", "qemu:///system", "version"], capture_output=True,
                         check=False).returncode != 0:
        if time.monotonic() > deadline:
            pytest.fail("libvirtd did not come up")
        time.sleep(0.2)
    yield
    if kvm_mode is not None:
        os.chown(kvm, -1, kvm_mode.st_gid)
        kvm.chmod(kvm_mode.st_mode & 0o777)
    for daemon in reversed(started):
        subprocess.run(["pkill", "-x", daemon], check=False)
        for _ in range(100):
            if not _running(daemon):
                break
            time.sleep(0.1)


def assert_no_leftovers(suite_dir: Path) -> None:
    run = suite_dir / "run"
    assert not list(run.iterdir()), f"left in the run directory: {list(run.iterdir())}"
    assert not _qemu_processes_under(suite_dir), _qemu_processes_under(suite_dir)
