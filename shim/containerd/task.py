"""One containerd task: a UVM booted for it, the container inside, and the container's exec processes.

This is the logic behind the task service (shim/containerd/service.py is only its ttrpc edge). It speaks uvm/'s
types and raises uvm's errors; events go out through the publish callback as containerd's messages.
Each process has an exit future, resolved by a watcher once the process exited AND its output reached
containerd's FIFOs, so Wait never returns before the output (ctr closes its FIFOs right after).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.message import Message
from pydantic import ValidationError

from schemas import oci
from schemas.containerd import events_task_pb2 as ev
from schemas.containerd import mount_pb2
from schemas.shim_options import ShimOptions
from schemas.uvm_config import NEW_NETNS, Share, UvmConfig
from schemas.validation import first_problem
from shim.containerd import cgroups, leftovers
from shim.containerd import rootfs as host_rootfs
from shim.containerd.blockroot import BlockRootfs, PodLayers, snapshot_of
from shim.containerd.events import timestamp
from shim.containerd.pod import POD_TAG, Pod, Role, make_mount_targets, rewrite_namespaces, role_of
from shim.containerd.stdio import ProcessIO
from uvm import errors
from uvm.builder import host_memory_mib
from uvm.container import Container, ContainerState, ContainerStatistics, Rootfs, SharedSource
from uvm.layers import LayerCache
from uvm.lifecycle import VmState, stop_escalating
from uvm.process import Process, ProcessExit
from uvm.vm import UtilityVM

log = logging.getLogger("uvmshim.task")

INIT = ""  # the exec id of a task's init process
EXEC_FAILED_STATUS = 255  # an exec whose Start failed: a Wait on it returns this (runc releases it too)


class Status(enum.IntEnum):
    """containerd.v1.types.Status"""

    UNKNOWN = 0
    CREATED = 1
    RUNNING = 2
    STOPPED = 3
    PAUSED = 4


@dataclass(frozen=True)
class Exited:
    status: int
    at: float


@dataclass(frozen=True)
class ProcState:
    exec_id: str
    pid: int
    status: Status
    stdin: str
    stdout: str
    stderr: str
    terminal: bool
    exited: Exited | None


MAX_VM_ID = 48  # the UVM's sockets live in <run_dir>/<vm id>/: a unix socket path has 107 bytes at most


def vm_id_for(namespace: str, task_id: str) -> str:
    """A UVM id naming namespace and task, unique and deterministic (the `delete` action derives it). A
    long one (CRI's 64-hex ids) is cut and suffixed with a hash of the whole, so that a run directory of
    up to ~40 characters still leaves room for the sockets' names."""
    vid = f"{namespace}.{task_id}"
    if len(vid) > MAX_VM_ID or not vid[0].isalnum():
        vid = f"{vid[:MAX_VM_ID - 9].lstrip('._-') or 'task'}-{hashlib.sha256(vid.encode()).hexdigest()[:8]}"
    return vid


def exit_of(info: ProcessExit) -> Exited:
    return Exited(info.exit_code, info.at)


def network_namespace_of(spec: oci.Spec) -> str:
    """The network the container asks for, as UvmConfig.network_namespace: the path of the namespace to
    join (CNI ran there: a pod's), or "new" (a fresh one; `ctr run --cni` fills it after the create).
    Raises InvalidArgumentError for a spec with no network namespace: that asks for the host's network
    (`ctr run --net-host`, a hostNetwork pod), which a container in a VM cannot have."""
    namespaces = (spec.linux or {}).get("namespaces")
    for ns in namespaces if isinstance(namespaces, list) else []:
        if isinstance(ns, dict) and ns.get("type") == "network":
            path = ns.get("path")
            if path is not None and (not isinstance(path, str) or not path.startswith("/")):
                raise errors.InvalidArgumentError(f"network namespace path {path!r}: not an absolute path")
            return path or NEW_NETNS
    raise errors.InvalidArgumentError(
        "the spec has no network namespace, which asks for the host's network (ctr run --net-host, a hostNetwork "
        "pod): a container in a utility VM cannot share the host's network stack; give it a network namespace")


ANNOTATION_MEMORY = "io.uvmshim.uvm.memory_mib"  # the task's UVM shape, as hcsshim's computetopology annotations
ANNOTATION_CPUS = "io.uvmshim.uvm.cpus"
SANDBOX_MEMORY = "io.kubernetes.cri.sandbox-memory"  # bytes
SANDBOX_CPU_QUOTA = "io.kubernetes.cri.sandbox-cpu-quota"
SANDBOX_CPU_PERIOD = "io.kubernetes.cri.sandbox-cpu-period"
MIB = 1 << 20
DEFAULT_CPU_PERIOD = 100_000  # µs, the kernel's and runc's
MAX_CPUS = UvmConfig.model_fields["cpus"].metadata[-1].le
MAX_MEMORY_MIB = UvmConfig.model_fields["memory_mib"].metadata[-1].le


def uvm_shape(spec: oci.Spec, options: ShimOptions) -> dict[str, int]:
    """The UVM's memory and vCPUs for this container, as Kata sizes its VM: the configured size plus the
    container's memory limit and CPU quota (rounded up; a quota without a period is per 100 ms, as runc
    reads it), so the guest's own footprint does not eat the container's share; annotations set either
    outright. Both stay within the host's (memory limits may overcommit the host, as Kubernetes allows).
    Raises InvalidArgumentError naming the annotation or the resources."""
    base = options.uvm_config(id="shape")
    shape = {"memory_mib": base.memory_mib, "cpus": base.cpus}
    resources = (spec.linux or {}).get("resources")
    try:
        res = oci.LinuxResources.model_validate(resources) if isinstance(resources, dict) else None
    except ValidationError as e:
        raise errors.InvalidArgumentError(f"linux.resources: {first_problem(e)}") from None
    if res and res.memory and res.memory.limit and res.memory.limit > 0:
        shape["memory_mib"] += -(-res.memory.limit // MIB)
    if res and res.cpu and res.cpu.quota and res.cpu.quota > 0:
        shape["cpus"] += -(-res.cpu.quota // (res.cpu.period or DEFAULT_CPU_PERIOD))
    # A pod's sandbox: CRI's sizing of the whole pod (the sum of its containers' limits), as Kata reads it.
    ann = spec.annotations or {}
    pod_memory, pod_quota = annotation_int(ann, SANDBOX_MEMORY), annotation_int(ann, SANDBOX_CPU_QUOTA)
    pod_period = annotation_int(ann, SANDBOX_CPU_PERIOD, low=0)  # 0: the default period; -1 means nothing here
    if pod_memory > 0:
        shape["memory_mib"] += -(-pod_memory // MIB)
    if pod_quota > 0:
        shape["cpus"] += -(-pod_quota // (pod_period or DEFAULT_CPU_PERIOD))
    for key, field in ((ANNOTATION_MEMORY, "memory_mib"), (ANNOTATION_CPUS, "cpus")):
        value = (spec.annotations or {}).get(key)
        if value is not None:
            try:
                shape[field] = UvmConfig.model_validate({"id": "shape", field: int(value)}).model_dump()[field]
            except (ValueError, ValidationError):
                raise errors.InvalidArgumentError(f"annotation {key}={value!r}: not a valid {field}") from None
    shape["cpus"] = min(shape["cpus"], os.cpu_count() or 1, MAX_CPUS)
    try:
        host_mib = host_memory_mib()
    except (OSError, ValueError, errors.ConfigError):  # no readable MemTotal: the config's bound alone
        host_mib = MAX_MEMORY_MIB
    shape["memory_mib"] = min(shape["memory_mib"], host_mib, MAX_MEMORY_MIB)
    return shape


def annotation_int(annotations: dict[str, str], key: str, low: int = -1) -> int:
    """A whole-number annotation (0 if absent): decimal digits only, at least low (-1: CRI's "no limit").
    Raises InvalidArgumentError naming the annotation and its value."""
    value = annotations.get(key, "0")
    if re.fullmatch(r"-?[0-9]{1,19}", value) is None or int(value) < low:
        raise errors.InvalidArgumentError(f"annotation {key}={value!r}: not a whole number of at least {low}")
    return int(value)


def parse_spec_json(data: bytes | str, what: str) -> oci.Spec:
    try:
        return oci.Spec.model_validate_json(data)
    except ValidationError as e:
        raise errors.InvalidArgumentError(f"{what}: {validation_summary(e)}") from None


def validation_summary(e: ValidationError) -> str:
    more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    return first_problem(e, whole="document") + more


class TaskProcess:
    """A containerd process: the init (exec id "") or an exec, with its FIFOs and exit."""

    def __init__(self, exec_id: str, io: ProcessIO, spec: oci.Process | None = None) -> None:
        self.exec_id = exec_id
        self.io = io
        self.spec = spec
        self.proc: Process | None = None
        self.pid = 0
        self.exit: asyncio.Future[Exited] = asyncio.get_running_loop().create_future()
        self.watcher: asyncio.Task[None] | None = None

    @property
    def exited(self) -> Exited | None:
        return self.exit.result() if self.exit.done() else None


class Task:
    def __init__(self, task_id: str, bundle: Path, namespace: str, options: ShimOptions,
                 publish: Callable[[str, Message], None], state_dir: Path | None = None,
                 vm_factory: Callable[[UvmConfig], UtilityVM] = UtilityVM, console_log: Path | None = None,
                 pod: Pod[Task] | None = None) -> None:
        self.id = task_id
        self.bundle = bundle
        # Where the shim keeps its own files (uvmshim.json, the UVM's console log): containerd's bundle,
        # or runuvm's --root/<id> (a runc bundle belongs to the user).
        self.state_dir = state_dir or bundle
        self.console_log = console_log or self.state_dir / "uvm-console.log"  # runuvm create --vm-console
        self.namespace = namespace
        self.options = options
        self.publish = publish
        self._vm_factory = vm_factory  # tests: a UtilityVM over a fake backend
        self.pod: Pod[Task] = pod or Pod(self.state_dir)  # shared with the other tasks of this shim
        self.pod.tasks[task_id] = self
        self.role = Role("standalone", task_id)
        self.container: Container | None = None
        self.procs: dict[str, TaskProcess] = {}
        self.task_dir: Path | None = None  # <pod>/<id>: its rootfs and binds, once made
        self.block: BlockRootfs | None = None  # an image-based rootfs on block devices (blockroot.py)
        self.started = False
        self.deleted = False
        self._starting: asyncio.Future[None] | None = None  # the init's Start, until it answered
        self._teardown_task: asyncio.Task[None] | None = None
        self._pod_stop: asyncio.Task[None] | None = None  # a sandbox whose init exited stops its pod

    def __repr__(self) -> str:
        return f"<Task {self.namespace}/{self.id} {self.role.kind} procs={sorted(self.procs)} vm={self.vm!r}>"

    @property
    def vm(self) -> UtilityVM | None:
        """The UVM this task runs in: its pod's."""
        return self.pod.vm

    @property
    def owns_the_uvm(self) -> bool:
        return self.pod.owner == self.id

    # -- create -----------------------------------------------------------------------------------

    async def create(self, rootfs: list[mount_pb2.Mount], stdin: str, stdout: str, stderr: str,
                     terminal: bool) -> int:
        """Create (not start) the container: a sandbox or standalone task boots its pod's UVM first, a pod's
        container joins the running one. Everything of this task is undone on failure (the pod's UVM and
        its other containers are untouched when a container's create fails).

        Raises InvalidArgumentError (bundle, spec, rootfs, FIFOs), StateError (a container whose sandbox does
        not run here), AlreadyExistsError (a second sandbox), StartError (the UVM), AgentError."""
        try:
            spec_text = (self.bundle / "config.json").read_bytes()
        except OSError as e:
            raise errors.InvalidArgumentError(f"bundle {self.bundle}: config.json: {e.strerror}") from None
        spec = parse_spec_json(spec_text, f"bundle {self.bundle}: config.json")
        spec.process.terminal = terminal
        self.role = role_of(spec.annotations, self.id)
        io = ProcessIO(self.id, stdin, stdout, stderr, terminal, namespace=self.namespace)
        init = TaskProcess(INIT, io)
        try:
            await io.open()
            binds = host_rootfs.bind_mounts([(m.destination, m.source, m.type, m.options) for m in spec.mounts],
                                            self.bundle)
            network: str | None = network_namespace_of(spec)
            if self.role.brings_the_uvm:
                vm = await self._boot(spec, network)
            else:
                vm = self._joined_uvm()
            vm.oom_listeners.append(self.on_oom)
            root = await self._prepare_rootfs(rootfs, spec, vm)
            if binds:
                host_rootfs.stage_binds(binds, self.pod.dir.binds(self.id))
            rewrite_namespaces(spec, self.pod.owner_host_pid, self.pod.owner_guest_pid)
            want_in, want_out, want_err = io.wants
            self.container = await vm.create_container(
                self.id, spec, root,
                stdin=want_in, stdout=want_out, stderr=want_err,
                mount_sources={b.index: SharedSource(POD_TAG, f"{self.id}/{host_rootfs.BINDS_DIR}/{b.index}")
                               for b in binds})
        except BaseException:
            if self.block is not None and self.container is None:
                self.block.unused()  # no container ever wrote to it: the snapshot is as it was
            await io.close()
            await self.teardown()
            raise
        init.proc = self.container.init
        # The task's pid is QEMU's, as Kata reports the hypervisor's: /proc/<pid>/ns/net is the UVM's network
        # namespace, which `ctr run --cni` configures after this create and CRI names in the specs of a pod's
        # other containers. The guest's pids are what Pids lists.
        init.pid = vm.backend.pid if vm.backend is not None and vm.backend.pid else init.proc.pid
        if self.owns_the_uvm:
            self.pod.owner_host_pid, self.pod.owner_guest_pid = init.pid, init.proc.pid
        io.attach(init.proc)
        self.procs[INIT] = init
        init.watcher = asyncio.create_task(self._watch(init), name=f"{self.id}-init-exit")
        init.watcher.add_done_callback(self._watch_ended)
        self.publish("/tasks/create", ev.TaskCreate(
            container_id=self.id, bundle=str(self.bundle), rootfs=rootfs, pid=init.pid,
            io=ev.TaskIO(stdin=stdin, stdout=stdout, stderr=stderr, terminal=terminal)))
        return init.pid

    async def _boot(self, spec: oci.Spec, network: str | None) -> UtilityVM:
        """The pod's UVM, booted for this sandbox or standalone task, sized for it (uvm_shape), with the pod
        directory as its one share and the spec's network. Raises AlreadyExistsError when the shim runs a
        pod already."""
        if self.pod.owner is not None:
            raise errors.AlreadyExistsError(f"task {self.id}: this shim already runs the pod of {self.pod.owner}",
                                            container=self.id)
        base = self.options.uvm_config(id="shape")
        if network == NEW_NETNS and base.backend != "qemu":
            log.info("task %s: the %s backend gives a UVM no network of its own", self.id, base.backend)
            network = None
        shape = uvm_shape(spec, self.options)
        self.pod.owner = self.id
        cgroups_path = (spec.linux or {}).get("cgroupsPath")
        if isinstance(cgroups_path, str) and cgroups_path:
            # The host's accounting: this shim, and the QEMU it starts (which inherits it), in the pod's cgroup.
            self.pod.cgroup = cgroups.place(os.getpid(), cgroups_path)
        self.pod.dir.make()
        vm = self._vm_factory(self.options.uvm_config(
            id=vm_id_for(self.namespace, self.id), shares=[Share(tag=POD_TAG, host_path=self.pod.dir.path)],
            console_log=self.console_log, network_namespace=network, **shape))
        self.pod.vm = vm
        vm.network_listeners.append(self._write_state)  # its taps exist: the delete action must know
        self._write_state()
        await vm.start()
        self._write_state()
        return vm

    def _joined_uvm(self) -> UtilityVM:
        """A pod's container: its sandbox's running UVM. Raises StateError (FAILED_PRECONDITION) when the
        sandbox does not run in this shim (or is stopping)."""
        vm = self.pod.vm
        if vm is None or self.pod.owner != self.role.sandbox_id or vm.state is not VmState.RUNNING:
            raise errors.StateError(f"task {self.id}: its sandbox {self.role.sandbox_id or '(none named)'} does not "
                                    "run in this shim (not created, or stopping): nothing was booted",
                                    container=self.id)
        return vm

    async def _prepare_rootfs(self, mounts: list[mount_pb2.Mount], spec: oci.Spec, vm: UtilityVM) -> Rootfs:
        """The task's root filesystem: an image's overlay snapshot on block devices (blockroot.py, unless the
        options say rootfs = "9p"), else at <pod>/<id>/rootfs over the pod's 9p share: the snapshotter's
        mounts, or a bind of root.path (a host directory). A read-only root on 9p gets its missing mount
        points first (as runc makes them before it makes the root read-only), then is made read-only on the
        host too: a guest cannot write through. Raises InvalidArgumentError, LayerError, ScratchError,
        DiskError (all undone by teardown)."""
        self.task_dir = self.pod.dir.task_dir(self.id)
        self.task_dir.mkdir(mode=0o700)
        host_mounts = [host_rootfs.HostMount(m.type, m.source, tuple(m.options)) for m in mounts]
        snapshot = snapshot_of(host_mounts) if self.options.rootfs == "block" else None
        if snapshot is not None:
            if self.pod.layers is None:
                self.pod.layers = PodLayers()
            self.block = BlockRootfs(self.id, snapshot, self._layer_cache(), self.pod.layers,
                                     self.options.scratch_size_gb, self.task_dir, self._helper_vm)
            self._write_state()
            return await self.block.prepare(vm)
        target = self.pod.dir.rootfs(self.id)
        target.mkdir()
        self._write_state()
        if mounts:
            host_rootfs.mount_all(host_mounts, target)
        elif spec.root is None:
            raise errors.InvalidArgumentError(f"bundle {self.bundle}: config.json has no root and no rootfs mounts came")
        else:
            source = host_rootfs.host_root(self.bundle, spec.root.path)
            host_rootfs.run_mount(["mount", "--rbind", str(source), str(target)], f"rootfs {source}")
            host_rootfs.run_mount(["mount", "--make-rprivate", str(target)], f"rootfs {source}: private")
        if spec.root is not None and spec.root.readonly:
            make_mount_targets(target, spec.mounts, self.bundle)
            host_rootfs.run_mount(["mount", "-o", "remount,bind,ro", str(target)], f"rootfs {target}: read-only")
        return Rootfs(share=POD_TAG, path=str(target.relative_to(self.pod.dir.path)))

    def _layer_cache(self) -> LayerCache:
        root = self.options.layer_cache_dir or self.options.uvm_config(id="cache").state_dir / "layers"
        return LayerCache(root.absolute(), int(self.options.layer_cache_max_gb * (1 << 30)))

    @contextlib.asynccontextmanager
    async def _helper_vm(self) -> AsyncIterator[UtilityVM]:
        """A plain UVM of the configured image (no network, no shares) for work the pod's own UVM can no longer
        do (a writable layer brought back after QEMU died): one for the pod's tasks that need it at once,
        recorded in their state (the `delete` action kills it if this shim dies), stopped after the last."""
        pod = self.pod
        async with self._helper_lock():
            if pod.helper is None:
                owner = pod.owner or self.id
                vm = self._vm_factory(self.options.uvm_config(
                    id=vm_id_for(self.namespace, f"{owner}-helper"),
                    console_log=self.state_dir / "uvm-helper-console.log"))
                pod.helper = vm
                self._write_state()
                try:
                    await vm.start()
                except BaseException:
                    pod.helper = None
                    await vm.close()
                    self._write_state()
                    raise
            pod.helper_users += 1
            vm = pod.helper
            self._write_state()
        try:
            yield vm
        finally:
            pod.helper_users -= 1
            if pod.helper_users == 0 and pod.helper is vm:
                pod.helper = None
                with contextlib.suppress(errors.UvmError):
                    await stop_escalating(vm, self.options.stop_grace_s)
                await vm.close()

    def _helper_lock(self) -> asyncio.Lock:
        if self.pod.helper_lock is None:
            self.pod.helper_lock = asyncio.Lock()
        return self.pod.helper_lock

    def _write_state(self) -> None:
        """Record what a later `delete` must clean up if this shim dies: the task's directory in the pod (its
        rootfs and binds) and, for the task that brought the UVM, the VM, its QEMU pid, its network, the
        pod directory."""
        state: dict[str, object] = {"task_dir": str(self.task_dir) if self.task_dir else None}
        if (helper := self.pod.helper) is not None:
            state["helper"] = {"vm_id": helper.id, "run_dir": str(helper.config.run_dir / helper.id)}
        vm = self.pod.vm
        if self.owns_the_uvm and vm is not None:
            pid = vm.backend.pid if vm.backend is not None else None
            state.update({"vm_id": vm.id, "backend": vm.config.backend, "libvirt_uri": vm.config.libvirt_uri,
                          "hypervisor_pid": pid, "run_dir": str(vm.config.run_dir / vm.id),
                          "pod_dir": str(self.pod.dir.path),
                          "network": vm.network.record() if vm.network is not None else {}})
        leftovers.record(self.state_dir, state)

    # -- processes --------------------------------------------------------------------------------

    def _proc(self, exec_id: str) -> TaskProcess:
        p = self.procs.get(exec_id)
        if p is None:
            what = f"exec {exec_id}" if exec_id else "init process"
            raise errors.NotFoundError(f"task {self.id}: {what} not found", container=self.id)
        return p

    def _live_container(self, op: str) -> Container:
        if self.container is None:
            raise errors.NotFoundError(f"task {self.id}: {op}: not created", container=self.id)
        return self.container

    async def _watch(self, p: TaskProcess) -> None:
        """Resolve p.exit once the process exited and its output is in the FIFOs; publish TaskExit."""
        assert p.proc is not None
        if p.exec_id == INIT:
            assert self.container is not None
            info = await self.container.wait()
            if self._starting is not None:
                await asyncio.shield(self._starting)  # as runc's shim: TaskStart goes out before TaskExit
        else:
            info = await p.proc.wait()
        await p.io.drained()
        self._exited(p, exit_of(info))

    def _watch_ended(self, watcher: asyncio.Task[None]) -> None:
        """A watcher that failed (a bug): said loudly, not left for the garbage collector to mention."""
        if not watcher.cancelled() and (e := watcher.exception()) is not None:
            log.error("task %s: %s failed", self.id, watcher.get_name(), exc_info=e)

    def _exited(self, p: TaskProcess, exited: Exited) -> None:
        """p's exit: Wait returns it, and TaskExit tells containerd. A sandbox's init: the pod stops."""
        p.exit.set_result(exited)
        if p.exec_id == INIT and self.role.kind == "sandbox" and self.pod.others(self.id) and not self.deleted:
            self._pod_stop = asyncio.get_running_loop().create_task(self.stop_the_pod(), name=f"{self.id}-pod-stop")
        log.info("task %s: %s exited with %d", self.id, p.exec_id or "init", exited.status)
        self.publish("/tasks/exit", ev.TaskExit(container_id=self.id, id=p.exec_id or self.id, pid=p.pid,
                                                exit_status=exited.status, exited_at=timestamp(exited.at)))

    async def start(self, exec_id: str) -> int:
        """Start the init (the container) or a added exec; its pid. Raises StateError, NotFoundError."""
        p = self._proc(exec_id)
        container = self._live_container("start")
        if exec_id == INIT:
            if self.started or self._starting is not None:
                raise errors.StateError(f"task {self.id}: already started", container=self.id)
            self._starting = asyncio.get_running_loop().create_future()
            try:
                p.io.open_stdin()
                if self.vm is not None:
                    await self.vm.settle_network()  # `ctr run --cni` ran CNI since the create
                await container.start()
                self.started = True
                assert p.proc is not None
                p.io.attach_stdin(p.proc)
                self.publish("/tasks/start", ev.TaskStart(container_id=self.id, pid=p.pid))
            finally:
                self._starting.set_result(None)
                if not self.started:
                    self._starting = None  # it may be tried again
            return p.pid
        if p.proc is not None or p.exited is not None:
            raise errors.StateError(f"task {self.id}: exec {exec_id}: already started", container=self.id)
        assert p.spec is not None
        want_in, want_out, want_err = p.io.wants
        try:
            p.io.open_stdin()
            p.proc = await container.create_process(p.spec, stdin=want_in, stdout=want_out, stderr=want_err)
        except BaseException:
            p.exit.set_result(Exited(EXEC_FAILED_STATUS, time.time()))  # a Wait already waiting returns
            raise
        p.pid = p.proc.pid
        p.io.attach(p.proc)
        p.io.attach_stdin(p.proc)
        p.watcher = asyncio.create_task(self._watch(p), name=f"{self.id}-{exec_id}-exit")
        p.watcher.add_done_callback(self._watch_ended)
        self.publish("/tasks/exec-started", ev.TaskExecStarted(container_id=self.id, exec_id=exec_id, pid=p.pid))
        return p.pid

    async def exec_add(self, exec_id: str, spec_json: bytes, terminal: bool, stdin: str, stdout: str,
                       stderr: str) -> None:
        """Record an exec (started by start(exec_id)). Raises AlreadyExistsError, NotRunningError,
        InvalidArgumentError (bad process spec, FIFOs)."""
        if not exec_id:
            raise errors.InvalidArgumentError(f"task {self.id}: exec id must not be empty")
        if exec_id in self.procs:
            raise errors.AlreadyExistsError(f"task {self.id}: exec {exec_id} already exists", container=self.id)
        container = self._live_container("exec")
        if not self.started or container.init.exited:
            raise errors.NotRunningError(f"task {self.id}: exec {exec_id}: the container is not running",
                                         container=self.id)
        try:
            spec = oci.Process.model_validate_json(spec_json)
        except ValidationError as e:
            raise errors.InvalidArgumentError(f"task {self.id}: exec {exec_id}: process spec: {validation_summary(e)}") \
                from None
        spec.terminal = terminal
        io = ProcessIO(f"{self.id}/{exec_id}", stdin, stdout, stderr, terminal, container_id=exec_id,
                       namespace=self.namespace)
        await io.open()
        self.procs[exec_id] = TaskProcess(exec_id, io, spec)
        self.publish("/tasks/exec-added", ev.TaskExecAdded(container_id=self.id, exec_id=exec_id))

    def state(self, exec_id: str) -> ProcState:
        p = self._proc(exec_id)
        status = Status.CREATED
        if p.exited is not None:
            status = Status.STOPPED
        elif self.container is not None and self.container.state is ContainerState.PAUSED:
            status = Status.PAUSED
        elif (exec_id == INIT and self.started) or (exec_id != INIT and p.proc is not None):
            status = Status.RUNNING
        return ProcState(exec_id, p.pid, status, p.io.stdin_path, p.io.stdout_path, p.io.stderr_path,
                         p.io.terminal, p.exited)

    async def kill(self, exec_id: str, sig: int, all_processes: bool) -> None:
        """Signal a process (or all of the container's). Raises NotFoundError once it has exited."""
        p = self._proc(exec_id)
        if p.exited is not None:
            raise errors.NotFoundError(f"task {self.id}: {exec_id or 'init'}: process already finished",
                                       container=self.id)
        if exec_id == INIT:
            if all_processes and self.role.kind == "sandbox":  # CRI's stop of a pod: every container too
                await self._signal_the_pods_containers(sig)
            try:
                await self._live_container("kill").kill(sig, all_processes)
            except errors.NotRunningError:
                raise errors.NotFoundError(f"task {self.id}: process already finished", container=self.id) from None
            return
        if p.proc is None:
            raise errors.StateError(f"task {self.id}: exec {exec_id}: not started", container=self.id)
        if not await p.proc.signal(sig):
            raise errors.NotFoundError(f"task {self.id}: exec {exec_id}: process already finished", container=self.id)

    async def resize(self, exec_id: str, width: int, height: int) -> None:
        """As runc's shim: nothing to do (and no error) for a process without a terminal or a 0x0 size."""
        p = self._proc(exec_id)
        if not p.io.terminal or not width or not height:
            return
        if p.proc is None:
            assert p.spec is not None
            p.spec.consoleSize = oci.ConsoleSize(width=width, height=height)
            return
        if p.exited is None:
            await p.proc.resize_console(width, height)

    async def close_io(self, exec_id: str, stdin: bool) -> None:
        p = self._proc(exec_id)
        if stdin:
            await p.io.close_stdin(p.proc)

    async def wait(self, exec_id: str) -> Exited:
        """The process's exit, once it exited and its output reached containerd."""
        return await asyncio.shield(self._proc(exec_id).exit)

    async def pids(self) -> list[int]:
        return await self._live_container("pids").process_list()

    def exec_ids(self) -> dict[int, str]:
        """pid -> exec id of the started exec processes that have not exited."""
        return {p.pid: exec_id for exec_id, p in self.procs.items() if exec_id != INIT and p.pid and p.exited is None}

    async def stats(self) -> ContainerStatistics:
        return await self._live_container("stats").statistics()

    async def pause(self) -> None:
        await self._live_container("pause").pause()
        self.publish("/tasks/paused", ev.TaskPaused(container_id=self.id))

    async def resume(self) -> None:
        await self._live_container("resume").resume()
        self.publish("/tasks/resumed", ev.TaskResumed(container_id=self.id))

    async def update(self, resources_json: bytes) -> None:
        try:
            resources = oci.LinuxResources.model_validate_json(resources_json)
        except ValidationError as e:
            raise errors.InvalidArgumentError(f"task {self.id}: update: resources: {validation_summary(e)}") from None
        await self._live_container("update").update(resources)

    def on_oom(self, container: Container, kills: int) -> None:
        if container is self.container:
            self.publish("/tasks/oom", ev.TaskOOM(container_id=self.id))

    # -- delete -----------------------------------------------------------------------------------

    async def delete(self, exec_id: str) -> tuple[int, Exited]:
        """Remove an exited exec, or the whole task (container, UVM, rootfs mount): (pid, exit).

        Raises StateError (FAILED_PRECONDITION) for a process still running."""
        p = self._proc(exec_id)
        if exec_id != INIT:
            if p.proc is not None and p.exited is None:
                raise errors.StillRunningError(f"task {self.id}: exec {exec_id}: cannot delete a running process",
                                               container=self.id)
            del self.procs[exec_id]
            await p.io.close()
            if p.proc is not None:
                p.proc.close()
            return p.pid, p.exited or Exited(0, time.time())
        if (self.started or self._starting is not None) and p.exited is None:
            raise errors.StillRunningError(f"task {self.id}: cannot delete a running task", container=self.id)
        await self.teardown()
        exited = p.exited or Exited(137, time.time())  # created, never started: killed by the delete
        self.publish("/tasks/delete", ev.TaskDelete(container_id=self.id, pid=p.pid, exit_status=exited.status,
                                                    exited_at=timestamp(exited.at)))
        return p.pid, exited

    async def teardown(self) -> None:
        """Stop and release everything: container, UVM, FIFO relays, rootfs mount, state file. Idempotent.

        Runs to its end even if the caller is cancelled (a Delete past its deadline, containerd gone):
        a half-done teardown would leave the VM running with no record for `delete` to find it by."""
        self.deleted = True
        if self._teardown_task is None:
            self._teardown_task = asyncio.create_task(self._teardown(), name=f"{self.id}-teardown")
        await asyncio.shield(self._teardown_task)

    async def _teardown(self) -> None:
        owner = self.owns_the_uvm
        save_error: errors.UvmError | None = None
        log.info("task %s: tearing down its container%s and mounts", self.id, ", the pod's UVM" if owner else "")
        released = False
        try:
            if self._pod_stop is not None:
                await asyncio.gather(self._pod_stop, return_exceptions=True)
            if self.container is not None:
                with contextlib.suppress(errors.UvmError):
                    await self.container.close()
            if self.block is not None:
                save_error = await self._save_rootfs()
                await self.block.release(self.vm)
            if owner:
                await self._stop_the_uvm()
            released = True
        finally:
            now = time.time()
            for p in list(self.procs.values()):
                if p.watcher is not None and not p.watcher.done():
                    p.watcher.cancel()
                    await asyncio.gather(p.watcher, return_exceptions=True)
                if p.proc is not None and not p.exit.done():  # killed with the container (before TaskDelete)
                    self._exited(p, Exited(137, now))
                await p.io.close()
            # Its rootfs and binds (the user's files are behind them); for the owner, the whole pod directory.
            try:
                if owner and released:
                    self.pod.dir.remove()
                elif self.task_dir is not None:
                    self.pod.dir.release_task(self.id)
                self.task_dir = None
            except errors.UvmError as e:
                log.error("task %s: %s", self.id, e.message)
                raise errors.UvmError(f"task {self.id}: mounts left under {self.pod.dir.path}", container=self.id) \
                    from None
            if released:  # else `delete` must still find the VM by this record
                leftovers.forget(self.state_dir)
        if save_error is not None:
            raise save_error

    async def _save_rootfs(self) -> errors.UvmError | None:
        """A block rootfs's writable layer back in containerd's snapshot (blockroot.py): the error, if that
        failed (the scratch is kept, and the error names it)."""
        if self.block is None:
            return None
        try:
            await self.block.save(self.vm)
        except errors.UvmError as e:
            log.error("task %s: %s", self.id, e.message)
            return e
        return None

    async def _stop_the_uvm(self) -> None:
        """The pod's UVM stopped (shutdown, then terminate) and closed; its other tasks' processes are
        reported exited by the VM's death. Idempotent."""
        vm = self.pod.vm
        if vm is not None:
            with contextlib.suppress(errors.UvmError):
                if vm.backend is not None and vm.state.value in ("running", "stopping"):
                    await stop_escalating(vm, self.options.stop_grace_s)
            await vm.close()
        if self.pod.cgroup is not None:
            self.pod.cgroup.undo(os.getpid())
            self.pod.cgroup = None

    async def _signal_the_pods_containers(self, sig: int) -> None:
        for task in self.pod.others(self.id):
            if task.container is not None and not task.container.init.exited:
                try:
                    await task.container.kill(sig, True)
                except errors.UvmError as e:
                    log.warning("task %s: signal %d to the pod's container %s: %s", self.id, sig, task.id, e.message)

    async def stop_the_pod(self) -> None:
        """The sandbox's init exited: the pod's containers are killed (each exit reported), then its UVM
        stops (the sandbox's Delete still releases the rest)."""
        await self._signal_the_pods_containers(9)
        exits = [t.procs[INIT].exit for t in self.pod.others(self.id) if INIT in t.procs]
        if exits:  # (asyncio.wait, not a timed gather: that would cancel the futures Wait hands out)
            await asyncio.wait(exits, timeout=self.options.stop_grace_s)
        # What they and the sandbox wrote, while the UVM can still send it; all at once, so that a helper UVM
        # (the UVM died) is booted once for all: CRI gives each task's Delete 10 s.
        await asyncio.gather(*(task._save_rootfs() for task in [self, *self.pod.others(self.id)]))
        await self._stop_the_uvm()
