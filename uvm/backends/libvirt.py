"""The libvirt backend: the same launch description as a transient q35 domain, through libvirt-python.

For hosts whose operators manage VMs with libvirt: the domain is named ``uvmshim-<vm id>`` and
carries metadata naming its owner, so ``virsh list`` shows what it is and a leftover from a dead
shim can be found and destroyed by id (``destroy_leftover``). Lifecycle goes through libvirt's API
(createXML, shutdown, destroy) and its lifecycle events (death detection); disks through
attach/detach device calls on the virtio-scsi controller; the agent's virtio-serial channel is a
unix socket libvirt creates; the console goes to a file. libvirt errors are translated here, once.

libvirt-python's calls block, so they run in a thread; its events are dispatched by one daemon
thread running libvirt's default event loop, and handed to asyncio with call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import pwd
import shutil
import socket
import stat
import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

import libvirt

from uvm.backends.base import HypervisorExit, connect_unix, create_run_dir, remove_run_dir
from uvm.backends.qemu import tail_lines
from uvm.builder import LaunchSpec
from uvm.errors import AlreadyExistsError, DiskError, StartError, UvmError

DOMAIN_PREFIX = "uvmshim-"
METADATA_NS = "https://github.com/uvmshim/uvmshim/xmlns/domain/1"
HOW_TO_START = "is libvirtd running? As root: `virtlogd -d && libvirtd -d` (or `systemctl start libvirtd`)"
DEVICE_REMOVED_TIMEOUT_S = 15.0
LATE_CALL_WAIT_S = 60.0  # how long aclose waits for a libvirt call a cancelled start left running

_events_lock = threading.Lock()
_events_started = False


def _ensure_event_loop() -> None:
    """libvirt's default event loop, in one daemon thread; must run before connections are opened."""
    global _events_started
    with _events_lock:
        if _events_started:
            return
        libvirt.virEventRegisterDefaultImpl()
        # libvirt prints every error to stderr by default; they are translated into ours instead.
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _events_started = True


def libvirt_message(e: libvirt.libvirtError) -> str:
    return str(e.get_error_message() or e)


def no_such_domain(e: libvirt.libvirtError) -> bool:
    """Whether e says the domain does not exist (any other lookup error says nothing about the name)."""
    return bool(e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN)


def domain_xml(spec: LaunchSpec, console: Path) -> str:
    """The transient q35 domain for spec: PVH-booted ELF vmlinux, virtio disks, agent channel.

    The PCI devices sit directly on the root bus as integrated endpoints, and there is no USB
    controller: left to itself libvirt puts every device behind its own pcie-root-port and adds an
    xhci controller, which the guest kernel then probes under emulation on every boot. Nothing is
    hot-plugged on PCI (disks come and go on the virtio-scsi controllers), so no root port is needed.
    """
    vcpu_model = "<cpu mode='host-passthrough'/>" if spec.accel == "kvm" else (
        "<cpu mode='custom' match='exact'><model fallback='allow'>qemu64</model></cpu>")
    slots = iter(range(2, 0x1F))  # 0: host bridge, 1: VGA's slot by convention, 0x1f: the ICH9 functions

    def pci() -> str:
        slot = next(slots, None)
        return "" if slot is None else (  # past the last free slot, libvirt places it behind a root port
            f"<address type='pci' domain='0x0000' bus='0x00' slot='0x{slot:02x}' function='0x0'/>")

    scsi = "".join(f"<controller type='scsi' index='{n}' model='virtio-scsi'>{pci()}</controller>"
                   for n in range(spec.scsi_controllers))
    ports = "".join(f"<channel type='unix'><source mode='bind'/><target type='virtio' name={quoteattr(p)}/></channel>"
                    for p in spec.extra_ports)
    shares = "".join(
        f"<filesystem type='mount' accessmode='passthrough' multidevs='remap'><source dir={quoteattr(str(s.host_path))}/>"
        f"<target dir={quoteattr(s.tag)}/>{'<readonly/>' if s.readonly else ''}{pci()}</filesystem>" for s in spec.shares)
    return f"""<domain type='{"kvm" if spec.accel == "kvm" else "qemu"}'>
  <name>{DOMAIN_PREFIX}{escape(spec.vm_id)}</name>
  <description>uvmshim utility VM {escape(spec.vm_id)}</description>
  <metadata><uvmshim:vm xmlns:uvmshim='{METADATA_NS}'><uvmshim:id>{escape(spec.vm_id)}</uvmshim:id>
    <uvmshim:owner pid='{os.getpid()}'/></uvmshim:vm></metadata>
  <memory unit='MiB'>{spec.memory_mib}</memory>
  <vcpu>{spec.cpus}</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{escape(str(spec.kernel))}</kernel><initrd>{escape(str(spec.initrd))}</initrd>
    <cmdline>{escape(spec.cmdline)}</cmdline></os>
  <features><acpi/></features>
  {vcpu_model}
  <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file={quoteattr(str(spec.rootfs))}/>
      <target dev='vda' bus='virtio'/><readonly/>{pci()}</disk>
    {scsi}
    <controller type='virtio-serial' index='0'>{pci()}</controller>
    <controller type='usb' model='none'/>
    <channel type='unix'><source mode='bind'/><target type='virtio' name={quoteattr(spec.agent_port_name)}/></channel>
    {ports}{shares}
    <rng model='virtio'><backend model='random'>/dev/urandom</backend>{pci()}</rng>
    <serial type='file'><source path={quoteattr(str(console))}/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>"""


def kvm_node_problem() -> str | None:
    """What is wrong with /dev/kvm for libvirt, if anything: root-only access makes libvirt re-probe
    QEMU's capabilities on every domain start (~85 s on an emulated host)."""
    try:
        st = os.stat("/dev/kvm")
    except OSError:
        return None
    if not st.st_mode & 0o060:
        return ("/dev/kvm is accessible to root only, so libvirtd re-probes QEMU's capabilities on every domain "
                "start; give it udev's usual `chgrp kvm /dev/kvm; chmod 660 /dev/kvm`")
    return None


def check_kvm_node(log: logging.Logger) -> None:
    problem = kvm_node_problem()
    if problem:
        log.warning("%s (domain starts are slow until then)", problem)


PUBLISHED_KEEP = 9  # image files kept in libvirt_image_dir (three images' worth), least recently used go


@dataclass(frozen=True)
class HypervisorUser:
    """Who libvirt runs QEMU as (its DAC security model's base label), with that user's groups."""

    uid: int
    gid: int
    groups: frozenset[int]

    def describe(self) -> str:
        try:
            name = pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return f"uid {self.uid}"
        return f"{name} (uid {self.uid})"


def hypervisor_user(capabilities_xml: str) -> HypervisorUser | None:
    """libvirt's QEMU user from its capabilities (<secmodel> dac, baselabel '+64055:+64055'); None when
    libvirt runs QEMU as root or the label cannot be read."""
    for model in ET.fromstring(capabilities_xml).iter("secmodel"):
        if model.findtext("model") != "dac":
            continue
        for label in model.iter("baselabel"):
            if label.get("type") not in ("qemu", "kvm") or not label.text:
                continue
            try:
                uid, gid = (int(part.strip().lstrip("+")) for part in label.text.split(":"))
            except ValueError:
                return None
            if uid == 0:
                return None
            groups = {gid}
            with contextlib.suppress(KeyError):
                groups.update(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
            return HypervisorUser(uid, gid, frozenset(groups))
    return None


def _allows(st: os.stat_result, user: HypervisorUser, bit: int) -> bool:
    """Whether the permission bit (4 read, 1 search) of st's mode grants it to user (owner, group, others)."""
    if st.st_uid == user.uid:
        return bool(st.st_mode & (bit << 6))
    if st.st_gid in user.groups:
        return bool(st.st_mode & (bit << 3))
    return bool(st.st_mode & bit)


def unreachable(path: Path, user: HypervisorUser, *, directory: bool = False) -> str | None:
    """Why user cannot reach path (a directory on the way denies it search; a directory itself, with
    directory, too), or None. libvirt's dynamic ownership hands a file to QEMU's user, never the
    directories above it."""
    for parent in [*reversed(path.parents), *([path] if directory else [])]:
        try:
            st = parent.stat()
        except OSError as e:
            return f"{parent}: {e.strerror}"
        if not _allows(st, user, 1):
            return (f"{parent} (mode {stat.S_IMODE(st.st_mode):04o}, owner {st.st_uid}:{st.st_gid}) does not let "
                    f"{user.describe()} through")
    return None


def publish(files: dict[str, Path], dest: Path) -> dict[str, Path]:
    """Copies of the image's files in dest, a root-owned directory every user may search (made 0755 where
    missing), reused while the source is unchanged (keyed by its path, size and mtime) and written
    atomically; the least recently used beyond PUBLISHED_KEEP are removed (a running QEMU keeps the file
    it has open). A copy, not a link: libvirt chowns what QEMU opens, and the checkout's files stay its own.
    Raises OSError."""
    for missing in reversed([dest, *dest.parents]):
        if not missing.exists():
            missing.mkdir(mode=0o755)
    out = {}
    for what, src in files.items():
        st = src.stat()
        digest = hashlib.sha256(f"{src}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
        target = dest / f"{digest}-{src.name}"
        if not (target.exists() and target.stat().st_size == st.st_size):
            tmp = dest / f".{target.name}.{os.getpid()}.tmp"
            try:
                shutil.copyfile(src, tmp)
                tmp.chmod(0o644)
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
        os.utime(target)  # recently used
        out[what] = target
    published = sorted((p for p in dest.iterdir() if not p.name.startswith(".")), key=lambda p: p.stat().st_mtime,
                       reverse=True)
    for old in published[PUBLISHED_KEEP:]:
        if old not in out.values():
            old.unlink(missing_ok=True)
    return out


def sd_name(index: int) -> str:
    """sda, sdb, ..., sdz, sdaa, ...: libvirt's target names (the guest names its disks itself)."""
    letters = ""
    index += 1
    while index:
        index, rem = divmod(index - 1, 26)
        letters = chr(ord("a") + rem) + letters
    return "sd" + letters


def qemu_pid(domain_name: str) -> int | None:
    """The pid of the QEMU process behind a running domain (libvirt's pid file)."""
    try:
        return int(Path(f"/run/libvirt/qemu/{domain_name}.pid").read_text().strip())
    except (OSError, ValueError):
        return None


class LibvirtBackend:
    name = "libvirt"

    def __init__(self, spec: LaunchSpec) -> None:
        self.spec = spec
        self.run_dir = spec.run_dir
        self.domain_name = DOMAIN_PREFIX + spec.vm_id
        self.log = logging.getLogger(f"uvm.{spec.vm_id}.libvirt")
        self._conn: Any = None
        self._dom: Any = None
        # libvirt calls run in threads that a cancelled start cannot stop: what they return late
        # (a connection, a running domain) is released by aclose.
        self._opening: asyncio.Future[Any] | None = None
        self._creating: asyncio.Future[Any] | None = None
        self._callbacks: list[int] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._exit: asyncio.Future[HypervisorExit] | None = None
        self._removed: dict[str, asyncio.Event] = {}
        self._channels: dict[str, str] = {}
        self._pid: int | None = None
        self._user: HypervisorUser | None = None  # libvirt's QEMU user, once connected
        self._terminating = False
        self._run_dir_lock: int | None = None  # held from launch until the directory is removed
        self._closed = False
        self._watchdog: asyncio.Task[None] | None = None
        self.disconnects = 0  # times the watchdog found the connection to libvirtd lost while QEMU ran
        self.reconnects = 0

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def console_path(self) -> Path:
        return self.spec.console_log or self.run_dir / "console.log"

    def slow_launch_hint(self) -> str:
        """Why a launch may be taking long (for the launch timeout's error), led by '; '."""
        if self._creating is not None and not self._creating.done():
            step = "libvirt's domain start (createXML) had not returned"
        elif self._opening is not None and not self._opening.done():
            step = f"the connection to libvirt at {self.spec.libvirt_uri} had not opened ({HOW_TO_START})"
        else:
            return ""
        problem = kvm_node_problem()
        return f"; {step}" + (f": {problem}" if problem and self._creating is not None else "")

    # -- libvirt calls (blocking: in a thread) ----------------------------------------------------

    async def _call(self, what: str, fn: Any, *args: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args)
        except libvirt.libvirtError as e:
            raise UvmError(f"VM {self.spec.vm_id}: libvirt {what}: {libvirt_message(e)}", vm_id=self.spec.vm_id,
                           domain=self.domain_name) from None

    async def launch(self, spec: LaunchSpec) -> None:
        self._loop = asyncio.get_running_loop()
        self._exit = self._loop.create_future()
        self._run_dir_lock = create_run_dir(spec, 0o755)  # libvirt's QEMU user must reach the console log
        check_kvm_node(self.log)
        _ensure_event_loop()
        try:
            self._opening = asyncio.ensure_future(asyncio.to_thread(libvirt.open, spec.libvirt_uri))
            self._conn = await asyncio.shield(self._opening)
        except libvirt.libvirtError as e:
            raise StartError(f"VM {spec.vm_id}: cannot connect to libvirt at {spec.libvirt_uri}: "
                             f"{libvirt_message(e)} ({HOW_TO_START})", vm_id=spec.vm_id) from None
        try:
            await asyncio.to_thread(self._conn.lookupByName, self.domain_name)
        except libvirt.libvirtError as e:
            if not no_such_domain(e):
                raise StartError(f"VM {spec.vm_id}: libvirt: cannot tell whether domain {self.domain_name} exists: "
                                 f"{libvirt_message(e)}", vm_id=spec.vm_id) from None
        else:
            raise AlreadyExistsError(f"VM {spec.vm_id}: libvirt domain {self.domain_name} already exists "
                                     f"(`virsh destroy {self.domain_name}` if it is a leftover)", vm_id=spec.vm_id)
        spec = self.spec = await self._reachable_image(spec)
        xml = domain_xml(spec, self.console_path)
        try:
            self._creating = asyncio.ensure_future(asyncio.to_thread(self._conn.createXML, xml, 0))
            self._dom = await asyncio.shield(self._creating)
        except libvirt.libvirtError as e:
            raise StartError(f"VM {spec.vm_id}: libvirt refused the domain: {libvirt_message(e)}",
                             vm_id=spec.vm_id) from None
        self._callbacks = self._register_events(self._conn, self._dom)
        live = ET.fromstring(await self._call("XMLDesc", self._dom.XMLDesc, 0))
        for ch in live.iter("channel"):
            src, tgt = ch.find("source"), ch.find("target")
            if src is not None and tgt is not None and src.get("path") and tgt.get("name"):
                self._channels[str(tgt.get("name"))] = str(src.get("path"))
        self._pid = qemu_pid(self.domain_name)
        self._watchdog = self._loop.create_task(self._poll_active(), name=f"{spec.vm_id}-libvirt-watch")

    async def _reachable_image(self, spec: LaunchSpec) -> LaunchSpec:
        """spec with the image's files published where libvirt's QEMU user can read them (the checkout
        may sit under a 0700 home); StartError naming any file or share that user still cannot reach."""
        self._user = hypervisor_user(await self._call("capabilities", self._conn.getCapabilities))
        if spec.libvirt_image_dir is not None:
            try:
                files = await asyncio.to_thread(publish, {"kernel": spec.kernel, "initrd": spec.initrd,
                                                          "rootfs": spec.rootfs}, spec.libvirt_image_dir)
            except OSError as e:
                raise StartError(f"VM {spec.vm_id}: cannot publish the guest image in {spec.libvirt_image_dir} for "
                                 f"libvirt's QEMU: {e}", vm_id=spec.vm_id) from None
            spec = dataclasses.replace(spec, kernel=files["kernel"], initrd=files["initrd"], rootfs=files["rootfs"])
        if self._user is not None:
            needed = [("kernel", spec.kernel, False), ("initrd", spec.initrd, False), ("root image", spec.rootfs, False)]
            needed += [(f"share {share.tag}", share.host_path, True) for share in spec.shares]
            for what, path, directory in needed:
                why = unreachable(path, self._user, directory=directory)
                if why is not None:
                    raise StartError(f"VM {spec.vm_id}: libvirt runs QEMU as {self._user.describe()}, which cannot "
                                     f"reach the {what} {path}: {why}", vm_id=spec.vm_id, path=str(path))
        return spec

    def _register_events(self, conn: Any, dom: Any) -> list[int]:
        return [conn.domainEventRegisterAny(dom, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None),
                conn.domainEventRegisterAny(dom, libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, self._on_device_removed,
                                            None)]

    def _on_lifecycle(self, conn: Any, dom: Any, event: int, detail: int, opaque: Any) -> None:
        if event == libvirt.VIR_DOMAIN_EVENT_STOPPED and self._loop is not None:
            self._loop.call_soon_threadsafe(self._stopped, detail)

    def _on_device_removed(self, conn: Any, dom: Any, alias: str, opaque: Any) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._device_removed, alias)

    def _device_removed(self, alias: str) -> None:
        for key, ev in self._removed.items():
            if alias.endswith(key):
                ev.set()

    def _stopped(self, detail: int) -> None:
        if self._exit is None or self._exit.done():
            return
        if detail == libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN:
            hv = HypervisorExit(0, None, "guest-shutdown")
        elif detail == libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED:
            hv = HypervisorExit(0, None, "host-qmp-quit" if self._terminating else "destroyed",
                                "" if self._terminating else "libvirt destroyed the domain")
        else:
            names = {libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED: "crashed", libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED:
                     "failed (the QEMU process died)"}
            hv = HypervisorExit(None, None, None, f"libvirt: domain {names.get(detail, f'stopped ({detail})')}")
        self._exit.set_result(hv)

    async def _poll_active(self) -> None:
        """Belt and braces: a missed event must not leave waiters hanging. A lost connection to libvirtd
        (restarted, say) is not the VM's death: while its QEMU runs, the backend reconnects."""
        connected = True
        while self._exit is not None and not self._exit.done():
            await asyncio.sleep(1.0)
            try:
                active = await asyncio.to_thread(self._dom.isActive)
            except libvirt.libvirtError as e:
                if not no_such_domain(e) and self._qemu_running():
                    if connected:
                        self.disconnects += 1
                        self.log.warning("libvirt: lost the connection (%s) while QEMU runs: reconnecting",
                                         libvirt_message(e))
                    connected = await self._reconnect()
                    continue
                active = 0
            if not active:
                await asyncio.sleep(0.5)  # give the event a chance to say how it ended
                if not self._exit.done():
                    self._exit.set_result(HypervisorExit(None, None, None, "libvirt: the domain is gone"))

    def _qemu_running(self) -> bool:
        """Whether this domain's QEMU process is alive (its pid, still running this domain's QEMU)."""
        if self._pid is None:
            return False
        try:
            return f"guest={self.domain_name},".encode() in Path(f"/proc/{self._pid}/cmdline").read_bytes()
        except OSError:
            return False

    async def _reconnect(self) -> bool:
        """A new connection to libvirtd with this domain's events; False while libvirtd does not answer."""
        try:
            conn = await asyncio.to_thread(libvirt.open, self.spec.libvirt_uri)
        except libvirt.libvirtError:
            return False
        try:
            dom = await asyncio.to_thread(conn.lookupByName, self.domain_name)
            callbacks = self._register_events(conn, dom)
        except libvirt.libvirtError:
            with contextlib.suppress(libvirt.libvirtError):
                await asyncio.to_thread(conn.close)
            return False
        old, self._conn, self._dom, self._callbacks = self._conn, conn, dom, callbacks
        with contextlib.suppress(libvirt.libvirtError):
            await asyncio.to_thread(old.close)
        self.reconnects += 1
        self.log.info("libvirt: reconnected to %s", self.spec.libvirt_uri)
        return True

    async def connect_agent(self) -> socket.socket:
        return await connect_unix(self._channels[self.spec.agent_port_name])

    def port_path(self, name: str) -> str:
        return self._channels[name]

    def _active(self) -> bool:
        return self._dom is not None and self._exit is not None and not self._exit.done()

    async def request_powerdown(self) -> None:
        if self._active():
            with contextlib.suppress(UvmError):
                await self._call("shutdown", self._dom.shutdownFlags, libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)

    async def terminate(self) -> None:
        if self._active():
            self._terminating = True
            with contextlib.suppress(UvmError):
                await self._call("destroy", self._dom.destroy)

    async def wait_exit(self) -> HypervisorExit:
        if self._exit is None:
            raise StartError(f"VM {self.spec.vm_id}: the domain was never started", vm_id=self.spec.vm_id)
        return await asyncio.shield(self._exit)

    # -- disks -----------------------------------------------------------------------------------

    @staticmethod
    def _disk_xml(controller: int, lun: int, path: str, readonly: bool, fmt: str) -> str:
        return (f"<disk type='file' device='disk'><driver name='qemu' type='{fmt}'/><source file={quoteattr(path)}/>"
                f"<target dev='{sd_name(controller * 256 + lun)}' bus='scsi'/>{'<readonly/>' if readonly else ''}"
                f"<alias name='ua-sd{controller}-lun{lun}'/>"
                f"<address type='drive' controller='{controller}' bus='0' target='0' unit='{lun}'/></disk>")

    def _live_disks(self, xml: str) -> dict[tuple[int, int], ET.Element]:
        out = {}
        for disk in ET.fromstring(xml).iter("disk"):
            addr, tgt = disk.find("address"), disk.find("target")
            if addr is not None and tgt is not None and tgt.get("bus") == "scsi":
                out[(int(addr.get("controller", "0")), int(addr.get("unit", "0")))] = disk
        return out

    async def attach_scsi(self, controller: int, lun: int, path: str, readonly: bool, fmt: str) -> None:
        if not self._active():
            raise DiskError(f"VM {self.spec.vm_id}: attach {path}: the domain is not running", vm_id=self.spec.vm_id)
        user = self._user
        if user is not None and (why := await asyncio.to_thread(unreachable, Path(path), user)):  # (absolute)
            raise DiskError(f"VM {self.spec.vm_id}: attach {path}: libvirt runs QEMU as {user.describe()}, which "
                            f"cannot reach it: {why}", vm_id=self.spec.vm_id, path=path)
        try:
            await asyncio.to_thread(self._dom.attachDeviceFlags, self._disk_xml(controller, lun, path, readonly, fmt),
                                    libvirt.VIR_DOMAIN_AFFECT_LIVE)
        except libvirt.libvirtError as e:
            raise DiskError(f"VM {self.spec.vm_id}: attach {path} at {controller}:{lun}: libvirt: {libvirt_message(e)}",
                            vm_id=self.spec.vm_id, path=path) from None

    async def detach_scsi(self, controller: int, lun: int) -> None:
        xml = await self._call("XMLDesc", self._dom.XMLDesc, 0)
        disk = self._live_disks(xml).get((controller, lun))
        if disk is None:
            raise DiskError(f"VM {self.spec.vm_id}: detach {controller}:{lun}: nothing attached there")
        key = f"sd{controller}-lun{lun}"
        removed = self._removed[key] = asyncio.Event()
        try:
            try:
                await asyncio.to_thread(self._dom.detachDeviceFlags, ET.tostring(disk, encoding="unicode"),
                                        libvirt.VIR_DOMAIN_AFFECT_LIVE)
            except libvirt.libvirtError as e:
                raise DiskError(f"VM {self.spec.vm_id}: detach {controller}:{lun}: libvirt: {libvirt_message(e)}",
                                vm_id=self.spec.vm_id) from None
            deadline = asyncio.get_running_loop().time() + DEVICE_REMOVED_TIMEOUT_S
            while (controller, lun) in self._live_disks(await self._call("XMLDesc", self._dom.XMLDesc, 0)):
                if asyncio.get_running_loop().time() > deadline:
                    raise DiskError(f"VM {self.spec.vm_id}: detach {controller}:{lun}: the device was not removed")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(removed.wait(), 0.2)
        finally:
            self._removed.pop(key, None)

    async def scsi_inventory(self) -> dict[str, list[str]]:
        disks = self._live_disks(await self._call("XMLDesc", self._dom.XMLDesc, 0))
        names = [f"sd{c}-lun{lun}" for c, lun in sorted(disks)]
        return {"nodes": [n.replace("sd", "scsi", 1) for n in names], "devices": names}

    def console_tail(self, lines: int = 30) -> str:
        return tail_lines(self.console_path, lines)

    async def _settle_abandoned_calls(self) -> bool:
        """A start cancelled while libvirt was connecting or creating the domain: wait (bounded) for
        that call to return, and keep what it made, so that it is destroyed and closed below. True if a
        domain came late (no lifecycle events were registered for it: nothing will report its end)."""
        late_domain = False
        for attr, pending in (("_conn", self._opening), ("_dom", self._creating)):
            if pending is None or pending.cancelled() or getattr(self, attr) is not None:
                continue
            try:
                setattr(self, attr, await asyncio.wait_for(asyncio.shield(pending), LATE_CALL_WAIT_S))
                late_domain = late_domain or attr == "_dom"
            except libvirt.libvirtError:
                pass  # it failed: nothing was made
            except TimeoutError:
                self.log.error("libvirt %s did not return within %gs: domain %s may be left (virsh destroy it)",
                               "createXML" if attr == "_dom" else "open", LATE_CALL_WAIT_S, self.domain_name)
        return late_domain

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            late_domain = await self._settle_abandoned_calls()
            if self._active():
                await self.terminate()
                if not late_domain:  # (a late one was destroyed, and no event will come for it)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(self._exit), 15.0)  # type: ignore[arg-type]
        finally:
            if self._watchdog is not None:
                self._watchdog.cancel()
                with contextlib.suppress(BaseException):
                    await self._watchdog
            if self._conn is not None:
                for cb in self._callbacks:
                    with contextlib.suppress(libvirt.libvirtError):
                        self._conn.domainEventDeregisterAny(cb)
                with contextlib.suppress(libvirt.libvirtError):
                    await asyncio.to_thread(self._conn.close)
            if self._run_dir_lock is not None:
                remove_run_dir(self.run_dir, self._run_dir_lock)
                self._run_dir_lock = None


def destroy_leftover(vm_id: str, uri: str = "qemu:///system") -> bool:
    """Destroy the domain of VM vm_id left by a dead shim; True if there was one."""
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as e:
        raise UvmError(f"cannot connect to libvirt at {uri}: {libvirt_message(e)} ({HOW_TO_START})") from None
    try:
        dom = conn.lookupByName(DOMAIN_PREFIX + vm_id)
    except libvirt.libvirtError as e:
        conn.close()
        if no_such_domain(e):
            return False
        raise UvmError(f"libvirt domain {DOMAIN_PREFIX + vm_id}: lookup: {libvirt_message(e)}") from None
    try:
        dom.destroy()
    except libvirt.libvirtError as e:
        raise UvmError(f"libvirt domain {DOMAIN_PREFIX + vm_id}: destroy: {libvirt_message(e)}") from None
    finally:
        conn.close()
    return True
