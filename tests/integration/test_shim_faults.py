"""Faults at every step of a task's life: QEMU, then the shim, SIGKILLed during the boot, right after the
agent's hello, during the container's create, during its start, while its output streams, and during the
task's delete. Each time containerd must never report success: a run that had no task yet fails; a task
that existed exits non-zero and its /tasks/exit event arrives; and the `delete` action (containerd runs it
once it sees the shim gone) leaves no QEMU, shim, socket, FIFO, mount or run directory behind.

The steps are found from outside, as an operator would see them: the QEMU process appearing (boot), the
UVM's "started" line in containerd's log (hello), OCI hooks that crun runs in the UVM and that leave a
marker in the shared rootfs and then wait (create: createRuntime; start: poststart), the first bytes
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
    qemu_processes,
    remove_ctr_fifos,
    run,
    shim_processes,
    task_status,
    wait_status,
)
from tests.integration.ctr import nothing_outlives_its_test as _nothing_outlives_its_test

pytestmark = pytest.mark.vm

STEPS = ["boot", "hello", "create", "start", "output", "delete"]
STEP_TIMEOUT_S = 180.0
POD_SHARE = "/run/uvmshim/shares/pod"  # where the UVM mounts its pod's share: <task id>/rootfs (for createRuntime hooks)


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
    return qemu_processes(ctd, tid)


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


def spec_with_hooks(ctd: PrivateContainerd, tmp_path: Path, rootfs: Path, tid: str, step: str, marker: str) -> Path:
    """ctr's default spec (ctr run --config takes nothing else but the id) on the rootfs directory, running
    a loop that prints; for the create and start steps, a hook run by crun in the UVM that leaves a marker
    the host sees in the shared rootfs and then waits: createRuntime stops the create, poststart the start
    (crun start has not returned)."""
    spec = json.loads(run(ctd, "oci", "spec").stdout)
    spec["root"] = {"path": str(rootfs)}
    spec["process"]["args"] = ["/bin/sh", "-c", "while true; do echo streaming; done"]
    hook = {"create": "createRuntime", "start": "poststart"}.get(step)
    if hook:
        spec["hooks"] = {hook: [{"path": "/bin/sh", "args": [
            "sh", "-c", f"touch {POD_SHARE}/{tid}/rootfs/tmp/{marker}.{step}; while true; do sleep 1; done"]}]}
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
    spec = spec_with_hooks(ctd, tmp_path, rootfs, tid, step, marker)
    argv = ["ctr", "--address", str(ctd.address), "-n", ctd.namespace, "run", *RUNTIME, "--config", str(spec), tid]
    if step != "output":  # (a foreground ctr run deletes the task itself when it ends)
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
        # The task may be gone already: a foreground ctr run deletes it when it ends, and containerd deletes
        # one whose shim died. What is left is stopped (never running) and is removed as a user would.
        if task_status(ctd, tid) != "missing":
            if step != "delete":
                wait_status(ctd, tid, "STOPPED")
            rm = run(ctd, "task", "rm", "-f", tid)
            assert rm.returncode == 0 or b"not found" in rm.stderr, rm.stderr
        if task_existed:  # containerd publishes a dead shim's exit once its delete action ran: in its own time
            assert seen.wait_for(rf'/tasks/exit .*"container_id":"{tid}"'), f"no exit event of {tid}:\n{seen.text}"
        run(ctd, "container", "rm", tid)
    statuses = exit_statuses(seen.text, tid)
    if task_existed:
        assert statuses and 0 not in statuses, f"exit events of {tid}: {statuses}\n{seen.text}"
    for leftover in rootfs.glob(f"tmp/{marker}.*"):
        leftover.unlink()
    remove_ctr_fifos(ctd, tid)
    assert_clean(ctd, tid)


def strike(ctd: PrivateContainerd, tid: str, step: str, marker: str, rootfs: Path, ctr: subprocess.Popen[bytes],
           log_offset: int, kill: Callable[[], None]) -> bool:
    """Wait for the step, then kill; whether the task existed (Create had returned) when it struck."""
    from shim.containerd.task import vm_id_for

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
    ctr.communicate(timeout=STEP_TIMEOUT_S)  # ctr run -d: the task runs; kill it, then delete it
    wait_status(ctd, tid, "RUNNING")
    assert run(ctd, "task", "kill", "-s", "SIGKILL", tid).returncode == 0
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
