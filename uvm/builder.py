"""Config -> launch description: everything a backend needs to start this VM on this host.

The builder checks the config against the host (image files readable, memory available, the
accelerator usable) and resolves defaults; it does no I/O beyond those checks and starts nothing.
"""

from __future__ import annotations

import errno
import json
import shlex
import socket
from dataclasses import dataclass, field
from pathlib import Path

from schemas.agent import AGENT_PORT_NAME
from schemas.uvm_config import Share, UvmConfig
from uvm.accel import Accel, resolve_accel
from uvm.errors import ConfigError

# Boot options measured to keep boots fast and hang-free under emulation
# (shared/reference/qemu-on-this-machine.md).
BASE_CMDLINE = (
    "console=ttyS0 quiet mitigations=off tsc=reliable no_timer_check i8042.noaux i8042.nokbd "
    "8250.nr_uarts=1 random.trust_cpu=on cryptomgr.notests panic=-1 reboot=t"
)


PLACEHOLDER_MAC = "02:75:76:6d:00:00"  # a NIC that stands in for no veth yet (a new namespace; templates)


@dataclass(frozen=True)
class Nic:
    """A virtio-net NIC on a tap the host made (uvm/network.py): QEMU gets the tap's open fds (one per
    queue), never a name it would open itself, and vhost-net fds when the host has them."""

    id: str
    mac: str
    tap_fds: tuple[int, ...]
    vhost_fds: tuple[int, ...] = ()


@dataclass(frozen=True)
class LaunchSpec:
    """A VM as a backend starts it. Paths are absolute and were checked readable."""

    vm_id: str
    kernel: Path
    initrd: Path
    rootfs: Path
    cmdline: str
    cpus: int
    memory_mib: int
    accel: Accel
    cpu_model: str
    tb_size_mib: int | None
    qemu_binary: str
    run_dir: Path  # this VM's own directory (created by the backend at launch)
    console_log: Path | None
    kill_with_parent: bool
    agent_port_name: str = AGENT_PORT_NAME
    image_id: str = ""
    shares: tuple[Share, ...] = ()
    extra_ports: tuple[str, ...] = ()
    scsi_controllers: int = 1
    backend: str = "qemu"
    libvirt_uri: str = "qemu:///system"
    libvirt_image_dir: Path | None = None  # where the libvirt backend publishes the image for its QEMU user
    console_socket: bool = False  # the serial console on <run_dir>/console.sock (and still logged)
    ssh_port: int | None = None  # host loopback port forwarded to the guest's port 22 (a NIC only when set)
    # Guest RAM in a file (templates): shared (the template writes it) or private copy-on-write
    # (a clone); incoming: the saved device state a clone starts from instead of booting.
    memory_file: Path | None = None
    memory_shared: bool = False
    incoming: Path | None = None
    confine: bool = True  # QEMU in a jail of its own (uvm/jail.py)
    confine_uid_range: tuple[int, int] = (2147418112, 2147483647)
    nics: tuple[Nic, ...] = ()  # added by UtilityVM once its network is set up
    netns_fd: int | None = None  # QEMU starts in this network namespace (its taps are there)
    extra: dict[str, str] = field(default_factory=dict)


def _readable_file(path: Path, what: str) -> Path:
    path = path.absolute()
    if not path.exists():
        raise ConfigError(f"{what} {path}: not found (build the guest image with `make image`)", path=str(path))
    if not path.is_file():
        raise ConfigError(f"{what} {path}: not a regular file", path=str(path))
    try:
        with path.open("rb") as f:
            f.read(1)
    except OSError as e:
        raise ConfigError(f"{what} {path}: cannot be read: {e.strerror}", path=str(path)) from None
    return path


def resolve_image(config: UvmConfig) -> tuple[Path, Path, Path, str]:
    """(kernel, initrd, rootfs, image id) from the image manifest, with per-file overrides."""
    files: dict[str, Path | None] = {"kernel": config.kernel, "initrd": config.initrd, "rootfs": config.rootfs}
    image_id = "custom"
    if any(v is None for v in files.values()):
        manifest_path = config.image / "manifest.json"
        try:
            manifest = json.loads(manifest_path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"image {config.image}: no manifest.json (build it with `make image`)",
                              path=str(config.image)) from None
        except (OSError, ValueError) as e:
            raise ConfigError(f"image {manifest_path}: unreadable manifest: {e}", path=str(manifest_path)) from None
        if not isinstance(manifest, dict) or not all(isinstance(manifest.get(k), str) for k in files):
            raise ConfigError(f"image {manifest_path}: manifest lacks kernel/initrd/rootfs names")
        image_id = str(manifest.get("id", ""))
        for k in files:
            if files[k] is None:
                files[k] = config.image / manifest[k]
    kernel, initrd, rootfs = (_readable_file(files[k], k) for k in ("kernel", "initrd", "rootfs"))  # type: ignore[arg-type]
    return kernel, initrd, rootfs, image_id


def host_memory_mib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    raise ConfigError("cannot read MemTotal from /proc/meminfo")


def host_tsc_khz() -> int | None:
    """The host's TSC frequency: under TCG the guest TSC runs at the host's rate."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return int(float(line.split(":")[1]) * 1000)
    except (OSError, ValueError):
        pass
    return None


def loopback_port(port: int) -> int:
    """port (0: a free one) after checking it can be bound on 127.0.0.1 now. Raises ConfigError.

    QEMU binds it again a moment later: another process taking it in between makes QEMU refuse to
    start, and UtilityVM then tries another free port (a port the user chose is not replaced). QEMU
    can bind port 0 itself, but then tells the port only through the human monitor's `info usernet`;
    choosing it here keeps the backends unaware of SSH.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            why = "in use" if e.errno == errno.EADDRINUSE else e.strerror
            raise ConfigError(f"ssh_port {port}: cannot listen on 127.0.0.1:{port}: {why}", ssh_port=port) from None
        return int(s.getsockname()[1])


def build(config: UvmConfig) -> LaunchSpec:
    """The launch description for config on this host. Raises ConfigError naming what is wrong."""
    kernel, initrd, rootfs, image_id = resolve_image(config)
    total = host_memory_mib()
    if config.memory_mib > total:
        raise ConfigError(f"memory_mib {config.memory_mib}: more than this host has ({total} MiB)",
                          memory_mib=config.memory_mib)
    accel = resolve_accel(config.accel, config.qemu_binary, config.state_dir)
    cmdline = BASE_CMDLINE
    if accel == "tcg":
        # Skips the PIT calibration that raced under emulation and hung ~1 boot in 10.
        khz = host_tsc_khz()
        if khz:
            cmdline += f" tsc_early_khz={khz}"
    if config.guest_lockdown != "none":
        cmdline += f" lockdown={config.guest_lockdown}"
    cmdline += f" uvm.id={config.id}"
    if config.kernel_args:
        try:
            shlex.split(config.kernel_args)  # reject unbalanced quotes early
        except ValueError as e:
            raise ConfigError(f"kernel_args {config.kernel_args!r}: {e}") from None
        cmdline += " " + config.kernel_args
    shares = []
    for share in config.shares:
        host = share.host_path.absolute()
        if not host.is_dir():
            raise ConfigError(f"share {share.tag}: {host} is not a directory", share=share.tag)
        shares.append(share.model_copy(update={"host_path": host}))
    if config.backend != "qemu" and (config.ssh_port is not None or config.console_socket):
        what = "ssh_port (user-network port forwarding)" if config.ssh_port is not None else "console_socket"
        raise ConfigError(f"{what}: only the qemu backend supports it, not {config.backend}", backend=config.backend)
    if config.backend != "qemu" and config.network_namespace is not None:
        raise ConfigError(f"network_namespace {config.network_namespace}: the {config.backend} backend cannot connect a "
                          "VM to a network namespace (libvirtd starts QEMU in its own, so no tap can sit beside the "
                          "container's veth); use the qemu backend", backend=config.backend)
    ssh_port = loopback_port(config.ssh_port) if config.ssh_port is not None else None
    run_dir = config.run_dir.absolute() / config.id
    if len(str(run_dir / "agent.sock")) > 100:
        room = 100 - len(f"/{config.id}/agent.sock")
        raise ConfigError(f"run_dir {config.run_dir.absolute()}: {len(str(config.run_dir.absolute()))} characters, too "
                          f"long for the unix sockets of VM {config.id} under it (at most {room} with this VM id)",
                          run_dir=str(config.run_dir))
    return LaunchSpec(
        vm_id=config.id, kernel=kernel, initrd=initrd, rootfs=rootfs, cmdline=cmdline,
        cpus=config.cpus, memory_mib=config.memory_mib, accel=accel,
        cpu_model="host" if accel == "kvm" else "qemu64",
        tb_size_mib=config.tb_size_mib if accel == "tcg" else None,
        qemu_binary=config.qemu_binary, run_dir=run_dir,
        console_log=config.console_log.absolute() if config.console_log else None,
        kill_with_parent=config.kill_with_parent, image_id=image_id, shares=tuple(shares),
        extra_ports=tuple(config.extra_ports), scsi_controllers=config.scsi_controllers,
        backend=config.backend, libvirt_uri=config.libvirt_uri, libvirt_image_dir=config.libvirt_image_dir.absolute(),
        confine=config.confine, confine_uid_range=config.confine_uid_range,
        console_socket=config.console_socket,
        ssh_port=ssh_port,
    )
