"""Faults at every step of a task's life: QEMU, then the shim, SIGKILLed during the boot, right after the
agent's hello, during the container's create, during its start, while its output streams, and during the
task's delete. Each time containerd must never report success: a run that had no task yet fails; a task
that existed exits non-zero and its /tasks/exit event arrives; and the `delete` action (containerd runs it
once it sees the shim gone) leaves no QEMU, shim, socket, FIFO, mount or run directory behind.

The steps are found from outside, as an operator would see them: the QEMU process appearing (boot), the
UVM's "started" line in containerd's log (hello), OCI hooks that crun runs in the UVM and that leave a
marker in the shared rootfs and then wait (create: createRuntime; start: startContainer), the first bytes
of output on ctr's stdout, and the task's "tearing down" line in containerd's log (delete).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shim.containerd_env import PrivateContainerd
from tests.integration.ctr import (
    RUNTIME,
    assert_clean,
    ctr_events,
    run,
    shim_processes,
    task_status,
    vm_processes,
    wait_status,
)
from tests.integration.ctr import nothing_outlives_its_test as _nothing_outlives_its_test

pytestmark = pytest.mark.vm

STEPS = ["boot", "hello", "create", "start", "output", "delete"]
STEP_TIMEOUT_S = 180.0
GUEST_SHARE = "/run/uvmshim/shares/rootfs"  # where the UVM mounts a task's rootfs share (for createRuntime hooks)


@pytest.fixture(scope="module")
def env(containerd_env: tuple[PrivateContainerd, Path]) -> tuple[PrivateContainerd, Path]:
    return containerd_env


@pytest.fixture(autouse=True)
def nothing_outlives_its_test(env: tuple[PrivateContainerd, Path]) -> Iterator[None]:
    yield from _nothing_outlives_its_test(env)


def until(found: Callable[[], bool], what: str, ctr: subprocess.Popen[bytes] | None = None,
          timeout: float = STEP_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not found():
        assert time.monotonic() < deadline, f"never saw {what}"
        if ctr is not None and ctr.poll() is not None:
            pytest.fail(f"ctr ended ({ctr.returncode}) before {what}: {ctr.communicate()[1]!r}")
        time.sleep(0.02)


def qemu_of(ctd: PrivateContainerd, tid: str) -> list[int]:
    return [p for p in vm_processes(ctd, tid) if b"qemu" in _cmdline(p)]


def shim_of(ctd: PrivateContainerd, tid: str) -> list[int]:
    return [p for p in shim_processes(ctd) if f"\0-id\0{tid}\0".encode() in b"\0" + _cmdline(p)]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def kill_all(pids: list[int]) -> None:
    assert pids, "nothing to kill"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


def spec_with_hooks(ctd: PrivateContainerd, tmp_path: Path, rootfs: Path, marker: str) -> Path:
    """ctr's default spec (ctr run --config takes nothing else but the id) on the rootfs directory, running
    a loop that prints, plus hooks that stop the create (createRuntime, run by crun in the UVM) and the
    start (startContainer, in the container) after leaving a marker the host sees in the shared rootfs."""
    spec = json.loads(run(ctd, "oci", "spec").stdout)
    spec["root"] = {"path": str(rootfs)}
    spec["process"]["args"] = ["/bin/sh", "-c", "while true; do echo streaming; done"]
    wait = "while true; do sleep 1; done"
    spec["hooks"] = {
        "createRuntime": [{"path": "/bin/sh", "args": ["sh", "-c", f"touch {GUEST_SHARE}/tmp/{marker}.create; {wait}"]}],
        "startContainer": [{"path": "/bin/sh", "args": ["sh", "-c", f"touch /tmp/{marker}.start; {wait}"]}],
    } if marker else {}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def log_lines_since(ctd: PrivateContainerd, offset: int) -> str:
    with ctd.log_path.open("rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def exit_statuses(events: str, tid: str) -> list[int]:
    """The exit_status of every /tasks/exit of the task's init in `ctr events` output."""
    found = []
    for line in events.splitlines():
        if "/tasks/exit" in line and f'"container_id":"{tid}"' in line.replace(" ", ""):
            m = re.search(r'"exit_status":\s*(\d+)', line)
            found.append(int(m.group(1)) if m else 0)  # proto3 JSON omits a zero status
    return found


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("victim", ["qemu", "shim"])
def test_a_kill_at_each_step_is_never_a_success(env: tuple[PrivateContainerd, Path], tmp_path: Path, step: str,
                                                 victim: str) -> None:
    ctd, rootfs = env
    tid = f"fault-{victim}-{step}"
    marker = f"{tid}-{time.monotonic_ns()}"
    victims = {"qemu": qemu_of, "shim": shim_of}[victim]
    log_offset = ctd.log_path.stat().st_size
    spec = spec_with_hooks(ctd, tmp_path, rootfs, marker if step in ("create", "start") else "")
    argv = ["ctr", "--address", str(ctd.address), "-n", ctd.namespace, "run", *RUNTIME, "--config", str(spec), tid]
    if step not in ("output", "delete"):
        argv.insert(argv.index("run") + 1, "-d")
    with ctr_events(ctd) as seen:
        ctr = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            task_existed = strike(ctd, tid, step, marker, rootfs, ctr, log_offset, lambda: kill_all(victims(ctd, tid)))
            err = ctr.communicate(timeout=STEP_TIMEOUT_S)[1]
        finally:
            if ctr.poll() is None:
                ctr.kill()
                ctr.communicate()
        if step != "delete":
            assert ctr.returncode != 0, f"ctr run reported success after {victim} was killed during {step}: {err!r}"
        if task_existed and step != "delete":
            wait_status(ctd, tid, "STOPPED")
            rm = run(ctd, "task", "rm", tid)
            assert rm.returncode == 0 or b"not found" in rm.stderr, rm.stderr
        elif task_status(ctd, tid) != "missing":  # delete: try again, as a user would
            run(ctd, "task", "rm", "-f", tid)
        run(ctd, "container", "rm", tid)
    statuses = exit_statuses(seen[0], tid)
    if task_existed:
        assert statuses and 0 not in statuses, f"exit events of {tid}: {statuses}\n{seen[0]}"
    for leftover in rootfs.glob(f"tmp/{marker}.*"):
        leftover.unlink()
    assert_clean(ctd, tid)


def strike(ctd: PrivateContainerd, tid: str, step: str, marker: str, rootfs: Path, ctr: subprocess.Popen[bytes],
           log_offset: int, kill: Callable[[], None]) -> bool:
    """Wait for the step, then kill; whether the task existed (Create had returned) when it struck."""
    from shim.task import vm_id_for

    if step == "boot":
        until(lambda: bool(qemu_of(ctd, tid)), f"the QEMU of {tid}", ctr)
        kill()
        return False
    if step == "hello":
        started = f"uvm.{vm_id_for(ctd.namespace, tid)}: started"
        until(lambda: started in log_lines_since(ctd, log_offset), f"'{started}' in containerd's log", ctr)
        kill()
        return False
    if step in ("create", "start"):
        until(lambda: (rootfs / "tmp" / f"{marker}.{step}").exists(), f"the {step} hook's marker", ctr)
        kill()
        return step == "start"
    if step == "output":
        assert ctr.stdout is not None
        assert ctr.stdout.read(64).startswith(b"streaming"), "no output"
        kill()
        return True
    assert ctr.stdout is not None
    assert ctr.stdout.read(64).startswith(b"streaming"), "no output"
    assert run(ctd, "task", "kill", "-s", "SIGKILL", tid).returncode == 0  # it ran: now it ends, then is deleted
    ctr.communicate(timeout=STEP_TIMEOUT_S)
    wait_status(ctd, tid, "STOPPED")
    log_offset = ctd.log_path.stat().st_size
    rm = subprocess.Popen(["ctr", "--address", str(ctd.address), "-n", ctd.namespace, "task", "rm", tid],
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        until(lambda: f"task {tid}: tearing down" in log_lines_since(ctd, log_offset), "the task's teardown")
        with contextlib.suppress(AssertionError, ProcessLookupError):
            kill()  # (a graceful stop is quick: the teardown may have stopped QEMU already)
    finally:
        rm.wait(timeout=STEP_TIMEOUT_S)
    return True
