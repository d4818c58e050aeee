"""What the end-to-end tests through a private containerd share: its module-scoped fixture (a containerd
of the suite's own, a busybox rootfs directory), `ctr` runs, and checks that a task left nothing behind."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim.containerd.leftovers import processes_using
from shim.containerd_env import PrivateContainerd, mounts_under, shim_daemons
from tests.conftest import private_config
from uvm.demo import busybox_rootfs

RUNTIME = ["--runtime", "io.containerd.uvm.v1"]
VENV_BIN = Path(sys.executable).parent


def shim_processes(ctd: PrivateContainerd) -> list[int]:
    """This containerd's shims only (another containerd's, another user's, are not the suite's)."""
    return shim_daemons(address=str(ctd.address))


def qemu_processes(ctd: PrivateContainerd, tid: str) -> list[int]:
    """The QEMU of a task's UVM (its program, not a process whose arguments merely say qemu)."""
    return [p for p in vm_processes(ctd, tid) if is_qemu(p)]


def is_qemu(pid: int) -> bool:
    try:
        program = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        return False
    return Path(program.decode(errors="replace")).name.startswith("qemu-system")


def vm_processes(ctd: PrivateContainerd, tid: str) -> list[int]:
    """QEMU of a task's UVM: its command line names files in the UVM's run directory."""
    from shim.containerd.task import vm_id_for

    run_dir = Path(os.environ.get("UVMSHIM_RUN_DIR", "/run/uvmshim")) / vm_id_for(ctd.namespace, tid)
    return [p for p in processes_using(str(run_dir)) if p != os.getpid()]


def containerd_env(suite_dir: Path, image_dir: Path) -> Iterator[tuple[PrivateContainerd, Path]]:
    """A private containerd and a busybox rootfs directory (the `containerd_env` fixture of conftest.py)."""
    if os.geteuid() != 0:
        pytest.skip("containerd needs root")
    base = Path(tempfile.mkdtemp(prefix="uvmct-", dir="/tmp"))
    rootfs = busybox_rootfs(base)
    run_dir = suite_dir / "run"
    with pytest.MonkeyPatch.context() as mp:
        # containerd passes its environment to the shim: keep the VMs' run directories in the suite's.
        mp.setenv("UVMSHIM_RUN_DIR", str(run_dir))
        mp.setenv("UVMSHIM_IMAGE_DIR", str(image_dir))
        mp.setenv("UVMSHIM_CONFIG", str(private_config(base)))  # never the host's /etc/uvmshim/config.toml
        ctd = PrivateContainerd(base / "c", extra_path=[VENV_BIN])
        try:
            ctd.start()
            yield ctd, rootfs
        finally:
            ctd.stop()
            shutil.rmtree(base, ignore_errors=True)
    assert not shim_processes(ctd), "shim processes left behind"


def nothing_outlives_its_test(env: tuple[PrivateContainerd, Path]) -> Iterator[None]:
    """A task or shim a test leaves behind fails that test and is removed here, not left to fail every
    later test of the module too (one hung `ctr run` once showed up in CI as 15 failures)."""
    yield
    ctd, _ = env
    tasks = ctd.remove_tasks_and_containers()
    shims = shim_processes(ctd)
    for pid in shims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if tasks or shims:
        pytest.fail(f"left behind by this test (now removed): tasks {tasks}, shim processes {shims}")


def run(ctd: PrivateContainerd, *args: str, input: bytes | None = b"",
        timeout: float = 180) -> subprocess.CompletedProcess[bytes]:
    return ctd.ctr(*args, input=input, timeout=timeout, check=False)


def assert_clean(ctd: PrivateContainerd, *ids: str) -> None:
    """Nothing of these tasks is left: shim, QEMU, sockets, FIFOs, mounts, run directories."""
    from shim.containerd.task import vm_id_for

    run_dir = Path(os.environ.get("UVMSHIM_RUN_DIR", "/run/uvmshim"))
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        left = {"shims": shim_processes(ctd), "shared": sorted(map(str, ctd.shared_entries_of(*ids))),
                "mounts": [str(m) for m in mounts_under(ctd.base_dir) if {"rootfs", "binds"} & set(m.parts)],
                "qemu": [p for i in ids for p in vm_processes(ctd, i)],
                "run directories": [str(run_dir / vm_id_for(ctd.namespace, i)) for i in ids
                                    if (run_dir / vm_id_for(ctd.namespace, i)).exists()]}
        if not any(left.values()):
            return
        time.sleep(0.2)
    pytest.fail(f"left behind: {left}")


def task_status(ctd: PrivateContainerd, tid: str) -> str:
    res = run(ctd, "task", "ls")
    for line in res.stdout.decode().splitlines():
        fields = line.split()
        if fields and fields[0] == tid:
            return fields[-1]
    return "missing"


def wait_status(ctd: PrivateContainerd, tid: str, status: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (now := task_status(ctd, tid)) != status:
        assert time.monotonic() < deadline, f"task {tid} is {now}, not {status}"
        time.sleep(0.3)


def exit_status_of_rm(ctd: PrivateContainerd, tid: str) -> int:
    """`ctr task rm` warns "exit with non-zero exit code N" (from our DeleteResponse); 0 otherwise."""
    res = run(ctd, "task", "rm", tid)
    assert res.returncode == 0, res.stderr
    m = re.search(rb"non-zero exit code (\d+)", res.stderr)
    return int(m.group(1)) if m else 0


class Events:
    """What `ctr events` printed since it subscribed: ``text`` (after the block: everything the block
    caused) and ``wait_for`` (an event that comes in its own time, e.g. containerd's for a dead shim)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.start = 0
        self.arrived = threading.Condition()

    @property
    def text(self) -> str:
        with self.arrived:
            return "".join(self.lines[self.start:])

    def wait_for(self, pattern: str, timeout: float = 60) -> bool:
        """Whether a line matching the regular expression pattern arrived within timeout seconds."""
        regex = re.compile(pattern)
        with self.arrived:
            return self.arrived.wait_for(lambda: any(regex.search(line) for line in self.lines[self.start:]), timeout)


@contextlib.contextmanager
def ctr_events(ctd: PrivateContainerd) -> Iterator[Events]:
    """`ctr events` while the block runs. Events reach it in order, so a marker event (a namespace made,
    then removed) seen before the block says it has subscribed, and one seen after it says everything the
    block caused has arrived: no sleep guesses either."""
    seen = Events()
    events = subprocess.Popen(["ctr", "--address", str(ctd.address), "events"], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL)

    def read() -> None:
        assert events.stdout is not None
        for line in events.stdout:
            with seen.arrived:
                seen.lines.append(line.decode(errors="replace"))
                seen.arrived.notify_all()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    mark = f"evmark{os.getpid()}x{time.monotonic_ns() % 10**9}"
    created: list[str] = []

    def marker(verb: str, topic: str) -> None:
        deadline = time.monotonic() + 60
        while True:  # ctr events may not have subscribed yet when the first marker goes out: make another
            if verb == "create":
                created.append(f"{mark}n{len(created)}")
            name = created[-1]
            assert run(ctd, "namespaces", verb, name).returncode == 0
            if seen.wait_for(rf"{topic} .*{name}", timeout=2):
                return
            assert verb == "create" and time.monotonic() < deadline, f"`ctr events` never showed {topic} {name}"

    try:
        marker("create", "/namespaces/create")
        with seen.arrived:
            seen.start = len(seen.lines)
        yield seen
        marker("remove", "/namespaces/delete")
    finally:
        events.terminate()
        events.wait(timeout=10)
        reader.join(timeout=10)
        for name in created[:-1]:  # markers sent before ctr events listened
            run(ctd, "namespaces", "remove", name)


def remove_ctr_fifos(ctd: PrivateContainerd, tid: str) -> None:
    """The stdio FIFO directory `ctr run` made for a task: `ctr task rm` removes it only when it finds the
    task, and a task whose shim or run failed may be gone by then (runc's shim leaves the same behind).
    That is ctr's to clean, not the shim's."""
    for fifo_dir in ctd.shared_entries_of(tid):
        if fifo_dir.parent.name == "fifo":
            for f in fifo_dir.iterdir():
                f.unlink()
            fifo_dir.rmdir()
