"""shim.containerd.cgroups: a spec's linux.cgroupsPath as a path in a hierarchy (cgroupfs paths, and systemd's
slice:prefix:name as runc expands it), which hierarchies there are, and a placement done and undone in a
fake cgroup v2 root (a temporary directory: nothing here touches the host's cgroups)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shim.containerd import cgroups
from uvm import errors

# -- relative_path ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("cgroups_path", "expected"), [
    # cgroupfs (kubelet's cgroupfs driver): a path, taken from the hierarchy's root.
    ("/kubepods/besteffort/pod123/abc", "kubepods/besteffort/pod123/abc"),
    ("/kubepods/pod123/abc/", "kubepods/pod123/abc"),
    ("kubepods/pod123/abc", "kubepods/pod123/abc"),
    ("/kubepods/pod:1/abc", "kubepods/pod:1/abc"),  # a colon inside a path is no systemd form
    # systemd (kubelet's systemd driver): the slice nested as systemd nests it, the unit <prefix>-<name>.scope.
    ("kubepods-besteffort-pod123.slice:cri-containerd:abc",
     "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod123.slice/cri-containerd-abc.scope"),
    ("kubelet-kubepods-burstable-pod83b0_9676.slice:cri-containerd:18b2",
     "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/"
     "kubelet-kubepods-burstable-pod83b0_9676.slice/cri-containerd-18b2.scope"),
    ("system.slice:runc:abc", "system.slice/runc-abc.scope"),
    ("user-1000.slice:docker:x", "user.slice/user-1000.slice/docker-x.scope"),
    ("-.slice:runc:abc", "runc-abc.scope"),  # the root slice
])
def test_relative_path(cgroups_path: str, expected: str) -> None:
    assert cgroups.relative_path(cgroups_path) == expected


@pytest.mark.parametrize("cgroups_path", [
    "",
    "/",
    "///",
    "/kubepods/../etc",
    "../kubepods",
    "/kubepods/pod 1",  # characters no cgroup of ours has
    "/kubepods/pod\n1",
    "kubepods.slice:cri-containerd",  # two parts
    "kubepods.slice:cri-containerd:abc:def",  # four
    "kubepods.slice::abc",  # no prefix
    "kubepods.slice:cri-containerd:",  # no name
    "kubepods:cri-containerd:abc",  # not a slice
    "kubepods.slice:cri-containerd:../../x",
])
def test_relative_path_refuses_bad_input_by_name(cgroups_path: str) -> None:
    with pytest.raises(errors.InvalidArgumentError) as e:
        cgroups.relative_path(cgroups_path)
    assert "linux.cgroupsPath" in str(e.value) and repr(cgroups_path) in str(e.value)


def test_an_empty_slice_is_system_slice_as_runc_reads_it() -> None:
    assert cgroups.relative_path(":runc:abc") == "system.slice/runc-abc.scope"


@pytest.mark.parametrize("cgroups_path", [
    "test--a.slice:p:n",
    "-test.slice:p:n",
    "test-.slice:p:n",
    ".slice:p:n",
    "a/b.slice:p:n",
])
def test_a_slice_name_runc_refuses_is_refused(cgroups_path: str) -> None:
    with pytest.raises(errors.InvalidArgumentError):
        cgroups.relative_path(cgroups_path)


# -- hierarchies -----------------------------------------------------------------------------------------


def fake_v2_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory standing for /sys/fs/cgroup on a cgroup v2 host (it has cgroup.controllers). Checked to be
    the only hierarchy, so a test can never write into the host's cgroups."""
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpu memory pids\n")
    monkeypatch.setattr(cgroups, "CGROUP_ROOT", root)
    assert cgroups.hierarchies() == [root]
    return root


def test_a_v2_host_has_one_hierarchy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = fake_v2_root(tmp_path, monkeypatch)
    assert cgroups.hierarchies() == [root]


def test_a_v1_host_has_every_mounted_v1_hierarchy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without cgroup.controllers at the root: the mount points of type cgroup (not cgroup2) in mountinfo."""
    monkeypatch.setattr(cgroups, "CGROUP_ROOT", tmp_path)
    expected = set()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            before, _, after = line.partition(" - ")
            if after.split()[0] == "cgroup":
                expected.add(Path(before.split()[4]))
    assert cgroups.hierarchies() == sorted(expected)


# -- place and undo (a fake v2 root) ---------------------------------------------------------------------


def origin_in(root: Path) -> Path:
    """Where place() finds this process in a v2 hierarchy: /proc/self/cgroup's 0:: line, else the root."""
    with open(f"/proc/{os.getpid()}/cgroup") as f:
        rel = next((line.rstrip("\n").split(":", 2)[2] for line in f if line.startswith("0::")), "/")
    return root / rel.lstrip("/")


def kernel_files_gone(placement: cgroups.Placement) -> None:
    """In cgroupfs a directory's interface files do not keep rmdir from removing it; in the fake they would:
    the cgroup.procs files place() wrote in the directories it made are removed first."""
    for d in placement.made:
        (d / "cgroup.procs").unlink(missing_ok=True)


def test_place_makes_what_is_missing_and_undo_removes_only_that(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kubelet's pod cgroup exists: the sandbox's is made in it; undo moves the pid back and removes the
    sandbox's cgroup, never the kubelet's."""
    root = fake_v2_root(tmp_path, monkeypatch)
    (root / "kubepods" / "pod123").mkdir(parents=True)
    pid = os.getpid()
    placement = cgroups.place(pid, "/kubepods/pod123/sb/inner")
    target = root / "kubepods" / "pod123" / "sb" / "inner"
    assert placement.made == [target.parent, target]  # shallowest first
    assert placement.joined == [target]
    assert (target / "cgroup.procs").read_text() == str(pid)
    assert placement.origin == {root: origin_in(root)}
    origin_in(root).mkdir(parents=True, exist_ok=True)
    kernel_files_gone(placement)
    placement.undo(pid)
    assert (origin_in(root) / "cgroup.procs").read_text() == str(pid)
    assert not (root / "kubepods" / "pod123" / "sb").exists()
    assert (root / "kubepods" / "pod123").is_dir()
    assert placement.made == [] and placement.joined == []
    placement.undo(pid)  # again: nothing more to do


def test_place_in_a_systemd_slice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = fake_v2_root(tmp_path, monkeypatch)
    placement = cgroups.place(os.getpid(), "kubepods-besteffort-pod1.slice:cri-containerd:sb")
    target = root / "kubepods.slice" / "kubepods-besteffort.slice" / "kubepods-besteffort-pod1.slice" / \
        "cri-containerd-sb.scope"
    assert placement.joined == [target]
    assert placement.made[0] == root / "kubepods.slice" and placement.made[-1] == target
    kernel_files_gone(placement)
    placement.undo(os.getpid())
    assert not (root / "kubepods.slice").exists()


def test_undo_leaves_a_cgroup_it_cannot_remove(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """A cgroup with a process left in it (here: a file) stays, and says so in the log; undo does not raise."""
    root = fake_v2_root(tmp_path, monkeypatch)
    placement = cgroups.place(os.getpid(), "/pod/sb")
    placement.undo(os.getpid())  # the fake's cgroup.procs is still there: rmdir fails
    assert (root / "pod" / "sb").is_dir()
    assert "not removed" in caplog.text


def test_place_that_fails_undoes_what_it_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cgroup that cannot be made half-way down: InvalidArgumentError naming cgroupsPath; what was made is gone."""
    root = fake_v2_root(tmp_path, monkeypatch)
    path = "/pod/sb/" + "x" * 300  # the last one cannot be made (its name is too long)
    with pytest.raises(errors.InvalidArgumentError) as e:
        cgroups.place(os.getpid(), path)
    assert repr(path) in str(e.value) and "cannot join" in str(e.value)
    assert sorted(p.name for p in root.iterdir()) == ["cgroup.controllers"]


def test_place_where_a_file_is_in_the_way(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = fake_v2_root(tmp_path, monkeypatch)
    (root / "pod").write_text("not a cgroup")
    with pytest.raises(errors.InvalidArgumentError, match="cannot join"):
        cgroups.place(os.getpid(), "/pod/sb")
    assert (root / "pod").read_text() == "not a cgroup"


def test_place_refuses_a_bad_path_before_touching_anything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = fake_v2_root(tmp_path, monkeypatch)
    with pytest.raises(errors.InvalidArgumentError, match="not a usable cgroup path"):
        cgroups.place(os.getpid(), "/pod/../../escape")
    assert sorted(p.name for p in root.iterdir()) == ["cgroup.controllers"]
    assert not (tmp_path / "escape").exists()
