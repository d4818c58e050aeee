"""One UVM per pod: the shim of a sandbox serves every task of its pod (Kubernetes through containerd's CRI).

containerd's CRI plugin runs a pod as a sandbox (pause) task plus the pod's containers, all with the
same runtime handler; their specs say which is which (``io.kubernetes.cri.container-type``) and whose
(``io.kubernetes.cri.sandbox-id``). As runc's shim groups the tasks of one group, the shim's ``start``
sends a container to its sandbox's shim (``group_of``), so one shim, one UVM, serves the whole pod:

* the sandbox task (or a standalone task: ``ctr run``, a pod of one) boots the UVM (``Pod.boot``), with
  one 9p share, the pod directory, exported at boot and made a shared mount point first, so mounts made
  under it later reach QEMU's jail (uvm/jail.py binds shares as slaves) and, through 9p, the guest;
* every task's root filesystem is mounted (a snapshotter's mounts) or bound (a host directory) at
  ``<pod>/<task id>/rootfs`` and its bind mounts staged under ``<pod>/<task id>/binds``: a container
  added later reaches the running UVM with no reboot and no hot-plug;
* the pod's containers share the UVM's network namespace (the pod's NIC), and join the pause
  container's IPC and UTS (and PID, when the pod shares it) namespaces inside the guest: their specs
  name ``/proc/<sandbox task's pid>/ns/...``, the host pid of QEMU, which the shim maps to the pause
  process's pid in the guest.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

from shim.containerd import rootfs as host_rootfs
from uvm import errors

if TYPE_CHECKING:  # (shim start imports this module: nothing heavy at import time)
    import asyncio

    from schemas import oci
    from shim.containerd.blockroot import PodLayers
    from shim.containerd.cgroups import Placement
    from uvm.vm import UtilityVM

log = logging.getLogger("uvmshim.pod")

POD_TAG = "pod"  # the 9p share every task's rootfs and binds reach the UVM through
POD_DIR = "pod"  # in the state directory of the shim (the first task's bundle)
CONTAINER_TYPE = "io.kubernetes.cri.container-type"
SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
RUNC_GROUP = "io.containerd.runc.v2.group"
NAMESPACES_TO_SHARE = ("ipc", "uts", "pid")  # with the pause container, when the spec names its


@dataclass(frozen=True)
class Role:
    """What a task is in its pod: a sandbox (CRI's pause task), a container of a sandbox, or standalone (a
    pod of one). The first and the last bring the UVM; a container joins its sandbox's."""

    kind: str  # sandbox | container | standalone
    sandbox_id: str

    @property
    def brings_the_uvm(self) -> bool:
        return self.kind != "container"


def role_of(annotations: Mapping[str, str] | None, task_id: str) -> Role:
    ann = annotations or {}
    kind = ann.get(CONTAINER_TYPE)
    if kind == "container":
        return Role("container", ann.get(RUNC_GROUP) or ann.get(SANDBOX_ID) or "")  # group_of's order
    if kind == "sandbox":
        return Role("sandbox", task_id)
    group = ann.get(RUNC_GROUP)
    if group and group != task_id:
        return Role("container", group)
    return Role("standalone", task_id)


def group_of(annotations: Mapping[str, str] | None, task_id: str) -> str:
    """The shim a task belongs to, by runc's shim's rule: io.containerd.runc.v2.group, else CRI's sandbox id,
    else the task's own id."""
    ann = annotations or {}
    return ann.get(RUNC_GROUP) or ann.get(SANDBOX_ID) or task_id


def rewrite_namespaces(spec: oci.Spec, sandbox_host_pid: int | None, sandbox_guest_pid: int | None) -> None:
    """The container's namespaces, as they are to be inside its UVM: the network entry goes (the container
    shares the UVM's network namespace: its NICs stand in for the pod's veths); a namespace the spec joins
    at /proc/<sandbox host pid>/ns/<type> is the pause process's in the guest; any other path is the host's,
    which a container in a UVM cannot enter: it gets a new namespace of that type, as Kata does."""
    namespaces = (spec.linux or {}).get("namespaces")
    if not isinstance(namespaces, list):
        return
    for ns in list(namespaces):
        if not isinstance(ns, dict):
            continue
        kind = ns.get("type")
        if kind == "network":
            namespaces.remove(ns)
            continue
        path = ns.get("path")
        if path is None:
            continue
        if (sandbox_host_pid and sandbox_guest_pid and kind in NAMESPACES_TO_SHARE
                and path == f"/proc/{sandbox_host_pid}/ns/{kind}"):
            ns["path"] = f"/proc/{sandbox_guest_pid}/ns/{kind}"
        else:
            log.info("namespace %s: not joining the host's %s inside the UVM", kind, ns.pop("path"))


class PodDir:
    """The pod directory on the host (the pod share): a shared mount point of its own, so that what is
    mounted under it later reaches QEMU's jail; one subdirectory per task."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def make(self) -> None:
        """Create it and make it a shared mount point. Raises InvalidArgumentError (nothing left)."""
        self.remove()  # what a dead shim left in the same place
        self.path.mkdir(mode=0o700, parents=True)
        try:
            host_rootfs.run_mount(["mount", "--bind", str(self.path), str(self.path)], f"pod directory {self.path}")
            host_rootfs.run_mount(["mount", "--make-shared", str(self.path)], f"pod directory {self.path}: shared")
        except BaseException:
            self.remove()
            raise

    def task_dir(self, task_id: str) -> Path:
        return self.path / task_id

    def rootfs(self, task_id: str) -> Path:
        return self.path / task_id / "rootfs"

    def binds(self, task_id: str) -> Path:
        return self.path / task_id / host_rootfs.BINDS_DIR

    def release_task(self, task_id: str) -> None:
        """Unmount and remove a task's subdirectory (its rootfs and binds). Raises UvmError when something
        stays mounted (nothing below it is removed then: the mounts are of the user's files)."""
        release_task_dir(self.task_dir(task_id))

    def remove(self) -> bool:
        """Unmount everything below it and itself, then remove it. True if there was something."""
        if not self.path.exists():
            return False
        for point in host_rootfs.mount_points_under(self.path):  # deepest first
            host_rootfs.unmount(point)
        left = host_rootfs.mount_points_under(self.path)
        if left:
            raise errors.UvmError(f"pod directory {self.path}: cannot unmount {left[0]}")
        shutil.rmtree(self.path)
        return True


def release_task_dir(task_dir: Path) -> bool:
    """A task's subdirectory of the pod directory: its binds unstaged, its rootfs unmounted, then removed.
    True if there was something. Raises UvmError when something stays mounted."""
    if not task_dir.exists():
        return False
    host_rootfs.unstage_binds(task_dir / host_rootfs.BINDS_DIR)
    host_rootfs.unmount(task_dir / "rootfs")
    left = host_rootfs.mount_points_under(task_dir)
    if left:
        raise errors.UvmError(f"task directory {task_dir}: cannot unmount {left[0]}")
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(task_dir)
    return True


def make_mount_targets(root: Path, mounts: list[oci.Mount], bundle: Path) -> None:
    """What runc does before it makes a root read-only: the spec's mount points that the rootfs lacks are
    created (a file for a bind of a file, else a directory; CRI binds /etc/resolv.conf, /etc/hosts and
    /etc/hostname into images that may have none), so that crun can mount on them. Every path is walked
    one component at a time without following a symlink: an image's symlink never makes the shim create
    anything outside the rootfs (such a target is left for crun to refuse). A relative bind source is the
    bundle's, as the OCI spec reads it. Raises InvalidArgumentError."""
    for m in mounts:
        parts = [p for p in m.destination.split("/") if p and p != "."]
        if not parts or ".." in parts:
            continue
        is_file = (host_rootfs.is_bind(m.type, m.options) and m.source is not None
                   and os.path.isfile(bundle / m.source))  # (an absolute source stays itself)
        try:
            _make_target(root, parts, is_file)
        except OSError as e:
            raise errors.InvalidArgumentError(f"mount {m.destination}: cannot create its mount point in the "
                                              f"read-only rootfs: {e.strerror}") from None


def _make_target(root: Path, parts: list[str], is_file: bool) -> None:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for n, part in enumerate(parts):
            last = n == len(parts) - 1
            try:
                st = os.stat(part, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                if last and is_file:
                    os.close(os.open(part, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=fd))
                    return
                os.mkdir(part, 0o755, dir_fd=fd)
                st = os.stat(part, dir_fd=fd, follow_symlinks=False)
            if last:
                return
            if not stat.S_ISDIR(st.st_mode):  # a symlink or a file on the way: not ours to follow
                return
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nxt
    finally:
        os.close(fd)


class Member(Protocol):
    """What the pod needs of its tasks (shim/containerd/task.py's Task): whether each is deleted."""

    @property
    def deleted(self) -> bool: ...


T = TypeVar("T", bound=Member)


class Pod(Generic[T]):
    """What the tasks of one shim share: the pod directory, the UVM (brought by the sandbox or standalone
    task, its owner) and one another (Kill(all) of the sandbox reaches every container). Generic in its
    tasks' type, so this module never imports shim/containerd/task.py (which imports it)."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = PodDir(state_dir / POD_DIR)
        self.vm: UtilityVM | None = None
        self.owner: str | None = None  # the task that brought the UVM
        self.owner_host_pid: int | None = None  # QEMU's: the sandbox task's pid, in the specs of its containers
        self.owner_guest_pid: int | None = None  # the pause process, in the guest
        self.tasks: dict[str, T] = {}
        self.helper: UtilityVM | None = None  # a helper UVM, while tasks use it (their UVM died: blockroot.py)
        self.helper_users = 0
        self.helper_lock: asyncio.Lock | None = None
        self.layers: PodLayers | None = None  # image layer disks in the UVM, shared by the tasks' block root filesystems
        self.cgroup: Placement | None = None  # the sandbox's cgroup, which this shim and its QEMU joined

    def __repr__(self) -> str:
        return f"<Pod owner={self.owner} tasks={sorted(self.tasks)} vm={self.vm!r}>"

    def others(self, task_id: str) -> list[T]:
        """The pod's other tasks that are not deleted."""
        return [t for tid, t in self.tasks.items() if tid != task_id and not t.deleted]

