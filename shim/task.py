"""One containerd task: a UVM booted for it, the container inside, and the container's exec processes.

This is the logic behind the task service (shim/service.py is only its ttrpc edge). It speaks uvm/'s
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
import time
from collections.abc import Callable
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
from shim import leftovers
from shim import rootfs as host_rootfs
from shim.events import timestamp
from shim.stdio import ProcessIO
from uvm import errors
from uvm.builder import host_memory_mib
from uvm.container import Container, ContainerState, ContainerStatistics, Rootfs, SharedSource
from uvm.lifecycle import stop_escalating
from uvm.process import Process, ProcessExit
from uvm.vm import UtilityVM

log = logging.getLogger("uvmshim.task")

INIT = ""  # the exec id of a task's init process
SHARE_TAG = "rootfs"
BINDS_TAG = "binds"  # the share holding the task's bind mount sources (shim/rootfs.py)
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


def vm_id_for(namespace: str, task_id: str) -> str:
    """A UVM id naming namespace and task, unique and deterministic (the `delete` action derives it)."""
    vid = f"{namespace}.{task_id}"
    if len(vid) > 64 or not vid[0].isalnum():
        vid = f"{vid[:55].lstrip('._-') or 'task'}-{hashlib.sha256(vid.encode()).hexdigest()[:8]}"
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


def namespaces_in_the_uvm(spec: oci.Spec) -> None:
    """The container shares its UVM's network namespace (the guest's NICs stand in for the veths of the
    namespace the spec named: that is the container's network), so the spec loses its network entry; the
    paths of other namespaces to join (a pod's /proc/PID/ns/ipc, ...) are the host's, which a container in
    its own UVM cannot enter: it gets new ones of those types inside the UVM, as Kata does."""
    namespaces = (spec.linux or {}).get("namespaces")
    if not isinstance(namespaces, list):
        return
    for ns in list(namespaces):
        if isinstance(ns, dict) and ns.get("type") == "network":
            namespaces.remove(ns)
        elif isinstance(ns, dict) and "path" in ns:
            log.info("namespace %s: not joining the host's %s inside the UVM", ns.get("type"), ns.pop("path"))


ANNOTATION_MEMORY = "io.uvmshim.uvm.memory_mib"  # the task's UVM shape, as hcsshim's computetopology annotations
ANNOTATION_CPUS = "io.uvmshim.uvm.cpus"
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
                 vm_factory: Callable[[UvmConfig], UtilityVM] = UtilityVM, console_log: Path | None = None) -> None:
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
        self.vm: UtilityVM | None = None
        self.container: Container | None = None
        self.procs: dict[str, TaskProcess] = {}
        self.rootfs_mounted: Path | None = None
        self.binds_staged: Path | None = None
        self.started = False
        self.deleted = False
        self._starting: asyncio.Future[None] | None = None  # the init's Start, until it answered
        self._teardown_task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<Task {self.namespace}/{self.id} procs={sorted(self.procs)} vm={self.vm!r}>"

    # -- create -----------------------------------------------------------------------------------

    async def create(self, rootfs: list[mount_pb2.Mount], stdin: str, stdout: str, stderr: str,
                     terminal: bool) -> int:
        """Boot the UVM and create (not start) the container. Everything is undone on failure.

        Raises InvalidArgumentError (bundle, spec, rootfs, FIFOs), StartError (the UVM), AgentError."""
        try:
            spec_text = (self.bundle / "config.json").read_bytes()
        except OSError as e:
            raise errors.InvalidArgumentError(f"bundle {self.bundle}: config.json: {e.strerror}") from None
        spec = parse_spec_json(spec_text, f"bundle {self.bundle}: config.json")
        spec.process.terminal = terminal
        io = ProcessIO(self.id, stdin, stdout, stderr, terminal, namespace=self.namespace)
        init = TaskProcess(INIT, io)
        try:
            await io.open()
            binds = host_rootfs.bind_mounts([(m.destination, m.source, m.type, m.options) for m in spec.mounts],
                                            self.bundle)
            network: str | None = network_namespace_of(spec)
            if network == NEW_NETNS and self.options.uvm_config(id="net").backend != "qemu":
                log.info("task %s: the %s backend gives a UVM no network of its own", self.id,
                         self.options.uvm_config(id="net").backend)
                network = None
            shape = uvm_shape(spec, self.options)
            root = self._prepare_rootfs(rootfs, spec)
            shares = [Share(tag=SHARE_TAG, host_path=root, readonly=bool(spec.root and spec.root.readonly))]
            if binds:
                self.binds_staged = self.state_dir / host_rootfs.BINDS_DIR
                host_rootfs.stage_binds(binds, self.binds_staged)
                shares.append(Share(tag=BINDS_TAG, host_path=self.binds_staged, readonly=all(b.readonly for b in binds)))
            namespaces_in_the_uvm(spec)
            self.vm = self._vm_factory(self.options.uvm_config(
                id=vm_id_for(self.namespace, self.id), shares=shares, console_log=self.console_log,
                network_namespace=network, **shape))
            self.vm.oom_listeners.append(self.on_oom)
            self.vm.network_listeners.append(self._write_state)  # its taps exist: the delete action must know
            self._write_state()
            await self.vm.start()
            self._write_state()
            want_in, want_out, want_err = io.wants
            self.container = await self.vm.create_container(
                self.id, spec, Rootfs(share=SHARE_TAG), stdin=want_in, stdout=want_out, stderr=want_err,
                mount_sources={b.index: SharedSource(BINDS_TAG, str(b.index)) for b in binds})
        except BaseException:
            await io.close()
            await self.teardown()
            raise
        init.proc = self.container.init
        # The task's pid is QEMU's, as Kata reports the hypervisor's: /proc/<pid>/ns/net is the UVM's network
        # namespace, which `ctr run --cni` configures after this create and CRI names in the specs of a pod's
        # other containers. The guest's pids are what Pids lists.
        init.pid = self.vm.backend.pid if self.vm.backend is not None and self.vm.backend.pid else init.proc.pid
        io.attach(init.proc)
        self.procs[INIT] = init
        init.watcher = asyncio.create_task(self._watch(init), name=f"{self.id}-init-exit")
        self.publish("/tasks/create", ev.TaskCreate(
            container_id=self.id, bundle=str(self.bundle), rootfs=rootfs, pid=init.pid,
            io=ev.TaskIO(stdin=stdin, stdout=stdout, stderr=stderr, terminal=terminal)))
        return init.pid

    def _prepare_rootfs(self, mounts: list[mount_pb2.Mount], spec: oci.Spec) -> Path:
        if mounts:
            target = self.bundle / "rootfs"
            target.mkdir(exist_ok=True)
            host_rootfs.mount_all([host_rootfs.HostMount(m.type, m.source, tuple(m.options)) for m in mounts], target)
            self.rootfs_mounted = target
            return target
        if spec.root is None:
            raise errors.InvalidArgumentError(f"bundle {self.bundle}: config.json has no root and no rootfs mounts came")
        return host_rootfs.host_root(self.bundle, spec.root.path)

    def _write_state(self) -> None:
        """Record what a later `delete` must clean up if this shim dies (VM, its QEMU pid, mounts)."""
        assert self.vm is not None
        pid = self.vm.backend.pid if self.vm.backend is not None else None
        state = {"vm_id": self.vm.id, "backend": self.vm.config.backend, "libvirt_uri": self.vm.config.libvirt_uri,
                 "hypervisor_pid": pid, "run_dir": str(self.vm.config.run_dir / self.vm.id),
                 "rootfs_mounted": str(self.rootfs_mounted) if self.rootfs_mounted else None,
                 "network": self.vm.network.record() if self.vm.network is not None else {}}
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

    def _exited(self, p: TaskProcess, exited: Exited) -> None:
        """p's exit: Wait returns it, and TaskExit tells containerd."""
        p.exit.set_result(exited)
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
        log.info("task %s: tearing down its container, UVM and mounts", self.id)
        released = False
        try:
            if self.container is not None:
                with contextlib.suppress(errors.UvmError):
                    await self.container.close()
            if self.vm is not None:
                with contextlib.suppress(errors.UvmError):
                    if self.vm.backend is not None and self.vm.state.value in ("running", "stopping"):
                        await stop_escalating(self.vm, self.options.stop_grace_s)
                await self.vm.close()
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
            # The binds first (the user's files are behind them), each step whatever the other did.
            unmounted = True
            for attr, undo in (("binds_staged", host_rootfs.unstage_binds), ("rootfs_mounted", host_rootfs.unmount)):
                path = getattr(self, attr)
                if path is not None:
                    try:
                        undo(path)
                        setattr(self, attr, None)
                    except errors.UvmError as e:
                        log.error("task %s: %s", self.id, e.message)
                        unmounted = False
            if not unmounted:
                raise errors.UvmError(f"task {self.id}: mounts left under {self.state_dir}", container=self.id)
            if released:  # else `delete` must still find the VM by this record
                leftovers.forget(self.state_dir)
