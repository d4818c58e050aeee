"""shim.containerd.leftovers: the state file a serving shim records, and the `delete` action's cleanup of what a dead
shim left (processes using the VM's run directory, the directory itself), with real processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim.containerd import leftovers
from shim.containerd.leftovers import STATE_FILE, clean, forget, processes_using, record

pytestmark = pytest.mark.timeout(10)


@pytest.fixture
def run_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="uvmlo-", dir="/tmp"))
    (d / "qmp.sock").touch()
    (d / "logs").mkdir()
    (d / "logs" / "qemu.log").write_text("booting\n")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def wait_for_cmdline(pid: int) -> None:
    """Popen returns once exec began; /proc/<pid>/cmdline stays empty until the kernel finished it."""
    deadline = time.monotonic() + 5.0
    while not Path(f"/proc/{pid}/cmdline").read_bytes():
        assert time.monotonic() < deadline, f"process {pid} never showed its command line"
        time.sleep(0.005)


@pytest.fixture
def fake_qemu(run_dir: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A process that names a path inside run_dir on its command line, as QEMU does."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(100)", f"{run_dir}/x"])
    wait_for_cmdline(proc.pid)
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def test_record_writes_the_state_file_atomically(tmp_path: Path) -> None:
    state = {"vm_id": "ns.t", "backend": "qemu", "run_dir": "/run/uvmshim/ns.t", "rootfs_mounted": None}
    record(tmp_path, state)
    assert json.loads((tmp_path / STATE_FILE).read_text()) == state
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_FILE]  # no temporary file left
    record(tmp_path, {**state, "hypervisor_pid": 1234})
    assert json.loads((tmp_path / STATE_FILE).read_text())["hypervisor_pid"] == 1234


def test_forget_removes_the_state_file_and_is_idempotent(tmp_path: Path) -> None:
    record(tmp_path, {"vm_id": "x"})
    forget(tmp_path)
    assert not (tmp_path / STATE_FILE).exists()
    forget(tmp_path)


def test_processes_using_finds_only_processes_naming_the_run_dir(run_dir: Path,
                                                                 fake_qemu: subprocess.Popen[bytes]) -> None:
    assert processes_using(str(run_dir)) == [fake_qemu.pid]
    assert processes_using(str(run_dir) + "/") == [fake_qemu.pid]
    # A sibling whose name only starts like the run directory is not inside it.
    assert fake_qemu.pid not in processes_using(str(run_dir)[:-1])


def test_clean_kills_the_vm_processes_and_removes_the_run_dir(tmp_path: Path, run_dir: Path,
                                                              fake_qemu: subprocess.Popen[bytes]) -> None:
    record(tmp_path, {"vm_id": run_dir.name, "backend": "qemu", "run_dir": str(run_dir)})
    done = clean(tmp_path)
    assert fake_qemu.wait(timeout=5) == -signal.SIGKILL
    assert done == [f"killed VM processes [{fake_qemu.pid}]", f"removed {run_dir}"]
    assert not run_dir.exists()
    assert not (tmp_path / STATE_FILE).exists()
    assert clean(tmp_path) == []


def test_clean_kills_a_helper_vm_the_task_was_using(tmp_path: Path, run_dir: Path,
                                                    fake_qemu: subprocess.Popen[bytes]) -> None:
    """A task whose UVM died was bringing its writable layer back through a helper UVM when its shim died."""
    record(tmp_path, {"task_dir": None, "helper": {"vm_id": run_dir.name, "run_dir": str(run_dir)}})
    assert clean(tmp_path) == [f"killed VM processes [{fake_qemu.pid}]", f"removed {run_dir}"]
    assert fake_qemu.wait(timeout=5) == -signal.SIGKILL


def test_a_helper_record_that_names_no_vm_run_dir_is_ignored(tmp_path: Path) -> None:
    record(tmp_path, {"helper": {"vm_id": "x", "run_dir": "/"}})
    assert clean(tmp_path) == []
    record(tmp_path, {"helper": "not a record"})
    assert clean(tmp_path) == []


def test_clean_waits_no_longer_than_needed_for_a_child_that_became_a_zombie(
        tmp_path: Path, run_dir: Path, fake_qemu: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    """Our own child stays a zombie until reaped: clean() must not wait KILL_WAIT_S for it to vanish."""
    monkeypatch.setattr(leftovers, "KILL_WAIT_S", 30.0)
    record(tmp_path, {"vm_id": run_dir.name, "run_dir": str(run_dir)})
    clean(tmp_path)  # the 10 s test timeout fails this if clean() waits for the zombie to disappear
    assert fake_qemu.wait(timeout=5) == -signal.SIGKILL


def test_clean_removes_a_run_dir_nobody_uses(tmp_path: Path, run_dir: Path) -> None:
    record(tmp_path, {"vm_id": run_dir.name, "run_dir": str(run_dir)})
    assert clean(tmp_path) == [f"removed {run_dir}"]
    assert not run_dir.exists()


def test_clean_twice_is_fine(tmp_path: Path, run_dir: Path, fake_qemu: subprocess.Popen[bytes]) -> None:
    record(tmp_path, {"vm_id": run_dir.name, "run_dir": str(run_dir)})
    assert clean(tmp_path)
    assert clean(tmp_path) == []
    assert fake_qemu.wait(timeout=5) == -signal.SIGKILL


def test_clean_without_a_state_file(tmp_path: Path) -> None:
    assert clean(tmp_path) == []


def test_clean_with_containerds_empty_rootfs_dir(tmp_path: Path) -> None:
    (tmp_path / "rootfs").mkdir()  # containerd creates it in every bundle; nothing is mounted on it
    assert clean(tmp_path) == []
    assert (tmp_path / "rootfs").is_dir()


@pytest.mark.parametrize("content", ["not json", '{"run_dir": 5}', '{"run_dir": ""}', '{"vm_id": "x"}', ""])
def test_clean_with_a_broken_state_file_removes_it(tmp_path: Path, content: str) -> None:
    (tmp_path / STATE_FILE).write_text(content)
    assert clean(tmp_path) == []
    assert not (tmp_path / STATE_FILE).exists()


@pytest.mark.parametrize("content", ["[1, 2]", "null"])
def test_clean_with_a_state_file_that_is_not_a_json_object(tmp_path: Path, content: str) -> None:
    (tmp_path / STATE_FILE).write_text(content)
    assert clean(tmp_path) == []
    assert not (tmp_path / STATE_FILE).exists()


def test_clean_with_a_run_dir_already_gone(tmp_path: Path) -> None:
    gone = tmp_path / "run" / "ns.t"
    record(tmp_path, {"vm_id": gone.name, "run_dir": str(gone)})
    assert clean(tmp_path) == []
    assert not (tmp_path / STATE_FILE).exists()


def test_kill_and_wait_tolerates_pids_that_are_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()

    def no_waiting(seconds: float) -> None:
        raise AssertionError(f"waited {seconds}s for a pid that is gone")

    monkeypatch.setattr(leftovers.time, "sleep", no_waiting)
    leftovers.kill_and_wait([proc.pid])  # no ProcessLookupError, and no wait


def test_processes_using_finds_a_process_that_only_holds_the_run_dir_open(run_dir: Path) -> None:
    """A confined QEMU's command line names nothing of its run directory (its sockets and logs are
    descriptors), but it holds the directory's lock: that is how the delete action finds it."""
    fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
    holder = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE,
                              pass_fds=(fd,))
    try:
        os.close(fd)
        assert holder.pid in processes_using(str(run_dir))
        assert holder.pid not in processes_using(str(run_dir) + "x")
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait()
