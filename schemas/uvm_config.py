"""The UVM configuration: what VM to build (desired state). Strict: unknown fields are rejected.

Host-independent checks live here (ranges, names); checks against this host (files exist, memory
fits) are the builder's, in ``uvm.builder``.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

NEW_NETNS = "new"  # network_namespace: a fresh one, for CNI to fill after the VM started
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
REPO_ROOT = Path(__file__).resolve().parent.parent


def default_image_dir() -> Path:
    """$UVMSHIM_IMAGE_DIR, else the checkout's images/out (what `make image` writes)."""
    env = os.environ.get("UVMSHIM_IMAGE_DIR")
    if env:
        return Path(env)
    return REPO_ROOT / "images" / "out"


def default_run_dir() -> Path:
    """Where each VM's sockets and logs live while it runs: short paths (unix sockets: 108 bytes)."""
    env = os.environ.get("UVMSHIM_RUN_DIR")
    if env:
        return Path(env)
    return Path("/run/uvmshim") if os.geteuid() == 0 else Path(os.environ.get("XDG_RUNTIME_DIR", "/tmp")) / "uvmshim"


def default_state_dir() -> Path:
    env = os.environ.get("UVMSHIM_STATE_DIR")
    if env:
        return Path(env)
    return Path("/var/lib/uvmshim") if os.geteuid() == 0 else Path.home() / ".local/state/uvmshim"


def default_libvirt_image_dir() -> Path:
    """$UVMSHIM_LIBVIRT_IMAGE_DIR, else /var/lib/uvmshim/libvirt-images: where the libvirt backend puts the
    copies of the guest image that libvirt's QEMU user can reach (a checkout under /root cannot be)."""
    env = os.environ.get("UVMSHIM_LIBVIRT_IMAGE_DIR")
    return Path(env) if env else Path("/var/lib/uvmshim/libvirt-images")


def new_vm_id() -> str:
    return "uvm-" + secrets.token_hex(4)


class Share(BaseModel):
    """A host directory exposed to the guest over virtio-9p, mounted there on first use."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tag: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,31}$")]
    host_path: Path
    readonly: bool = False


class UvmConfig(BaseModel):
    """One utility VM. Every field has a default except what only the caller can know."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(default_factory=new_vm_id, description="VM id: letters, digits, '_', '.', '-'")
    cpus: Annotated[int, Field(ge=1, le=64)] = 1
    memory_mib: Annotated[int, Field(ge=64, le=1 << 20)] = 256
    image: Path = Field(default_factory=default_image_dir, description="directory with manifest.json")
    kernel: Path | None = None
    initrd: Path | None = None
    rootfs: Path | None = None
    kernel_args: Annotated[str, Field(max_length=2048)] = ""
    # The guest kernel's lockdown (kernel_lockdown(7)). confidentiality also keeps tracefs from
    # creating its thousands of event files at boot (~9 MiB of slab in every UVM, and boot time);
    # "integrity" or "none" for a guest whose containers use tracefs, kprobes, perf or BPF tracing.
    guest_lockdown: Literal["none", "integrity", "confidentiality"] = "confidentiality"
    accel: Literal["auto", "kvm", "tcg"] = "auto"
    # From the hypervisor up (QEMU's QMP answered, libvirt's domain running) to the agent's hello.
    boot_timeout: Annotated[float, Field(gt=0, le=3600)] = 60.0
    # For the hypervisor to come up, before the boot timeout starts: libvirt's domain start alone
    # re-probes QEMU for ~85 s on a host whose /dev/kvm is root-only.
    launch_timeout: Annotated[float, Field(gt=0, le=3600)] = 180.0
    backend: Literal["qemu", "libvirt"] = "qemu"
    libvirt_uri: Annotated[str, Field(min_length=1, max_length=256)] = "qemu:///system"
    libvirt_image_dir: Path = Field(default_factory=default_libvirt_image_dir)
    qemu_binary: str = "qemu-system-x86_64"
    tb_size_mib: Annotated[int, Field(ge=16, le=4096)] | None = None
    run_dir: Path = Field(default_factory=default_run_dir)
    state_dir: Path = Field(default_factory=default_state_dir)
    # Fast start (uvm/template.py): "template" clones a saved VM of the same image and shape,
    # building the template first when there is none; "auto" clones when a valid template exists,
    # else boots cold (and builds one in the background if template_autobuild).
    start: Literal["cold", "template", "auto"] = "cold"
    template_autobuild: bool = False
    # Templates kept: after each build, the least recently used beyond this many are removed (and
    # any whose image or QEMU binary has changed since: nothing can use them again).
    template_max_count: Annotated[int, Field(ge=1, le=256)] = 8
    template_dir: Path | None = Field(default=None, description="default: <state_dir>/templates")
    template_memory_dir: Path = Path("/dev/shm/uvmshim-templates")
    console_log: Path | None = None
    # The serial console as a unix socket <run_dir>/<id>/console.sock that a user attaches to (`runuvm
    # boot --console`); what the guest prints is still written to the console log. QEMU backend only.
    console_socket: bool = False
    # A virtio-net NIC on QEMU's user network (restricted: no route out of the VM) with tcp
    # 127.0.0.1:<ssh_port> forwarded to the guest's port 22 (`runuvm boot --ssh`); 0 picks a free
    # port. None: the VM has no network device. QEMU backend only.
    ssh_port: Annotated[int, Field(ge=0, le=65535)] | None = None
    # The container's network (uvm/network.py): None, no NIC; a network namespace's path (CNI already
    # ran there: a pod's), whose interfaces the VM's NICs take over through taps beside them; or "new",
    # a fresh namespace that QEMU starts in with one NIC, taken over once CNI fills it (`ctr run --cni`
    # gives /proc/<QEMU's pid>/ns/net to CNI after the task's create). QEMU backend only.
    network_namespace: Annotated[str, Field(max_length=4096)] | None = None
    kill_with_parent: bool = True
    # QEMU confined (uvm/jail.py): a uid of its own from confine_uid_range (no account may use one), only
    # the capabilities its 9p shares need, a mount namespace holding only its files, QEMU's full seccomp
    # sandbox. QEMU backend (libvirt confines its QEMU its own way). Off: a warning at every start.
    confine: bool = True
    confine_uid_range: tuple[Annotated[int, Field(gt=0, lt=0xFFFFFFFE)], Annotated[int, Field(gt=0, lt=0xFFFFFFFE)]] = (
        2147418112, 2147483647)
    shares: Annotated[list[Share], Field(max_length=16)] = Field(default_factory=list)
    scsi_controllers: Annotated[int, Field(ge=0, le=4)] = 1
    # Extra virtio-serial ports, each a unix socket <run_dir>/<id>/port-<name>.sock on the host
    # (measurements and debugging: e.g. a raw echo to compare the agent link against).
    extra_ports: Annotated[list[Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,30}$")]],
                           Field(max_length=8)] = Field(default_factory=list)

    @field_validator("id")
    @classmethod
    def _check_id(cls, v: str) -> str:
        if not ID_RE.fullmatch(v):
            raise ValueError(f"{v!r} is not a valid VM id (1-64 of [A-Za-z0-9_.-], not starting with '.', '-' or '_')")
        return v

    @field_validator("shares")
    @classmethod
    def _unique_tags(cls, v: list[Share]) -> list[Share]:
        tags = [s.tag for s in v]
        if len(set(tags)) != len(tags):
            raise ValueError(f"share tags must be unique: {tags}")
        return v

    @field_validator("network_namespace")
    @classmethod
    def _check_netns(cls, v: str | None) -> str | None:
        if v is not None and v != NEW_NETNS and (not v.startswith("/") or "\0" in v):
            raise ValueError(f"{v!r}: an absolute path of a network namespace, or {NEW_NETNS!r}")
        return v

    @field_validator("kernel_args")
    @classmethod
    def _check_args(cls, v: str) -> str:
        if "\n" in v or "\0" in v:
            raise ValueError("kernel_args must be one line")
        return v
