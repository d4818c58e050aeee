"""The embedded backend: spawns qemu-system-x86_64 (microvm) and drives it over QMP (qemu.qmp).

Per VM, a private run directory holds the QMP and agent sockets, the console log and QEMU's own
log; it is removed on close whatever happened. QEMU runs under ``setpriv --pdeathsig KILL`` so it
cannot outlive the process that started it (configurable).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
from pathlib import Path

from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError
from qemu.qmp.protocol import ConnectError

from uvm.backends.base import HypervisorExit, connect_unix, create_run_dir, remove_run_dir
from uvm.builder import LaunchSpec
from uvm.errors import DiskError, StartError, TemplateError, UvmError

QMP_QUIT_TIMEOUT_S = 1.0
QMP_REFUSED_RETRIES = 200  # 10 ms apart
QMP_CALL_TIMEOUT_S = 15.0
EXIT_AFTER_KILL_S = 10.0
CONSOLE_SOCKET = "console.sock"  # in the run directory, with UvmConfig.console_socket
MIGRATE_MAX_BANDWIDTH = 1 << 40


def opt(path: Path | str) -> str:
    """path as a value in a QEMU option list, where a ',' ends the value unless doubled."""
    return str(path).replace(",", ",,")


def qemu_argv(spec: LaunchSpec, run_dir: Path) -> list[str]:
    """The qemu-system command line for spec (microvm, virtio-mmio devices)."""
    console = opt(spec.console_log or run_dir / "console.log")
    machine = "microvm"
    memory: list[str] = []
    if spec.memory_file is not None:
        machine += ",memory-backend=ram"
        memory = ["-object", f"memory-backend-file,id=ram,size={spec.memory_mib}M,mem-path={opt(spec.memory_file)},"
                             f"share={'on' if spec.memory_shared else 'off'}"]
    argv = [
        spec.qemu_binary,
        "-name", f"uvmshim-{spec.vm_id}",
        "-machine", machine,
        *memory,
        "-accel", f"tcg,tb-size={spec.tb_size_mib}" if spec.accel == "tcg" and spec.tb_size_mib else spec.accel,
        "-cpu", spec.cpu_model,
        "-smp", str(spec.cpus),
        "-m", str(spec.memory_mib),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(spec.kernel),
        "-initrd", str(spec.initrd),
        "-append", spec.cmdline,
        "-chardev", (f"socket,id=console,path={opt(run_dir / CONSOLE_SOCKET)},server=on,wait=off,logfile={console}"
                     if spec.console_socket else f"file,id=console,path={console}"),
        "-serial", "chardev:console",
        "-drive", f"if=none,id=rootfs,file={opt(spec.rootfs)},format=raw,readonly=on",
        "-device", "virtio-blk-device,drive=rootfs",
        # Entropy from the host: without it the guest kernel's random pool is not ready until it has
        # run its jitter-entropy loop, which python3's start waits for (~1.4 s of a boot under TCG).
        "-object", "rng-random,id=rng0,filename=/dev/urandom",
        "-device", "virtio-rng-device,rng=rng0",
        "-device", "virtio-serial-device",
        "-chardev", f"socket,id=agent,path={opt(run_dir / 'agent.sock')},server=on,wait=off",
        "-device", f"virtserialport,chardev=agent,name={spec.agent_port_name}",
        "-qmp", f"unix:{opt(run_dir / 'qmp.sock')},server=on,wait=off",
    ]
    for n in range(spec.scsi_controllers):
        argv += ["-device", f"virtio-scsi-device,id=scsi{n}"]
    for name in spec.extra_ports:
        argv += ["-chardev", f"socket,id=port-{name},path={opt(run_dir / f'port-{name}.sock')},server=on,wait=off",
                 "-device", f"virtserialport,chardev=port-{name},name={name}"]
    if spec.ssh_port is not None:
        # restrict=on: the guest reaches nothing outside the VM; the forwarded port still reaches it.
        argv += ["-netdev", f"user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:{spec.ssh_port}-:22",
                 "-device", "virtio-net-device,netdev=net0"]
    for nic in spec.nics:
        fds = ":".join(map(str, nic.tap_fds))
        netdev = f"tap,id={nic.id},{'fds' if len(nic.tap_fds) > 1 else 'fd'}={fds}"
        if nic.vhost_fds:
            vfds = ":".join(map(str, nic.vhost_fds))
            netdev += f",vhost=on,{'vhostfds' if len(nic.vhost_fds) > 1 else 'vhostfd'}={vfds}"
        argv += ["-netdev", netdev,
                 "-device", f"virtio-net-device,netdev={nic.id},mac={nic.mac}{',mq=on' if len(nic.tap_fds) > 1 else ''}"]
    for n, share in enumerate(spec.shares):
        ro = ",readonly=on" if share.readonly else ""
        argv += ["-fsdev", f"local,id=fs{n},path={opt(share.host_path)},security_model=none,multidevs=remap{ro}",
                 "-device", f"virtio-9p-device,fsdev=fs{n},mount_tag={share.tag}"]
    if spec.incoming is not None:
        argv += ["-incoming", "defer"]
    return argv


def tail_lines(path: Path, lines: int, max_bytes: int = 16384) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return ""
    text = data.decode(errors="replace").replace("\r", "")
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


class QemuBackend:
    name = "qemu"

    def __init__(self, spec: LaunchSpec) -> None:
        self.spec = spec
        self.run_dir = spec.run_dir
        self.log = logging.getLogger(f"uvm.{spec.vm_id}.qemu")
        self._proc: asyncio.subprocess.Process | None = None
        self._qmp: QMPClient | None = None
        self._events_task: asyncio.Task[None] | None = None
        self._exit_task: asyncio.Task[HypervisorExit] | None = None
        self._shutdown_reason: str | None = None
        self._run_dir_lock: int | None = None  # held from launch until the directory is removed
        self._closed = False
        self._deleting: dict[str, asyncio.Event] = {}

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def console_path(self) -> Path:
        return self.spec.console_log or self.run_dir / "console.log"

    def slow_launch_hint(self) -> str:
        """What the launch was waiting for, for the launch timeout's error, led by '; '."""
        if self._proc is None:
            return ""
        sock = self.run_dir / "qmp.sock"
        if self._qmp is None:
            what = "had not created" if not sock.exists() else "did not answer on"
            return f"; QEMU (pid {self._proc.pid}) {what} its QMP socket {sock}"
        return f"; QEMU (pid {self._proc.pid}) was loading the template's state" if self.spec.incoming else ""

    async def launch(self, spec: LaunchSpec) -> None:
        self._run_dir_lock = create_run_dir(spec, 0o700)
        argv = qemu_argv(spec, self.run_dir)
        if spec.kill_with_parent and shutil.which("setpriv"):
            argv = ["setpriv", "--pdeathsig", "KILL", "--", *argv]
        self.log.debug("spawn %s", " ".join(argv))
        qemu_log = (self.run_dir / "qemu.log").open("wb")
        # QEMU holds the run directory's lock too, while it lives, and its NICs' taps (and vhost-net) fds.
        fds = (self._run_dir_lock, *(fd for nic in spec.nics for fd in (*nic.tap_fds, *nic.vhost_fds)))
        # In the container's network namespace: its taps are there, and /proc/<QEMU's pid>/ns/net names
        # it (CNI configures that path after a `ctr run --cni` task's create; CRI puts it in the specs of
        # a pod's containers).
        enter = None
        if spec.netns_fd is not None:
            from uvm.network import enter_netns_preexec  # (pyroute2: only VMs with a network pay its import)

            enter = enter_netns_preexec(spec.netns_fd)
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=qemu_log, stderr=qemu_log, start_new_session=True,
                pass_fds=fds, preexec_fn=enter)
        except (OSError, subprocess.SubprocessError) as e:
            raise StartError(f"VM {spec.vm_id}: cannot run {spec.qemu_binary}: {getattr(e, 'strerror', None) or e}",
                             vm_id=spec.vm_id) from None
        finally:
            qemu_log.close()
        self._exit_task = asyncio.get_running_loop().create_task(self._watch_exit(), name=f"{spec.vm_id}-qemu-exit")
        await self._connect_qmp()
        if spec.incoming is not None:
            await self._load_incoming(spec.incoming)

    # -- templates: save a stopped VM's device state, start a clone from it ----------------------

    async def _set_ignore_shared(self, what: str) -> None:
        # Guest RAM lives in the template's memory file: only device state goes through the stream.
        await self._qmp_call(what, "migrate-set-capabilities", {"capabilities": [
            {"capability": "x-ignore-shared", "state": True}]}, error=TemplateError)

    async def _load_incoming(self, state: Path) -> None:
        """Load a template's device state into this (paused, -incoming defer) QEMU and let it run."""
        what = f"load template state {state}"
        await self._set_ignore_shared(what)
        await self._qmp_call(what, "migrate-incoming", {"uri": f"exec:cat {shlex.quote(str(state))}"},
                             error=TemplateError)
        # QEMU 7.2 exits when an incoming stream fails to load; once loaded, the VM is paused as the
        # template was when saved, and runs on `cont`.
        while True:
            status = await self._qmp_call(what, "query-status", error=TemplateError)
            if not isinstance(status, dict) or status.get("status") != "inmigrate":
                break
            await asyncio.sleep(0.005)
        if not isinstance(status, dict) or status.get("status") != "paused":
            raise TemplateError(f"VM {self.spec.vm_id}: {what}: the VM is {status!r} after loading",
                                vm_id=self.spec.vm_id)
        await self._qmp_call(what, "cont", error=TemplateError)

    async def save_state(self, dest: Path) -> None:
        """Stop the guest and write its device state to dest (RAM stays in the shared memory file)."""
        what = f"save template state to {dest}"
        await self._qmp_call(what, "stop", error=TemplateError)
        await self._set_ignore_shared(what)
        # QEMU 7.2 caps migration at 128 MiB/s by default: lift the cap for a local file.
        await self._qmp_call(what, "migrate-set-parameters", {"max-bandwidth": MIGRATE_MAX_BANDWIDTH},
                             error=TemplateError)
        await self._qmp_call(what, "migrate", {"uri": f"exec:cat > {shlex.quote(str(dest))}"},
                             error=TemplateError)
        while True:
            info = await self._qmp_call(what, "query-migrate", error=TemplateError)
            status = info.get("status") if isinstance(info, dict) else None
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                detail = info.get("error-desc", status) if isinstance(info, dict) else status
                raise TemplateError(f"VM {self.spec.vm_id}: {what}: migration {detail}", vm_id=self.spec.vm_id)
            await asyncio.sleep(0.01)

    async def _connect_qmp(self) -> None:
        sock = self.run_dir / "qmp.sock"
        assert self._exit_task is not None
        while not sock.exists():
            if self._exit_task.done():
                raise StartError(f"VM {self.spec.vm_id}: QEMU {self._exit_task.result().describe()}",
                                 vm_id=self.spec.vm_id)
            await asyncio.sleep(0.005)
        qmp = QMPClient(f"uvm.{self.spec.vm_id}.qmp")
        try:
            for attempt in range(QMP_REFUSED_RETRIES, -1, -1):
                try:
                    await qmp.connect(str(sock))
                    break
                except ConnectError as e:
                    # The socket file exists between QEMU's bind() and listen(): on a loaded host that
                    # window is long enough to be refused. Try again while QEMU runs.
                    if not isinstance(e.exc, ConnectionRefusedError) or not attempt or self._exit_task.done():
                        raise
                    await asyncio.sleep(0.01)
        except QMPError as e:
            # Usually QEMU failing right after creating its sockets (e.g. a kernel it cannot load):
            # report its own words rather than the connection error.
            with contextlib.suppress(asyncio.TimeoutError):
                hv = await asyncio.wait_for(asyncio.shield(self._exit_task), 2.0)
                raise StartError(f"VM {self.spec.vm_id}: QEMU {hv.describe()}", vm_id=self.spec.vm_id) from None
            raise StartError(f"VM {self.spec.vm_id}: QMP connection to {sock} failed: {e}", vm_id=self.spec.vm_id) from None
        self._qmp = qmp
        self._events_task = asyncio.get_running_loop().create_task(self._watch_events(qmp), name=f"{self.spec.vm_id}-qmp-events")

    async def _watch_events(self, qmp: QMPClient) -> None:
        async for event in qmp.events:
            if event["event"] == "DEVICE_DELETED":
                data = event.get("data")
                device = data.get("device") if isinstance(data, dict) else None
                if isinstance(device, str) and device in self._deleting:
                    self._deleting[device].set()
            if event["event"] == "SHUTDOWN":
                data = event.get("data")
                self._shutdown_reason = str(data.get("reason", "unknown")) if isinstance(data, dict) else "unknown"
                self.log.debug("QMP SHUTDOWN reason=%s", self._shutdown_reason)

    async def _watch_exit(self) -> HypervisorExit:
        assert self._proc is not None
        rc = await self._proc.wait()
        # Let the QMP event reader see a SHUTDOWN event sent just before the exit.
        await asyncio.sleep(0)
        detail = tail_lines(self.run_dir / "qemu.log", 3).replace("\n", " | ")
        if rc < 0:
            return HypervisorExit(None, -rc, self._shutdown_reason, detail)
        return HypervisorExit(rc, None, self._shutdown_reason, detail)

    async def connect_agent(self) -> socket.socket:
        return await connect_unix(str(self.run_dir / "agent.sock"))

    def _alive(self) -> bool:
        return self._proc is not None and self._proc.returncode is None and not (
            self._exit_task is not None and self._exit_task.done())

    async def request_powerdown(self) -> None:
        if self._qmp is not None and self._alive():
            with contextlib.suppress(QMPError, OSError, asyncio.TimeoutError):
                await asyncio.wait_for(self._qmp.execute("system_powerdown"), QMP_QUIT_TIMEOUT_S)

    async def terminate(self) -> None:
        if not self._alive():
            return
        if self._qmp is not None:
            try:
                await asyncio.wait_for(self._qmp.execute("quit"), QMP_QUIT_TIMEOUT_S)
                return
            except (TimeoutError, QMPError, OSError, EOFError) as e:
                self.log.debug("QMP quit failed (%r): killing QEMU", e)
        self._kill()

    def _kill(self) -> None:
        # os.kill, not Process.send_signal: that polls the child first (Popen.send_signal since Python
        # 3.9), and a poll that reaps a QEMU which just died (killed by someone else, say) takes its
        # status from asyncio's child watcher, which then reports "returncode 255" for it.
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._proc.pid, signal.SIGKILL)

    async def wait_exit(self) -> HypervisorExit:
        if self._exit_task is None:
            raise StartError(f"VM {self.spec.vm_id}: QEMU was never started", vm_id=self.spec.vm_id)
        return await asyncio.shield(self._exit_task)

    # -- SCSI disks ------------------------------------------------------------------------------

    @staticmethod
    def _scsi_names(controller: int, lun: int) -> tuple[str, str]:
        return f"scsi{controller}-lun{lun}", f"sd{controller}-lun{lun}"  # block node, device id

    async def _qmp_call(self, what: str, cmd: str, args: dict[str, object] | None = None,
                        error: type[UvmError] = DiskError) -> object:
        """One QMP command (bounded); every failure raised as error (disks: DiskError) naming what."""
        from qemu.qmp import ExecuteError

        if self._qmp is None or not self._alive():
            raise error(f"VM {self.spec.vm_id}: {what}: QEMU is not running", vm_id=self.spec.vm_id)
        try:
            return await asyncio.wait_for(self._qmp.execute(cmd, args), QMP_CALL_TIMEOUT_S)
        except ExecuteError as e:
            raise error(f"VM {self.spec.vm_id}: {what}: {cmd}: {e}", vm_id=self.spec.vm_id,
                        qmp=cmd, sent=args) from None
        except (TimeoutError, QMPError, OSError, EOFError) as e:
            raise error(f"VM {self.spec.vm_id}: {what}: {cmd} failed: {e!r}", vm_id=self.spec.vm_id) from None

    async def attach_scsi(self, controller: int, lun: int, path: str, readonly: bool, fmt: str) -> None:
        node, dev = self._scsi_names(controller, lun)
        what = f"attach {path} at {controller}:{lun}"
        await self._qmp_call(what, "blockdev-add", {
            "node-name": node, "driver": fmt, "read-only": readonly,
            "file": {"driver": "file", "filename": path, "read-only": readonly}})
        try:
            await self._qmp_call(what, "device_add", {
                "driver": "scsi-hd", "id": dev, "bus": f"scsi{controller}.0", "drive": node,
                "channel": 0, "scsi-id": 0, "lun": lun})
        except BaseException:  # a failed or cancelled device_add: the node must not stay behind
            with contextlib.suppress(DiskError):
                await asyncio.shield(self._qmp_call(what, "blockdev-del", {"node-name": node}))
            raise

    async def detach_scsi(self, controller: int, lun: int) -> None:
        node, dev = self._scsi_names(controller, lun)
        what = f"detach {controller}:{lun}"
        deleted = self._deleting[dev] = asyncio.Event()
        try:
            await self._qmp_call(what, "device_del", {"id": dev})
            try:
                await asyncio.wait_for(deleted.wait(), QMP_CALL_TIMEOUT_S)
            except TimeoutError:
                raise DiskError(f"VM {self.spec.vm_id}: {what}: QEMU did not report the device deleted",
                                vm_id=self.spec.vm_id) from None
        finally:
            self._deleting.pop(dev, None)
        await self._qmp_call(what, "blockdev-del", {"node-name": node})

    async def scsi_inventory(self) -> dict[str, list[str]]:
        blocks = await self._qmp_call("query-named-block-nodes", "query-named-block-nodes", {})
        nodes = [str(b.get("node-name")) for b in blocks if isinstance(b, dict)] if isinstance(blocks, list) else []
        tree = await self._qmp_call("qom-list", "qom-list", {"path": "/machine/peripheral"})
        devices = [str(d.get("name")) for d in tree if isinstance(d, dict)] if isinstance(tree, list) else []
        return {"nodes": [n for n in nodes if n.startswith("scsi")], "devices": [d for d in devices if d.startswith("sd")]}

    def console_tail(self, lines: int = 30) -> str:
        return tail_lines(self.console_path, lines)

    def qemu_log_tail(self, lines: int = 10) -> str:
        return tail_lines(self.run_dir / "qemu.log", lines)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._exit_task is not None and not self._exit_task.done():
                await self.terminate()
                try:
                    await asyncio.wait_for(asyncio.shield(self._exit_task), EXIT_AFTER_KILL_S)
                except TimeoutError:
                    self._kill()
                    await asyncio.wait_for(asyncio.shield(self._exit_task), EXIT_AFTER_KILL_S)
        finally:
            if self._qmp is not None:
                with contextlib.suppress(Exception):
                    await self._qmp.disconnect()
            for task in (self._events_task,):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task
            if self._run_dir_lock is not None:
                remove_run_dir(self.run_dir, self._run_dir_lock)
                self._run_dir_lock = None
