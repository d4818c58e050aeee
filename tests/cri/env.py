"""A containerd of the tests' own with its CRI plugin on: Kubernetes pods without a kubelet.

`CriContainerd` is a `PrivateContainerd` (root, state, sockets and log under one short base directory)
whose config.toml turns the CRI plugin on, with everything CRI touches outside containerd made private
too: a CNI network of the bridge plugin (a unique bridge name, a free 10.x.y.0/24, host-local IPAM data
in the base directory), a cgroup parent of its own for the pods, log directories below the base
directory. Two runtime handlers: ``runc`` (io.containerd.runc.v2, the default) and ``uvm`` (our shim,
found as containerd-shim-uvm-v1 in this interpreter's bin directory, with a private empty shim config as
its ConfigPath). containerd, and so every shim it starts, inherits this process's environment: set
UVMSHIM_RUN_DIR, UVMSHIM_IMAGE_DIR and UVMSHIM_CONFIG before start().

Nothing can be pulled, so start() imports two images it builds from the host's busybox-static into
containerd's "k8s.io" namespace (where CRI looks): ``docker.io/library/uvmbusybox:latest`` (every applet)
and the sandbox image ``registry.k8s.io/pause:uvmtest`` (sh as PID 1, waiting until SIGTERM or SIGINT).

stop() takes the pods down the way the kubelet does -- StopPodSandbox (containers and sandbox killed,
CNI DEL, netns removed) then RemovePodSandbox -- and then everything PrivateContainerd.stop removes (any
task left, the daemon, stray shims, mounts, the base directory), the bridge and the cgroup parent. A
pod netns CRI failed to remove is unmounted and removed there, with a warning.

Host state CRI shares with others: pod netns live in /var/run/netns (cni-<uuid>); libcni caches results
in /var/lib/cni/results (removed by CNI DEL); the bridge plugin with isGateway turns on
net.ipv4.ip_forward (left on).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import platform
import secrets
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from shim.containerd_env import DEFAULT_IMAGE_REF, ContainerdEnvError, PrivateContainerd, build_busybox_image_tar
from tests.cri import api_pb2 as api
from tests.cri.client import CriClient, CriError
from tests.netfixtures import CNI_BIN, cni_bridge_conf, delete_link, free_subnet

__all__ = [
    "BUSYBOX_IMAGE_REF",
    "CRI_NAMESPACE",
    "PAUSE_IMAGE_REF",
    "RUNC_HANDLER",
    "UVM_HANDLER",
    "CriContainerd",
    "build_pause_image_tar",
    "container_config",
]

log = logging.getLogger(__name__)

CRI_NAMESPACE = "k8s.io"  # the containerd namespace of CRI's pods, containers and images
BUSYBOX_IMAGE_REF = DEFAULT_IMAGE_REF
PAUSE_IMAGE_REF = "registry.k8s.io/pause:uvmtest"
RUNC_HANDLER = "runc"
UVM_HANDLER = "uvm"
UVM_RUNTIME_TYPE = "io.containerd.uvm.v1"
# Pod and container annotations CRI passes on to the uvm handler's tasks (besides its io.kubernetes.cri.*).
UVM_ANNOTATIONS = ["io.uvmshim.*"]
VENV_BIN = Path(sys.executable).parent
CRI_PLUGIN = 'plugins."io.containerd.grpc.v1.cri"'
CGROUP_ROOT = Path("/sys/fs/cgroup")
# The pause process: PID 1 of the sandbox. It must keep running and end with status 0 on SIGTERM or
# SIGINT (as PID 1 it gets no signal it does not handle). `wait` is interrupted by a trapped signal, so
# the trap runs at once rather than after the sleep.
PAUSE_SCRIPT = "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait; done"


class CriContainerd(PrivateContainerd):
    """containerd with CRI on, under ``base_dir`` (default: a new /tmp/uvmcri-XXXXXXXX).

    Use as a context manager, or start() and stop(); ``cri`` is a CriClient on its socket. ``subnet``
    ("10.x.y"), ``gateway`` (subnet.1, on ``bridge``) and ``cgroup_parent`` say what pods get.
    Raises ContainerdEnvError if the base directory's socket path is too long.
    """

    def __init__(self, base_dir: Path | None = None, log_level: str = "info") -> None:
        base = base_dir if base_dir is not None else Path(tempfile.mkdtemp(prefix="uvmcri-", dir="/tmp"))
        super().__init__(base, extra_path=[VENV_BIN], namespace=CRI_NAMESPACE, log_level=log_level)
        try:
            self._configure(log_level)
        except BaseException:
            shutil.rmtree(self.base_dir, ignore_errors=True)
            raise
        self.cri = CriClient(self.address)

    def _configure(self, log_level: str) -> None:
        suffix = secrets.token_hex(3)
        self.bridge = f"uvcri{suffix}"  # at most 15 bytes: a Linux interface name
        self.subnet = free_subnet()
        self.gateway = f"{self.subnet}.1"
        self.cgroup_parent = f"/uvmcri-{suffix}"
        self.cni_conf_dir = self.base_dir / "cni"
        self.shim_config = self.base_dir / "uvmshim.toml"
        self.log_root = self.base_dir / "logs"
        self.image_dir = self.base_dir / "images"
        self._pod_netns: dict[str, Path] = {}  # pod id -> its netns, recorded when stop() takes pods down
        self._write_cni_config(f"uvmcri-{suffix}")
        # The shim's defaults (never the host's /etc/uvmshim/config.toml), the layer cache in the base directory.
        self.shim_config.write_text(f"layer_cache_dir = {json.dumps(str(self.base_dir / 'layers'))}\n")
        self.config_path.write_text(self._config_toml(log_level))

    def __repr__(self) -> str:
        return f"<CriContainerd {self.state.value} address={self.address} subnet={self.subnet}.0/24 bridge={self.bridge}>"

    def __enter__(self) -> CriContainerd:
        self.start()
        return self

    # --- configuration --------------------------------------------------------------------------------

    def _write_cni_config(self, network: str) -> None:
        """One conflist of the bridge plugin; CRI adds the loopback network itself."""
        self.cni_conf_dir.mkdir()
        bridge = cni_bridge_conf(network, self.bridge, self.subnet, str(self.base_dir / "ipam"))
        plugin = {k: v for k, v in bridge.items() if k not in ("cniVersion", "name")}
        conflist = {"cniVersion": bridge["cniVersion"], "name": network, "plugins": [plugin]}
        (self.cni_conf_dir / "10-uvmcri.conflist").write_text(json.dumps(conflist, indent=2) + "\n")

    def _config_toml(self, log_level: str) -> str:
        """containerd's config.toml (version 2): private paths, CRI on, the runc and uvm handlers."""
        runtimes = f"{CRI_PLUGIN}.containerd.runtimes"
        return "\n".join([
            "version = 2",
            f"root = {_toml(self.base_dir / 'root')}",
            f"state = {_toml(self.base_dir / 'state')}",
            "",
            "[grpc]",
            f"  address = {_toml(self.address)}",
            "[ttrpc]",
            f"  address = {_toml(self.ttrpc_address)}",
            "[debug]",
            f"  level = {_toml(log_level)}",
            "",
            f"[{CRI_PLUGIN}]",
            f"  sandbox_image = {_toml(PAUSE_IMAGE_REF)}",
            "  disable_apparmor = true",
            # Nested hosts refuse a negative oom_score_adj: runc's sandbox create would die with
            # "can't get final child's PID from pipe".
            "  restrict_oom_score_adj = true",
            '  stream_server_address = "127.0.0.1"',
            '  stream_server_port = "0"',
            f"[{CRI_PLUGIN}.cni]",
            f"  bin_dir = {_toml(CNI_BIN)}",
            f"  conf_dir = {_toml(self.cni_conf_dir)}",
            "  max_conf_num = 1",
            f"[{CRI_PLUGIN}.containerd]",
            f"  default_runtime_name = {_toml(RUNC_HANDLER)}",
            f"[{runtimes}.{RUNC_HANDLER}]",
            '  runtime_type = "io.containerd.runc.v2"',
            f"[{runtimes}.{UVM_HANDLER}]",
            f"  runtime_type = {_toml(UVM_RUNTIME_TYPE)}",
            f"  pod_annotations = {json.dumps(UVM_ANNOTATIONS)}",
            f"  container_annotations = {json.dumps(UVM_ANNOTATIONS)}",
            f"[{runtimes}.{UVM_HANDLER}.options]",
            f"  ConfigPath = {_toml(self.shim_config)}",
            "",
        ])

    # --- start ----------------------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        """Start containerd, wait until CRI answers and its network is ready, import the two images.

        Raises ContainerdEnvError (with containerd's log tail) if any step fails or passes ``timeout``
        seconds; everything is torn down then. Raises StateError if started or stopped before.
        """
        super().start(timeout)
        try:
            self._wait_cri_ready(time.monotonic() + timeout)
            self._import_images(time.monotonic() + timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_cri_ready(self, deadline: float) -> None:
        """Until Version answers and Status says RuntimeReady and NetworkReady (CNI config loaded)."""
        problem = "no answer"
        while time.monotonic() < deadline:
            try:
                self.cri.version(timeout=2)
                conditions = {c.type: c for c in self.cri.status(timeout=2).status.conditions}
            except CriError as e:
                problem = str(e)
            else:
                unready = [f"{name}: {c.reason} {c.message}".strip() for name, c in conditions.items() if not c.status]
                if not unready and {"RuntimeReady", "NetworkReady"} <= conditions.keys():
                    return
                problem = "; ".join(unready) or f"conditions {sorted(conditions)}"
            time.sleep(0.1)
        raise ContainerdEnvError(f"containerd's CRI at {self.address} is not ready: {problem}"
                                 f"\n--- {self.log_path} tail ---\n{self.log_tail()}", address=str(self.address))

    def _import_images(self, deadline: float) -> None:
        """Build and `ctr image import` the busybox and pause images, then wait until CRI knows both
        (its image store follows containerd's image events)."""
        self.image_dir.mkdir(exist_ok=True)
        self.import_image(build_busybox_image_tar(self.image_dir / "busybox.tar", BUSYBOX_IMAGE_REF))
        self.import_image(build_pause_image_tar(self.image_dir / "pause.tar", PAUSE_IMAGE_REF))
        for ref in (BUSYBOX_IMAGE_REF, PAUSE_IMAGE_REF):
            while not self.cri.image_status(ref, timeout=5).HasField("image"):
                if time.monotonic() > deadline:
                    raise ContainerdEnvError(f"CRI at {self.address} does not list the imported image {ref}",
                                             address=str(self.address))
                time.sleep(0.1)

    # --- desired state of pods ------------------------------------------------------------------------

    def pod_config(self, name: str, *, hostname: str = "", dns: api.DNSConfig | None = None,
                   annotations: Mapping[str, str] | None = None, labels: Mapping[str, str] | None = None,
                   share_pid: bool = False) -> api.PodSandboxConfig:
        """A PodSandboxConfig as the kubelet would send for pod ``name``: a fresh uid, namespace "uvmtest",
        a log directory of its own (made here) under ``log_root``, this environment's cgroup parent, and a
        PID namespace per container unless ``share_pid``. Without ``dns`` CRI copies the host's
        resolv.conf; ``hostname`` defaults to ``name``."""
        uid = uuid.uuid4().hex
        log_dir = self.log_root / f"{name}-{uid[:8]}"
        log_dir.mkdir(parents=True)
        pid_mode = api.POD if share_pid else api.CONTAINER
        return api.PodSandboxConfig(
            metadata=api.PodSandboxMetadata(name=name, uid=uid, namespace="uvmtest", attempt=0),
            hostname=hostname or name,
            log_directory=str(log_dir),
            dns_config=dns,
            labels=dict(labels or {}),
            annotations=dict(annotations or {}),
            linux=api.LinuxPodSandboxConfig(
                cgroup_parent=self.cgroup_parent,
                security_context=api.LinuxSandboxSecurityContext(
                    namespace_options=api.NamespaceOption(network=api.POD, pid=pid_mode, ipc=api.POD))),
        )

    def netns_of(self, pod_id: str) -> Path | None:
        """The network namespace CRI made for a pod (/var/run/netns/cni-<uuid>), from the sandbox's runtime
        spec in PodSandboxStatus's verbose info; None if the pod has none. Raises CriError."""
        info = json.loads(self.cri.pod_status(pod_id, verbose=True).info.get("info", "{}"))
        namespaces = ((info.get("runtimeSpec") or {}).get("linux") or {}).get("namespaces") or []
        for ns in namespaces:
            if ns.get("type") == "network" and ns.get("path"):
                return Path(ns["path"])
        return None

    # --- stop -----------------------------------------------------------------------------------------

    def remove_tasks_and_containers(self) -> list[str]:
        """Stop and remove every pod through CRI (as the kubelet would: its containers killed, CNI DEL, the
        netns removed), then whatever task or container is left through `ctr`. Returns what was removed
        ("pod/<id>", "namespace/id"). PrivateContainerd.stop calls this, after restarting a dead
        containerd. Raises ContainerdEnvError if a pod could not be removed through CRI (after the rest
        was removed), CtrError if `ctr` failed."""
        if self._proc is None or self._proc.poll() is not None:  # no daemon: nothing answers
            return []
        try:
            removed = self.remove_pods()
        except CriError as e:
            super().remove_tasks_and_containers()
            raise ContainerdEnvError(f"pods of {self.address} not removed through CRI: {e}",
                                     address=str(self.address)) from e
        return removed + super().remove_tasks_and_containers()

    def remove_pods(self) -> list[str]:
        """StopPodSandbox and RemovePodSandbox for every pod; "pod/<id>" of each removed. The netns of each
        is recorded so that stop() can make sure it is gone. Raises CriError after trying every pod."""
        self._wait_cri_answers(time.monotonic() + 20)
        failures: list[CriError] = []
        removed = []
        for pod in self.cri.list_pods(timeout=10).items:
            try:
                with contextlib.suppress(CriError, ValueError):
                    if netns := self.netns_of(pod.id):
                        self._pod_netns[pod.id] = netns
                self.cri.stop_pod(pod.id)
                self.cri.remove_pod(pod.id)
                removed.append(f"pod/{pod.id}")
            except CriError as e:
                log.warning("removing pod %s (%s): %s", pod.id, pod.metadata.name, e)
                failures.append(e)
        if failures:
            raise failures[0]
        return removed

    def _wait_cri_answers(self, deadline: float) -> None:
        """CRI answers a little after `ctr version` does when containerd has just been (re)started."""
        while True:
            try:
                self.cri.version(timeout=2)
                return
            except CriError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        """Take every pod down through CRI, then everything PrivateContainerd.stop removes, then the
        bridge, the cgroup parent and any pod netns CRI left. Idempotent; every step runs even if an
        earlier one failed. Raises ContainerdEnvError only if something could not be removed."""
        try:
            super().stop()
        finally:
            self.cri.close()
            self._remove_host_leftovers()

    def _remove_host_leftovers(self) -> None:
        for pod_id, netns in self._pod_netns.items():
            if netns.exists():
                log.warning("pod %s: CRI left its netns %s: removing it", pod_id, netns)
                subprocess.run(["umount", "-l", str(netns)], capture_output=True)
                with contextlib.suppress(FileNotFoundError):
                    netns.unlink()
        delete_link(self.bridge)
        for group in cgroup_dirs(self.cgroup_parent):
            remove_cgroup_tree(group)


def cgroup_dirs(cgroup_path: str) -> list[Path]:
    """Where a cgroupfs path exists on this host: once per v1 hierarchy, or once on a v2 host."""
    relative = cgroup_path.strip("/")
    candidates = [CGROUP_ROOT / relative] + [h / relative for h in CGROUP_ROOT.iterdir() if h.is_dir()]
    return [c for c in candidates if c.is_dir()]


def remove_cgroup_tree(group: Path) -> None:
    """rmdir a cgroup and its children, deepest first (a cgroup with processes stays, with a warning)."""
    for directory, _subdirs, _files in sorted(os.walk(group), key=lambda entry: -len(Path(entry[0]).parts)):
        try:
            os.rmdir(directory)
        except OSError as e:
            log.warning("cannot remove cgroup %s: %s", directory, e)


# --- the pods' containers ----------------------------------------------------------------------------


def container_config(name: str, command: Sequence[str], *, pod: api.PodSandboxConfig | None = None,
                     image: str = BUSYBOX_IMAGE_REF, envs: Mapping[str, str] | None = None,
                     annotations: Mapping[str, str] | None = None, stdin: bool = False, stdin_once: bool = False,
                     tty: bool = False, log_path: str | None = None) -> api.ContainerConfig:
    """A ContainerConfig running ``command`` (as the entrypoint) in ``image``, logging to
    ``<pod log directory>/<log_path or name.log>``. CRI takes a container's namespaces from the
    container's own security context (unset: the pod's PID namespace, pause as PID 1), so pass the
    ``pod`` config to copy its namespace options, as the kubelet does."""
    security = api.LinuxContainerSecurityContext()
    if pod is not None:
        security.namespace_options.CopyFrom(pod.linux.security_context.namespace_options)
    return api.ContainerConfig(
        metadata=api.ContainerMetadata(name=name, attempt=0),
        image=api.ImageSpec(image=image),
        command=list(command),
        envs=[api.KeyValue(key=k, value=v) for k, v in (envs or {}).items()],
        annotations=dict(annotations or {}),
        log_path=log_path or f"{name}.log",
        stdin=stdin,
        stdin_once=stdin_once,
        tty=tty,
        linux=api.LinuxContainerConfig(security_context=security),
    )


# --- the pause image ---------------------------------------------------------------------------------

MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar"
_GOARCH = {"x86_64": "amd64", "aarch64": "arm64"}


def build_pause_image_tar(dest: Path, ref: str = PAUSE_IMAGE_REF, busybox: Path = Path("/bin/busybox")) -> Path:
    """Write an OCI image layout tar of a pause image named ``ref`` to ``dest`` and return ``dest``.

    One uncompressed layer: /bin/busybox (static) with sh and sleep linked to it, and the directories
    runc mounts over (the sandbox's rootfs is read-only); Cmd runs PAUSE_SCRIPT. Deterministic for a
    given busybox. Raises OSError if busybox is missing.
    """
    layer = _pause_layer(busybox.read_bytes())
    config = _json_bytes({
        "architecture": _GOARCH.get(platform.machine(), platform.machine()),
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh", "-c", PAUSE_SCRIPT]},
        "rootfs": {"type": "layers", "diff_ids": [_digest(layer)]},
    })
    manifest = _json_bytes({"schemaVersion": 2, "mediaType": MEDIA_MANIFEST,
                            "config": _descriptor(MEDIA_CONFIG, config), "layers": [_descriptor(MEDIA_LAYER, layer)]})
    index = _json_bytes({"schemaVersion": 2, "manifests": [_descriptor(MEDIA_MANIFEST, manifest, annotations={
        "io.containerd.image.name": ref, "org.opencontainers.image.ref.name": ref})]})
    files = {"oci-layout": _json_bytes({"imageLayoutVersion": "1.0.0"}), "index.json": index,
             **{f"blobs/sha256/{_digest(blob).removeprefix('sha256:')}": blob for blob in (layer, config, manifest)}}
    with tarfile.open(dest, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in files.items():
            tar.addfile(_entry(name, tarfile.REGTYPE, 0o644, size=len(data)), io.BytesIO(data))
    return dest


def _pause_layer(busybox: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for directory in ("bin", "dev", "etc", "proc", "sys", "tmp"):
            tar.addfile(_entry(directory, tarfile.DIRTYPE, 0o755))
        tar.addfile(_entry("bin/busybox", tarfile.REGTYPE, 0o755, size=len(busybox)), io.BytesIO(busybox))
        for applet in ("sh", "sleep"):
            tar.addfile(_entry(f"bin/{applet}", tarfile.SYMTYPE, 0o777, linkname="busybox"))
    return buf.getvalue()


def _entry(name: str, kind: bytes, mode: int, size: int = 0, linkname: str = "") -> tarfile.TarInfo:
    """A tar header owned by root with mtime 0, so that the same content gives the same digest."""
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.size, info.linkname = kind, mode, size, linkname
    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "root", "root"
    return info


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _descriptor(media_type: str, data: bytes, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": _digest(data), "size": len(data), **extra}


def _json_bytes(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _toml(value: object) -> str:
    """A TOML basic string (JSON's escaping is a subset TOML accepts)."""
    return json.dumps(str(value))
