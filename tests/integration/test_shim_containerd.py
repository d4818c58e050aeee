"""End to end: a private containerd running tasks with `--runtime io.containerd.uvm.v1`, each task in
its own UVM (QEMU under TCG here), driven with Debian's `ctr` exactly as a user would."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import pty
import re
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim.containerd_env import (
    PrivateContainerd,
    build_busybox_image_tar,
    mounts_under,
)
from tests.integration.ctr import (
    RUNTIME,
    assert_clean,
    ctr_events,
    exit_status_of_rm,
    qemu_processes,
    remove_ctr_fifos,
    run,
    shim_processes,
    task_status,
    vm_processes,
    wait_status,
)
from tests.integration.ctr import nothing_outlives_its_test as _nothing_outlives_its_test

pytestmark = pytest.mark.vm

IMAGE_REF = "docker.io/library/uvmbusybox:latest"


@pytest.fixture(scope="module")
def env(containerd_env: tuple[PrivateContainerd, Path]) -> tuple[PrivateContainerd, Path]:
    return containerd_env


@pytest.fixture(autouse=True)
def nothing_outlives_its_test(env: tuple[PrivateContainerd, Path]) -> Iterator[None]:
    yield from _nothing_outlives_its_test(env)


def test_run_rm_echo_and_exit_code(env: tuple[PrivateContainerd, Path]) -> None:
    ctd, rootfs = env
    res = run(ctd, "run", "--rm", *RUNTIME, "--rootfs", str(rootfs), "echo1", "/bin/sh", "-c",
              "echo hello from $(uname -s); exit 7")
    assert res.returncode == 7, res.stderr
    assert res.stdout == b"hello from Linux\n"
    assert_clean(ctd, "echo1")


def test_stdin_1mib_round_trip(env: tuple[PrivateContainerd, Path]) -> None:
    ctd, rootfs = env
    data = os.urandom(1 << 20)
    res = run(ctd, "run", "--rm", *RUNTIME, "--rootfs", str(rootfs), "stdin1", "/bin/sha256sum", input=data)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    assert_clean(ctd, "stdin1")


def test_stdout_16mib(env: tuple[PrivateContainerd, Path]) -> None:
    ctd, rootfs = env
    size = 16 << 20
    res = run(ctd, "run", "--rm", *RUNTIME, "--rootfs", str(rootfs), "out16", "/bin/sh", "-c",
              f"yes 0123456789abcdef | head -c {size}")
    assert res.returncode == 0, res.stderr
    expected = (b"0123456789abcdef\n" * (size // 17 + 1))[:size]
    assert len(res.stdout) == size
    assert hashlib.sha256(res.stdout).digest() == hashlib.sha256(expected).digest()
    assert_clean(ctd, "out16")


def test_tty(env: tuple[PrivateContainerd, Path]) -> None:
    """`ctr run -t` needs a terminal of its own: give it a pty and read what the container printed."""
    ctd, rootfs = env
    master, slave = pty.openpty()
    argv = ["ctr", "--address", str(ctd.address), "--namespace", ctd.namespace, "run", "--rm", "-t", *RUNTIME,
            "--rootfs", str(rootfs), "tty1", "/bin/sh", "-c", "tty; stty size; echo done"]
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    out = b""
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        assert proc.wait(30) == 0, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    assert re.search(rb"/dev/pts/\d+", out), out
    assert b"done" in out
    assert_clean(ctd, "tty1")


@pytest.fixture
def detached(env: tuple[PrivateContainerd, Path], request: pytest.FixtureRequest) -> Iterator[str]:
    """A detached task (its init a shell that exits 143 on SIGTERM, as PID 1 ignores a bare SIGTERM)."""
    ctd, rootfs = env
    tid = re.sub(r"[^a-z0-9]", "", request.node.name.lower().removeprefix("test_"))[:24]
    ready = rootfs / "tmp" / f"{tid}.ready"  # the rootfs is the host directory, shared into the UVM
    ready.unlink(missing_ok=True)
    res = run(ctd, "run", "-d", *RUNTIME, "--rootfs", str(rootfs), tid, "/bin/sh", "-c",
              f"trap 'exit 143' TERM; touch /tmp/{tid}.ready; while true; do sleep 0.2; done")
    assert res.returncode == 0, res.stderr
    deadline = time.monotonic() + 60  # the trap is set: a SIGTERM now is not ignored by PID 1
    while not ready.exists():
        assert time.monotonic() < deadline, f"task {tid} never became ready"
        time.sleep(0.1)
    yield tid
    ready.unlink(missing_ok=True)
    run(ctd, "task", "kill", "-s", "SIGKILL", tid)
    run(ctd, "task", "rm", "-f", tid)
    run(ctd, "container", "rm", tid)
    assert_clean(ctd, tid)


@pytest.mark.parametrize("sig,status", [("SIGTERM", 143), ("SIGKILL", 137)])
def test_kill_detached(env: tuple[PrivateContainerd, Path], detached: str, sig: str, status: int) -> None:
    ctd, _ = env
    wait_status(ctd, detached, "RUNNING")
    assert run(ctd, "task", "kill", "-s", sig, detached).returncode == 0
    wait_status(ctd, detached, "STOPPED")
    assert exit_status_of_rm(ctd, detached) == status


async def update_memory_limit(ctd: PrivateContainerd, tid: str, limit: int) -> None:
    """Task/Update on the shim's own socket (its address file in the bundle), as containerd would send it."""
    from google.protobuf import any_pb2, empty_pb2

    from schemas.containerd import shim_pb2
    from shim.containerd.ttrpc import Client

    bundle = ctd.base_dir / "state" / "io.containerd.runtime.v2.task" / ctd.namespace / tid
    address = (bundle / "address").read_text().removeprefix("unix://")
    resources = any_pb2.Any(type_url="types.containerd.io/opencontainers/runtime-spec/1/LinuxResources",
                            value=json.dumps({"memory": {"limit": limit}}).encode())
    async with await Client.connect_unix(address) as client:
        await client.call("containerd.task.v2.Task", "Update", shim_pb2.UpdateTaskRequest(id=tid, resources=resources),
                          empty_pb2.Empty, timeout=30)


def test_exec_update_pause_resume_ps_metrics(env: tuple[PrivateContainerd, Path], detached: str) -> None:
    ctd, _ = env
    res = run(ctd, "task", "exec", "--exec-id", "e1", detached, "/bin/sh", "-c", "echo from exec; exit 3")
    assert (res.returncode, res.stdout) == (3, b"from exec\n"), res.stderr
    ps = run(ctd, "task", "ps", detached)
    rows = [line.split() for line in ps.stdout.decode().splitlines()[1:] if line.strip()]  # under PID INFO
    assert ps.returncode == 0 and rows and all(row[0].isdigit() for row in rows), ps
    metrics = run(ctd, "task", "metrics", detached)
    assert metrics.returncode == 0, metrics.stderr
    assert re.search(rb"memory.usage\s+[1-9]", metrics.stdout) and re.search(rb"pids.current\s+[1-9]", metrics.stdout)
    asyncio.run(update_memory_limit(ctd, detached, 96 << 20))  # ctr 1.6 has no `task update`: call the shim
    metrics = run(ctd, "task", "metrics", detached)
    assert re.search(rb"memory.usage_limit\s+%d\s" % (96 << 20), metrics.stdout), metrics.stdout
    assert run(ctd, "task", "pause", detached).returncode == 0
    assert task_status(ctd, detached) == "PAUSED"
    assert run(ctd, "task", "resume", detached).returncode == 0
    assert task_status(ctd, detached) == "RUNNING"


def test_events(env: tuple[PrivateContainerd, Path]) -> None:
    """Every event the shim publishes, in order, as `ctr events` shows them."""
    ctd, rootfs = env
    with ctr_events(ctd) as seen:
        res = run(ctd, "run", "-d", *RUNTIME, "--rootfs", str(rootfs), "ev1", "/bin/sh", "-c",
                  "while true; do sleep 0.2; done")
        assert res.returncode == 0, res.stderr
        res = run(ctd, "task", "exec", "--exec-id", "x1", "ev1", "/bin/true")
        assert res.returncode == 0, res.stderr
        for verb in ("pause", "resume"):
            assert run(ctd, "task", verb, "ev1").returncode == 0
        assert run(ctd, "task", "kill", "-s", "SIGKILL", "ev1").returncode == 0
        wait_status(ctd, "ev1", "STOPPED")
        assert run(ctd, "task", "rm", "ev1").returncode == 0
        assert run(ctd, "container", "rm", "ev1").returncode == 0
    out = seen.text
    topics = [t for t in re.findall(r"(/tasks/[a-z-]+)", out)]
    order = ["/tasks/create", "/tasks/start", "/tasks/exec-added", "/tasks/exec-started", "/tasks/paused",
             "/tasks/resumed", "/tasks/delete"]
    for topic in order:
        assert topics.count(topic) == 1, out
    assert [topics.index(t) for t in order] == sorted(topics.index(t) for t in order), out
    assert topics.count("/tasks/exit") == 2, out  # the exec's, then the init's
    assert topics.index("/tasks/exec-started") < topics.index("/tasks/exit") < topics.index("/tasks/paused")
    assert re.search(r"/tasks/exec-added .*x1", out) and re.search(r"/tasks/paused .*ev1", out), out
    assert_clean(ctd, "ev1")


def test_oom_kill_is_an_event(env: tuple[PrivateContainerd, Path]) -> None:
    """A container over its memory limit is OOM-killed: /tasks/oom is published, the exit is 137."""
    ctd, rootfs = env
    with ctr_events(ctd) as seen:
        res = run(ctd, "run", "--rm", *RUNTIME, "--memory-limit", str(32 << 20), "--rootfs", str(rootfs), "oom1",
                  "/bin/sh", "-c", "tail /dev/zero")
    out = seen.text
    assert res.returncode == 137, res.stderr
    assert re.search(r"/tasks/oom .*oom1", out), out
    assert_clean(ctd, "oom1")


def test_image_run(env: tuple[PrivateContainerd, Path], tmp_path: Path) -> None:
    ctd, _ = env
    tar = build_busybox_image_tar(tmp_path / "busybox.tar", IMAGE_REF)
    ctd.import_image(tar)
    res = run(ctd, "run", "--rm", *RUNTIME, IMAGE_REF, "img1", "/bin/sh", "-c", "echo from-image > /f; cat /f")
    assert (res.returncode, res.stdout) == (0, b"from-image\n"), res.stderr
    assert_clean(ctd, "img1")


def test_bind_mounts_of_host_paths(env: tuple[PrivateContainerd, Path], tmp_path: Path) -> None:
    """`ctr run --mount type=bind,...`: a host directory read and written, a host file read-only (its
    siblings not shared); a missing source fails the run naming it."""
    ctd, rootfs = env
    data, conf = tmp_path / "data", tmp_path / "conf"
    data.mkdir()
    conf.mkdir()
    (data / "in").write_text("dir from the host\n")
    (conf / "f").write_text("file from the host\n")
    (conf / "sibling").write_text("not shared\n")
    script = ("cat /mnt/data/in /mnt/f; echo from the container > /mnt/data/out; "
              "echo x 2>/dev/null > /mnt/f || echo read-only; ls /mnt")
    res = run(ctd, "run", "--rm", *RUNTIME, "--mount", f"type=bind,src={data},dst=/mnt/data,options=rbind:rw",
              "--mount", f"type=bind,src={conf / 'f'},dst=/mnt/f,options=rbind:ro", "--rootfs", str(rootfs), "bind1",
              "/bin/sh", "-c", script)
    assert (res.returncode, res.stdout) == (0, b"dir from the host\nfile from the host\nread-only\ndata\nf\n"), res.stderr
    assert (data / "out").read_text() == "from the container\n"
    assert (conf / "f").read_text() == "file from the host\n"
    assert_clean(ctd, "bind1")
    res = run(ctd, "run", "--rm", *RUNTIME, "--mount", f"type=bind,src={tmp_path / 'missing'},dst=/mnt/m,options=rbind",
              "--rootfs", str(rootfs), "bind2", "/bin/true")
    assert res.returncode != 0 and b"/mnt/m" in res.stderr and b"does not exist" in res.stderr, res.stderr
    run(ctd, "container", "rm", "bind2")
    assert_clean(ctd, "bind2")


def test_the_uvm_is_sized_for_the_memory_limit(env: tuple[PrivateContainerd, Path]) -> None:
    """`ctr run --memory-limit`: the container's UVM has that much memory on top of the configured 256 MiB
    (as Kata sizes its VM; the limit itself is the cgroup's, which crun sets)."""
    ctd, rootfs = env
    res = run(ctd, "run", "--rm", *RUNTIME, "--memory-limit", str(512 << 20), "--rootfs", str(rootfs), "mem1",
              "/bin/grep", "MemTotal", "/proc/meminfo")
    assert res.returncode == 0, res.stderr
    assert int(res.stdout.split()[1]) > (256 + 512 - 96) << 10, res.stdout  # less what the kernel keeps
    assert_clean(ctd, "mem1")


@pytest.mark.parametrize("scheme", ["file", "binary"])
def test_log_uri(env: tuple[PrivateContainerd, Path], tmp_path: Path, scheme: str) -> None:
    """`ctr run --log-uri`: the output goes to a file, or to a logging binary started by the shim (fd 3
    stdout, fd 4 stderr, fd 5 closed when ready, CONTAINER_ID/CONTAINER_NAMESPACE), as runc's shim does."""
    ctd, rootfs = env
    out = tmp_path / "out.log"
    if scheme == "file":
        uri = f"file://{out}"
    else:
        logger = tmp_path / "logger"
        logger.write_text('#!/bin/sh\nexec 5>&-\n'  # args: tag t1 OUT ''
                          '{ echo "$CONTAINER_NAMESPACE/$CONTAINER_ID $2"; cat <&3; cat <&4; } > "$3.tmp"\nmv "$3.tmp" "$3"\n')
        logger.chmod(0o755)
        uri = f"binary://{logger}?tag=t1&{out}"
    tid = f"log{scheme}"
    res = run(ctd, "run", "--rm", *RUNTIME, "--log-uri", uri, "--rootfs", str(rootfs), tid,
              "/bin/sh", "-c", "echo to stdout; echo to stderr >&2; exit 3")
    assert res.returncode == 3, res.stderr
    deadline = time.monotonic() + 30  # the logger finishes on its own once its input ends
    while scheme == "binary" and not out.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    expected = ["to stdout", "to stderr"] if scheme == "file" else [f"{ctd.namespace}/{tid} t1", "to stdout",
                                                                   "to stderr"]
    assert sorted(out.read_text().splitlines()) == sorted(expected)
    assert_clean(ctd, tid)


@pytest.mark.parametrize("case", ["bad-config", "empty-rootfs"])
def test_bad_input_fails_the_run_with_a_message(env: tuple[PrivateContainerd, Path], tmp_path: Path, case: str) -> None:
    """A config with an unknown key fails the shim's start; an empty rootfs fails Create: ctr shows why."""
    ctd, rootfs = env
    cfg = tmp_path / "uvm.toml"
    cfg.write_text("[uvm]\ncpus = 2\ncolour = 'red'\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    opts, root, expected = {"bad-config": (["--runtime-config-path", str(cfg)], rootfs, b"colour"),
                            "empty-rootfs": ([], empty, b"is empty")}[case]
    tid = case.replace("-", "")
    res = run(ctd, "run", "--rm", *RUNTIME, *opts, "--rootfs", str(root), tid, "/bin/true")
    assert res.returncode != 0
    assert expected in res.stderr, res.stderr
    run(ctd, "container", "rm", tid)
    assert_clean(ctd, tid)


def test_qemu_killed_under_a_running_task(env: tuple[PrivateContainerd, Path], detached: str) -> None:
    ctd, _ = env
    wait_status(ctd, detached, "RUNNING")
    qemu = qemu_processes(ctd, detached)
    assert qemu, "no QEMU process found for the task"
    for pid in qemu:
        os.kill(pid, signal.SIGKILL)
    wait_status(ctd, detached, "STOPPED")
    assert exit_status_of_rm(ctd, detached) not in (0, 143)


def test_shim_killed_then_task_rm(env: tuple[PrivateContainerd, Path], detached: str) -> None:
    """containerd sees the shim's connection drop and runs our `delete` action, which kills the VM."""
    ctd, _ = env
    wait_status(ctd, detached, "RUNNING")
    shims = [p for p in shim_processes(ctd) if f"-id\0{detached}\0".encode() in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert len(shims) == 1
    os.kill(shims[0], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while vm_processes(ctd, detached):
        assert time.monotonic() < deadline, "the VM outlived its shim"
        time.sleep(0.2)
    res = run(ctd, "task", "rm", "-f", detached)
    assert res.returncode == 0 or b"not found" in res.stderr, res.stderr  # containerd may have removed it already
    remove_ctr_fifos(ctd, detached)
    # the fixture removes the container and checks that no QEMU, mount, socket or FIFO is left


def test_twenty_sequential_runs_leave_nothing(env: tuple[PrivateContainerd, Path]) -> None:
    ctd, rootfs = env
    ids = [f"seq{i}" for i in range(20)]
    for tid in ids:
        res = run(ctd, "run", "--rm", *RUNTIME, "--rootfs", str(rootfs), tid, "/bin/echo", tid)
        assert (res.returncode, res.stdout) == (0, f"{tid}\n".encode()), res.stderr
    assert_clean(ctd, *ids)
    assert not mounts_under(ctd.base_dir / "state")


def test_runs_from_a_template(env: tuple[PrivateContainerd, Path], tmp_path: Path, suite_dir: Path) -> None:
    """start = "template" in the runtime config: the first run builds the template, then each task's
    UVM is a clone (the shim says so in containerd's log); the template outlives the tasks."""
    from shim.containerd.task import vm_id_for
    from tests.conftest import template_memory_dir
    from uvm import template

    ctd, rootfs = env
    cfg = tmp_path / "uvm.toml"
    tdir = tmp_path / "templates"
    cfg.write_text(f'layer_cache_dir = "{tmp_path / "layers"}"\n[uvm]\nstart = "template"\ntemplate_dir = "{tdir}"\n'
                   f'template_memory_dir = "{template_memory_dir(suite_dir)}"\n')
    ctd.import_image(build_busybox_image_tar(tmp_path / "busybox.tar", IMAGE_REF))
    ids = ["tmpl1", "tmpl2"]
    for tid in ids:
        # A rootfs directory (9p), then an image (its layers hot-plugged as disks into the clone).
        source = ["--rootfs", str(rootfs), tid] if tid == "tmpl1" else [IMAGE_REF, tid]
        res = run(ctd, "run", "--rm", *RUNTIME, "--runtime-config-path", str(cfg), *source,
                  "/bin/sh", "-c", f"echo {tid} from $(hostname)")
        # No hostname in the spec: the container sees its UVM's, which a clone takes at resume.
        assert (res.returncode, res.stdout) == (0, f"{tid} from {vm_id_for(ctd.namespace, tid)}\n".encode()), res.stderr
    log = ctd.log_path.read_text(errors="replace")
    for tid in ids:
        assert re.search(rf"uvm\.{ctd.namespace}\.{tid}: started from a template", log), ctd.log_tail()
    assert_clean(ctd, *ids)
    templates = [Path(p) for p in tdir.iterdir() if p.is_dir()]
    assert len(templates) == 1
    template.remove(templates[0])
