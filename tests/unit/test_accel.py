"""uvm.accel: the bounded KVM probe and its cache, with fake qemu scripts (and the firmware under real TCG)."""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from uvm import accel

QEMU = shutil.which("qemu-system-x86_64")


def write_script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def fake_qemu(tmp_path: Path) -> Callable[[str], Path]:
    """Make a fake qemu: it records each run (one line in runs.log, its argv in argv.log) then runs body."""

    def make(body: str) -> Path:
        runs, argv = tmp_path / "runs.log", tmp_path / "argv.log"
        return write_script(tmp_path / "fake-qemu", f'echo run >> "{runs}"\necho "$@" > "{argv}"\n{body}')

    return make


def runs(tmp_path: Path) -> int:
    log = tmp_path / "runs.log"
    return len(log.read_text().splitlines()) if log.exists() else 0


@pytest.fixture
def kvm_device(monkeypatch: pytest.MonkeyPatch) -> Callable[[bool], None]:
    """Decide whether /dev/kvm looks accessible, whatever this host has."""

    def set_present(present: bool) -> None:
        real_access = os.access

        def access(path: object, mode: int, *args: object, **kw: object) -> bool:
            if str(path) == "/dev/kvm":
                return present
            return real_access(path, mode, *args, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr(os, "access", access)  # the os module uvm.accel uses

    set_present(True)
    return set_present


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# -- explicit choices ----------------------------------------------------------------------------------


@pytest.mark.parametrize("requested", ["kvm", "tcg"])
def test_explicit_accel_is_returned_without_probing(
    requested: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_qemu: Callable[[str], Path],
) -> None:
    def no_probe(*args: object, **kw: object) -> tuple[bool, str]:
        raise AssertionError("probed")

    monkeypatch.setattr(accel, "probe_kvm", no_probe)
    assert accel.resolve_accel(requested, str(fake_qemu("exit 99")), tmp_path / "cache") == requested
    assert runs(tmp_path) == 0
    assert not (tmp_path / "cache").exists()


# -- the probe firmware ----------------------------------------------------------------------------------


def test_probe_firmware_layout() -> None:
    rom = accel.probe_firmware()
    assert len(rom) == 65536
    # Reset vector (top 16 bytes): mov al,0x31; out 0xf4,al; hlt; jmp $-3; everything else is hlt.
    assert rom[0xFFF0:0xFFF7] == bytes([0xB0, 0x31, 0xE6, 0xF4, 0xF4, 0xEB, 0xFD])
    assert set(rom[:0xFFF0]) == {0xF4}
    assert (0x31 << 1) | 1 == accel.PROBE_EXIT == 99


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")
def test_probe_firmware_really_exits_99_under_tcg(tmp_path: Path) -> None:
    assert QEMU is not None
    fw = tmp_path / "probe.bin"
    fw.write_bytes(accel.probe_firmware())
    argv = [QEMU, "-machine", "pc,accel=tcg", "-m", "16", "-nodefaults", "-no-user-config", "-display", "none",
            "-bios", str(fw), "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]
    res = subprocess.run(argv, capture_output=True, timeout=60, check=False)
    assert res.returncode == accel.PROBE_EXIT, res.stderr.decode(errors="replace")


# -- probe_kvm against fake qemus --------------------------------------------------------------------------


def test_probe_passes_the_firmware_under_kvm(tmp_path: Path, kvm_device: object,
                                             fake_qemu: Callable[[str], Path]) -> None:
    copy = tmp_path / "fw-copy.bin"
    script = fake_qemu(f'while [ $# -gt 0 ]; do [ "$1" = -bios ] && cp "$2" "{copy}"; shift; done\nexit 99')
    assert accel.probe_kvm(str(script), timeout=10) == (True, "KVM probe guest ran")
    argv = (tmp_path / "argv.log").read_text().split()
    assert argv[:4] == ["-machine", "pc,accel=kvm", "-cpu", "host"]
    assert "isa-debug-exit,iobase=0xf4,iosize=0x04" in argv
    assert copy.read_bytes() == accel.probe_firmware()


def test_probe_failure_reports_the_last_stderr_line(kvm_device: object, fake_qemu: Callable[[str], Path]) -> None:
    script = fake_qemu('echo "warming up" >&2\necho "kvm run failed Bad address" >&2\nexit 1')
    ok, why = accel.probe_kvm(str(script), timeout=10)
    assert not ok
    assert why == "KVM probe exited 1: kvm run failed Bad address"


def test_probe_without_dev_kvm_does_not_run_qemu(tmp_path: Path, kvm_device: Callable[[bool], None],
                                                 fake_qemu: Callable[[str], Path]) -> None:
    kvm_device(False)
    assert accel.probe_kvm(str(fake_qemu("exit 99"))) == (False, "/dev/kvm is missing or not accessible")
    assert runs(tmp_path) == 0


def test_probe_with_a_missing_binary(tmp_path: Path, kvm_device: object) -> None:
    ok, why = accel.probe_kvm(str(tmp_path / "no-such-qemu"), timeout=5)
    assert not ok and why.startswith(f"cannot run {tmp_path / 'no-such-qemu'}:")


def test_hanging_probe_is_killed_at_its_deadline(tmp_path: Path, kvm_device: object,
                                                 fake_qemu: Callable[[str], Path]) -> None:
    pidfile = tmp_path / "pid"
    script = fake_qemu(f'echo $$ > "{pidfile}"\nexec sleep 30')
    t0 = time.monotonic()
    ok, why = accel.probe_kvm(str(script), timeout=1)
    elapsed = time.monotonic() - t0
    pid = int(pidfile.read_text())
    try:
        assert (ok, why) == (False, "KVM guest did not run within 1s (vCPU hangs)")
        assert elapsed > 0.9  # not before its deadline; that it ended there, the dead pid shows
        assert not pid_alive(pid), "the hung probe process was left running"
    finally:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_hanging_probe_behind_a_wrapper_leaves_nothing_running(tmp_path: Path, kvm_device: object,
                                                              fake_qemu: Callable[[str], Path]) -> None:
    pidfile = tmp_path / "child"
    script = fake_qemu(f'sleep 30 &\necho $! > "{pidfile}"\nwait')
    try:
        assert accel.probe_kvm(str(script), timeout=1)[0] is False
        child = int(pidfile.read_text())
        assert not pid_alive(child), "the wrapper's hung child was left running"
    finally:
        if pidfile.exists() and pid_alive(int(pidfile.read_text())):
            os.kill(int(pidfile.read_text()), signal.SIGKILL)


# -- resolve_accel("auto") ---------------------------------------------------------------------------------


def test_auto_picks_kvm_when_the_probe_guest_runs(tmp_path: Path, kvm_device: object,
                                                  fake_qemu: Callable[[str], Path]) -> None:
    assert accel.resolve_accel("auto", str(fake_qemu("exit 99")), tmp_path / "cache") == "kvm"
    assert runs(tmp_path) == 1


def test_auto_picks_tcg_when_the_probe_fails(tmp_path: Path, kvm_device: object,
                                             fake_qemu: Callable[[str], Path]) -> None:
    assert accel.resolve_accel("auto", str(fake_qemu("exit 1")), tmp_path / "cache") == "tcg"


def test_auto_picks_tcg_when_the_probe_hangs(tmp_path: Path, kvm_device: object, monkeypatch: pytest.MonkeyPatch,
                                             fake_qemu: Callable[[str], Path]) -> None:
    # PROBE_TIMEOUT_S is bound as probe_kvm's default when the module loads: shorten the call itself.
    monkeypatch.setattr(accel, "probe_kvm", functools.partial(accel.probe_kvm, timeout=1))
    pidfile = tmp_path / "pid"
    result = accel.resolve_accel("auto", str(fake_qemu(f'echo $$ > "{pidfile}"\nexec sleep 30')), tmp_path / "c")
    pid = int(pidfile.read_text())
    try:
        assert result == "tcg"
        assert not pid_alive(pid)
        assert "did not run within 1s" in json.loads((tmp_path / "c" / "accel-probe.json").read_text())["why"]
    finally:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_auto_without_dev_kvm_is_tcg(tmp_path: Path, kvm_device: Callable[[bool], None],
                                     fake_qemu: Callable[[str], Path]) -> None:
    kvm_device(False)
    assert accel.resolve_accel("auto", str(fake_qemu("exit 99")), None) == "tcg"
    assert runs(tmp_path) == 0


def test_verdict_is_cached(tmp_path: Path, kvm_device: object, fake_qemu: Callable[[str], Path]) -> None:
    script, cache = fake_qemu("exit 99"), tmp_path / "cache"
    assert accel.resolve_accel("auto", str(script), cache) == "kvm"
    assert accel.resolve_accel("auto", str(script), cache) == "kvm"
    assert runs(tmp_path) == 1  # the second call read the cache
    data = json.loads((cache / "accel-probe.json").read_text())
    assert data["accel"] == "kvm" and data["why"] == "KVM probe guest ran"
    assert str(script) in data["key"]
    assert [p.name for p in cache.iterdir()] == ["accel-probe.json"]  # no temporary file left


def test_cached_tcg_verdict_is_reused_too(tmp_path: Path, kvm_device: object,
                                          fake_qemu: Callable[[str], Path]) -> None:
    script, cache = fake_qemu("exit 1"), tmp_path / "cache"
    assert [accel.resolve_accel("auto", str(script), cache) for _ in range(3)] == ["tcg"] * 3
    assert runs(tmp_path) == 1


def test_without_a_cache_dir_every_call_probes(tmp_path: Path, kvm_device: object,
                                               fake_qemu: Callable[[str], Path]) -> None:
    script = fake_qemu("exit 99")
    assert accel.resolve_accel("auto", str(script), None) == "kvm"
    assert accel.resolve_accel("auto", str(script), None) == "kvm"
    assert runs(tmp_path) == 2


def test_a_changed_qemu_binary_is_probed_again(tmp_path: Path, kvm_device: object,
                                               fake_qemu: Callable[[str], Path]) -> None:
    cache = tmp_path / "cache"
    assert accel.resolve_accel("auto", str(fake_qemu("exit 99")), cache) == "kvm"
    assert accel.resolve_accel("auto", str(fake_qemu("exit 1 # a new build")), cache) == "tcg"
    assert runs(tmp_path) == 2


@pytest.mark.parametrize("content", ["{not json", "", '{"key": "other", "accel": "kvm"}', '{"accel": "xen"}'])
def test_unusable_cache_is_ignored_and_rewritten(tmp_path: Path, kvm_device: object,
                                                 fake_qemu: Callable[[str], Path], content: str) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "accel-probe.json").write_text(content)
    assert accel.resolve_accel("auto", str(fake_qemu("exit 1")), cache) == "tcg"
    assert runs(tmp_path) == 1
    assert json.loads((cache / "accel-probe.json").read_text())["accel"] == "tcg"


def test_unwritable_cache_still_answers(tmp_path: Path, kvm_device: object, fake_qemu: Callable[[str], Path],
                                        caplog: pytest.LogCaptureFixture) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    assert accel.resolve_accel("auto", str(fake_qemu("exit 99")), not_a_dir / "cache") == "kvm"
    assert "cannot cache the KVM probe result" in caplog.text


@pytest.mark.parametrize("content", ["[]", "null"])
def test_cache_holding_non_object_json_is_ignored(tmp_path: Path, kvm_device: object,
                                                  fake_qemu: Callable[[str], Path], content: str) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "accel-probe.json").write_text(content)
    assert accel.resolve_accel("auto", str(fake_qemu("exit 1")), cache) == "tcg"
