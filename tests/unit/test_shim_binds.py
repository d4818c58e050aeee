"""Bind mounts of host paths (`ctr run --mount type=bind,...`, Kubernetes volumes): staged on the host
under the task's state directory and shared into the UVM (real mounts here, no VM; the e2e suite runs
them through containerd into a real guest)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from shim.containerd import leftovers
from shim.containerd import rootfs as host_rootfs
from shim.containerd.pod import POD_TAG
from tests.unit.test_shim_task import INIT_PID, Harness, Runtime, within
from uvm import errors
from uvm.testing import Request

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")


@pytest.fixture
def sources(tmp_path: Path) -> dict[str, Path]:
    data = tmp_path / "data"
    data.mkdir()
    (data / "a").write_text("in data\n")
    conf = tmp_path / "etc"
    conf.mkdir()
    (conf / "hosts").write_text("127.0.0.1 localhost\n")
    (conf / "secret").write_text("not for the guest\n")
    return {"data": data, "hosts": conf / "hosts"}


def spec_mounts(sources: dict[str, Path]) -> list[dict[str, Any]]:
    return [{"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/data", "type": "bind", "source": str(sources["data"]), "options": ["rbind", "rw"]},
            {"destination": "/etc/hosts", "source": str(sources["hosts"]), "options": ["bind", "ro"]}]


def as_tuples(mounts: list[dict[str, Any]]) -> list[tuple[str, str | None, str | None, list[str] | None]]:
    return [(m["destination"], m.get("source"), m.get("type"), m.get("options")) for m in mounts]


def test_bind_mounts_are_the_bind_typed_or_optioned_ones(tmp_path: Path, sources: dict[str, Path]) -> None:
    (tmp_path / "rel").mkdir()
    mounts = [*spec_mounts(sources), {"destination": "/rel", "source": "rel", "type": "none", "options": ["bind"]}]
    binds = host_rootfs.bind_mounts(as_tuples(mounts), tmp_path)
    assert [(b.index, b.destination, b.source, b.readonly, b.recursive) for b in binds] == [
        (1, "/data", sources["data"], False, True), (2, "/etc/hosts", sources["hosts"], True, False),
        (3, "/rel", tmp_path / "rel", False, False)]


@pytest.mark.parametrize("source, problem", [(None, "needs a source"), ("/nonexistent/x", "does not exist"),
                                             ("/dev/null", "not a directory or regular file")])
def test_a_bad_bind_source_is_named(tmp_path: Path, source: str | None, problem: str) -> None:
    with pytest.raises(errors.InvalidArgumentError, match=problem) as e:
        host_rootfs.bind_mounts([("/x", source, "bind", None)], tmp_path)
    assert "mount /x" in str(e.value)


def test_staged_binds_are_what_the_mounts_say_and_leave_nothing(tmp_path: Path, sources: dict[str, Path]) -> None:
    stage = tmp_path / "state" / host_rootfs.BINDS_DIR
    stage.parent.mkdir()
    binds = host_rootfs.bind_mounts(as_tuples(spec_mounts(sources)), tmp_path)
    host_rootfs.stage_binds(binds, stage)
    try:
        assert sorted(p.name for p in stage.iterdir()) == ["1", "2"]  # the file's siblings are not there
        assert (stage / "1" / "a").read_text() == "in data\n"
        (stage / "1" / "b").write_text("from the guest\n")  # rw: reaches the host directory
        assert (sources["data"] / "b").read_text() == "from the guest\n"
        assert (stage / "2").read_text() == "127.0.0.1 localhost\n"
        with pytest.raises(OSError) as e:
            (stage / "2").write_text("x")
        assert e.value.errno == errno.EROFS
        (stage / "junk").mkdir()  # what a guest may add where some bind is writable: removed with the stage
        (stage / "junk" / "f").write_text("x")
    finally:
        assert host_rootfs.unstage_binds(stage)
    assert not stage.exists() and not host_rootfs.mount_points_under(tmp_path)
    assert (sources["data"] / "a").read_text() == "in data\n" and sources["hosts"].exists()
    assert not host_rootfs.unstage_binds(stage)


def test_a_failed_staging_is_undone(tmp_path: Path, sources: dict[str, Path]) -> None:
    binds = host_rootfs.bind_mounts(as_tuples(spec_mounts(sources)), tmp_path)
    sources["hosts"].unlink()  # gone between the check and the mount: a file source, now missing
    stage = tmp_path / host_rootfs.BINDS_DIR
    with pytest.raises(errors.InvalidArgumentError, match="/etc/hosts"):
        host_rootfs.stage_binds(binds, stage)
    assert not stage.exists() and not host_rootfs.mount_points_under(tmp_path)


def test_delete_of_a_dead_shims_bundle_unstages_its_binds(tmp_path: Path, sources: dict[str, Path]) -> None:
    """A pod's container's task directory (<pod>/<id>: its binds, its rootfs), as its state file names it."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    task_dir = tmp_path / "pod" / "c1"
    task_dir.mkdir(parents=True)
    host_rootfs.stage_binds(host_rootfs.bind_mounts(as_tuples(spec_mounts(sources)), tmp_path),
                            task_dir / host_rootfs.BINDS_DIR)
    leftovers.record(bundle, {"task_dir": str(task_dir)})
    done = leftovers.clean(bundle)
    assert done == [f"unmounted and removed {task_dir}"]
    assert not host_rootfs.mount_points_under(tmp_path) and not task_dir.exists()


async def test_a_task_shares_its_bind_sources_and_the_guest_is_told_where(
        tmp_path: Path, sources: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness(tmp_path)
    spec = json.loads((h.task.bundle / "config.json").read_text())
    spec["mounts"] = spec_mounts(sources)
    spec["linux"] = {"namespaces": [{"type": "network", "path": "/var/run/netns/cni-1"}, {"type": "pid"}]}
    (h.task.bundle / "config.json").write_text(json.dumps(spec))
    seen: list[dict[str, Any]] = []

    def create(runtime: Runtime, req: Request) -> dict[str, Any]:
        seen.append(req.params)
        runtime.running.add(INIT_PID)
        return {"pid": INIT_PID}

    monkeypatch.setattr(Runtime, "create", create)
    stage = h.task.pod.dir.binds("t1")
    try:
        await h.create()
        assert h.task.vm is not None
        # One share, the pod directory: the task's rootfs and its binds are under it (<id>/rootfs, <id>/binds).
        assert [(s.tag, s.host_path, s.readonly) for s in h.task.vm.config.shares] == [
            (POD_TAG, h.task.pod.dir.path, False)]
        assert host_rootfs.mount_points_under(stage)
        [params] = seen
        assert params["rootfs"] == {"share": POD_TAG, "path": "t1/rootfs"}
        assert params["mount_sources"] == [{"index": 1, "share": POD_TAG, "path": "t1/binds/1"},
                                           {"index": 2, "share": POD_TAG, "path": "t1/binds/2"}]
        assert params["spec"]["mounts"] == spec_mounts(sources)  # the guest rewrites the sources
        # The container shares its UVM's network namespace (its NIC stands in for the named one's veth).
        assert params["spec"]["linux"]["namespaces"] == [{"type": "pid"}]
    finally:
        await within(h.task.teardown())
    assert not h.task.pod.dir.path.exists() and not host_rootfs.mount_points_under(tmp_path)


PROPAGATION = """
import subprocess, sys
from pathlib import Path
from shim.containerd import rootfs
base = Path(sys.argv[1])
run = lambda *a: subprocess.run(a, check=True)
run("mount", "-t", "tmpfs", "tmpfs", str(base))  # a shared mount, as systemd's / is
run("mount", "--make-shared", str(base))
src = base / "src"
(src / "sub").mkdir(parents=True)
run("mount", "-t", "tmpfs", "tmpfs", str(src / "sub"))  # the user's own submount
(src / "sub" / "f").write_text("user data")
stage = base / "state" / "binds"
stage.parent.mkdir()
binds = rootfs.bind_mounts([("/v", str(src), "bind", ["rbind", "ro"])], base)
rootfs.stage_binds(binds, stage)
try:
    (stage / "0" / "sub" / "f").write_text("from the guest")
    print("WRITABLE")
except OSError as e:
    print("errno", e.errno)
rootfs.unstage_binds(stage)
print("SOURCE", (src / "sub" / "f").read_text(), rootfs.is_mountpoint(src / "sub"))
"""


def test_unstaging_an_rbind_of_a_shared_mount_keeps_the_users_submounts(tmp_path: Path) -> None:
    """A source on a shared mount with a submount, bound rbind,ro: the submount's copy is read-only too,
    and unmounting the copies leaves the user's submount mounted (in a private mount namespace)."""
    res = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, "-c", PROPAGATION,
                          str(tmp_path)], capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[2])
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [f"errno {errno.EROFS}", "SOURCE user data True"]
