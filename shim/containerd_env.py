"""A private containerd for tests, the demo and benchmarks, and a busybox image to feed it.

The shim can only be exercised end to end by a containerd that launches it. The host's containerd
(if any) is shared state we must not touch, so `PrivateContainerd` runs one of our own: its root,
state, sockets and log all live under one short base directory, and `stop()` takes everything down
again -- tasks, containers, the daemon, stray shims, mounts and the directory -- even after a
half-failed start or a containerd crash. One thing escapes the base directory: containerd 1.6 always
creates /run/containerd/{s,fifo,runc} (shim sockets, stdio FIFOs, runc state), shared with any other
containerd on the host. Those directories are left alone; `shared_run_entries()` lists what is in s/ and
fifo/, and `PrivateContainerd.shared_entries_of(ids)` picks out what given containers left there.

No registry is reachable from the machines this runs on, so `build_busybox_image_tar` builds an OCI
image layout tar of a busybox root filesystem ourselves, deterministically, for `ctr image import`.
"""

from __future__ import annotations

import enum
import gzip
import hashlib
import io
import json
import logging
import os
import platform
import shlex
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from shim.containerd.leftovers import process_cmdlines
from shim.containerd.rootfs import mount_points_under as mounts_under
from uvm.demo import busybox_rootfs
from uvm.errors import AlreadyStoppedError, StateError, UvmError

__all__ = [
    "DEFAULT_IMAGE_REF",
    "ContainerdEnvError",
    "ContainerdState",
    "CtrError",
    "PrivateContainerd",
    "build_busybox_image_tar",
    "busybox_rootfs",
    "mounts_under",
    "processes_with_arg",
    "shared_run_entries",
]

log = logging.getLogger(__name__)

CONTAINERD = "containerd"
CTR = "ctr"
DEFAULT_IMAGE_REF = "docker.io/library/uvmbusybox:latest"
# containerd 1.6 hard-codes this for shim sockets and stdio FIFOs, whatever its `state` says.
SHARED_RUN_DIR = Path("/run/containerd")
# sun_path is 108 bytes with the NUL; containerd appends ".ttrpc" to the grpc address.
MAX_SOCKET_PATH = 107 - len(".ttrpc")


class ContainerdEnvError(UvmError):
    """The private containerd could not be configured, started or stopped cleanly."""


class CtrError(ContainerdEnvError):
    """A `ctr` command failed or timed out. ``ctr_args``, ``returncode`` (None on timeout) and the
    captured ``stdout``/``stderr`` say which and how."""

    def __init__(self, message: str, ctr_args: Sequence[str], returncode: int | None, stdout: bytes, stderr: bytes) -> None:
        super().__init__(message, ctr_args=list(ctr_args), returncode=returncode)
        self.ctr_args = list(ctr_args)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr


class ContainerdState(enum.Enum):
    """CONFIGURED (config written) -> RUNNING (start() succeeded, until stop()) -> STOPPED (all gone)."""

    CONFIGURED = "configured"
    RUNNING = "running"
    STOPPED = "stopped"


class PrivateContainerd:
    """A containerd of our own under ``base_dir`` (keep it short: sockets live there).

    Use as a context manager, or call start() and stop(). stop() is idempotent and always tears
    everything down; after it the object cannot be started again (its directory is gone).
    """

    def __init__(
        self,
        base_dir: Path,
        extra_path: Sequence[Path] = (),
        namespace: str = "uvmtest",
        log_level: str = "info",
    ) -> None:
        """Write ``<base_dir>/config.toml``. ``extra_path`` goes in front of PATH so containerd finds
        our shim binary (containerd-shim-uvm-v1 in the venv's bin); ``log_level`` "debug" also makes
        containerd pass -debug to shims. Raises ContainerdEnvError if the socket path is too long."""
        self.base_dir = base_dir.resolve()
        self.namespace = namespace
        self.extra_path = [p.resolve() for p in extra_path]
        self.config_path = self.base_dir / "config.toml"
        self.log_path = self.base_dir / "containerd.log"
        self.address = self.base_dir / "c.sock"
        self.ttrpc_address = self.base_dir / "c.sock.ttrpc"
        if len(str(self.address)) > MAX_SOCKET_PATH:
            raise ContainerdEnvError(
                f"containerd socket path {self.address} is longer than {MAX_SOCKET_PATH} bytes: use a shorter base dir "
                "(e.g. tempfile.mkdtemp(prefix='uvmct-', dir='/tmp'))",
                base_dir=str(self.base_dir),
            )
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            "version = 2\n"
            f"root = {_toml_str(self.base_dir / 'root')}\n"
            f"state = {_toml_str(self.base_dir / 'state')}\n"
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            "\n[grpc]\n"
            f"  address = {_toml_str(self.address)}\n"
            "\n[ttrpc]\n"
            f"  address = {_toml_str(self.ttrpc_address)}\n"
            "\n[debug]\n"
            f"  level = {_toml_str(log_level)}\n"
        )
        self.state = ContainerdState.CONFIGURED
        self._proc: subprocess.Popen[bytes] | None = None
        self._served = False  # start() succeeded once: a dead daemon is a crash, worth one respawn in stop()

    def __repr__(self) -> str:
        pid = self._proc.pid if self._proc is not None else None
        return f"<PrivateContainerd {self.state.value} pid={pid} address={self.address} namespace={self.namespace}>"

    def __enter__(self) -> PrivateContainerd:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def start(self, timeout: float = 20.0) -> None:
        """Launch containerd in its own session and wait until `ctr version` answers.

        Raises StateError if already started or stopped, ContainerdEnvError (with the log tail) if it
        exits or does not answer within ``timeout`` seconds; everything is torn down in that case.
        """
        if self.state is ContainerdState.RUNNING:
            raise StateError(f"containerd at {self.address} is already running", address=str(self.address))
        if self.state is ContainerdState.STOPPED:
            raise AlreadyStoppedError(f"containerd at {self.address} was stopped; make a new PrivateContainerd",
                                      address=str(self.address))
        self.state = ContainerdState.RUNNING
        try:
            self._spawn(timeout)
        except BaseException:
            self.stop()
            raise
        self._served = True

    def _spawn(self, timeout: float) -> None:
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([*map(str, self.extra_path), env.get("PATH", os.defpath)])
        with self.log_path.open("ab") as log_file:
            try:
                # cwd = base_dir: containerd looks for shim binaries in its cwd before PATH.
                proc = self._proc = subprocess.Popen(
                    [CONTAINERD, "--config", str(self.config_path)],
                    stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                    cwd=self.base_dir, env=env, start_new_session=True,
                )
            except OSError as e:
                raise ContainerdEnvError(f"cannot run {CONTAINERD} (install Debian's containerd): {e}",
                                         address=str(self.address))
        self._wait_ready(proc, timeout)
        log.debug("containerd pid %d serving %s", proc.pid, self.address)

    def _wait_ready(self, proc: subprocess.Popen[bytes], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if (code := proc.poll()) is not None:
                raise ContainerdEnvError(
                    f"containerd --config {self.config_path} exited with status {code} before serving"
                    f"\n--- {self.log_path} tail ---\n{self.log_tail()}", address=str(self.address))
            left = deadline - time.monotonic()
            if left <= 0:
                raise ContainerdEnvError(
                    f"containerd at {self.address} did not answer `ctr version` within {timeout:g}s"
                    f"\n--- {self.log_path} tail ---\n{self.log_tail()}", address=str(self.address))
            if self.address.exists():
                try:
                    subprocess.run([CTR, "--address", str(self.address), "version"], capture_output=True,
                                   check=True, timeout=min(left, 5.0))
                    return
                except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
                    pass
            time.sleep(0.05)

    def ctr(self, *args: str, input: bytes | None = None, timeout: float = 120, check: bool = True
            ) -> subprocess.CompletedProcess[bytes]:
        """Run `ctr --address SOCK --namespace NS *args`, capturing its output.

        Raises StateError unless running, CtrError on timeout or (with ``check``) a non-zero exit.
        """
        if self.state is not ContainerdState.RUNNING:
            raise StateError(f"containerd at {self.address} is {self.state.value}, not running", address=str(self.address))
        return self._ctr(self.namespace, args, input=input, timeout=timeout, check=check)

    def _ctr(self, namespace: str, args: Sequence[str], input: bytes | None = None, timeout: float = 120,
             check: bool = True) -> subprocess.CompletedProcess[bytes]:
        argv = [CTR, "--address", str(self.address), "--namespace", namespace, *args]
        try:
            res = subprocess.run(argv, input=input, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise CtrError(f"{shlex.join(argv)}: no answer within {timeout:g}s", argv, None,
                           _as_bytes(e.stdout), _as_bytes(e.stderr))
        if check and res.returncode != 0:
            raise CtrError(f"{shlex.join(argv)}: exit status {res.returncode}: "
                           f"{res.stderr.decode(errors='replace').strip()}", argv, res.returncode, res.stdout, res.stderr)
        return res

    def import_image(self, tar_path: Path, timeout: float = 120) -> None:
        """`ctr image import` an OCI layout tar; its io.containerd.image.name annotations name the images
        (no --base-name needed) and they are unpacked for the default snapshotter, ready for `ctr run`.
        Raises CtrError."""
        self.ctr("image", "import", str(tar_path), timeout=timeout)

    def kill_daemon(self) -> None:
        """SIGKILL containerd and reap it, as a crash would: its shims and their containers live on.
        For tests of recovery; ctr calls fail until stop(), which still cleans up everything.
        Raises StateError unless running."""
        if self.state is not ContainerdState.RUNNING or self._proc is None:
            raise StateError(f"containerd at {self.address} is {self.state.value}, not running", address=str(self.address))
        self._proc.kill()
        self._proc.wait()

    def shared_entries_of(self, *container_ids: str) -> set[Path]:
        """What these containers of ours left in the shared /run/containerd: runc shim sockets
        (s/<sha256(address/namespace/id)>) and stdio FIFO dirs (fifo/<random>/<id>-stdin...). Give ids
        unique to the run: other containerds on the host use the same directories. Other runtimes' shims
        name their sockets their own way (compare shared_run_entries() before and after for those)."""
        sockets = {hashlib.sha256(f"{self.address}/{self.namespace}/{cid}".encode()).hexdigest() for cid in container_ids}
        stdio = {f"{cid}-{stream}" for cid in container_ids for stream in ("stdin", "stdout", "stderr")}
        return {p for p in shared_run_entries() if p.name in sockets or not stdio.isdisjoint(_entry_names(p))}

    def log_tail(self, n: int = 40) -> str:
        """The last ``n`` lines of containerd's log ("" if there is none yet)."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        return "\n".join(lines[-n:])

    def stop(self) -> None:
        """Kill and remove every task and container, stop containerd (SIGTERM, SIGKILL after 10 s), kill
        shims it left, unmount everything under base_dir and remove it. Idempotent; every step runs even
        if an earlier one failed. Raises ContainerdEnvError only if something could not be removed.

        If containerd died after serving, it is first started again on the same state: it reconnects to
        the shims still running (or runs their `delete` action), so their containers -- processes or VMs
        that outlive both containerd and a killed shim -- are removed through the runtime that made them.
        """
        if self.state is ContainerdState.STOPPED:
            return
        self.state = ContainerdState.STOPPED
        try:
            if self._served and self._proc is not None and self._proc.poll() is not None:
                log.warning("containerd at %s died (status %s): starting it again to clean up",
                            self.address, self._proc.returncode)
                self._spawn(timeout=20)
            self.remove_tasks_and_containers()
        except ContainerdEnvError as e:
            log.warning("containerd at %s: cleanup through containerd failed, killing everything: %s", self.address, e)
        finally:
            self._stop_daemon()
            kill_processes_with_arg(str(self.address))
            self._unmount_all()
            self._remove_base_dir()

    def remove_tasks_and_containers(self) -> list[str]:
        """Kill and remove every task and container through containerd, so that shims run their own
        cleanup; in every namespace. Returns the "namespace/id" of each removed. Raises CtrError."""
        removed: list[str] = []
        if self._proc is None or self._proc.poll() is not None:
            return removed
        for ns in self._ctr(self.namespace, ["namespaces", "ls", "-q"], timeout=10).stdout.decode().split():
            for task in self._ctr(ns, ["tasks", "ls", "-q"], timeout=10).stdout.decode().split():
                self._ctr(ns, ["tasks", "kill", "-s", "SIGKILL", task], timeout=10, check=False)
                self._ctr(ns, ["tasks", "rm", "-f", task], timeout=30, check=False)
            for container in self._ctr(ns, ["containers", "ls", "-q"], timeout=10).stdout.decode().split():
                self._ctr(ns, ["containers", "rm", container], timeout=30, check=False)
                removed.append(f"{ns}/{container}")
        return removed

    def _stop_daemon(self) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            log.warning("containerd pid %d ignored SIGTERM for 10s: killing it", proc.pid)
            proc.kill()
            proc.wait()

    def _unmount_all(self) -> None:
        for mount_point in mounts_under(self.base_dir):
            res = subprocess.run(["umount", str(mount_point)], capture_output=True)
            if res.returncode != 0:
                log.warning("umount %s: %s; detaching it lazily", mount_point, res.stderr.decode(errors="replace").strip())
                subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)

    def _remove_base_dir(self) -> None:
        # Never rmtree through a mount point: that would delete whatever filesystem is mounted there.
        if left := mounts_under(self.base_dir):
            raise ContainerdEnvError(f"cannot remove {self.base_dir}: still mounted below it: {left}",
                                     base_dir=str(self.base_dir))
        shutil.rmtree(self.base_dir, ignore_errors=True)
        if self.base_dir.exists():
            raise ContainerdEnvError(f"cannot remove {self.base_dir}: remove it by hand", base_dir=str(self.base_dir))


def shared_run_entries() -> set[Path]:
    """What is in /run/containerd/s (shim sockets) and /run/containerd/fifo (stdio FIFO dirs) now.

    These directories are shared by every containerd on the host: see PrivateContainerd.shared_entries_of
    for the entries of given containers."""
    return {p for name in ("s", "fifo") for p in _entries(SHARED_RUN_DIR / name)}


def _entries(directory: Path) -> list[Path]:
    """The entries of ``directory``, none if it is gone or not a directory (others remove theirs concurrently)."""
    try:
        return list(directory.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def _entry_names(directory: Path) -> set[str]:
    return {p.name for p in _entries(directory)}


def processes_with_arg(arg: str) -> list[int]:
    """Pids of live processes other than this one with ``arg`` as one whole argument, e.g. our socket
    path: containerd's shims get it as `-address SOCK`. (Zombies have an empty cmdline: not counted.)"""
    return [pid for pid, cmdline in process_cmdlines() if arg.encode() in cmdline.split(b"\0")]


def shim_daemons(*, address: str | None = None, under: Path | None = None) -> list[int]:
    """Our shim daemons (`shim.containerd.main` in argv) of one containerd (its address in argv) or working under one
    directory (runuvm's --root/<id>): never the shims that someone else runs on the same host."""
    found = []
    for pid, cmdline in process_cmdlines():
        args = cmdline.split(b"\0")
        if b"shim.containerd.main" not in args or (address is not None and address.encode() not in args):
            continue
        if under is not None:
            try:
                cwd = os.readlink(f"/proc/{pid}/cwd")
            except OSError:
                continue
            if not Path(cwd).is_relative_to(under):
                continue
        found.append(pid)
    return found


def kill_processes_with_arg(arg: str, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL, what still runs with ``arg`` in its argv: shims outlive containerd by design.
    They are not our children, so poll /proc (by argv, not by pid, which could be reused) to see them go."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not (pids := processes_with_arg(arg)):
            return
        log.warning("sending %s to processes left with %s in their argv: %s", sig.name, arg, pids)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and processes_with_arg(arg):
            time.sleep(0.05)


def _toml_str(value: object) -> str:
    """A TOML basic string (JSON's escaping is a subset TOML accepts)."""
    return json.dumps(str(value))


def _as_bytes(data: bytes | str | None) -> bytes:
    if data is None:
        return b""
    return data.encode() if isinstance(data, str) else data


# --- the busybox OCI image ---------------------------------------------------------------------------

MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
# Every tar entry gets this mtime, so that the same busybox gives the same digests.
FIXED_MTIME = 0
# The layer holds the host's busybox binary, so the image is for the host's architecture.
_GOARCH = {"x86_64": "amd64", "aarch64": "arm64"}


def build_busybox_image_tar(dest: Path, ref: str = DEFAULT_IMAGE_REF,
                            extra_layers: Sequence[Mapping[str, bytes]] = ()) -> Path:
    """Write an OCI image layout tar of one busybox image named ``ref`` to ``dest`` and return ``dest``;
    each of extra_layers (relative path -> content, directories made as needed) is a layer above busybox's.

    Deterministic: the same /bin/busybox always gives the same bytes. index.json names the image in
    both io.containerd.image.name (which `ctr image import` uses as is) and
    org.opencontainers.image.ref.name. Raises OSError or CalledProcessError if busybox is missing.
    """
    layers = []
    with tempfile.TemporaryDirectory(prefix="uvmimg-") as tmp:
        layers.append(_deterministic_tar(busybox_rootfs(Path(tmp))))
    for files in extra_layers:
        with tempfile.TemporaryDirectory(prefix="uvmimg-") as tmp:
            for name, content in files.items():
                path = Path(tmp) / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(content)
            layers.append(_deterministic_tar(Path(tmp)))
    blobs = [gzip.compress(layer, compresslevel=6, mtime=FIXED_MTIME) for layer in layers]
    config = _json_bytes({
        "architecture": _GOARCH.get(platform.machine(), platform.machine()),
        "os": "linux",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": [_digest(layer) for layer in layers]},
    })
    manifest = _json_bytes({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": _descriptor(MEDIA_CONFIG, config),
        "layers": [_descriptor(MEDIA_LAYER_GZIP, blob) for blob in blobs],
    })
    index = _json_bytes({
        "schemaVersion": 2,
        "manifests": [_descriptor(MEDIA_MANIFEST, manifest, annotations={
            "io.containerd.image.name": ref,
            "org.opencontainers.image.ref.name": ref,
        })],
    })
    files = {
        "oci-layout": _json_bytes({"imageLayoutVersion": "1.0.0"}),
        "index.json": index,
        **{f"blobs/sha256/{_digest(blob).removeprefix('sha256:')}": blob for blob in (*blobs, config, manifest)},
    }
    with tarfile.open(dest, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in files.items():
            info = _normalized(tarfile.TarInfo(name))
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return dest


def _deterministic_tar(root: Path) -> bytes:
    """An uncompressed tar of the tree under ``root`` (names relative to it), sorted, owned by root."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for path in sorted(root.rglob("*")):
            info = _normalized(tar.gettarinfo(path, arcname=path.relative_to(root).as_posix()))
            if info.isfile():
                with path.open("rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    return buf.getvalue()


def _normalized(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.mtime = FIXED_MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _descriptor(media_type: str, data: bytes, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": _digest(data), "size": len(data), **extra}


def _json_bytes(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
