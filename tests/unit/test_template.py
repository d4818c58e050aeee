"""Template keys and validity checks, without a VM: what makes a template stale or corrupt."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from pathlib import Path

import pytest

from schemas.uvm_config import Share, UvmConfig
from uvm import template
from uvm.builder import LaunchSpec
from uvm.errors import TemplateError


@pytest.fixture
def spec(tmp_path: Path) -> LaunchSpec:
    files = {}
    for name in ("kernel", "initrd", "rootfs"):
        files[name] = tmp_path / name
        files[name].write_bytes(name.encode())
    return LaunchSpec(vm_id="vm1", kernel=files["kernel"], initrd=files["initrd"], rootfs=files["rootfs"],
                      cmdline="console=ttyS0 quiet uvm.id=vm1", cpus=1, memory_mib=256, accel="tcg",
                      cpu_model="qemu64", tb_size_mib=None, qemu_binary="true", run_dir=tmp_path / "run",
                      console_log=None, kill_with_parent=True, image_id="img1")


def test_key_ignores_the_vm_id_and_host_paths_but_not_the_shape(spec: LaunchSpec, tmp_path: Path) -> None:
    key = template.template_key(template.key_inputs(spec))
    same = dataclasses.replace(spec, vm_id="vm2", cmdline="console=ttyS0 quiet uvm.id=vm2", run_dir=tmp_path / "r2",
                               shares=(Share(tag="rootfs", host_path=tmp_path),))
    other_share_dir = dataclasses.replace(same, shares=(Share(tag="rootfs", host_path=tmp_path / "run"),))
    assert template.template_key(template.key_inputs(same)) != key  # a 9p device more: another machine
    assert template.template_key(template.key_inputs(other_share_dir)) == template.template_key(
        template.key_inputs(same))  # the host directory behind a share is the clone's own
    for change in ({"cpus": 2}, {"memory_mib": 512}, {"cmdline": "console=ttyS0 uvm.id=vm1"},
                   {"tb_size_mib": 32}, {"extra_ports": ("bench",)}, {"scsi_controllers": 2}):
        assert template.template_key(template.key_inputs(dataclasses.replace(spec, **change))) != key, change  # type: ignore[arg-type]
    os.utime(spec.kernel, ns=(time.time_ns(), time.time_ns() + 10**9))  # the kernel file changed
    assert template.template_key(template.key_inputs(spec)) != key


def _fake_template(root: Path, spec: LaunchSpec, memory: Path) -> Path:
    inputs = template.key_inputs(spec)
    key = template.template_key(inputs)
    path = root / key
    path.mkdir(parents=True)
    (path / template.STATE).write_bytes(b"QEVM state")
    memory.write_bytes(b"\0" * 4096)
    meta = template.TemplateMeta(
        format=template.FORMAT, key=key, inputs=inputs, cmdline=spec.cmdline, vm_id="t", memory_file=memory,
        memory_identity=template._file_identity(memory), state_sha256=hashlib.sha256(b"QEVM state").hexdigest(),
        state_size=10, created=0.0, build_seconds=1.0)
    (path / template.META).write_text(meta.model_dump_json())
    return path


def test_check_detects_every_kind_of_damage(spec: LaunchSpec, tmp_path: Path) -> None:
    memory = tmp_path / "mem"
    path = _fake_template(tmp_path / "templates", spec, memory)
    inputs = template.key_inputs(spec)
    assert template.check(path, inputs).memory == memory
    with pytest.raises(TemplateError, match="not built"):
        template.check(tmp_path / "templates" / "nope")
    with pytest.raises(TemplateError, match="stale: cpus"):
        template.check(path, {**inputs, "cpus": 4})
    (path / template.STATE).write_bytes(b"QEVM")
    with pytest.raises(TemplateError, match="corrupt: state file is 4 bytes"):
        template.check(path)
    (path / template.STATE).write_bytes(b"QEVM stale")  # same size, other content
    with pytest.raises(TemplateError, match="content changed"):
        template.check(path)
    (path / template.STATE).write_bytes(b"QEVM state")
    memory.write_bytes(b"\1" * 4096)
    with pytest.raises(TemplateError, match="memory file .* changed"):
        template.check(path)
    memory.unlink()
    with pytest.raises(TemplateError, match="missing"):
        template.check(path)
    (path / template.META).write_text("{not json")
    with pytest.raises(TemplateError, match="corrupt meta.json"):
        template.check(path)


def test_list_and_remove(spec: LaunchSpec, tmp_path: Path) -> None:
    memory = tmp_path / "mem"
    path = _fake_template(tmp_path / "templates", spec, memory)
    config = UvmConfig(template_dir=tmp_path / "templates")
    rows = template.list_templates(config)
    assert [(r["key"], r["valid"]) for r in rows] == [(path.name, True)]
    template.remove(path)
    assert not path.exists() and not memory.exists()
    assert template.list_templates(config) == []


def test_no_room_is_named(tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match="MiB free"):
        template._check_room(tmp_path, 1 << 40)


def test_sweep_removes_a_killed_builders_work_dir_and_memory_file_only(tmp_path: Path) -> None:
    root, shm = tmp_path / "templates", tmp_path / "shm"
    root.mkdir()
    shm.mkdir()
    key, other = "k" * 16, "o" * 16
    dead = root / f".{key}-dead0001"
    dead.mkdir()
    (dead / "console.log").write_text("boot")
    dead_mem = shm / f"{key}-dead0001.mem"
    dead_mem.write_bytes(b"ram")
    (dead / template.MEMORY_NOTE).write_text(str(dead_mem))
    early = root / f".{key}-dead0002"  # killed before it named its memory file
    early.mkdir()
    keep = [root / f".{other}-live0001", root / f".{key}.lock", root / key, shm / f"{key}-live0003.mem",
            shm / "unrelated.mem"]
    keep[0].mkdir()
    keep[1].write_text("")
    keep[2].mkdir()
    for f in keep[3:]:
        f.write_bytes(b"x")
    stray = root / f".{key}-named-elsewhere"  # a note naming a file that is not a template memory file
    stray.mkdir()
    (stray / template.MEMORY_NOTE).write_text(str(shm / "unrelated.mem"))
    template._sweep(root, key)
    assert not dead.exists() and not dead_mem.exists() and not early.exists() and not stray.exists()
    assert all(p.exists() for p in keep)


def test_a_failed_clone_discards_its_template_but_not_a_newer_one_or_one_being_built(spec: LaunchSpec,
                                                                                      tmp_path: Path) -> None:
    root = tmp_path / "templates"
    path = _fake_template(root, spec, tmp_path / "mem-old")
    old = template.check(path)
    # Another process rebuilt it meanwhile (a new build has its own memory file): the new one stays.
    template.remove(path)
    _fake_template(root, spec, tmp_path / "mem-new")
    assert not template.discard(old)
    assert template.check(path).memory == tmp_path / "mem-new"
    # A builder holds the key's lock: a new template is coming, nothing is removed under it.
    new = template.check(path)
    with template._locked(root, new.key):
        assert not template.discard(new)
    assert path.exists()
    # The template the clone failed on is still the one there: it goes, memory file and lock file included.
    assert template.discard(new)
    assert not path.exists() and not (tmp_path / "mem-new").exists()
    assert list(root.iterdir()) == []


async def test_a_builder_waiting_for_the_lock_gives_up_in_time_and_can_be_cancelled(tmp_path: Path) -> None:
    import asyncio
    import threading

    root, key = tmp_path / "templates", "k"
    threads = threading.active_count()
    with template._locked(root, key):  # another builder holds it
        t0 = time.monotonic()
        with pytest.raises(TemplateError, match="another process has been building it for 0.3s"):
            async with template._building(root, key, wait=0.3):
                pass
        assert time.monotonic() - t0 >= 0.3
        waiter = asyncio.ensure_future(template._building(root, key).__aenter__())
        await asyncio.sleep(0.3)
        waiter.cancel()  # the VM's start was cancelled (closed, timed out) while it waited
        with pytest.raises(asyncio.CancelledError):
            await waiter
    assert threading.active_count() == threads  # nothing left waiting for the lock in a thread
    async with template._building(root, key, wait=0):  # free again: the cancelled waiter holds nothing
        with pytest.raises(TemplateError, match="another process is building it"), template._locked(root, key):
            pass
    (root / f".{key}.lock").unlink()
    with pytest.raises(TemplateError, match=f"template directory {root / 'f'}"):
        (root / "f").write_text("")
        async with template._building(root / "f", key):
            pass


def test_prune_removes_what_cannot_be_used_and_the_least_recently_used(spec: LaunchSpec, tmp_path: Path) -> None:
    root = tmp_path / "templates"
    paths = {cpus: _fake_template(root, dataclasses.replace(spec, cpus=cpus), tmp_path / f"mem{cpus}")
             for cpus in (1, 2, 3, 4, 5)}
    for age, cpus in enumerate((1, 2, 3, 4, 5)):  # 1 used most recently, 5 least
        os.utime(paths[cpus], (time.time() - age * 60, time.time() - age * 60))
    (paths[3] / template.STATE).write_bytes(b"junk")  # corrupt
    other_kernel = tmp_path / "kernel2"
    other_kernel.write_bytes(b"k2")
    gone = _fake_template(root, dataclasses.replace(spec, kernel=other_kernel, cpus=6), tmp_path / "mem6")
    other_kernel.write_bytes(b"kernel 2, rebuilt")  # the image it was built from changed: never usable again
    with template._locked(root, paths[5].name):  # being built (or discarded) by another process
        removed = template.prune(root, max_count=2, keep=paths[4].name)
    assert sorted(removed) == sorted([paths[2].name, paths[3].name, gone.name])
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == sorted(
        [paths[1].name, paths[4].name, paths[5].name])  # the newest, the one kept, the locked one
    assert not (tmp_path / "mem2").exists() and not (tmp_path / "mem6").exists()
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == sorted(
        f".{paths[n].name}.lock" for n in (1, 5))  # the removed ones' lock files went with them (4: not looked at)
    assert template.prune(root, max_count=8) == []


async def test_a_lock_file_removed_with_its_template_is_not_locked_again(tmp_path: Path) -> None:
    import asyncio

    root, key = tmp_path / "templates", "k"
    waiting = template._building(root, key)
    with template._locked(root, key):
        waiter = asyncio.ensure_future(waiting.__aenter__())
        await asyncio.sleep(0.3)  # it opened the lock file and waits for it
        template._unlink_lock(root, key)  # the holder removed the template, its lock file last
    await asyncio.wait_for(waiter, 10)  # then the waiter locks the key's new lock file...
    try:
        with pytest.raises(TemplateError, match="another process is building it"), template._locked(root, key):
            pass  # ... the one every other process sees
    finally:
        await waiting.__aexit__(None, None, None)
    with template._locked(root, key):
        template._unlink_lock(root, key)
    assert list(root.iterdir()) == []
    # A lock file opened before its holder removed it is not the key's lock any more.
    fd = template._lock_file(root, key)
    try:
        assert template._is_current(fd, template._lock_path(root, key))
        template._unlink_lock(root, key)
        assert not template._is_current(fd, template._lock_path(root, key))
        os.close(template._lock_file(root, key))  # another process made the key's new lock file
        assert not template._is_current(fd, template._lock_path(root, key))
    finally:
        os.close(fd)
        template._unlink_lock(root, key)
    path = root / "t1"
    path.mkdir()
    template.delete(path)  # runuvm template rm: the lock file goes too
    assert list(root.iterdir()) == []


def test_find_records_the_use(spec: LaunchSpec, tmp_path: Path) -> None:
    root = tmp_path / "templates"
    path = _fake_template(root, spec, tmp_path / "mem")
    os.utime(path, (0, 0))
    config = UvmConfig(template_dir=root)
    assert template.find(config, spec).path == path
    assert path.stat().st_mtime > time.time() - 60
