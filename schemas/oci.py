"""The subset of the OCI runtime spec (1.0/1.1) uvmshim reads, validated strictly where it matters.

``Process`` rejects unknown fields, a missing or empty ``args`` and a relative ``cwd``; ``Spec``
rejects unknown top-level fields. ``linux`` is kept as given (crun in the guest interprets it),
with its resources typed so updates can be checked. ``default_spec()`` gives what ``crun spec``
would, for callers that only have a command line.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ConsoleSize(Strict):
    height: Annotated[int, Field(ge=0, le=65535)]
    width: Annotated[int, Field(ge=0, le=65535)]


class User(Strict):
    uid: Annotated[int, Field(ge=0)] = 0
    gid: Annotated[int, Field(ge=0)] = 0
    umask: int | None = None
    additionalGids: list[int] | None = None
    username: str | None = None


class Rlimit(Strict):
    type: str
    hard: Annotated[int, Field(ge=0)]
    soft: Annotated[int, Field(ge=0)]


class Process(Strict):
    terminal: bool = False
    consoleSize: ConsoleSize | None = None
    user: User = Field(default_factory=User)
    args: Annotated[list[str], Field(min_length=1)]
    commandLine: str | None = None
    env: list[str] = Field(default_factory=lambda: ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"])
    cwd: str = "/"
    capabilities: dict[str, list[str]] | None = None
    rlimits: list[Rlimit] | None = None
    noNewPrivileges: bool | None = None
    apparmorProfile: str | None = None
    oomScoreAdj: int | None = None
    selinuxLabel: str | None = None
    ioPriority: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None

    @field_validator("cwd")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f"cwd {v!r} must be an absolute path")
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: list[str]) -> list[str]:
        for e in v:
            if "=" not in e:
                raise ValueError(f"env entry {e!r} is not NAME=value")
        return v


class Root(Strict):
    path: str
    readonly: bool = False


class Mount(Strict):
    destination: str
    source: str | None = None
    type: str | None = None
    options: list[str] | None = None
    uidMappings: list[dict[str, int]] | None = None
    gidMappings: list[dict[str, int]] | None = None


class Spec(Strict):
    ociVersion: str = "1.0.2"
    process: Process
    root: Root | None = None
    hostname: str | None = None
    domainname: str | None = None
    mounts: list[Mount] = Field(default_factory=list)
    hooks: dict[str, Any] | None = None
    annotations: dict[str, str] | None = None
    linux: dict[str, Any] | None = None
    solaris: dict[str, Any] | None = None
    windows: dict[str, Any] | None = None
    vm: dict[str, Any] | None = None
    zos: dict[str, Any] | None = None

    def wire(self) -> dict[str, Any]:
        """The JSON object sent to the guest (unset optional fields left out)."""
        return self.model_dump(mode="json", exclude_none=True)


class LinuxMemory(BaseModel):
    model_config = ConfigDict(extra="allow")
    limit: int | None = None
    reservation: int | None = None
    swap: int | None = None


class LinuxCPU(BaseModel):
    model_config = ConfigDict(extra="allow")
    shares: Annotated[int, Field(ge=0)] | None = None
    quota: int | None = None
    period: Annotated[int, Field(ge=0)] | None = None
    cpus: str | None = None
    mems: str | None = None


class LinuxPids(Strict):
    limit: int


class LinuxResources(BaseModel):
    """OCI linux.resources (what `update` accepts); unknown controller fields pass through to crun."""

    model_config = ConfigDict(extra="allow")
    memory: LinuxMemory | None = None
    cpu: LinuxCPU | None = None
    pids: LinuxPids | None = None

    def wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


DEFAULT_CAPS = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_CHOWN", "CAP_DAC_OVERRIDE",
                "CAP_FOWNER", "CAP_FSETID", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_NET_RAW",
                "CAP_SYS_CHROOT", "CAP_MKNOD", "CAP_SETFCAP"]


def default_spec(args: list[str], terminal: bool = False, cwd: str = "/", env: list[str] | None = None,
                 hostname: str = "container", readonly_root: bool = False) -> Spec:
    """A spec like `crun spec`'s: own pid/ipc/uts/mount/network namespaces, the usual mounts."""
    caps = {k: list(DEFAULT_CAPS) for k in ("bounding", "effective", "permitted")}
    process = Process(args=args, terminal=terminal, cwd=cwd, capabilities=caps, noNewPrivileges=True,
                      rlimits=[Rlimit(type="RLIMIT_NOFILE", hard=1024, soft=1024)],
                      **({"env": env} if env is not None else {}))
    mounts = [
        Mount(destination="/proc", type="proc", source="proc"),
        Mount(destination="/dev", type="tmpfs", source="tmpfs", options=["nosuid", "strictatime", "mode=755", "size=65536k"]),
        Mount(destination="/dev/pts", type="devpts", source="devpts",
              options=["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]),
        Mount(destination="/dev/shm", type="tmpfs", source="shm",
              options=["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]),
        Mount(destination="/dev/mqueue", type="mqueue", source="mqueue", options=["nosuid", "noexec", "nodev"]),
        Mount(destination="/sys", type="sysfs", source="sysfs", options=["nosuid", "noexec", "nodev", "ro"]),
        Mount(destination="/sys/fs/cgroup", type="cgroup", source="cgroup",
              options=["nosuid", "noexec", "nodev", "relatime", "ro"]),
    ]
    linux = {
        "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount", "cgroup")],
        "maskedPaths": ["/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
                        "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi"],
        "readonlyPaths": ["/proc/asound", "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
    }
    return Spec(process=process, root=Root(path="rootfs", readonly=readonly_root), hostname=hostname,
                mounts=mounts, linux=linux)
