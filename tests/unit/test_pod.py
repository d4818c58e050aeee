"""A pod in one UVM (shim/containerd/pod.py and the pod side of task.py and service.py), with no QEMU and no
containerd: the pure rules (which task is what, the namespaces a container joins inside the UVM, the mount
points of a read-only root, a sandbox's size from CRI's annotations), then a sandbox task and its containers
sharing one Pod over a UtilityVM on the fake backend, with a FakeGuest playing the guest's container runtime,
and the task service's edge over a real ttrpc connection.

The pod directory and every task's root filesystem are bind mounts on the host: the tests that create a task
which gets that far run as root only, and check that no mount of theirs is left behind."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from google.protobuf import any_pb2, empty_pb2
from google.protobuf.message import Message

from schemas import agent as proto
from schemas import oci
from schemas.containerd import events_task_pb2 as ev
from schemas.containerd import shim_pb2 as pb
from schemas.shim_options import ShimOptions
from schemas.uvm_config import UvmConfig
from shim.containerd.events import Publisher
from shim.containerd.pod import (
    CONTAINER_TYPE,
    RUNC_GROUP,
    SANDBOX_ID,
    Pod,
    Role,
    group_of,
    make_mount_targets,
    rewrite_namespaces,
    role_of,
)
from shim.containerd.service import SERVICE, TaskService, to_status
from shim.containerd.task import INIT, SANDBOX_CPU_PERIOD, SANDBOX_CPU_QUOTA, SANDBOX_MEMORY, Status, Task, uvm_shape
from shim.containerd.ttrpc import Client, Code, TtrpcError
from tests.unit.ttrpc_harness import served
from uvm import errors
from uvm.lifecycle import VmState
from uvm.testing import ErrorReply, FakeBackendFactory, FakeGuest, Request, make_test_config
from uvm.vm import UtilityVM

pytestmark = pytest.mark.timeout(20)

T = TypeVar("T")
DEADLINE = 5.0
MIB = 1 << 20
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the pod directory and rootfs are bind mounts: root only")


async def within(aw: Awaitable[T], timeout: float = DEADLINE) -> T:
    return await asyncio.wait_for(aw, timeout)


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below path, read from /proc/self/mountinfo (independently of the code under test)."""
    top = str(path.resolve())
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split(" ")[4])
            if point == top or point.startswith(f"{top}/"):
                found.append(point)
    return found


def sandbox_annotations(sid: str = "sb") -> dict[str, str]:
    return {CONTAINER_TYPE: "sandbox", SANDBOX_ID: sid}


def container_annotations(sandbox: str = "sb") -> dict[str, str]:
    return {CONTAINER_TYPE: "container", SANDBOX_ID: sandbox}


def cri_namespaces(sandbox_pid: int) -> list[dict[str, str]]:
    """A pod container's namespaces as CRI writes them: the sandbox task's network, IPC and UTS by its pid."""
    return [{"type": "pid"}, {"type": "ipc", "path": f"/proc/{sandbox_pid}/ns/ipc"},
            {"type": "uts", "path": f"/proc/{sandbox_pid}/ns/uts"}, {"type": "mount"},
            {"type": "network", "path": f"/proc/{sandbox_pid}/ns/net"}]


def spec_of(**fields: Any) -> oci.Spec:
    return oci.Spec.model_validate({"process": {"args": ["sh"]}, **fields})


# -- role_of, group_of -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("annotations", "task_id", "role"), [
    (sandbox_annotations("sb"), "sb", Role("sandbox", "sb")),
    ({CONTAINER_TYPE: "sandbox"}, "sb", Role("sandbox", "sb")),  # no sandbox id: its own
    (container_annotations("sb"), "c1", Role("container", "sb")),
    ({CONTAINER_TYPE: "container", RUNC_GROUP: "g"}, "c1", Role("container", "g")),
    ({CONTAINER_TYPE: "container", SANDBOX_ID: "", RUNC_GROUP: "g"}, "c1", Role("container", "g")),
    ({CONTAINER_TYPE: "container"}, "c1", Role("container", "")),  # names none: refused at create
    ({RUNC_GROUP: "g"}, "c1", Role("container", "g")),  # runc's grouping without CRI
    ({RUNC_GROUP: "c1"}, "c1", Role("standalone", "c1")),  # the group's first task
    ({RUNC_GROUP: ""}, "c1", Role("standalone", "c1")),
    (None, "t1", Role("standalone", "t1")),
    ({}, "t1", Role("standalone", "t1")),
    ({CONTAINER_TYPE: "podsandbox", SANDBOX_ID: "sb"}, "t1", Role("standalone", "t1")),  # a type CRI never writes
    ({CONTAINER_TYPE: "", SANDBOX_ID: "sb"}, "t1", Role("standalone", "t1")),
    ({SANDBOX_ID: "sb"}, "t1", Role("standalone", "t1")),  # a sandbox id without a type
])
def test_role_of(annotations: dict[str, str] | None, task_id: str, role: Role) -> None:
    assert role_of(annotations, task_id) == role
    assert role.brings_the_uvm == (role.kind != "container")


@pytest.mark.parametrize(("annotations", "task_id", "group"), [
    (sandbox_annotations("sb"), "sb", "sb"),
    (container_annotations("sb"), "c1", "sb"),
    ({RUNC_GROUP: "g", SANDBOX_ID: "sb"}, "c1", "g"),  # runc's shim: the group annotation first
    ({RUNC_GROUP: "", SANDBOX_ID: "sb"}, "c1", "sb"),
    ({SANDBOX_ID: ""}, "t1", "t1"),
    ({}, "t1", "t1"),
    (None, "t1", "t1"),
])
def test_group_of(annotations: dict[str, str] | None, task_id: str, group: str) -> None:
    assert group_of(annotations, task_id) == group


def test_a_container_joins_the_sandbox_of_the_shim_it_is_sent_to() -> None:
    annotations = {CONTAINER_TYPE: "container", SANDBOX_ID: "sb", RUNC_GROUP: "g"}
    assert role_of(annotations, "c1").sandbox_id == group_of(annotations, "c1")


# -- rewrite_namespaces ----------------------------------------------------------------------------------


def namespaces_after(namespaces: Any, host_pid: int | None, guest_pid: int | None) -> Any:
    spec = spec_of(linux={"namespaces": namespaces})
    rewrite_namespaces(spec, host_pid, guest_pid)
    assert spec.linux is not None
    return spec.linux["namespaces"]


def test_a_pod_containers_namespaces_are_the_pause_processes_in_the_guest() -> None:
    """Network goes (the UVM's is the pod's); IPC and UTS at /proc/<QEMU's pid> become the pause process's."""
    assert namespaces_after(cri_namespaces(4242), 4242, 100) == [
        {"type": "pid"}, {"type": "ipc", "path": "/proc/100/ns/ipc"}, {"type": "uts", "path": "/proc/100/ns/uts"},
        {"type": "mount"}]


def test_a_shared_pid_namespace_is_the_pause_processes() -> None:
    assert namespaces_after([{"type": "pid", "path": "/proc/4242/ns/pid"}], 4242, 100) == [
        {"type": "pid", "path": "/proc/100/ns/pid"}]


@pytest.mark.parametrize("entry", [
    {"type": "ipc", "path": "/proc/999/ns/ipc"},  # another process's
    {"type": "uts", "path": "/var/run/utsns/x"},
    {"type": "ipc", "path": "/proc/4242/ns/uts"},  # the sandbox's, but of another type
    {"type": "mount", "path": "/proc/4242/ns/mnt"},  # a type the pod does not share
    {"type": "cgroup", "path": "/proc/4242/ns/cgroup"},
    {"type": "user", "path": "/proc/1/ns/user"},
    {"type": "pid", "path": "/proc/42420/ns/pid"},  # a pid that only starts like the sandbox's
])
def test_a_host_namespace_path_becomes_a_new_namespace_of_that_type(entry: dict[str, str]) -> None:
    assert namespaces_after([entry], 4242, 100) == [{"type": entry["type"]}]


@pytest.mark.parametrize(("host_pid", "guest_pid"), [(None, None), (4242, None), (None, 100)])
def test_without_a_sandbox_every_path_is_the_hosts(host_pid: int | None, guest_pid: int | None) -> None:
    """A standalone task (or one whose pause pid is unknown) joins nothing: each entry a new namespace."""
    assert namespaces_after(cri_namespaces(4242), host_pid, guest_pid) == [
        {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]


def test_pathless_and_odd_entries_are_left_alone() -> None:
    odd: list[Any] = [{"type": "ipc"}, "not an entry", {"type": "uts", "path": None}, {"path": "/proc/4242/ns/ipc"},
                      {"type": "network"}]
    assert namespaces_after(odd, 4242, 100) == [{"type": "ipc"}, "not an entry", {"type": "uts", "path": None}, {}]


@pytest.mark.parametrize("linux", [None, {}, {"namespaces": None}, {"namespaces": {"type": "network"}}])
def test_a_spec_without_a_namespace_list_is_unchanged(linux: dict[str, Any] | None) -> None:
    spec = spec_of(linux=linux)
    before = spec.model_dump()
    rewrite_namespaces(spec, 4242, 100)
    assert spec.model_dump() == before


# -- make_mount_targets ----------------------------------------------------------------------------------


def bind(destination: str, source: Path | str, *options: str) -> oci.Mount:
    return oci.Mount(destination=destination, type="bind", source=str(source), options=["rbind", *options])


@pytest.fixture
def host_files(tmp_path: Path) -> tuple[Path, Path]:
    """A host file and a host directory to bind, outside any rootfs."""
    host = tmp_path / "host"
    host.mkdir()
    (host / "resolv.conf").write_text("nameserver 10.0.0.1\n")
    (host / "volume").mkdir()
    return host / "resolv.conf", host / "volume"


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) + ("/" if p.is_dir() and not p.is_symlink() else "")
                  for p in path.rglob("*"))


def test_missing_mount_points_are_made_a_file_for_a_file_bind(tmp_path: Path, host_files: tuple[Path, Path]) -> None:
    """CRI binds /etc/resolv.conf, /etc/hosts, /etc/hostname into images that may have none."""
    host_file, host_dir = host_files
    root = tmp_path / "root"
    root.mkdir()
    make_mount_targets(root, [
        bind("/etc/resolv.conf", host_file, "ro"),
        oci.Mount(destination="/etc/hosts", type="none", source=str(host_file), options=["bind"]),
        bind("/data/volume", host_dir),
        oci.Mount(destination="/proc", type="proc", source="proc"),
        oci.Mount(destination="/dev/shm", type="tmpfs", source=str(host_file)),  # not a bind: a directory
        oci.Mount(destination="/./run/./secrets/", type="tmpfs", source="tmpfs"),
    ], tmp_path)
    assert tree(root) == ["data/", "data/volume/", "dev/", "dev/shm/", "etc/", "etc/hosts", "etc/resolv.conf",
                          "proc/", "run/", "run/secrets/"]
    assert (root / "etc" / "resolv.conf").read_text() == ""  # a mount point, not a copy


def test_what_the_rootfs_has_is_left_as_it_is(tmp_path: Path, host_files: tuple[Path, Path]) -> None:
    host_file, host_dir = host_files
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "resolv.conf").write_text("the image's own\n")
    (root / "bin").write_text("a file where a directory is wanted")
    make_mount_targets(root, [bind("/etc/resolv.conf", host_file), bind("/bin/tool", host_dir), bind("/", host_dir)], tmp_path)
    assert tree(root) == ["bin", "etc/", "etc/resolv.conf"]
    assert (root / "etc" / "resolv.conf").read_text() == "the image's own\n"


@pytest.mark.parametrize("link", ["absolute", "relative"])
def test_a_symlink_in_the_rootfs_is_never_followed_out_of_it(tmp_path: Path, host_files: tuple[Path, Path],
                                                            link: str) -> None:
    """An image whose /etc (or a mount point itself) is a symlink to a directory outside the root: nothing is
    created outside (crun refuses such a target later)."""
    host_file, host_dir = host_files
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    target = str(outside) if link == "absolute" else "../outside"
    (root / "etc").symlink_to(target)
    (root / "mnt").symlink_to(target)
    (root / "dangling").symlink_to(str(outside / "nothing"))
    make_mount_targets(root, [bind("/etc/resolv.conf", host_file), bind("/etc/deep/er", host_dir),
                              bind("/mnt", host_dir), bind("/mnt/sub", host_dir), bind("/dangling", host_file)], tmp_path)
    assert list(outside.iterdir()) == []
    assert tree(root) == ["dangling", "etc", "mnt"]
    assert (root / "etc").is_symlink() and (root / "mnt").is_symlink() and (root / "dangling").is_symlink()


@pytest.mark.parametrize("destination", ["/../escape", "/a/../../escape", "/..", "../escape", "/a/b/.."])
def test_a_destination_with_dot_dot_is_ignored(tmp_path: Path, host_files: tuple[Path, Path], destination: str) -> None:
    _, host_dir = host_files
    root = tmp_path / "deep" / "root"
    root.mkdir(parents=True)
    make_mount_targets(root, [bind(destination, host_dir)], tmp_path)
    assert list(root.iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == ["root"]
    assert not (tmp_path / "escape").exists()


def test_a_mount_point_that_cannot_be_made_is_an_invalid_argument_naming_it(tmp_path: Path,
                                                                           host_files: tuple[Path, Path]) -> None:
    _, host_dir = host_files
    root = tmp_path / "root"
    root.mkdir()
    long = "/data/" + "x" * 300
    with pytest.raises(errors.InvalidArgumentError) as e:
        make_mount_targets(root, [bind(long, host_dir)], tmp_path)
    assert long in str(e.value) and "mount point" in str(e.value)
    with pytest.raises(errors.InvalidArgumentError, match="/etc/hosts"):
        make_mount_targets(tmp_path / "no-root", [bind("/etc/hosts", host_dir)], tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a directory whatever its mode")
def test_a_read_only_directory_is_an_invalid_argument(tmp_path: Path, host_files: tuple[Path, Path]) -> None:
    _, host_dir = host_files
    root = tmp_path / "root"
    root.mkdir()
    root.chmod(0o500)
    try:
        with pytest.raises(errors.InvalidArgumentError, match="/data"):
            make_mount_targets(root, [bind("/data", host_dir)], tmp_path)
    finally:
        root.chmod(0o700)


# -- uvm_shape with CRI's sandbox annotations -----------------------------------------------------------


@pytest.fixture
def host_of_8_cpus_and_64_gib(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    monkeypatch.setattr("shim.containerd.task.host_memory_mib", lambda: 64 * 1024)


@pytest.mark.usefixtures("host_of_8_cpus_and_64_gib")
@pytest.mark.parametrize(("annotations", "resources", "shape"), [
    ({}, None, (256, 1)),
    ({SANDBOX_MEMORY: str(512 * MIB)}, None, (768, 1)),
    ({SANDBOX_MEMORY: str(100 * MIB + 1)}, None, (357, 1)),  # rounded up
    ({SANDBOX_MEMORY: "0"}, None, (256, 1)),
    ({SANDBOX_MEMORY: "-1"}, None, (256, 1)),
    ({SANDBOX_CPU_QUOTA: "150000", SANDBOX_CPU_PERIOD: "100000"}, None, (256, 3)),
    ({SANDBOX_CPU_QUOTA: "50000"}, None, (256, 2)),  # no period: per 100 ms
    ({SANDBOX_CPU_QUOTA: "50000", SANDBOX_CPU_PERIOD: "0"}, None, (256, 2)),
    ({SANDBOX_CPU_QUOTA: "100000", SANDBOX_CPU_PERIOD: "50000"}, None, (256, 3)),
    ({SANDBOX_CPU_QUOTA: "-1", SANDBOX_CPU_PERIOD: "100000"}, None, (256, 1)),  # no limit
    ({SANDBOX_CPU_PERIOD: "100000"}, None, (256, 1)),
    ({SANDBOX_CPU_QUOTA: "2000000", SANDBOX_CPU_PERIOD: "100000"}, None, (256, 8)),  # the host's CPUs at most
    ({SANDBOX_MEMORY: str(1 << 50)}, None, (64 * 1024, 1)),  # the host's memory at most
    # The pod's sizing adds to the sandbox's own limits; the uvmshim annotations set either outright.
    ({SANDBOX_MEMORY: str(64 * MIB), SANDBOX_CPU_QUOTA: "100000"},
     {"memory": {"limit": 32 * MIB}, "cpu": {"quota": 100000, "period": 100000}}, (352, 3)),
    ({SANDBOX_MEMORY: str(512 * MIB), "io.uvmshim.uvm.memory_mib": "1024", "io.uvmshim.uvm.cpus": "2",
      SANDBOX_CPU_QUOTA: "400000"}, None, (1024, 2)),
])
def test_a_sandbox_is_sized_for_its_pod(annotations: dict[str, str], resources: dict[str, Any] | None,
                                        shape: tuple[int, int]) -> None:
    """As Kata reads CRI's annotations: the pod's memory (bytes) and CPU quota/period on top of the configured size."""
    spec = spec_of(annotations=annotations, linux={"resources": resources} if resources else None)
    assert uvm_shape(spec, ShimOptions()) == {"memory_mib": shape[0], "cpus": shape[1]}


@pytest.mark.parametrize(("key", "value"), [
    (SANDBOX_MEMORY, "lots"),
    (SANDBOX_MEMORY, "1.5e9"),
    (SANDBOX_MEMORY, ""),
    (SANDBOX_CPU_QUOTA, "1.5"),
    (SANDBOX_CPU_PERIOD, "100ms"),
])
def test_a_bad_sandbox_annotation_is_refused_by_name(key: str, value: str) -> None:
    with pytest.raises(errors.InvalidArgumentError) as e:
        uvm_shape(spec_of(annotations={key: value}), ShimOptions())
    assert key in str(e.value)


@pytest.mark.usefixtures("host_of_8_cpus_and_64_gib")
def test_a_negative_cpu_period_is_refused_by_name() -> None:
    spec = spec_of(annotations={SANDBOX_CPU_QUOTA: "150000", SANDBOX_CPU_PERIOD: "-1"})
    with pytest.raises(errors.InvalidArgumentError, match=SANDBOX_CPU_PERIOD):
        uvm_shape(spec, ShimOptions())


# -- a pod of tasks over the fake backend ----------------------------------------------------------------


class PodRuntime:
    """The guest's container runtime for a whole pod, in the FakeGuest: each container its own init pid; exec
    pids; a kill ends the container's processes (all, or its init) with exit notifications, as the agent does,
    unless `report_exits` is False (a guest that never tells)."""

    def __init__(self, guest: FakeGuest) -> None:
        self.guest = guest
        self.inits: dict[str, int] = {}
        self.running: dict[str, set[int]] = {}
        self.specs: dict[str, dict[str, Any]] = {}
        self.rootfs: dict[str, dict[str, Any]] = {}
        self.kills: list[tuple[str, int, bool]] = []
        self.deleted: list[str] = []
        self.create_errors: dict[str, ErrorReply] = {}
        self.report_exits = True
        self._next_pid = 100
        self._notes: set[asyncio.Task[None]] = set()
        guest.handlers.update({proto.CREATE: self.create, proto.START: self.start, proto.EXEC: self.exec,
                               proto.KILL: self.kill, proto.DELETE: self.delete})

    def _pid(self) -> int:
        pid, self._next_pid = self._next_pid, self._next_pid + 1
        return pid

    def create(self, req: Request) -> dict[str, Any] | ErrorReply:
        cid = req.params["id"]
        if cid in self.create_errors:
            return self.create_errors[cid]
        pid = self._pid()
        self.inits[cid], self.running[cid] = pid, {pid}
        self.specs[cid], self.rootfs[cid] = req.params["spec"], req.params["rootfs"]
        return {"pid": pid}

    def start(self, req: Request) -> dict[str, Any]:
        return {"pid": self.inits[req.params["id"]]}

    def exec(self, req: Request) -> dict[str, Any]:
        pid = self._pid()
        self.running.setdefault(req.params["container"], set()).add(pid)
        return {"pid": pid}

    def kill(self, req: Request) -> dict[str, Any]:
        cid, sig, everything = req.params["id"], req.params["signal"], bool(req.params["all"])
        self.kills.append((cid, sig, everything))
        if self.report_exits:
            pids = sorted(self.running.get(cid, ())) if everything else [self.inits[cid]]
            for pid in pids:
                self.exit(cid, pid, None, sig)
        return {}

    def delete(self, req: Request) -> dict[str, Any]:
        self.deleted.append(req.params["id"])
        return {}

    def exit(self, cid: str, pid: int, status: int | None, sig: int | None = None) -> None:
        """The process ends: its exit notification goes out (from a task of its own, as the agent's)."""
        self.running.get(cid, set()).discard(pid)
        note = {"event": proto.EVENT_EXIT, "container": cid, "pid": pid, "exit_status": status, "signal": sig,
                "at": time.time()}
        task = asyncio.get_running_loop().create_task(self.guest.notify(note))
        self._notes.add(task)
        task.add_done_callback(self._notes.discard)


class PodHarness:
    """Tasks sharing one Pod, as TaskService makes them: the first keeps its files in the shim's state directory,
    the later ones in their bundles. Bundles are host directories (root.path), bound under the pod directory."""

    def __init__(self, tmp: Path, stop_grace_s: float = 2.0) -> None:
        self.tmp = tmp
        self.factory = FakeBackendFactory(guest=self._guest)
        self.runtimes: list[PodRuntime] = []
        self.events: list[tuple[str, Message]] = []
        self.options = ShimOptions(stop_grace_s=stop_grace_s)
        self.state_dir = tmp / "shim"
        self.state_dir.mkdir(exist_ok=True)
        self.pod: Pod[Task] = Pod(self.state_dir)

    def _guest(self) -> FakeGuest:
        guest = FakeGuest()
        self.runtimes.append(PodRuntime(guest))
        return guest

    def vm(self, config: UvmConfig) -> UtilityVM:
        return UtilityVM(make_test_config(self.tmp, id=config.id, shares=config.shares, console_log=config.console_log),
                         backend_factory=self.factory)

    def _publish(self, topic: str, event: Message) -> None:
        self.events.append((topic, event))

    @property
    def runtime(self) -> PodRuntime:
        return self.runtimes[-1]

    @property
    def qemu_pid(self) -> int:
        pid = self.factory.last.pid
        assert pid is not None
        return pid

    def exits_of(self, task_id: str) -> list[int]:
        return [e.exit_status for _, e in self.events if isinstance(e, ev.TaskExit) and e.id == task_id]

    def bundle(self, task_id: str, annotations: dict[str, str] | None,
               namespaces: list[dict[str, str]] | None = None, **fields: Any) -> Path:
        bundle = self.tmp / "bundles" / task_id
        (bundle / "rootfs" / "bin").mkdir(parents=True, exist_ok=True)
        spec = {"ociVersion": "1.0.2", "root": {"path": "rootfs"}, "process": {"args": ["sh"], "cwd": "/"},
                "annotations": annotations or {},
                "linux": {"namespaces": namespaces or [{"type": "pid"}, {"type": "ipc"}, {"type": "network"}]},
                **fields}
        (bundle / "config.json").write_text(json.dumps(spec))
        return bundle

    async def create(self, task_id: str, annotations: dict[str, str] | None,
                     namespaces: list[dict[str, str]] | None = None, **fields: Any) -> Task:
        bundle = self.bundle(task_id, annotations, namespaces, **fields)
        state_dir = self.state_dir if not self.pod.tasks else bundle
        task = Task(task_id, bundle, "ns", self.options, self._publish, state_dir, vm_factory=self.vm, pod=self.pod)
        try:
            await within(task.create([], "", "", "", False))
        except BaseException:
            del self.pod.tasks[task_id]  # as TaskService does with a task whose create failed
            raise
        return task

    async def sandbox(self, sid: str = "sb") -> Task:
        task = await self.create(sid, sandbox_annotations(sid))
        await within(task.start(INIT))
        return task

    async def container(self, cid: str, sandbox: str = "sb", start: bool = True, **fields: Any) -> Task:
        task = await self.create(cid, container_annotations(sandbox), cri_namespaces(self.qemu_pid), **fields)
        if start:
            await within(task.start(INIT))
        return task

    async def close(self) -> None:
        for task in sorted(self.pod.tasks.values(), key=lambda t: t.owns_the_uvm):  # containers first
            await within(task.teardown())
        assert all(b.closed for b in self.factory.backends)
        assert mounts_under(self.tmp) == []


@contextlib.asynccontextmanager
async def pod_harness(tmp: Path, stop_grace_s: float = 2.0) -> AsyncIterator[PodHarness]:
    harness = PodHarness(tmp, stop_grace_s)
    try:
        yield harness
    finally:
        await harness.close()


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[PodHarness]:
    async with pod_harness(tmp_path) as harness:
        yield harness


def exec_spec(*args: str) -> bytes:
    return json.dumps({"args": list(args), "cwd": "/"}).encode()


@pytest.mark.parametrize("annotations", [container_annotations("sb"), {CONTAINER_TYPE: "container"}])
async def test_a_container_without_its_sandbox_is_refused_and_nothing_boots(h: PodHarness,
                                                                            annotations: dict[str, str]) -> None:
    with pytest.raises(errors.StateError) as e:
        await h.create("c1", annotations, cri_namespaces(4242))
    assert to_status(e.value).code == Code.FAILED_PRECONDITION
    assert "does not run in this shim" in str(e.value)
    assert (annotations.get(SANDBOX_ID) or "(none named)") in str(e.value)
    assert h.factory.backends == [] and h.pod.vm is None and h.pod.owner is None
    assert h.pod.tasks == {}
    assert not h.pod.dir.path.exists()


@needs_root
async def test_a_pods_containers_join_the_sandboxs_uvm_and_its_namespaces(h: PodHarness) -> None:
    sandbox = await h.sandbox()
    c1 = await h.container("c1")
    c2 = await h.container("c2", start=False)
    assert len(h.factory.backends) == 1 and h.pod.owner == "sb"
    assert sandbox.owns_the_uvm and not c1.owns_the_uvm
    assert (sandbox.role, c1.role) == (Role("sandbox", "sb"), Role("container", "sb"))
    # Every task's pid is QEMU's (CRI names the sandbox's in the containers' specs); the guest's are the processes'.
    assert {t.state(INIT).pid for t in (sandbox, c1, c2)} == {h.qemu_pid}
    pause = h.runtime.inits["sb"]
    assert (h.pod.owner_host_pid, h.pod.owner_guest_pid) == (h.qemu_pid, pause)
    assert h.runtime.specs["c1"]["linux"]["namespaces"] == [
        {"type": "pid"}, {"type": "ipc", "path": f"/proc/{pause}/ns/ipc"},
        {"type": "uts", "path": f"/proc/{pause}/ns/uts"}, {"type": "mount"}]
    # Each root at <pod>/<id>/rootfs, the guest reaching it through the one pod share.
    assert h.runtime.rootfs["c2"] == {"share": "pod", "path": "c2/rootfs"}
    pod_dir = h.pod.dir.path
    assert sorted(mounts_under(pod_dir)) == sorted(str(p) for p in (
        pod_dir, pod_dir / "sb" / "rootfs", pod_dir / "c1" / "rootfs", pod_dir / "c2" / "rootfs"))
    assert [s.tag for s in h.factory.last.spec.shares] == ["pod"]
    assert h.pod.others("sb") == [c1, c2]


@needs_root
async def test_a_second_sandbox_in_the_pod_is_refused(h: PodHarness) -> None:
    sandbox = await h.sandbox("sb")
    with pytest.raises(errors.AlreadyExistsError) as e:
        await h.create("sb2", sandbox_annotations("sb2"))
    assert to_status(e.value).code == Code.ALREADY_EXISTS
    assert "already runs the pod of sb" in str(e.value)
    assert len(h.factory.backends) == 1 and h.pod.owner == "sb"
    assert sandbox.vm is not None and sandbox.vm.state is VmState.RUNNING
    assert not h.pod.dir.task_dir("sb2").exists()
    with pytest.raises(errors.AlreadyExistsError):  # nor a standalone task: the shim runs a pod already
        await h.create("t1", {})
    await within(sandbox.exec_add("e1", exec_spec("true"), False, "", "", ""))
    assert await within(sandbox.start("e1")) > 0


@needs_root
async def test_a_container_of_another_sandbox_is_refused(h: PodHarness) -> None:
    await h.sandbox("sb")
    with pytest.raises(errors.StateError, match="other"):
        await h.container("c1", sandbox="other")
    assert len(h.factory.backends) == 1 and "c1" not in h.runtime.specs
    assert not h.pod.dir.task_dir("c1").exists()


@needs_root
async def test_a_containers_failed_create_leaves_the_pod_as_it_was(h: PodHarness) -> None:
    sandbox = await h.sandbox()
    h.runtime.create_errors["c1"] = ErrorReply(proto.E_INVALID, "container c1: bad spec")
    with pytest.raises(errors.UvmError, match="bad spec"):
        await h.container("c1")
    assert not h.pod.dir.task_dir("c1").exists()
    assert mounts_under(h.pod.dir.path / "c1") == []
    assert sandbox.vm is not None and sandbox.vm.state is VmState.RUNNING
    del h.runtime.create_errors["c1"]
    c1 = await h.container("c1")  # the same id again, once the guest takes it
    assert c1.state(INIT).status.name == "RUNNING"


@needs_root
async def test_kill_all_of_the_sandbox_reaches_every_container(h: PodHarness) -> None:
    """CRI's StopPodSandbox: a Kill(all) of the sandbox signals the pod's containers (all their processes) too."""
    sandbox = await h.sandbox()
    c1 = await h.container("c1")
    c2 = await h.container("c2")
    await within(c2.exec_add("e1", exec_spec("sleep", "99"), False, "", "", ""))
    await within(c2.start("e1"))
    await within(sandbox.kill(INIT, 15, True))
    assert h.runtime.kills == [("c1", 15, True), ("c2", 15, True), ("sb", 15, True)]
    assert (await within(c1.wait(INIT))).status == 143
    assert (await within(c2.wait(INIT))).status == 143
    assert (await within(c2.wait("e1"))).status == 143
    assert (await within(sandbox.wait(INIT))).status == 143
    await within(h.factory.last.wait_exit())  # the sandbox's exit stopped the pod's UVM


@needs_root
@pytest.mark.parametrize("guest_reports_the_kills", [True, False])
async def test_the_sandboxs_exit_kills_the_containers_and_stops_the_uvm(tmp_path: Path,
                                                                        guest_reports_the_kills: bool) -> None:
    """The pause process ends: the pod's containers are killed (or die with the UVM when the guest never reports
    their exits), each Wait returns a non-zero exit, and the UVM stops."""
    async with pod_harness(tmp_path, stop_grace_s=0.2) as h:
        sandbox = await h.sandbox()
        c1 = await h.container("c1")
        c2 = await h.container("c2", start=False)
        h.runtime.report_exits = guest_reports_the_kills
        h.runtime.exit("sb", h.runtime.inits["sb"], 0)
        assert (await within(sandbox.wait(INIT))).status == 0  # the sandbox's own exit is its own
        exits = [(await within(c.wait(INIT))).status for c in (c1, c2)]
        assert exits == ([137, 137] if guest_reports_the_kills else [255, 255])
        assert h.exits_of("c1") == [exits[0]]
        await within(h.factory.last.wait_exit())  # the hypervisor ended
        assert ("c1", 9, True) in h.runtime.kills
        for task in (c1, c2, sandbox):
            await within(task.delete(INIT))


@needs_root
async def test_the_sandbox_deleted_before_its_containers_takes_the_pod_down(h: PodHarness) -> None:
    """`ctr task rm -f` of the sandbox while a container is left: the UVM and the whole pod directory go with the
    sandbox; the container's exit was reported and its own Delete still answers."""
    sandbox = await h.sandbox()
    c1 = await h.container("c1")
    await within(sandbox.kill(INIT, 9, False))  # the sandbox's init alone
    assert (await within(sandbox.wait(INIT))).status == 137
    assert (await within(c1.wait(INIT))).status == 137  # killed by the pod's stop
    await within(sandbox.delete(INIT))
    assert h.factory.last.state == "closed"
    assert not h.pod.dir.path.exists() and mounts_under(h.tmp) == []
    assert h.pod.others("sb") == [c1]
    pid, exited = await within(c1.delete(INIT))
    assert (pid, exited.status) == (h.qemu_pid, 137)
    assert h.exits_of("c1") == [137]


@needs_root
async def test_a_containers_exit_and_delete_leave_the_uvm_running(h: PodHarness) -> None:
    sandbox = await h.sandbox()
    c1 = await h.container("c1")
    h.runtime.exit("c1", h.runtime.inits["c1"], 3)
    assert (await within(c1.wait(INIT))).status == 3
    assert (await within(c1.delete(INIT)))[1].status == 3
    assert "c1" in h.runtime.deleted
    assert not h.pod.dir.task_dir("c1").exists() and mounts_under(h.pod.dir.path / "c1") == []
    assert h.factory.last.running and sandbox.vm is not None and sandbox.vm.state is VmState.RUNNING
    assert h.runtime.kills == []  # nothing else was signalled
    await within(sandbox.exec_add("e1", exec_spec("hostname"), False, "", "", ""))
    pid = await within(sandbox.start("e1"))
    h.runtime.exit("sb", pid, 0)
    assert (await within(sandbox.wait("e1"))).status == 0
    c2 = await h.container("c2")  # and a new container still joins
    assert c2.state(INIT).status.name == "RUNNING" and len(h.factory.backends) == 1


@needs_root
@pytest.mark.parametrize("how", ["crash", "guest_poweroff"])
async def test_the_uvms_death_is_every_tasks_exit_never_0(h: PodHarness, how: str) -> None:
    sandbox = await h.sandbox()
    c1 = await h.container("c1")
    c2 = await h.container("c2", start=False)
    await within(c1.exec_add("e1", exec_spec("sleep", "99"), False, "", "", ""))
    await within(c1.start("e1"))
    getattr(h.factory.last, how)()
    statuses = {f"{t.id}/{x or 'init'}": (await within(t.wait(x))).status
                for t, x in ((sandbox, INIT), (c1, INIT), (c1, "e1"), (c2, INIT))}
    assert statuses == dict.fromkeys(statuses, 255)
    with pytest.raises(errors.StateError):  # nothing joins a dead pod
        await h.container("c3")


@needs_root
async def test_a_container_create_while_the_pods_uvm_is_stopping_is_refused(h: PodHarness) -> None:
    sandbox = await h.sandbox()
    await h.container("c1")
    guest = h.factory.last.guest
    shutdown_may_answer = asyncio.Event()

    async def held_shutdown(req: Request) -> dict[str, Any]:
        await shutdown_may_answer.wait()
        return {}

    guest.handlers[proto.SHUTDOWN] = held_shutdown
    h.runtime.exit("sb", h.runtime.inits["sb"], 0)  # the pod stops: its containers killed, then its UVM
    await within(guest.wait_until(lambda: any(r.method == proto.SHUTDOWN for r in guest.requests)))
    assert sandbox.vm is not None and sandbox.vm.state is VmState.STOPPING
    with pytest.raises(errors.StateError, match=r"does not run in this shim \(not created, or stopping\)"):
        await h.container("c2")  # refused up front, before its rootfs is mounted or the guest is asked
    assert "c2" not in h.runtime.specs and not h.pod.dir.task_dir("c2").exists()
    shutdown_may_answer.set()
    assert (await within(h.factory.last.wait_exit())).shutdown_reason == "guest-shutdown"


@needs_root
async def test_a_read_only_containers_root_gets_its_mount_points_first(h: PodHarness, tmp_path: Path) -> None:
    """As runc before it makes a root read-only: CRI's /etc/resolv.conf bind gets a file to mount on; then the
    root is read-only on the host too."""
    await h.sandbox()
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 10.0.0.1\n")
    await h.container("c1", root={"path": "rootfs", "readonly": True},
                      mounts=[{"destination": "/etc/resolv.conf", "type": "bind", "source": str(resolv),
                               "options": ["rbind", "ro"]}])
    bundle_root = tmp_path / "bundles" / "c1" / "rootfs"
    assert (bundle_root / "etc" / "resolv.conf").is_file()
    with pytest.raises(OSError, match="Read-only file system"):
        (h.pod.dir.rootfs("c1") / "written").write_text("x")


@needs_root
async def test_a_relative_file_bind_in_a_read_only_root_gets_a_file_to_mount_on(
        h: PodHarness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    await h.sandbox()
    monkeypatch.chdir(tmp_path / "bundles" / "sb")  # containerd starts a pod's shim in its sandbox's bundle
    bundle = h.bundle("c1", None)
    (bundle / "resolv.conf").write_text("nameserver 10.0.0.1\n")  # OCI: a bind source relative to the bundle
    await h.container("c1", root={"path": "rootfs", "readonly": True},
                      mounts=[{"destination": "/etc/resolv.conf", "type": "bind", "source": "resolv.conf",
                               "options": ["rbind", "ro"]}])
    assert (bundle / "rootfs" / "etc" / "resolv.conf").is_file()


# -- the task service's edge, over ttrpc -------------------------------------------------------------------


@dataclass
class PodShim:
    h: PodHarness
    service: TaskService
    client: Client

    async def call(self, method: str, request: Message, response_type: type[Message] = empty_pb2.Empty) -> Any:
        return await self.client.call(SERVICE, method, request, response_type, timeout=DEADLINE)

    async def status_of(self, method: str, request: Message) -> TtrpcError:
        with pytest.raises(TtrpcError) as info:
            await self.call(method, request)
        return info.value

    async def create(self, task_id: str, annotations: dict[str, str], namespaces: list[dict[str, str]] | None = None,
                     ) -> int:
        bundle = self.h.bundle(task_id, annotations, namespaces)
        resp = await self.call("Create", pb.CreateTaskRequest(id=task_id, bundle=str(bundle)), pb.CreateTaskResponse)
        return int(resp.pid)

    async def shutdown_requested_after_delete(self, task_id: str) -> bool:
        await self.call("Delete", pb.DeleteRequest(id=task_id), pb.DeleteResponse)
        await self.call("Shutdown", pb.ShutdownRequest(id=task_id))
        return self.service.shutdown_requested.is_set()


@pytest.fixture
async def shim(sock_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[PodShim]:
    monkeypatch.delenv("UVMSHIM_CONFIG", raising=False)
    config = tmp_path / "uvmshim.toml"
    config.write_text("stop_grace_s = 2.0\n")
    harness = PodHarness(tmp_path)
    service = TaskService("ns", "sb", Publisher("", "ns"), config_path=str(config), state_dir=harness.state_dir,
                          vm_factory=harness.vm)
    harness.pod = service.pod
    try:
        async with served(service, sock_dir) as client:
            yield PodShim(harness, service, client)
    finally:
        await within(service.close())
        assert all(b.closed for b in harness.factory.backends)
        assert mounts_under(tmp_path) == []


async def test_a_container_without_its_sandbox_is_a_failed_precondition(shim: PodShim) -> None:
    status = await shim.status_of("Create", pb.CreateTaskRequest(
        id="c1", bundle=str(shim.h.bundle("c1", container_annotations("sb"), cri_namespaces(4242)))))
    assert status.code == Code.FAILED_PRECONDITION
    assert shim.h.factory.backends == [] and shim.service.pod.tasks == {}
    assert (await shim.status_of("State", pb.StateRequest(id="c1"))).code == Code.NOT_FOUND
    await shim.call("Shutdown", pb.ShutdownRequest(id="c1"))  # no task left: the shim may go
    assert shim.service.shutdown_requested.is_set()


@needs_root
async def test_one_shim_serves_the_pod_and_goes_only_when_no_task_is_left(shim: PodShim) -> None:
    h = shim.h
    sandbox_pid = await shim.create("sb", sandbox_annotations())
    await shim.call("Start", pb.StartRequest(id="sb"), pb.StartResponse)
    assert sandbox_pid == h.qemu_pid
    assert await shim.create("c1", container_annotations(), cri_namespaces(sandbox_pid)) == sandbox_pid
    await shim.call("Start", pb.StartRequest(id="c1"), pb.StartResponse)
    assert len(h.factory.backends) == 1
    # Connect and State, per task.
    for tid in ("sb", "c1"):
        connected = await shim.call("Connect", pb.ConnectRequest(id=tid), pb.ConnectResponse)
        assert (connected.shim_pid, connected.task_pid) == (os.getpid(), sandbox_pid)
        state = await shim.call("State", pb.StateRequest(id=tid), pb.StateResponse)
        assert (state.id, state.bundle, state.status, state.pid) == (
            tid, str(h.tmp / "bundles" / tid), Status.RUNNING, sandbox_pid)
    # The container ends and goes: containerd's Shutdown after its Delete is ignored, the sandbox lives on.
    await shim.call("Kill", pb.KillRequest(id="c1", signal=15))
    assert (await shim.call("Wait", pb.WaitRequest(id="c1"), pb.WaitResponse)).exit_status == 143
    assert not await shim.shutdown_requested_after_delete("c1")
    assert (await shim.status_of("State", pb.StateRequest(id="c1"))).code == Code.NOT_FOUND
    assert h.factory.last.running
    await shim.call("Exec", pb.ExecProcessRequest(id="sb", exec_id="e1",
                                                  spec=any_pb2.Any(value=exec_spec("hostname"))))
    exec_pid = (await shim.call("Start", pb.StartRequest(id="sb", exec_id="e1"), pb.StartResponse)).pid
    h.runtime.exit("sb", exec_pid, 0)
    assert (await shim.call("Wait", pb.WaitRequest(id="sb", exec_id="e1"), pb.WaitResponse)).exit_status == 0
    # The sandbox ends and goes: now the shim may.
    await shim.call("Kill", pb.KillRequest(id="sb", signal=9, all=True))
    assert (await shim.call("Wait", pb.WaitRequest(id="sb"), pb.WaitResponse)).exit_status == 137
    assert await shim.shutdown_requested_after_delete("sb")
    assert h.factory.last.state == "closed"
