"""Shared fixtures: a private run/state directory for the whole session, and a leak check at the end
(no QEMU process, socket or directory of the suite may be left)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from schemas.uvm_config import UvmConfig, default_image_dir
from uvm.demo import busybox_rootfs as make_busybox_rootfs
from uvm.testing import libvirt_daemons


def _qemu_processes_under(path: Path) -> list[str]:
    """QEMU processes (real or fake) that name a path under path or hold one open (QEMU gets its sockets
    and logs as descriptors and holds its run directory's lock)."""
    from shim.containerd.leftovers import processes_using

    found = []
    for pid in processes_using(str(path)):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        program = Path(args[0].decode(errors="replace")).name
        if pid != os.getpid() and (program.startswith("qemu-system") or program == "fake-qemu" or
                                   (program == "sh" and b"fake-qemu" in b" ".join(args))):
            found.append(f"{pid}: {b' '.join(args).decode(errors='replace')[:200]}")
    return found


@pytest.fixture(scope="session")
def suite_dir() -> Iterator[Path]:
    """Short-pathed private directory (unix sockets live below it); checked for leaks at the end."""
    d = Path(tempfile.mkdtemp(prefix="uvmt-", dir="/tmp"))
    (d / "run").mkdir()
    (d / "state").mkdir()
    shm = template_memory_dir(d)
    published = libvirt_image_dir(d)
    published.mkdir(mode=0o755)
    published.chmod(0o755)
    yield d
    shutil.rmtree(published, ignore_errors=True)
    leaked_files = sorted(str(p) for p in (d / "run").rglob("*"))
    leaked_procs = _qemu_processes_under(d)
    orphans = orphan_template_files(d)
    shutil.rmtree(d, ignore_errors=True)
    shutil.rmtree(shm, ignore_errors=True)
    assert not leaked_procs, f"QEMU processes left behind: {leaked_procs}"
    assert not leaked_files, f"files left in the run directory: {leaked_files}"
    assert not orphans, f"template files no template owns: {orphans}"


def libvirt_image_dir(suite_dir: Path) -> Path:
    """The suite's own directory for the image copies the libvirt backend makes for libvirt's QEMU user
    (beside the 0700 suite directory, which that user could not enter), removed at the end."""
    return suite_dir.with_name(f"{suite_dir.name}-libvirt")


def template_memory_dir(suite_dir: Path) -> Path:
    """The suite's own directory for template RAM (tmpfs), removed at the end."""
    return Path("/dev/shm") / suite_dir.name


def orphan_template_files(suite_dir: Path) -> list[str]:
    """Template memory files and work directories that no valid template refers to (leaks)."""
    from uvm import template

    owned = set()
    root = suite_dir / "state" / "templates"
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        if entry.name.startswith(".") and entry.is_dir():
            return [f"unfinished template build {entry}"]
        if entry.is_dir():
            try:
                owned.add(template.check(entry).memory)
            except template.TemplateError:
                pass
    shm = template_memory_dir(suite_dir)
    return sorted(str(p) for p in (shm.iterdir() if shm.is_dir() else []) if p not in owned)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short-pathed private directory for unix sockets (their paths are capped at 108 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="uvmsock-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


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
        kw.setdefault("template_memory_dir", template_memory_dir(suite_dir))
        kw.setdefault("libvirt_image_dir", libvirt_image_dir(suite_dir))
        return UvmConfig(**kw)

    return make


@pytest.fixture
def make_config(suite_dir: Path, image_dir: Path) -> Callable[..., UvmConfig]:
    return _config_factory(suite_dir, image_dir)


@pytest.fixture(scope="module")
def make_config_module(suite_dir: Path, image_dir: Path) -> Callable[..., UvmConfig]:
    return _config_factory(suite_dir, image_dir)


@pytest.fixture(scope="session")
def busybox_rootfs(suite_dir: Path) -> Path:
    """<suite>/shares/busybox: a busybox root filesystem for containers (shared over 9p as "shares")."""
    root = make_busybox_rootfs(suite_dir / "shares")
    (root / "root").mkdir()
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    return root


@pytest.fixture(scope="session")
def libvirtd() -> Iterator[list[str]]:
    """libvirtd and virtlogd for the session (started and stopped here only if they were not running:
    the names of those started here)."""
    with libvirt_daemons() as started:
        yield started


def private_config(directory: Path) -> Path:
    """A shim config file in directory (the defaults, with the layer cache in directory/layers), for
    $UVMSHIM_CONFIG: the shims the suite starts must never read the host's /etc/uvmshim/config.toml, nor
    fill the host's own layer cache."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "uvmshim.toml"
    path.write_text(f"layer_cache_dir = {json.dumps(str(directory / 'layers'))}\n")
    return path


def assert_no_leftovers(suite_dir: Path) -> None:
    run = suite_dir / "run"
    assert not list(run.iterdir()), f"left in the run directory: {list(run.iterdir())}"
    assert not _qemu_processes_under(suite_dir), _qemu_processes_under(suite_dir)
