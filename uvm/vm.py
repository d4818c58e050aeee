"""UtilityVM: the lifecycle contract of shared/DESIGN.md on one VM.

* ``start()`` returns when the agent answered hello; it has a deadline, and on any failure the
  VM is torn down (no process, socket or directory left) before the error is raised.
* ``shutdown()`` asks gracefully (agent first, ACPI fallback) and returns at once;
  ``terminate()`` forces and returns at once; neither is an error on a stopped VM.
* ``wait()`` returns once the VM has exited and its host resources are released; every waiter
  sees the same result. An exit nobody asked for (QEMU killed or crashed, guest panic) raises
  ``VmDiedError`` with QEMU's status and the console tail: never reported as success.
* ``wait_timeout(t)`` raises ``WaitTimeoutError`` after t seconds and leaves the VM running.
* ``close()`` terminates if needed and releases everything; idempotent, shielded from cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from schemas import agent as proto
from schemas import agent_models as models
from schemas import oci
from schemas.uvm_config import UvmConfig
from schemas.validation import guest_problem, guest_text
from uvm import builder, errors
from uvm.backends.base import Backend, HypervisorExit
from uvm.container import Container, ContainerState, Rootfs, SharedSource
from uvm.lifecycle import VmState
from uvm.link import AgentClient, AgentConnection
from uvm.process import Process, ProcessTable
from uvm.scsi import MappedDisk, ScsiManager

if TYPE_CHECKING:
    from uvm.network import VmNetwork  # imported when a VM has a network (pyroute2)
    from uvm.template import Template  # imported when a template is asked for

SHUTDOWN_REQUEST_TIMEOUT_S = 2.0
CONSOLE_TAIL_LINES = 30
CLONE_TIMEOUT_S = 20.0
SSH_PORT_ATTEMPTS = 3
HOSTFWD_REFUSED = "Could not set up host forwarding rule"  # QEMU's words when the ssh port is taken
GUEST_LOG_LINE_LIMIT = 4096  # characters of a guest log line shown, once escaped (a LogEvent's own cap)

BackendFactory = Callable[[builder.LaunchSpec], Backend]


class LogBudget:
    """A token bucket for the guest's log notifications: a guest cannot flood the shim's log."""

    RATE = 50  # lines a second, on average
    BURST = 200

    def __init__(self) -> None:
        self.tokens = float(self.BURST)
        self.last = 0.0
        self.dropped = 0

    def take(self, now: float) -> int | None:
        """None: drop this line; else log it, after a note of how many were dropped before it (0: none)."""
        self.tokens = min(self.BURST, self.tokens + (now - self.last) * self.RATE)
        self.last = now
        if self.tokens < 1:
            self.dropped += 1
            return None
        self.tokens -= 1
        dropped, self.dropped = self.dropped, 0
        return dropped


@dataclass(frozen=True)
class VmExit:
    """How a VM ended. ``reason``: shutdown, terminated, poweroff (guest-initiated) or died."""

    reason: str
    hypervisor: HypervisorExit
    at: float  # time.time() of the exit

    @property
    def success(self) -> bool:
        return self.reason != "died"


def classify_exit(hv: HypervisorExit, requested: str | None) -> str:
    """shutdown | terminated | poweroff | died, from how QEMU ended and what we asked for."""
    if requested in ("terminate", "save"):
        return "terminated"
    if hv.shutdown_reason == "guest-shutdown" and hv.exit_status == 0:
        return "shutdown" if requested == "shutdown" else "poweroff"
    return "died"


def default_backend(spec: builder.LaunchSpec) -> Backend:
    """The backend the config names (libvirt-python is imported only when it is used)."""
    if spec.backend == "libvirt":
        from uvm.backends.libvirt import LibvirtBackend

        return LibvirtBackend(spec)
    from uvm.backends.qemu import QemuBackend

    return QemuBackend(spec)


class UtilityVM:
    def __init__(self, config: UvmConfig, backend_factory: BackendFactory | None = None,
                 spec_update: Mapping[str, Any] | None = None) -> None:
        self.config = config
        self._spec_update = dict(spec_update or {})
        self.started_from = "cold"  # or "template" (a clone)
        self.start_note = ""  # why a template was not used, when one was asked for
        self.id = config.id
        self.log = logging.getLogger(f"uvm.{self.id}")
        self._backend_factory = backend_factory or default_backend
        self.state = VmState.CREATED
        self.spec: builder.LaunchSpec | None = None
        self.backend: Backend | None = None
        self.agent: AgentClient | None = None
        self._conn: AgentConnection | None = None
        self.hello: models.HelloResult | None = None
        self.boot_seconds: float | None = None
        self.launch_seconds: float | None = None  # of boot_seconds: until the hypervisor was up (QMP, libvirt)
        self._stop_requested: str | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._exit: asyncio.Future[tuple[VmExit, errors.VmDiedError | None]] | None = None
        self._close_task: asyncio.Task[None] | None = None
        self._console_at_exit = ""
        self._console_at_failure = ""
        self._start_failed = False
        self._phase = ""  # of a start: launch (the hypervisor coming up), then agent (its hello)
        self._closing = False
        self._start_done = asyncio.Event()
        self.processes = ProcessTable()
        self.scsi = ScsiManager(self, config.scsi_controllers)
        self.containers: dict[str, Container] = {}
        self.oom_listeners: list[Callable[[Container, int], None]] = []
        self.network_listeners: list[Callable[[], None]] = []  # told when the network's taps were made
        self._guest_log = LogBudget()
        self._link_lost: errors.UvmError | None = None
        self._link_kill: asyncio.Task[None] | None = None
        self.network: VmNetwork | None = None  # config.network_namespace's taps (uvm/network.py)
        self._network_task: asyncio.Task[None] | None = None  # a new namespace: waiting for CNI's link

    def __repr__(self) -> str:
        pid = self.backend.pid if self.backend else None
        return f"<UtilityVM {self.id} {self.state.value} pid={pid}>"

    # -- start ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Boot the VM; return when the agent answered hello.

        Raises ConfigError (bad config for this host, nothing started), StartError or
        BootTimeoutError (carrying the console tail; everything torn down), StateError.
        """
        self._check_not_closed("start")
        if self.state is not VmState.CREATED:
            raise errors.StateError(f"VM {self.id}: start: already {self.state.value}", vm_id=self.id)
        t0 = time.monotonic()
        self.state = VmState.STARTING
        try:
            await self._start(t0)
        except BaseException:
            await asyncio.shield(self._release_network())
            raise
        finally:
            self._start_done.set()

    async def _start(self, t0: float) -> None:
        try:
            spec = await asyncio.to_thread(builder.build, self.config)
        except BaseException:
            self.state = VmState.CREATED  # nothing was started
            raise
        if self._spec_update:
            spec = dataclasses.replace(spec, **self._spec_update)
        if self.config.network_namespace is not None:
            try:
                spec = await self._open_network(spec)
            except BaseException:
                self.state = VmState.CREATED  # nothing was started
                raise
        if self.config.start != "cold" and not self._spec_update:
            from uvm import template

            tmpl = await self._find_template(spec)
            if tmpl is not None:
                try:
                    await self._launch_retrying_port(spec, t0, tmpl)
                    self.started_from = "template"
                    return
                except errors.StartError as e:
                    if self._closing:
                        raise
                    self.start_note = f"template {tmpl.key} failed to load: {e.message.splitlines()[0]}"
                    self.log.warning("%s: booting cold", self.start_note)
                    await asyncio.to_thread(template.discard, tmpl)  # rebuilt on the next use
                    self._reset_after_failed_start()
        await self._launch_retrying_port(spec, t0, None)

    async def _launch_retrying_port(self, spec: builder.LaunchSpec, t0: float, tmpl: Template | None) -> None:
        """Launch (a clone of tmpl, or cold). An ssh port the builder chose free may be taken by another
        process before QEMU binds it: QEMU then refuses to start, and a fresh port is tried."""
        for attempt in range(1, SSH_PORT_ATTEMPTS + 1):
            try:
                await self._launch(self._clone_spec(tmpl, spec) if tmpl else spec, t0, clone=tmpl is not None)
                return
            except errors.StartError as e:
                if (self.config.ssh_port != 0 or HOSTFWD_REFUSED not in e.message or attempt == SSH_PORT_ATTEMPTS
                        or self._closing):
                    raise
                self.log.info("ssh port %s was taken before QEMU bound it: trying another", spec.ssh_port)
                self._reset_after_failed_start()
                spec = dataclasses.replace(spec, ssh_port=await asyncio.to_thread(builder.loopback_port, 0))

    async def _open_network(self, spec: builder.LaunchSpec) -> builder.LaunchSpec:
        """The network namespace taken over (its taps made), and spec with its NICs and namespace. Raises
        NetworkError (nothing left behind)."""
        from uvm.network import VmNetwork

        assert self.config.network_namespace is not None
        # One queue per vCPU (multi-queue), vhost-net where KVM runs the guest.
        network = VmNetwork(self.id, self.config.network_namespace, queues=spec.cpus, vhost=spec.accel == "kvm")
        await network.open()
        self.network = network
        for listener in self.network_listeners:
            listener()
        nics = network.nics(lambda n, a: a.mac or builder.PLACEHOLDER_MAC)
        return dataclasses.replace(spec, nics=nics, netns_fd=network.netns_fd)

    @staticmethod
    def _clone_spec(tmpl: Template, spec: builder.LaunchSpec) -> builder.LaunchSpec:
        """A clone's NICs are the template's: whatever MAC the command line says, the saved device state
        brings the template's (the guest then gives each its veth's)."""
        nics = tuple(dataclasses.replace(nic, mac=builder.PLACEHOLDER_MAC) for nic in spec.nics)
        return tmpl.clone_spec(dataclasses.replace(spec, nics=nics))

    async def _find_template(self, spec: builder.LaunchSpec) -> Template | None:
        """The template to clone from, or None (with a warning naming why) to boot cold."""
        from uvm import template

        if len(spec.nics) > 1:
            self.start_note = f"no template: the VM has {len(spec.nics)} NICs (templates carry one at most)"
            self.log.warning("%s: booting cold", self.start_note)
            return None
        try:
            return await asyncio.to_thread(template.find, self.config, spec)
        except errors.TemplateError as e:
            problem = e
        if self.config.start == "template" and spec.backend == "qemu":
            if not problem.context.get("missing"):
                self.log.warning("%s: rebuilding it", problem)
            try:
                # Not forced: a template another process built meanwhile (under the build lock) is used.
                return await template.build(self.config, UtilityVM)
            except errors.TemplateError as e:
                problem = e
        elif self.config.template_autobuild and spec.backend == "qemu":
            template.build_in_background(self.config)
        self.start_note = f"no usable template: {problem}"
        self.log.warning("%s: booting cold", self.start_note)
        return None

    def _reset_after_failed_start(self) -> None:
        """Forget a failed attempt (everything of it was released) so start can try again cold."""
        self.backend = self._conn = self.agent = self.hello = None
        self._watcher = None
        self._exit = None
        self._stop_requested = None
        self._start_failed = False
        self._link_lost = None
        self._link_kill = None
        self.state = VmState.STARTING

    async def _launch(self, spec: builder.LaunchSpec, t0: float, *, clone: bool) -> None:
        self.spec = spec
        backend = self._backend_factory(spec)
        self.backend = backend
        self._exit = asyncio.get_running_loop().create_future()
        try:
            if self._closing:
                raise errors.ClosedError(f"VM {self.id}: closed while starting", vm_id=self.id)
            # A clone that is not up well within a cold boot's time will not be: boot cold instead.
            limit = CLONE_TIMEOUT_S if clone else math.inf
            self._phase = "launch"  # each phase has its own deadline, and a timeout names the phase
            async with asyncio.timeout(min(self.config.launch_timeout, limit)):
                await backend.launch(spec)
            self.launch_seconds = time.monotonic() - t0
            self._phase = "agent"
            async with asyncio.timeout(min(self.config.boot_timeout, limit)):
                self._watcher = asyncio.get_running_loop().create_task(self._watch(), name=f"{self.id}-watch")
                self._conn = AgentConnection(self.id, on_notify=self._on_notify)
                self._conn.on_fail = self._on_link_lost
                await self._conn.open(await backend.connect_agent())
                self.agent = AgentClient(self._conn)
                if clone:
                    # The clone's kernel carries the template's random state, clock and name: its
                    # handshake gives it the host's. One request, not hello + another: under
                    # emulation a clone's first requests run on an empty translation cache (~50 ms each).
                    hello = await self.agent.resume_clone(self.id, time.time_ns(), os.urandom(64))
                else:
                    hello = await self.agent.hello()
                self.hello = hello
                if self.network is not None:
                    await self._network_up(spec, clone)
            if self._closing:
                raise errors.ClosedError(f"VM {self.id}: closed while starting", vm_id=self.id)
        except BaseException as e:
            await self._abort_start(e, t0)
            if self._closing and not isinstance(e, asyncio.CancelledError):
                raise errors.ClosedError(f"VM {self.id}: closed while starting", vm_id=self.id) from None
            raise self._start_error(e) from (None if isinstance(e, asyncio.CancelledError) else e)
        self.boot_seconds = time.monotonic() - t0
        self.state = VmState.RUNNING
        if self.network is not None:
            self.network.launched()  # (not before: a failed clone's taps serve the cold boot that follows)
        self.log.info("started%s in %.2fs (agent v%d, kernel %s, accel %s)", " from a template" if clone else "",
                      self.boot_seconds, hello.version, guest_text(hello.kernel), spec.accel)

    async def _network_up(self, spec: builder.LaunchSpec, clone: bool) -> None:
        """A joined namespace's NICs are configured in the guest before start returns, a new namespace's
        once CNI adds its link (watched for the VM's life)."""
        assert self.network is not None and self.agent is not None
        network, configure, macs = self.network, self.agent.configure_network, self._nic_macs(spec, clone)
        if network.config is not None:
            await network.configure_guest(configure, macs)
        elif network.attachments:
            self._network_task = asyncio.get_running_loop().create_task(
                self._watch_network(network.take_over(configure, macs)), name=f"{self.id}-network")

    def _nic_macs(self, spec: builder.LaunchSpec, clone: bool) -> list[str]:
        """The MACs the guest's NICs have now: the command line's, or for a clone the template's."""
        return [builder.PLACEHOLDER_MAC if clone else nic.mac for nic in spec.nics]

    async def _watch_network(self, take_over: Awaitable[None]) -> None:
        try:
            await take_over
        except errors.UvmError as e:  # the VM goes on, without the network it was to get
            self.log.error("network: %s", e)

    async def settle_network(self) -> bool:
        """For a container about to start: when CNI has filled a new namespace by now, take it over and
        configure the guest before returning (ctr run --cni adds the link between the task's create and
        its start). Whether the VM has a network. Raises NetworkError, AgentError."""
        if self.network is None or self.spec is None:
            return False
        return await self.network.settle(self._client("settle_network").configure_network,
                                         self._nic_macs(self.spec, self.started_from == "template"))

    async def _release_network(self) -> None:
        """Leave the network namespace as CNI made it (shielded; idempotent)."""
        task, self._network_task = self._network_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        network, self.network = self.network, None
        if network is not None:
            await asyncio.shield(network.close())

    async def _abort_start(self, cause: BaseException, t0: float) -> None:
        self._start_failed = True
        self._stop_requested = "terminate"
        backend = self.backend
        tail = backend.console_tail(CONSOLE_TAIL_LINES) if backend else ""
        self._console_at_failure = tail or self._console_at_exit
        with contextlib.suppress(Exception):
            await asyncio.shield(self._release())
        if self.state is not VmState.CLOSED:
            self.state = VmState.STOPPED

    def _start_error(self, e: BaseException) -> BaseException:
        if isinstance(e, (asyncio.CancelledError, errors.ConfigError, errors.AlreadyExistsError)):
            return e
        tail = self._console_at_failure
        if isinstance(e, TimeoutError) and not isinstance(e, errors.UvmError):
            if self._phase == "launch":
                hint = getattr(self.backend, "slow_launch_hint", lambda: "")()
                backend = getattr(self.backend, "name", self.config.backend)
                return errors.BootTimeoutError(
                    f"VM {self.id}: the {backend} backend did not bring the hypervisor up within the launch timeout "
                    f"of {self.config.launch_timeout:g}s{hint}", console_tail=tail, vm_id=self.id)
            return errors.BootTimeoutError(
                f"VM {self.id}: the agent did not answer within the boot timeout of {self.config.boot_timeout:g}s "
                f"(counted from the hypervisor up, {self.launch_seconds or 0:.1f}s after the start)",
                console_tail=tail, vm_id=self.id)
        exit_info = self._exit.result()[0] if self._exit is not None and self._exit.done() else None
        if exit_info is not None and exit_info.reason == "died":
            return errors.StartError(f"VM {self.id}: QEMU {exit_info.hypervisor.describe()} during boot",
                                     console_tail=tail, vm_id=self.id)
        if isinstance(e, errors.StartError):
            return errors.StartError(e.message, console_tail=tail, vm_id=self.id)
        return errors.StartError(f"VM {self.id}: start failed: {e}", console_tail=tail, vm_id=self.id)

    # -- exit watching -------------------------------------------------------------------------

    async def _watch(self) -> None:
        """Owned by the VM: waits for the hypervisor to end, then fails the link and releases."""
        assert self.backend is not None and self._exit is not None
        hv = await self.backend.wait_exit()
        reason = classify_exit(hv, self._stop_requested)
        self._console_at_exit = tail = self.backend.console_tail(CONSOLE_TAIL_LINES)
        died: errors.VmDiedError | None = None
        if self._link_kill is not None:
            await asyncio.gather(self._link_kill, return_exceptions=True)
        if reason == "died":
            why = f"the agent link was lost ({self._link_lost}); " if self._link_lost is not None else ""
            died = errors.VmDiedError(f"VM {self.id} died: {why}QEMU {hv.describe()}", console_tail=tail, vm_id=self.id)
            self.log.error("VM died: QEMU %s", hv.describe())
        if self._conn is not None:
            self._conn.fail(died or errors.LinkError(f"VM {self.id}: stopped ({reason})", vm_id=self.id))
        # Everything that ran in it is gone: report every process exited (never as success).
        self.processes.vm_died()
        for c in self.containers.values():
            if c.state is not ContainerState.CLOSED:
                c.state = ContainerState.STOPPED
        exit_info = VmExit(reason, hv, time.time())
        await self._release_resources()
        if self.state is not VmState.STARTING:  # (a failed start releases it, or a retry reuses it)
            await self._release_network()
        if self.state is not VmState.CLOSED:
            self.state = VmState.STOPPED
        if not self._exit.done():
            self._exit.set_result((exit_info, died))

    async def _release_resources(self) -> None:
        if self._conn is not None:
            await self._conn.aclose()
        if self.backend is not None:
            await self.backend.aclose()

    async def _release(self) -> None:
        """Stop the hypervisor if needed and release everything (start failure and close)."""
        if self.backend is not None:
            await self.backend.terminate()
        if self._watcher is not None:
            await self._watcher
        else:
            await self._release_resources()

    # -- contract verbs ------------------------------------------------------------------------

    def _check_not_closed(self, op: str) -> None:
        if self.state is VmState.CLOSED:
            raise errors.ClosedError(f"VM {self.id}: {op}: closed", vm_id=self.id)

    def _check_started(self, op: str) -> None:
        self._check_not_closed(op)
        if self.state in (VmState.CREATED, VmState.STARTING):
            raise errors.NotRunningError(f"VM {self.id}: {op}: not started", vm_id=self.id)

    async def shutdown(self) -> None:
        """Ask the guest to stop gracefully; return at once. No error if already stopped."""
        self._check_started("shutdown")
        if self.state is VmState.STOPPED:
            return
        if self._stop_requested is None:
            self._stop_requested = "shutdown"
        self.state = VmState.STOPPING
        assert self.backend is not None
        if self.agent is not None and self._conn is not None and self._conn.closed is None:
            try:
                await asyncio.wait_for(self.agent.shutdown(), SHUTDOWN_REQUEST_TIMEOUT_S)
                return
            except (TimeoutError, errors.UvmError) as e:
                self.log.warning("agent shutdown failed (%s): falling back to ACPI power-down", e)
        await self.backend.request_powerdown()

    async def terminate(self) -> None:
        """Force the VM to stop; return at once. No error if already stopped."""
        self._check_started("terminate")
        if self.state is VmState.STOPPED:
            return
        self._stop_requested = "terminate"
        self.state = VmState.STOPPING
        assert self.backend is not None
        await self.backend.terminate()

    async def wait(self) -> VmExit:
        """Block until the VM exited and its resources are released.

        Raises VmDiedError if it stopped without being asked to; NotRunningError if never started.
        """
        self._check_started("wait")
        if self._start_failed or self._exit is None:
            raise errors.NotRunningError(f"VM {self.id}: wait: the VM did not start", vm_id=self.id)
        exit_info, died = await asyncio.shield(self._exit)
        if died is not None:
            raise died.with_traceback(None)  # one error object, raised for every waiter
        return exit_info

    async def wait_timeout(self, timeout: float) -> VmExit:
        """wait(), but raise WaitTimeoutError after timeout seconds (the VM keeps running)."""
        try:
            return await asyncio.wait_for(self.wait(), timeout)
        except TimeoutError:
            raise errors.WaitTimeoutError(f"VM {self.id}: still running after {timeout:g}s", vm_id=self.id) from None

    async def close(self) -> None:
        """Terminate if running and release every host resource. Idempotent; shielded."""
        if self._close_task is None:
            self._close_task = asyncio.get_running_loop().create_task(self._close(), name=f"{self.id}-close")
        await asyncio.shield(self._close_task)

    async def _close(self) -> None:
        try:
            if self.state is VmState.STARTING:
                # start() is running in another task: make it fail and tear down, then wait for it.
                self._closing = True
                if self.backend is not None:
                    await self.backend.terminate()
                await self._start_done.wait()
            if self.state in (VmState.RUNNING, VmState.STOPPING):
                self._stop_requested = self._stop_requested or "terminate"
                if self._stop_requested == "shutdown":
                    self._stop_requested = "terminate"
                await self._release()
            elif self.state is VmState.STOPPED and self._watcher is not None:
                await self._watcher
        finally:
            await self._release_network()
            self.state = VmState.CLOSED

    # -- operations in the UVM -----------------------------------------------------------------

    async def save_state(self, dest: Path) -> None:
        """Save this running VM as a template (uvm/template.py): the link is closed first, so the
        guest agent waits for a new host; the hypervisor is stopped and left for close()."""
        self._check_started("save")
        if self.state is not VmState.RUNNING or self.backend is None:
            raise errors.NotRunningError(f"VM {self.id}: save: {self.state.value}", vm_id=self.id)
        save = getattr(self.backend, "save_state", None)
        if save is None:
            raise errors.TemplateError(f"VM {self.id}: the {self.backend.name} backend cannot save templates")
        self._stop_requested = "save"
        if self._conn is not None:
            await self._conn.aclose(errors.LinkError(f"VM {self.id}: saved as a template", vm_id=self.id))
        await save(dest)

    def agent_client(self, op: str) -> AgentClient:
        """The agent of a running VM (raises NotRunningError/ClosedError otherwise)."""
        return self._client(op)

    def _client(self, op: str) -> AgentClient:
        self._check_started(op)
        if self.state is not VmState.RUNNING or self.agent is None:
            raise errors.NotRunningError(f"VM {self.id}: {op}: VM is {self.state.value}", vm_id=self.id)
        return self.agent

    async def ping(self, seq: int = 0) -> None:
        await self._client("ping").ping(seq)

    async def run(
        self,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes = b"",
        timeout: float | None = None,
    ) -> models.RunResult:
        """Run a command in the UVM itself to completion: exit status and captured output.

        Raises AgentNotFoundError (no such program), AgentInvalidArgumentError, LinkError/VmDiedError.
        """
        return await self._client("run").run(argv, env=env, cwd=cwd, stdin=stdin, timeout=timeout)

    # -- processes and containers ---------------------------------------------------------------

    def _on_link_lost(self, error: errors.UvmError) -> None:
        """The agent link failed while the VM runs: nothing in it can be observed or controlled any
        more, so the VM is terminated and reported dead (never as a success)."""
        if self.state is not VmState.RUNNING or self._stop_requested is not None or self.backend is None:
            return
        self._link_lost = error
        self._stop_requested = "link-lost"
        self.state = VmState.STOPPING
        self.log.error("agent link lost (%s): terminating VM %s", error, self.id)
        self._link_kill = asyncio.get_running_loop().create_task(self.backend.terminate(), name=f"{self.id}-link-lost")

    def _on_notify(self, msg: dict[str, Any]) -> None:
        """Guest notifications, validated (a bad one drops the link: GuestProtocolError)."""
        event = msg.get("event")
        try:
            if event == proto.EVENT_EXIT:
                self.processes.on_exit(models.ExitEvent.model_validate(msg))
            elif event == proto.EVENT_OOM:
                oom = models.OomEvent.model_validate(msg)
                c = self.containers.get(oom.container)
                if c is not None:
                    # memory.events' oom_kill only grows: one notification (and one event) per increase.
                    if oom.oom_kills < c.oom_kills:
                        raise errors.GuestProtocolError(
                            f"container {c.id}: oom_kills went down from {c.oom_kills} to {oom.oom_kills}")
                    if oom.oom_kills == c.oom_kills:
                        return
                    c.oom_kills = oom.oom_kills
                    for listener in self.oom_listeners:
                        listener(c, oom.oom_kills)
            elif event == proto.EVENT_LOG:
                rec = models.LogEvent.model_validate(msg)
                dropped = self._guest_log.take(time.monotonic())
                if dropped is not None:
                    if dropped:
                        self.log.warning("guest: %d log lines dropped (more than %d a second)", dropped,
                                         LogBudget.RATE)
                    self.log.log({"debug": 10, "info": 20, "warning": 30, "error": 40}[rec.level], "guest: %s",
                                 guest_text(rec.message, GUEST_LOG_LINE_LIMIT))
            else:
                raise errors.GuestProtocolError(f"unknown notification {str(event)[:64]!r}")
        except ValidationError as e:
            raise errors.GuestProtocolError(f"invalid {str(event)[:64]} notification: {guest_problem(e)}") from None

    async def _with_stdio(self, op: str, method: str, params: dict[str, Any], container: str | None, terminal: bool,
                          stdin: bool, stdout: bool, stderr: bool) -> Process:
        """Open the stdio streams, send the request that starts the process, wrap it in a Process.

        The streams are released again if the request fails (or is cancelled)."""
        client = self._client(op)
        assert self._conn is not None
        conn = self._conn
        where = f"container {container}" if container else "UVM"
        streams_in = conn.open_outbound(f"{where} stdin") if stdin else None
        streams_out = conn.open_inbound(f"{where} stdout") if stdout else None
        streams_err = conn.open_inbound(f"{where} stderr") if stderr and not terminal else None  # a tty merges them
        params = {**params, "terminal": terminal, "stdin": streams_in.sid if streams_in else None,
                  "stdout": streams_out.sid if streams_out else None,
                  "stderr": streams_err.sid if streams_err else None}
        try:
            res = await client.request(method, params, models.PidResult)
        except BaseException:
            for s in (streams_in, streams_out, streams_err):
                if s is not None:
                    conn.forget_stream(s.sid)
            raise
        proc = Process(client, container, res.pid, terminal, streams_in, streams_out, streams_err)
        try:
            self.processes.add(proc)
        except errors.GuestProtocolError as e:
            conn.fail(errors.GuestProtocolError(f"agent link {self.id}: {e.message}", vm_id=self.id))
            raise conn.closed or e from None
        return proc

    async def exec_in(self, container: str | None, spec: oci.Process, *, stdin: bool, stdout: bool,
                      stderr: bool) -> Process:
        """A process started in a container (None: in the UVM itself), with streamed stdio."""
        params = {"container": container, "process": spec.model_dump(mode="json", exclude_none=True)}
        return await self._with_stdio("create_process", proto.EXEC, params, container, spec.terminal,
                                      stdin, stdout, stderr)

    async def create_process(self, spec: oci.Process, *, stdin: bool = False, stdout: bool = True,
                             stderr: bool = True) -> Process:
        """Start a process in the UVM itself (ProcessHost), with streamed stdio."""
        return await self.exec_in(None, spec, stdin=stdin, stdout=stdout, stderr=stderr)

    async def open_process(self, pid: int) -> Process:
        self._check_started("open_process")
        proc = self.processes.get(None, pid)
        if proc is None:
            raise errors.NotFoundError(f"VM {self.id}: no process {pid}", vm_id=self.id, pid=pid)
        return proc

    async def create_container(self, cid: str, spec: oci.Spec, rootfs: Rootfs, *, stdin: bool = False,
                               stdout: bool = True, stderr: bool = True,
                               mount_sources: Mapping[int, SharedSource] | None = None) -> Container:
        """Create (not start) a container from an OCI spec, its rootfs a share subdirectory or UVM path;
        mount_sources maps indexes in spec.mounts to the share paths their sources are (bind mounts of
        host paths).

        Raises AlreadyExistsError, InvalidIdError, InvalidArgumentError, AgentInvalidArgumentError (bad
        spec or rootfs).
        """
        self._client("create_container")
        if cid in self.containers:
            raise errors.AlreadyExistsError(f"container {cid}: already exists in VM {self.id}", container=cid)
        params: dict[str, Any] = {"id": cid, "spec": spec.wire(), "rootfs": rootfs.wire()}
        if mount_sources:
            bad = [i for i in mount_sources if not 0 <= i < len(spec.mounts)]
            if bad:
                raise errors.InvalidArgumentError(f"container {cid}: mount_sources: no spec mount {bad[0]}",
                                                  container=cid)
            params["mount_sources"] = [src.wire(i) for i, src in sorted(mount_sources.items())]
        init = await self._with_stdio("create_container", proto.CREATE, params, cid, spec.process.terminal,
                                      stdin, stdout, stderr)
        container = Container(self, cid, init)
        self.containers[cid] = container
        return container

    def require_backend(self, op: str) -> Backend:
        """The hypervisor backend of the running VM (raises NotRunningError/ClosedError otherwise)."""
        self._check_started(op)
        if self.state is not VmState.RUNNING or self.backend is None:
            raise errors.NotRunningError(f"VM {self.id}: {op}: VM is {self.state.value}", vm_id=self.id)
        return self.backend

    async def add_scsi_disk(self, path: Path | str, guest_path: str | None = None, *, readonly: bool = False,
                            fstype: str = "ext4", options: tuple[str, ...] = ()) -> MappedDisk:
        """Attach a host image (raw or qcow2) on virtio-scsi and mount it at guest_path (None: only
        expose the block device). Rolled back entirely on failure. Raises DiskError."""
        return await self.scsi.add_mapped_disk(path, guest_path, readonly, fstype, options)

    async def remove_scsi_disk(self, disk: MappedDisk) -> None:
        """Unmount in the guest, unplug there, detach on the host. Raises DiskError."""
        await self.scsi.remove_mapped_disk(disk)

    def mapped_disks(self) -> dict[int, list[MappedDisk]]:
        """Mapped disks indexed by controller (seed Container.MappedVirtualDisks)."""
        out: dict[int, list[MappedDisk]] = {c: [] for c in range(self.scsi.controllers)}
        for disk in self.scsi.disks:
            out[disk.slot.controller].append(disk)
        return out

    def forget_container(self, container_id: str) -> None:
        """A closed container leaves the books (a live one of the same id, created since, stays)."""
        c = self.containers.get(container_id)
        if c is not None and c.state is not ContainerState.CLOSED:
            return
        self.containers.pop(container_id, None)
        self.processes.remove_container(container_id)

    def host_figures(self) -> tuple[int, float]:
        """(resident bytes, CPU seconds) of the hypervisor process on the host; zeros if unknown."""
        pid = self.backend.pid if self.backend else None
        if pid is None:
            return 0, 0.0
        try:
            with open(f"/proc/{pid}/statm") as f:
                rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return 0, 0.0
        return rss, cpu

    async def __aenter__(self) -> UtilityVM:
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()
