"""UVM templates with real VMs: build, clone, each clone its own machine, every fallback and fault."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from schemas.uvm_config import UvmConfig
from tests.conftest import assert_no_leftovers, orphan_template_files
from uvm import errors, template, template_builder
from uvm.vm import UtilityVM

pytestmark = pytest.mark.vm


async def guest(vm: UtilityVM, script: str) -> str:
    res = await vm.run(["sh", "-c", script])
    assert res.exit_status == 0, res.stderr
    return res.stdout.decode()


@pytest.fixture
def config(make_config: Callable[..., UvmConfig], tmp_path: Path) -> Iterator[Callable[..., UvmConfig]]:
    """Configs whose templates live in this test's own directory (so faults stay local); the
    templates are removed afterwards, memory files included."""
    def make(**kw: object) -> UvmConfig:
        kw.setdefault("template_dir", tmp_path / "templates")
        return make_config(**kw)
    yield make
    for row in template.list_templates(make()):
        template.remove(Path(row["path"]))


async def test_clones_are_their_own_machines(config: Callable[..., UvmConfig], suite_dir: Path) -> None:
    built = await template_builder.build(config())
    assert built.state.stat().st_size < 1 << 20  # device state only: RAM stays in the memory file
    clones = [UtilityVM(config(start="template")) for _ in range(2)]
    try:
        await asyncio.gather(*(c.start() for c in clones))
        assert [c.started_from for c in clones] == ["template", "template"], [c.start_note for c in clones]
        seen = []
        for c in clones:
            out = (await guest(c, "hostname; date +%s; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'"))
            hostname, clock, random = out.split("\n")[:3]
            assert hostname == c.id
            assert abs(int(clock) - time.time()) < 30  # the host's clock, not the template's
            seen.append(random)
        assert seen[0] != seen[1] and len(seen[0]) == 64  # two clones never share a random stream
        # Everything after start behaves as for a cold VM: a graceful shutdown, then close.
        await clones[0].shutdown()
        assert (await clones[0].wait_timeout(60)).reason == "shutdown"
    finally:
        await asyncio.gather(*(c.close() for c in clones))
    assert_no_leftovers(suite_dir)


async def test_auto_without_template_boots_cold_and_names_why(config: Callable[..., UvmConfig]) -> None:
    vm = UtilityVM(config(start="auto", kernel_args="uvm.test=auto-cold"))
    try:
        await vm.start()
        assert vm.started_from == "cold" and "not built" in vm.start_note
    finally:
        await vm.close()


async def test_corrupt_or_stale_template_is_not_resumed(config: Callable[..., UvmConfig], suite_dir: Path) -> None:
    cfg = config(kernel_args="uvm.test=corrupt")
    t = await template_builder.build(cfg)
    # A truncated state file: detected by its digest, never loaded; auto boots cold.
    with t.state.open("r+b") as f:
        f.truncate(t.meta.state_size // 2)
    vm = UtilityVM(config(kernel_args="uvm.test=corrupt", start="auto"))
    try:
        await vm.start()
        assert vm.started_from == "cold" and "corrupt" in vm.start_note, vm.start_note
    finally:
        await vm.close()
    # start="template" rebuilds it, then clones.
    vm = UtilityVM(config(kernel_args="uvm.test=corrupt", start="template"))
    try:
        await vm.start()
        assert vm.started_from == "template"
        assert (await guest(vm, "echo ok")) == "ok\n"
    finally:
        await vm.close()
    rebuilt = template.check(t.path)
    assert rebuilt.memory != t.memory and not t.memory.exists()  # the old RAM file went with it
    # A template of another kernel: not this VM's (its key and recorded inputs differ).
    other_kernel = suite_dir / "state" / "vmlinux-copy"
    spec_kernel = Path(json.loads((cfg.image / "manifest.json").read_text())["kernel"])
    shutil.copy(cfg.image / spec_kernel, other_kernel)
    try:
        from uvm import builder

        spec = builder.build(config(kernel_args="uvm.test=corrupt", kernel=other_kernel))
        with pytest.raises(errors.TemplateError, match="stale: image"):
            template.check(t.path, template.key_inputs(spec))
        with pytest.raises(errors.TemplateError, match="not built"):
            template.find(config(kernel_args="uvm.test=corrupt", kernel=other_kernel), spec)
    finally:
        other_kernel.unlink()


async def test_clone_whose_qemu_dies_mid_load_falls_back_cold(config: Callable[..., UvmConfig],
                                                               suite_dir: Path) -> None:
    cfg = config(kernel_args="uvm.test=badload")
    t = await template_builder.build(cfg)
    # A state file that passes the digest check (meta rewritten to match) but QEMU cannot load.
    t.state.write_bytes(b"QEVM" + os.urandom(t.meta.state_size - 4))
    meta = t.meta.model_copy(update={"state_sha256": template._sha256(t.state)})
    (t.path / template.META).write_text(meta.model_dump_json())
    vm = UtilityVM(config(kernel_args="uvm.test=badload", start="auto"))
    try:
        await vm.start()
        assert vm.started_from == "cold" and "failed to load" in vm.start_note, vm.start_note
        assert (await guest(vm, "echo ok")) == "ok\n"
    finally:
        await vm.close()
    assert not t.path.exists() and not t.memory.exists()  # removed, so the next use rebuilds it
    assert_no_leftovers(suite_dir)


async def test_no_room_for_the_template_memory(config: Callable[..., UvmConfig], tmp_path: Path,
                                               suite_dir: Path) -> None:
    small = tmp_path / "small-shm"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(small)], check=True)
    try:
        cfg = config(template_memory_dir=small, kernel_args="uvm.test=noroom")
        with pytest.raises(errors.TemplateError, match="MiB free"):
            await template_builder.build(cfg)
        vm = UtilityVM(cfg.model_copy(update={"start": "template"}))
        try:
            await vm.start()
            assert vm.started_from == "cold" and "MiB free" in vm.start_note
        finally:
            await vm.close()
        assert list(small.iterdir()) == []
        assert list((tmp_path / "templates").iterdir()) == []  # not even the key's lock file
    finally:
        subprocess.run(["umount", str(small)], check=True)
    assert_no_leftovers(suite_dir)
    assert not orphan_template_files(suite_dir)


def test_cli_template_build_list_boot_rm(suite_dir: Path, image_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "UVMSHIM_RUN_DIR": str(suite_dir / "run"), "UVMSHIM_STATE_DIR": str(tmp_path / "state"),
           "UVMSHIM_IMAGE_DIR": str(image_dir)}

    def runuvm(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "shim.runuvm.cli", *args], env=env, capture_output=True, text=True,
                              timeout=300)

    # The template memory goes to the default /dev/shm/uvmshim-templates here: removed by `rm` below
    # (and the directory by the test, when the test made it).
    default_memory_dir = UvmConfig.model_fields["template_memory_dir"].default
    made_memory_dir = not default_memory_dir.exists()
    built = runuvm("template", "build", "--memory", "192")
    assert built.returncode == 0, built.stderr
    key = built.stdout.split(":")[0]
    rows = json.loads(runuvm("template", "list", "--format", "json").stdout)
    assert [(r["key"], r["valid"], r["memory_mib"]) for r in rows] == [(key, True, 192)]
    boot = runuvm("boot", "--memory", "192", "--start", "template", "--measure", "--exec", "hostname")
    assert boot.returncode == 0, boot.stderr
    assert "cloned from a template" in boot.stderr and boot.stdout.startswith("uvm-")
    bad = runuvm("template", "rm", "nosuchkey")
    assert bad.returncode == 1 and "no template nosuchkey" in bad.stderr
    assert runuvm("template", "rm", "--all").returncode == 0
    assert json.loads(runuvm("template", "list", "--format", "json").stdout) == []
    assert not Path(rows[0]["memory_file"]).exists()
    assert list((tmp_path / "state" / "templates").iterdir()) == []  # the lock files went with them
    if made_memory_dir:
        default_memory_dir.rmdir()
    assert_no_leftovers(suite_dir)


async def test_auto_builds_in_the_background_when_configured(config: Callable[..., UvmConfig]) -> None:
    from shim.containerd.leftovers import process_cmdlines

    cfg = config(start="auto", template_autobuild=True, kernel_args="uvm.test=autobuild")
    vm = UtilityVM(cfg)
    try:
        await vm.start()
        assert vm.started_from == "cold" and "not built" in vm.start_note
    finally:
        await vm.close()

    def builders() -> list[int]:
        return [pid for pid, argv in process_cmdlines() if b"uvm.template_builder" in argv and b"uvm.test=autobuild" in argv]

    for _ in range(360):  # the detached builder (another process: no event to await) ends once the template is saved
        if not builders():
            break
        await asyncio.sleep(0.5)
    assert not builders()
    vm = UtilityVM(cfg)
    try:
        await vm.start()
        assert vm.started_from == "template", vm.start_note
    finally:
        await vm.close()
