"""The private containerd (shim.containerd_env) with runc, containerd's default runtime: no VM is booted,
so these run in seconds. They prove the harness the shim's end-to-end tests stand on: containers run and
report exit codes, our busybox image imports and runs, and stop() leaves no process, mount or file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim.containerd_env import (
    DEFAULT_IMAGE_REF,
    ContainerdEnvError,
    CtrError,
    PrivateContainerd,
    build_busybox_image_tar,
    busybox_rootfs,
    mounts_under,
    processes_with_arg,
)

if os.geteuid() != 0:
    pytest.skip("containerd and runc need root", allow_module_level=True)
if missing := [b for b in ("containerd", "ctr", "runc") if shutil.which(b) is None]:
    pytest.skip(f"not installed: {missing} (apt-get install containerd runc)", allow_module_level=True)

CTR_TIMEOUT = 30.0  # a hung ctr fails its test quickly instead of at pytest's global timeout
# Container ids unique to this run: runc's state (/run/containerd/runc/<ns>/<id>) and the stdio FIFOs are
# shared with every other containerd on the host, and another run may be using the same plain names.
_TAG = uuid.uuid4().hex[:8]
IDS = {name: f"{name}-{_TAG}" for name in ("echo", "exit7", "image", "detached", "crash")}


def short_base_dir() -> Path:
    """/tmp/uvmct-XXXXXXXX: short enough for containerd's unix sockets."""
    return Path(tempfile.mkdtemp(prefix="uvmct-", dir="/tmp"))


def running(pid: int) -> bool:
    """Alive and not a zombie (a zombie's cmdline is empty)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes() != b""
    except FileNotFoundError:
        return False


def assert_gone(env: PrivateContainerd) -> None:
    """Nothing of a stopped PrivateContainerd is left: process (containerd or shim), mount, directory, or
    shim socket and FIFO in the shared /run/containerd."""
    assert processes_with_arg(str(env.config_path)) == []
    assert processes_with_arg(str(env.address)) == []
    assert mounts_under(env.base_dir) == []
    assert not env.base_dir.exists()
    assert env.shared_entries_of(*IDS.values()) == set()


@pytest.fixture(scope="module")
def containerd() -> Iterator[PrivateContainerd]:
    env = PrivateContainerd(short_base_dir(), extra_path=[Path(sys.executable).parent])
    with env:
        yield env
    assert_gone(env)


@pytest.fixture(autouse=True)
def no_containers_left(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each test must remove its own containers; leftovers are removed here and fail the test."""
    yield
    if "containerd" not in request.fixturenames:
        return
    env: PrivateContainerd = request.getfixturevalue("containerd")
    left = env.ctr("containers", "ls", "-q", timeout=CTR_TIMEOUT).stdout.decode().split()
    for cid in left:
        env.ctr("tasks", "rm", "-f", cid, timeout=CTR_TIMEOUT, check=False)
        env.ctr("containers", "rm", cid, timeout=CTR_TIMEOUT, check=False)
    assert left == [], f"containers left behind: {left}"


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return busybox_rootfs(tmp_path_factory.mktemp("rootfs"))


@pytest.fixture(scope="module")
def image_tar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_busybox_image_tar(tmp_path_factory.mktemp("image") / "busybox.tar")


def test_run_rootfs_prints_output(containerd: PrivateContainerd, rootfs: Path) -> None:
    res = containerd.ctr("run", "--rm", "--rootfs", str(rootfs), IDS["echo"], "/bin/echo", "hello", timeout=CTR_TIMEOUT)
    assert res.stdout == b"hello\n"


def test_exit_status_propagates(containerd: PrivateContainerd, rootfs: Path) -> None:
    # --rootfs runs get no PATH from an image config: name the shell by its path.
    res = containerd.ctr("run", "--rm", "--rootfs", str(rootfs), IDS["exit7"], "/bin/sh", "-c", "exit 7",
                         timeout=CTR_TIMEOUT, check=False)
    assert res.returncode == 7


def test_ctr_failure_says_what_failed(containerd: PrivateContainerd) -> None:
    with pytest.raises(CtrError) as info:
        containerd.ctr("tasks", "kill", "no-such-task", timeout=CTR_TIMEOUT)
    assert info.value.returncode == 1
    assert "no-such-task" in str(info.value) and b"not found" in info.value.stderr


def test_image_is_deterministic(image_tar: Path, tmp_path: Path) -> None:
    assert build_busybox_image_tar(tmp_path / "again.tar").read_bytes() == image_tar.read_bytes()


def test_imported_image_runs(containerd: PrivateContainerd, image_tar: Path) -> None:
    containerd.import_image(image_tar)
    try:
        assert DEFAULT_IMAGE_REF in containerd.ctr("images", "ls", "-q", timeout=CTR_TIMEOUT).stdout.decode().split()
        # The image config's PATH and Cmd apply: `echo` is found without a path.
        res = containerd.ctr("run", "--rm", DEFAULT_IMAGE_REF, IDS["image"], "echo", "from-image", timeout=CTR_TIMEOUT)
        assert res.stdout == b"from-image\n"
    finally:
        containerd.ctr("images", "rm", DEFAULT_IMAGE_REF, timeout=CTR_TIMEOUT, check=False)


def test_stop_removes_running_task_and_mounts(image_tar: Path) -> None:
    """stop() with a task still running from an image (an overlay mount under state/) and two nested
    mounts of our own under base_dir: everything goes."""
    env = PrivateContainerd(short_base_dir())
    try:
        env.start()
        env.import_image(image_tar)
        env.ctr("run", "-d", DEFAULT_IMAGE_REF, IDS["detached"], "sleep", "60", timeout=CTR_TIMEOUT)
        outer = env.base_dir / "mnt"
        outer.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "uvmct", str(outer)], check=True)
        (outer / "inner").mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "uvmct", str(outer / "inner")], check=True)
        assert len(mounts_under(env.base_dir)) == 3  # the task's rootfs overlay and our two
        assert processes_with_arg(str(env.address))  # the runc shim
        assert len(env.shared_entries_of(IDS["detached"])) == 2  # its socket and the task's FIFO dir
    finally:
        env.stop()
    assert_gone(env)
    env.stop()  # idempotent


def test_stop_after_containerd_crash_removes_containers(rootfs: Path) -> None:
    """containerd SIGKILLed under a running task: the shim and the container live on without it, and
    stop() must still remove them (it restarts containerd to do so through the shim)."""
    env = PrivateContainerd(short_base_dir())
    try:
        env.start()
        env.ctr("run", "-d", "--rootfs", str(rootfs), IDS["crash"], "/bin/sleep", "60", timeout=CTR_TIMEOUT)
        task_pid = int(env.ctr("tasks", "ls", timeout=CTR_TIMEOUT).stdout.split()[-2])  # TASK PID STATUS
        env.kill_daemon()
        assert processes_with_arg(str(env.address)), "the shim should outlive containerd"
    finally:
        env.stop()
    assert_gone(env)
    assert not running(task_pid), "the container's process outlived stop()"


def test_failed_start_leaves_nothing() -> None:
    env = PrivateContainerd(short_base_dir())
    env.address.mkdir()  # containerd cannot listen on a directory: it exits at once
    with pytest.raises(ContainerdEnvError, match="exited with status") as info:
        env.start()
    assert "c.sock" in str(info.value)  # the log tail explains why
    assert_gone(env)


def test_too_long_socket_path_is_refused_before_creating_anything() -> None:
    base = Path("/tmp") / ("uvmct-" + "x" * 100)
    with pytest.raises(ContainerdEnvError, match="shorter base dir"):
        PrivateContainerd(base)
    assert not base.exists()
