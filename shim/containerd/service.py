"""`containerd.task.v2.Task` over ttrpc: each method parses its request, calls one Task method, and
translates uvm's errors into the status codes containerd maps (not found, already exists, failed
precondition, invalid argument, unimplemented). No lifecycle logic lives here: see shim/containerd/task.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from google.protobuf import any_pb2, empty_pb2
from google.protobuf.message import DecodeError, Message

from schemas.containerd import cgroups_v2_metrics_pb2 as cg2
from schemas.containerd import diag_pb2, runc_options_pb2, types_task_pb2
from schemas.containerd import shim_pb2 as pb
from schemas.containerd.runtime_options import config_path
from schemas.shim_options import OptionsError, ShimOptions, find_config, load_options
from schemas.uvm_config import UvmConfig
from shim.containerd.events import Publisher, timestamp
from shim.containerd.pod import Pod
from shim.containerd.task import INIT, Exited, Task
from shim.containerd.ttrpc import Code, Server, TtrpcError
from uvm import errors
from uvm.container import ContainerStatistics
from uvm.vm import UtilityVM

log = logging.getLogger("uvmshim.service")

SERVICE = "containerd.task.v2.Task"
DIAG_SERVICE = "uvmshim.diag.v1.Diag"  # schemas/containerd/diag.proto: `runuvm uvm list|exec`
VERSION = "uvmshim 0.1.0"

Req = TypeVar("Req", bound=Message)


def to_status(e: Exception) -> TtrpcError:
    """uvm's errors as containerd's codes (errdefs.FromGRPC turns them back into its error kinds)."""
    code = Code.UNKNOWN
    if isinstance(e, errors.NotFoundError):
        code = Code.NOT_FOUND
    elif isinstance(e, errors.AlreadyExistsError):
        code = Code.ALREADY_EXISTS
    elif isinstance(e, (errors.InvalidArgumentError, errors.ConfigError, OptionsError)):
        code = Code.INVALID_ARGUMENT
    elif isinstance(e, errors.AgentUnsupportedError):
        code = Code.UNIMPLEMENTED
    elif isinstance(e, errors.WaitTimeoutError):
        code = Code.DEADLINE_EXCEEDED
    elif isinstance(e, errors.StateError):
        code = Code.FAILED_PRECONDITION
    return TtrpcError(code, str(e))


def config_path_from(options: any_pb2.Any | None) -> str | None:
    """ConfigPath from containerd's runtime options (`ctr run --runtime-config-path`), if present."""
    if options is None:
        return None
    try:
        return config_path(options)
    except DecodeError:
        raise TtrpcError(Code.INVALID_ARGUMENT, f"runtime options ({options.type_url}) do not decode") from None


def metrics(s: ContainerStatistics) -> any_pb2.Any:
    """io.containerd.cgroups.v2.Metrics, the type `ctr task metrics` prints."""
    c = s.container
    m = cg2.Metrics(
        pids=cg2.PidsStat(current=c.pids_current, limit=c.pids_limit or 0),
        cpu=cg2.CPUStat(usage_usec=c.cpu_usage_usec, user_usec=c.cpu_user_usec, system_usec=c.cpu_system_usec),
        memory=cg2.MemoryStat(usage=c.memory_usage, usage_limit=c.memory_limit or 0, anon=c.memory_anon,
                              file=c.memory_file),
        memory_events=cg2.MemoryEvents(oom=c.oom_events, oom_kill=c.oom_kills),
        io=cg2.IOStat(usage=[cg2.IOEntry(rbytes=c.io_rbytes, wbytes=c.io_wbytes, rios=c.io_rios, wios=c.io_wios)]))
    return any_pb2.Any(type_url=m.DESCRIPTOR.full_name, value=m.SerializeToString())


def process_details(exec_id: str) -> any_pb2.Any:
    """containerd.runc.v1.ProcessDetails{exec_id} as an Any (typeurl names it by its full proto name)."""
    details = runc_options_pb2.ProcessDetails(exec_id=exec_id)
    return any_pb2.Any(type_url=details.DESCRIPTOR.full_name, value=details.SerializeToString())


def exited_fields(exited: Exited | None) -> dict[str, Any]:
    return {} if exited is None else {"exit_status": exited.status, "exited_at": timestamp(exited.at)}


class TaskService:
    """One shim's task service: the tasks of one pod (a sandbox and its containers, or one standalone task)
    in one UVM. `shutdown_requested` is set by Shutdown once no task is left."""

    def __init__(self, namespace: str, shim_id: str, publisher: Publisher, config_path: str | None = None,
                 state_dir: Path | None = None, console_log: Path | None = None,
                 vm_factory: Callable[[UvmConfig], UtilityVM] = UtilityVM) -> None:
        self.namespace = namespace
        self._vm_factory = vm_factory  # tests: UVMs over a fake backend
        self.state_dir = state_dir
        self.console_log = console_log
        self.shim_id = shim_id
        self.publisher = publisher
        self.config_path = config_path
        self.pod: Pod[Task] = Pod(state_dir or Path.cwd())
        self.shutdown_requested = asyncio.Event()

    @property
    def live_tasks(self) -> list[Task]:
        return [t for t in self.pod.tasks.values() if not t.deleted]

    def register(self, server: Server) -> None:
        table: dict[str, tuple[type[Message], Callable[[Any], Awaitable[Message]]]] = {
            "State": (pb.StateRequest, self.state), "Create": (pb.CreateTaskRequest, self.create),
            "Start": (pb.StartRequest, self.start), "Delete": (pb.DeleteRequest, self.delete),
            "Pids": (pb.PidsRequest, self.pids), "Pause": (pb.PauseRequest, self.pause),
            "Resume": (pb.ResumeRequest, self.resume), "Checkpoint": (pb.CheckpointTaskRequest, self.checkpoint),
            "Kill": (pb.KillRequest, self.kill), "Exec": (pb.ExecProcessRequest, self.exec),
            "ResizePty": (pb.ResizePtyRequest, self.resize_pty), "CloseIO": (pb.CloseIORequest, self.close_io),
            "Update": (pb.UpdateTaskRequest, self.update), "Wait": (pb.WaitRequest, self.wait),
            "Stats": (pb.StatsRequest, self.stats), "Connect": (pb.ConnectRequest, self.connect),
            "Shutdown": (pb.ShutdownRequest, self.shutdown),
        }
        for method, (req_type, handler) in table.items():
            server.register(SERVICE, method, req_type, self._edge(method, handler))
        server.register(DIAG_SERVICE, "Info", diag_pb2.InfoRequest, self._edge("Info", self.diag_info))
        server.register(DIAG_SERVICE, "ExecInUvm", diag_pb2.ExecInUvmRequest, self._edge("ExecInUvm", self.diag_exec))

    def _edge(self, method: str, handler: Callable[[Req], Awaitable[Message]]) -> Callable[[Req], Awaitable[Message]]:
        async def call(req: Req) -> Message:
            try:
                return await handler(req)
            except (errors.UvmError, OptionsError) as e:
                log.info("%s: %s", method, e)
                raise to_status(e) from None
        return call

    def _task(self, task_id: str) -> Task:
        task = self.pod.tasks.get(task_id)
        if task is None or task.deleted:
            raise TtrpcError(Code.NOT_FOUND, f"task {task_id}: not found in shim {self.shim_id}")
        return task

    async def create(self, req: pb.CreateTaskRequest) -> pb.CreateTaskResponse:
        old = self.pod.tasks.get(req.id)
        if old is not None and not old.deleted:
            raise TtrpcError(Code.ALREADY_EXISTS, f"task {req.id}: already exists in shim {self.shim_id}")
        if req.checkpoint:
            raise TtrpcError(Code.UNIMPLEMENTED, "restoring from a checkpoint is not supported by io.containerd.uvm.v1")
        explicit = config_path_from(req.options if req.HasField("options") else None) or self.config_path
        options: ShimOptions = load_options(find_config(explicit))
        bundle = Path(req.bundle)
        # The first task keeps its files in the shim's state directory (runuvm's --root/<id>, or its bundle);
        # a pod's later containers in their own bundles.
        state_dir = self.state_dir if not self.pod.tasks and self.state_dir is not None else bundle
        task = Task(req.id, bundle, self.namespace, options, self.publisher.publish, state_dir,
                    vm_factory=self._vm_factory, console_log=self.console_log, pod=self.pod)
        try:
            pid = await task.create(list(req.rootfs), req.stdin, req.stdout, req.stderr, req.terminal)
        except BaseException:
            if self.pod.tasks.get(req.id) is task:
                del self.pod.tasks[req.id]
            raise
        return pb.CreateTaskResponse(pid=pid)

    async def start(self, req: pb.StartRequest) -> pb.StartResponse:
        return pb.StartResponse(pid=await self._task(req.id).start(req.exec_id))

    async def state(self, req: pb.StateRequest) -> pb.StateResponse:
        task = self._task(req.id)
        s = task.state(req.exec_id)
        return pb.StateResponse(id=req.id, bundle=str(task.bundle), pid=s.pid, status=s.status.name, stdin=s.stdin,
                                stdout=s.stdout, stderr=s.stderr, terminal=s.terminal, exec_id=req.exec_id,
                                **exited_fields(s.exited))

    async def delete(self, req: pb.DeleteRequest) -> pb.DeleteResponse:
        task = self._task(req.id)
        pid, exited = await task.delete(req.exec_id)
        if not req.exec_id:
            await self.publisher.flush()  # TaskExit and TaskDelete reach containerd before we go
        return pb.DeleteResponse(pid=pid, **exited_fields(exited))

    async def pids(self, req: pb.PidsRequest) -> pb.PidsResponse:
        """Every pid of the container; an exec'd one carries its exec id in info, as runc's shim does."""
        task = self._task(req.id)
        pids = await task.pids()
        execs = task.exec_ids()
        return pb.PidsResponse(processes=[types_task_pb2.ProcessInfo(pid=p, info=process_details(execs[p]))
                                          if p in execs else types_task_pb2.ProcessInfo(pid=p) for p in pids])

    async def pause(self, req: pb.PauseRequest) -> empty_pb2.Empty:
        await self._task(req.id).pause()
        return empty_pb2.Empty()

    async def resume(self, req: pb.ResumeRequest) -> empty_pb2.Empty:
        await self._task(req.id).resume()
        return empty_pb2.Empty()

    async def checkpoint(self, req: pb.CheckpointTaskRequest) -> empty_pb2.Empty:
        raise TtrpcError(Code.UNIMPLEMENTED, "checkpoint is not supported by io.containerd.uvm.v1")

    async def kill(self, req: pb.KillRequest) -> empty_pb2.Empty:
        await self._task(req.id).kill(req.exec_id, req.signal, req.all)
        return empty_pb2.Empty()

    async def exec(self, req: pb.ExecProcessRequest) -> empty_pb2.Empty:
        await self._task(req.id).exec_add(req.exec_id, req.spec.value, req.terminal, req.stdin, req.stdout, req.stderr)
        return empty_pb2.Empty()

    async def resize_pty(self, req: pb.ResizePtyRequest) -> empty_pb2.Empty:
        await self._task(req.id).resize(req.exec_id, req.width, req.height)
        return empty_pb2.Empty()

    async def close_io(self, req: pb.CloseIORequest) -> empty_pb2.Empty:
        await self._task(req.id).close_io(req.exec_id, req.stdin)
        return empty_pb2.Empty()

    async def update(self, req: pb.UpdateTaskRequest) -> empty_pb2.Empty:
        await self._task(req.id).update(req.resources.value)
        return empty_pb2.Empty()

    async def wait(self, req: pb.WaitRequest) -> pb.WaitResponse:
        exited = await self._task(req.id).wait(req.exec_id)
        return pb.WaitResponse(**exited_fields(exited))

    async def stats(self, req: pb.StatsRequest) -> pb.StatsResponse:
        return pb.StatsResponse(stats=metrics(await self._task(req.id).stats()))

    async def connect(self, req: pb.ConnectRequest) -> pb.ConnectResponse:
        task = self.pod.tasks.get(req.id)
        task_pid = task.procs[INIT].pid if task is not None and INIT in task.procs else 0
        return pb.ConnectResponse(shim_pid=os.getpid(), task_pid=task_pid, version=VERSION)

    async def shutdown(self, req: pb.ShutdownRequest) -> empty_pb2.Empty:
        """Exit the shim once no task of its pod is left (or at once with `now`); the reply goes out first.
        containerd sends one after each task's delete: a pod's shim ignores those while tasks remain."""
        if self.live_tasks and not req.now:
            return empty_pb2.Empty()
        self.shutdown_requested.set()
        return empty_pb2.Empty()

    async def diag_info(self, req: diag_pb2.InfoRequest) -> diag_pb2.InfoResponse:
        resp = diag_pb2.InfoResponse(namespace=self.namespace, task_id=self.shim_id)
        vm = self.pod.vm if self.live_tasks else None
        owner = self.pod.tasks.get(self.pod.owner or "")
        if vm is not None and owner is not None:
            resp.bundle, resp.vm_id, resp.vm_state = str(owner.bundle), vm.id, vm.state.value
            resp.backend, resp.boot_seconds = vm.config.backend, vm.boot_seconds or 0.0
            resp.hypervisor_pid = (vm.backend.pid if vm.backend is not None else None) or 0
        return resp

    async def diag_exec(self, req: diag_pb2.ExecInUvmRequest) -> diag_pb2.ExecInUvmResponse:
        """A command in the UVM itself (not in a container), for looking inside (hcsshim's shimdiag exec)."""
        if not self.live_tasks or self.pod.vm is None:
            raise TtrpcError(Code.NOT_FOUND, f"shim {self.shim_id}: no UVM")
        if not req.args:
            raise TtrpcError(Code.INVALID_ARGUMENT, "ExecInUvm: args must not be empty")
        res = await self.pod.vm.run(list(req.args), stdin=req.stdin, timeout=req.timeout_seconds or None)
        code = res.exit_status if res.exit_status is not None else 128 + (res.signal or 0)
        return diag_pb2.ExecInUvmResponse(exit_code=code, stdout=res.stdout, stderr=res.stderr, truncated=res.truncated)

    async def close(self) -> None:
        """Tear down whatever is left (the shim is going away): the containers, then the pod's UVM; then
        flush the events."""
        tasks = list(self.pod.tasks.values())
        for task in sorted(tasks, key=lambda t: t.owns_the_uvm):
            try:
                await task.teardown()
            except errors.UvmError as e:  # (logged by the task; the rest must still go)
                log.warning("closing: task %s: %s", task.id, e.message)
        await self.publisher.close()
