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
import shutil
import signal
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError
from qemu.qmp.protocol import ConnectError

from uvm import jail
from uvm.backends.base import HypervisorExit, connect_unix, create_run_dir, remove_run_dir
from uvm.builder import LaunchSpec
from uvm.errors import ConfigError, DiskError, StartError, TemplateError, UvmError

QMP_QUIT_TIMEOUT_S = 1.0
QMP_REFUSED_RETRIES = 200  # 10 ms apart
QMP_CALL_TIMEOUT_S = 15.0
EXIT_AFTER_KILL_S = 10.0
CONSOLE_SOCKET = "console.sock"  # in the run directory, with UvmConfig.console_socket
MIGRATE_MAX_BANDWIDTH = 1 << 40


def opt(path: Path | str) -> str:
    """path as a value in a QEMU option list, where a ',' ends the value unless doubled."""
    return str(path).replace(",", ",,")


@dataclass(frozen=True)
class QemuFds:
    """The descriptors the shim opened for QEMU (passed with pass_fds, so their numbers stay): QEMU opens
    no socket or log of ours by path, and binds nothing in its run directory."""

    qmp: int  # a listening unix socket (QMP)
    agent: int  # a listening unix socket (the agent's virtio-serial port)
    console_log: int  # the serial console's log, open for writing
    console: int | None = None  # a listening unix socket for the serial console (UvmConfig.console_socket)
    ports: tuple[tuple[str, int], ...] = ()  # extra virtio-serial ports' listening sockets

    def all(self) -> tuple[int, ...]:
        return (self.qmp, self.agent, self.console_log, *(() if self.console is None else (self.console,)),
                *(fd for _, fd in self.ports))


CONSOLE_LOG_FDSET = 1


def qemu_argv(spec: LaunchSpec, fds: QemuFds) -> list[str]:
    """The qemu-system command line for spec (microvm, virtio-mmio devices), its host ends given as fds."""
    console_log = f"/dev/fdset/{CONSOLE_LOG_FDSET}"
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
        "-add-fd", f"fd={fds.console_log},set={CONSOLE_LOG_FDSET}",
        "-chardev", (f"socket,id=console,fd={fds.console},server=on,wait=off,logfile={console_log}"
                     if fds.console is not None else f"file,id=console,path={console_log}"),
        "-serial", "chardev:console",
        "-drive", f"if=none,id=rootfs,file={opt(spec.rootfs)},format=raw,readonly=on",
        "-device", "virtio-blk-device,drive=rootfs",
        # Entropy from the host: without it the guest kernel's random pool is not ready until it has
        # run its jitter-entropy loop, which python3's start waits for (~1.4 s of a boot under TCG).
        "-object", "rng-random,id=rng0,filename=/dev/urandom",
        "-device", "virtio-rng-device,rng=rng0",
        "-device", "virtio-serial-device",
        "-chardev", f"socket,id=agent,fd={fds.agent},server=on,wait=off",
        "-device", f"virtserialport,chardev=agent,name={spec.agent_port_name}",
        "-chardev", f"socket,id=qmp,fd={fds.qmp},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
    ]
    for n in range(spec.scsi_controllers):
        argv += ["-device", f"virtio-scsi-device,id=scsi{n}"]
    for name, fd in fds.ports:
        argv += ["-chardev", f"socket,id=port-{name},fd={fd},server=on,wait=off",
                 "-device", f"virtserialport,chardev=port-{name},name={name}"]
    if spec.ssh_port is not None:
        # restrict=on: the guest reaches nothing outside the VM; the forwarded port still reaches it.
        argv += ["-netdev", f"user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:{spec.ssh_port}-:22",
                 "-device", "virtio-net-device,netdev=net0"]
    for nic in spec.nics:
        taps = ":".join(map(str, nic.tap_fds))
        netdev = f"tap,id={nic.id},{'fds' if len(nic.tap_fds) > 1 else 'fd'}={taps}"
        if nic.vhost_fds:
            vfds = ":".join(map(str, nic.vhost_fds))
            netdev += f",vhost=on,{'vhostfds' if len(nic.vhost_fds) > 1 else 'vhostfd'}={vfds}"
        argv += ["-netdev", netdev,
                 "-device", f"virtio-net-device,netdev={nic.id},mac={nic.mac}{',mq=on' if len(nic.tap_fds) > 1 else ''}"]
    for n, share in enumerate(spec.shares):
        # passthrough: files get the guest's owner and mode (a confined QEMU chowns them with CAP_CHOWN; it has
        # no CAP_MKNOD, so a guest's device node on a share fails).
        ro = ",readonly=on" if share.readonly else ""
        argv += ["-fsdev", f"local,id=fs{n},path={opt(share.host_path)},security_model=passthrough,multidevs=remap{ro}",
                 "-device", f"virtio-9p-device,fsdev=fs{n},mount_tag={share.tag}"]
    if spec.incoming is not None:
        argv += ["-incoming", "defer"]
    if spec.confine:
        argv += ["-sandbox", jail.SECCOMP]
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
        self._fdsets: dict[str, int] = {}  # block node -> the fdset its image's descriptor is in
        self._fd_passing = asyncio.Lock()
        self._uid_lease: jail.UidLease | None = None  # a confined QEMU's uid, held until it is gone

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
        if self._qmp is None:
            return f"; QEMU (pid {self._proc.pid}) had not answered on its QMP socket {self.run_dir / 'qmp.sock'}"
        return f"; QEMU (pid {self._proc.pid}) was loading the template's state" if self.spec.incoming else ""

    async def launch(self, spec: LaunchSpec) -> None:
        self._run_dir_lock = create_run_dir(spec, 0o700)
        with contextlib.ExitStack() as ours:  # our copies of what QEMU gets: closed once it has them
            fds = self._open_host_ends(spec, ours)
            argv = qemu_argv(spec, fds)
            # QEMU holds the run directory's lock too, while it lives, and its NICs' taps (and vhost-net) fds.
            keep = (self._run_dir_lock, *fds.all(), *(fd for nic in spec.nics for fd in (*nic.tap_fds, *nic.vhost_fds)))
            preexec = None
            if spec.confine:
                argv, preexec, lease = await asyncio.to_thread(self._confine, spec, argv)
                self._uid_lease = lease
                keep += (lease.fd,)
            else:
                self.log.warning("confine = false: QEMU runs as root with every capability and sees the whole host")
                if spec.netns_fd is not None:
                    # In the container's network namespace: its taps are there, and /proc/<QEMU's pid>/ns/net
                    # names it (CNI configures that path after a `ctr run --cni` task's create; CRI puts it in the
                    # specs of a pod's containers).
                    from uvm.network import enter_netns_preexec  # (pyroute2: only VMs with a network pay its import)

                    preexec = enter_netns_preexec(spec.netns_fd)
                if spec.kill_with_parent and shutil.which("setpriv"):
                    argv = ["setpriv", "--pdeathsig", "KILL", "--", *argv]
            self.log.debug("spawn %s", " ".join(argv))
            qemu_log = ours.enter_context((self.run_dir / "qemu.log").open("wb"))
            try:
                self._proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stdout=qemu_log, stderr=qemu_log, start_new_session=True,
                    pass_fds=keep, preexec_fn=preexec)
            except (OSError, subprocess.SubprocessError) as e:
                why = getattr(e, "strerror", None) or self.qemu_log_tail(3) or str(e)
                raise StartError(f"VM {spec.vm_id}: cannot run {spec.qemu_binary}: {why}", vm_id=spec.vm_id) from None
        self._exit_task = asyncio.get_running_loop().create_task(self._watch_exit(), name=f"{spec.vm_id}-qemu-exit")
        await self._connect_qmp()
        if spec.incoming is not None:
            await self._load_incoming(spec.incoming)

    def _open_host_ends(self, spec: LaunchSpec, ours: contextlib.ExitStack) -> QemuFds:
        """The sockets QEMU serves on (bound and listening, 0600 in the 0700 run directory) and its console
        log, opened here and handed over; ours registered in ``ours`` for closing."""
        def listening(name: str) -> int:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            ours.callback(sock.close)
            path = self.run_dir / name
            sock.bind(str(path))
            os.chmod(path, 0o600)
            sock.listen(8)
            return sock.fileno()

        try:
            console_log = os.open(self.console_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise StartError(f"VM {spec.vm_id}: console log {self.console_path}: {e.strerror}", vm_id=spec.vm_id) \
                from None
        ours.callback(os.close, console_log)
        try:
            return QemuFds(qmp=listening("qmp.sock"), agent=listening("agent.sock"), console_log=console_log,
                           console=listening(CONSOLE_SOCKET) if spec.console_socket else None,
                           ports=tuple((name, listening(f"port-{name}.sock")) for name in spec.extra_ports))
        except OSError as e:
            raise StartError(f"VM {spec.vm_id}: sockets in {self.run_dir}: {e.strerror}", vm_id=spec.vm_id) from None

    def _confine(self, spec: LaunchSpec, argv: list[str]) -> tuple[list[str], Callable[[], None], jail.UidLease]:
        """argv run by a uid of its own with only the capabilities its shares need, in a jail (uvm/jail.py).
        Raises ConfigError (no setpriv, no uid free, a path that is missing)."""
        if os.geteuid() != 0:
            raise ConfigError(f"VM {spec.vm_id}: confine needs root to give QEMU a uid and a jail of its own "
                              "(set confine = false to run QEMU as yourself, unconfined)", vm_id=spec.vm_id)
        jail.check_setpriv()
        lease = jail.lease_uid(*spec.confine_uid_range, jail.UID_LOCK_DIR)
        try:
            (self.run_dir / jail.JAIL_DIR).mkdir(mode=0o700)
            writable = [spec.memory_file] if spec.memory_file is not None else []
            binary = Path(shutil.which(spec.qemu_binary) or spec.qemu_binary).resolve()
            extra = [] if binary.is_relative_to("/usr") else [binary]  # a QEMU of its own: bound in too
            plan = jail.plan(self.run_dir, [spec.kernel, spec.initrd, spec.rootfs, *extra],
                             [(share.host_path, share.readonly) for share in spec.shares], writable,
                             kvm=spec.accel == "kvm", netns_fd=spec.netns_fd)
        except BaseException:
            lease.release()
            raise
        caps = jail.SHARE_CAPABILITIES if spec.shares else ()
        prefix = jail.setpriv_argv(lease.uid, jail.kvm_groups(spec.accel == "kvm"), caps)
        self.log.debug("confined: uid %d, capabilities %s", lease.uid, ",".join(caps) or "none")
        return [*prefix, *argv], lambda: jail.enter(plan), lease

    # -- templates: save a stopped VM's device state, start a clone from it ----------------------

    async def _set_ignore_shared(self, what: str) -> None:
        # Guest RAM lives in the template's memory file: only device state goes through the stream.
        await self._qmp_call(what, "migrate-set-capabilities", {"capabilities": [
            {"capability": "x-ignore-shared", "state": True}]}, error=TemplateError)

    async def _pass_fd(self, what: str, fd: int, command: str, args: dict[str, object],
                       error: type[UvmError] = DiskError) -> object:
        """Send fd to QEMU (SCM_RIGHTS on the QMP socket), then the command that takes it (getfd, add-fd):
        files reach a QEMU that cannot open them itself (uvm/jail.py)."""
        if self._qmp is None or not self._alive():
            raise error(f"VM {self.spec.vm_id}: {what}: QEMU is not running", vm_id=self.spec.vm_id)
        async with self._fd_passing:  # the fd and its command go together
            try:
                self._qmp.send_fd_scm(fd)
            except (QMPError, OSError) as e:
                raise error(f"VM {self.spec.vm_id}: {what}: passing a descriptor: {e}", vm_id=self.spec.vm_id) from None
            return await self._qmp_call(what, command, args, error=error)

    async def _load_incoming(self, state: Path) -> None:
        """Load a template's device state into this (paused, -incoming defer) QEMU and let it run."""
        what = f"load template state {state}"
        await self._set_ignore_shared(what)
        try:
            fd = os.open(state, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise TemplateError(f"VM {self.spec.vm_id}: {what}: {e.strerror}", vm_id=self.spec.vm_id) from None
        try:
            await self._pass_fd(what, fd, "getfd", {"fdname": "incoming"}, error=TemplateError)
        finally:
            os.close(fd)
        await self._qmp_call(what, "migrate-incoming", {"uri": "fd:incoming"}, error=TemplateError)
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
        try:
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise TemplateError(f"VM {self.spec.vm_id}: {what}: {e.strerror}", vm_id=self.spec.vm_id) from None
        try:
            await self._pass_fd(what, fd, "getfd", {"fdname": "migrate"}, error=TemplateError)
        finally:
            os.close(fd)  # QEMU has its own copy: it writes the state through that, and no spawned `cat`
        await self._qmp_call(what, "migrate", {"uri": "fd:migrate"}, error=TemplateError)
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
        # The image reaches QEMU as a descriptor in a fdset (it may not see the path: uvm/jail.py).
        try:
            fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        except OSError as e:
            raise DiskError(f"VM {self.spec.vm_id}: {what}: {e.strerror}", vm_id=self.spec.vm_id, path=path) from None
        try:
            added = await self._pass_fd(what, fd, "add-fd", {"opaque": node})
        finally:
            os.close(fd)
        fdset = added.get("fdset-id") if isinstance(added, dict) else None
        if not isinstance(fdset, int):
            raise DiskError(f"VM {self.spec.vm_id}: {what}: add-fd answered {added!r}", vm_id=self.spec.vm_id)
        self._fdsets[node] = fdset
        try:
            await self._qmp_call(what, "blockdev-add", {
                "node-name": node, "driver": fmt, "read-only": readonly,
                "file": {"driver": "file", "filename": f"/dev/fdset/{fdset}", "read-only": readonly}})
        except BaseException:
            await self._remove_fdset(what, node)
            raise
        try:
            await self._qmp_call(what, "device_add", {
                "driver": "scsi-hd", "id": dev, "bus": f"scsi{controller}.0", "drive": node,
                "channel": 0, "scsi-id": 0, "lun": lun,
                # A host disk that fills up is an I/O error in the guest (the container's write fails), not
                # QEMU's default of pausing the whole VM until someone frees space (a hang for every task).
                "werror": "report", "rerror": "report"})
        except BaseException:  # a failed or cancelled device_add: the node must not stay behind
            with contextlib.suppress(DiskError):
                await asyncio.shield(self._qmp_call(what, "blockdev-del", {"node-name": node}))
            await self._remove_fdset(what, node)
            raise

    async def _remove_fdset(self, what: str, node: str) -> None:
        """The fdset a disk's descriptor came in: removed once the node is gone (QEMU closes it then)."""
        fdset = self._fdsets.pop(node, None)
        if fdset is not None:
            with contextlib.suppress(DiskError):
                await asyncio.shield(self._qmp_call(what, "remove-fd", {"fdset-id": fdset}))

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
        await self._remove_fdset(what, node)

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
            if self._uid_lease is not None:
                self._uid_lease.release()
                self._uid_lease = None
            if self._run_dir_lock is not None:
                remove_run_dir(self.run_dir, self._run_dir_lock)
                self._run_dir_lock = None
