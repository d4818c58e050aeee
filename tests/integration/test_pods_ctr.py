"""A pod through plain `ctr`, as containerd's CRI plugin would drive it: a sandbox task and containers whose
specs carry CRI's annotations (io.kubernetes.cri.container-type, sandbox-id) and name the sandbox's
/proc/<pid>/ns/* (given whole with `ctr run --config`). One shim, one UVM, one kernel for the pod; the
containers share its network (localhost), IPC and UTS namespaces; the pod's life and its bad input."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shim.containerd_env import PrivateContainerd
from tests.integration.ctr import RUNTIME, assert_clean, qemu_processes, run, shim_processes, task_status, wait_status
from tests.integration.ctr import nothing_outlives_its_test as _nothing_outlives_its_test

pytestmark = pytest.mark.vm

SANDBOX = "podsb"
LOOP = "trap 'exit 0' TERM; while true; do sleep 1; done"


@pytest.fixture(scope="module")
def env(containerd_env: tuple[PrivateContainerd, Path]) -> tuple[PrivateContainerd, Path]:
    return containerd_env


@pytest.fixture(autouse=True)
def nothing_outlives_its_test(env: tuple[PrivateContainerd, Path]) -> Iterator[None]:
    yield from _nothing_outlives_its_test(env)


def task_pid(ctd: PrivateContainerd, tid: str) -> int:
    for line in run(ctd, "task", "ls").stdout.decode().splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == tid:
            return int(fields[1])
    raise AssertionError(f"task {tid} not listed")


def spec_file(ctd: PrivateContainerd, tmp_path: Path, rootfs: Path, name: str, args: list[str],
              annotations: dict[str, str], join: int | None = None, readonly: bool = False,
              mounts: list[dict[str, Any]] | None = None) -> Path:
    spec = json.loads(run(ctd, "oci", "spec").stdout)
    spec["root"] = {"path": str(rootfs), "readonly": readonly}
    spec["process"]["args"] = args
    spec["annotations"] = annotations
    spec["mounts"] += mounts or []
    if join is not None:  # as CRI writes a pod container's spec: the sandbox task's namespaces, by its pid
        for ns in spec["linux"]["namespaces"]:
            if ns["type"] in ("network", "ipc", "uts"):
                ns["path"] = f"/proc/{join}/ns/{ns['type']}"
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(spec))
    return path


def sandbox_annotations() -> dict[str, str]:
    return {"io.kubernetes.cri.container-type": "sandbox", "io.kubernetes.cri.sandbox-id": SANDBOX}


def container_annotations(sandbox: str = SANDBOX) -> dict[str, str]:
    return {"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": sandbox}


def remove(ctd: PrivateContainerd, *ids: str) -> None:
    for tid in ids:
        run(ctd, "task", "rm", "-f", tid)
        run(ctd, "container", "rm", tid)


def test_a_pod_is_one_shim_one_uvm_and_its_containers_share_localhost_ipc_and_uts(
        env: tuple[PrivateContainerd, Path], tmp_path: Path) -> None:
    ctd, rootfs = env
    ids = [SANDBOX, "podweb", "podclient"]
    try:
        # The sandbox: a read-only root with CRI's binds (/etc/resolv.conf, /etc/hostname) the image lacks.
        resolv = tmp_path / "resolv.conf"
        resolv.write_text("nameserver 10.96.0.10\nsearch pod.test\n")
        binds = [{"destination": "/etc/resolv.conf", "type": "bind", "source": str(resolv), "options": ["rbind", "ro"]}]
        for stale in ("etc/resolv.conf",):
            (rootfs / stale).unlink(missing_ok=True)
        sb = spec_file(ctd, tmp_path, rootfs, "sb", ["/bin/sh", "-c", LOOP], sandbox_annotations(), readonly=True,
                       mounts=binds)
        res = run(ctd, "run", "-d", *RUNTIME, "--config", str(sb), SANDBOX)
        assert res.returncode == 0, res.stderr
        pid = task_pid(ctd, SANDBOX)
        qemu = qemu_processes(ctd, SANDBOX)
        assert qemu == [pid]  # the sandbox task's pid is its UVM's QEMU
        web = spec_file(ctd, tmp_path, rootfs, "web", ["/bin/sh", "-c", "mkdir -p /tmp/podwww && echo from the pod "
                        "> /tmp/podwww/index.html && exec httpd -f -p 127.0.0.1:8080 -h /tmp/podwww"],
                        container_annotations(), join=pid, mounts=binds)
        res = run(ctd, "run", "-d", *RUNTIME, "--config", str(web), "podweb")
        assert res.returncode == 0, res.stderr
        client = spec_file(ctd, tmp_path, rootfs, "client", ["/bin/sh", "-c", LOOP], container_annotations(), join=pid)
        res = run(ctd, "run", "-d", *RUNTIME, "--config", str(client), "podclient")
        assert res.returncode == 0, res.stderr
        assert len(shim_processes(ctd)) == 1 and len(qemu_processes(ctd, SANDBOX)) == 1  # one shim, one UVM
        assert task_pid(ctd, "podweb") == pid  # every task of the pod names its QEMU
        # One kernel, one network (localhost), one UTS and IPC namespace for the pod.
        probe = "cat /proc/sys/kernel/random/boot_id; hostname; readlink /proc/self/ns/ipc; readlink /proc/self/ns/uts"
        seen = {}
        for tid in ids:
            res = run(ctd, "task", "exec", "--exec-id", f"probe{tid}", tid, "/bin/sh", "-c", probe)
            assert res.returncode == 0, res.stderr
            seen[tid] = res.stdout
        assert seen[SANDBOX] == seen["podweb"] == seen["podclient"], seen
        deadline = time.monotonic() + 120
        while True:
            res = run(ctd, "task", "exec", "--exec-id", f"get{int(time.monotonic())}", "podclient", "wget", "-q",
                      "-O", "-", "http://127.0.0.1:8080/")
            if res.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert res.stdout == b"from the pod\n", res.stderr
        res = run(ctd, "task", "exec", "--exec-id", "dns", "podweb", "cat", "/etc/resolv.conf")
        assert res.stdout == resolv.read_bytes()
        # A container's end is not the pod's: the UVM goes on.
        assert run(ctd, "task", "kill", "-s", "SIGKILL", "podclient").returncode == 0
        wait_status(ctd, "podclient", "STOPPED")
        remove(ctd, "podclient")
        assert task_status(ctd, SANDBOX) == "RUNNING" and qemu_processes(ctd, SANDBOX) == [pid]
        res = run(ctd, "task", "exec", "--exec-id", "still", "podweb", "true")
        assert res.returncode == 0, res.stderr
        # Kill(all) of the sandbox reaches every container of the pod (CRI's StopPodSandbox).
        assert run(ctd, "task", "kill", "-a", "-s", "SIGKILL", SANDBOX).returncode == 0
        wait_status(ctd, "podweb", "STOPPED")
        wait_status(ctd, SANDBOX, "STOPPED")
    finally:
        remove(ctd, "podclient", "podweb", SANDBOX)
    assert_clean(ctd, *ids)


def test_a_container_without_its_sandbox_or_a_second_sandbox_is_refused(env: tuple[PrivateContainerd, Path],
                                                                        tmp_path: Path) -> None:
    ctd, rootfs = env
    orphan = spec_file(ctd, tmp_path, rootfs, "orphan", ["/bin/true"], container_annotations("nosuchpod"))
    res = run(ctd, "run", *RUNTIME, "--config", str(orphan), "orphan")
    assert res.returncode != 0 and b"its sandbox nosuchpod does not run in this shim" in res.stderr, res.stderr
    run(ctd, "container", "rm", "orphan")
    assert_clean(ctd, "orphan")
    sb = spec_file(ctd, tmp_path, rootfs, "sb", ["/bin/sh", "-c", LOOP], sandbox_annotations())
    try:
        assert run(ctd, "run", "-d", *RUNTIME, "--config", str(sb), SANDBOX).returncode == 0
        pid = task_pid(ctd, SANDBOX)
        # A container whose bind source is missing: refused by name, the pod untouched.
        bad = spec_file(ctd, tmp_path, rootfs, "bad", ["/bin/true"], container_annotations(), join=pid,
                        mounts=[{"destination": "/data", "type": "bind", "source": str(tmp_path / "gone"),
                                 "options": ["rbind"]}])
        res = run(ctd, "run", *RUNTIME, "--config", str(bad), "podbad")
        assert res.returncode != 0 and str(tmp_path / "gone").encode() in res.stderr, res.stderr
        run(ctd, "container", "rm", "podbad")
        assert task_status(ctd, SANDBOX) == "RUNNING"
        res = run(ctd, "task", "exec", "--exec-id", "alive", SANDBOX, "true")
        assert res.returncode == 0, res.stderr
    finally:
        remove(ctd, SANDBOX)
    assert_clean(ctd, SANDBOX, "podbad")
    assert not os.path.exists(tmp_path / "gone")
