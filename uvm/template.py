"""Templates: a UVM booted once, agent ready, saved; clones start from it in a fraction of a boot.

A template belongs to one (image, VM shape): its key hashes the image files' identities, the QEMU
binary's and every config field that shapes the machine (cpus, memory, accelerator, kernel command
line, shares' tags, ports, SCSI controllers). It is two files:

* guest RAM in a memory-backend-file under ``template_memory_dir`` (tmpfs, /dev/shm by default):
  written by the template's QEMU with ``share=on``; every clone maps it ``share=off``, i.e. private
  copy-on-write, so what clones only read stays shared between them;
* the device state (tens of KB) saved with ``x-ignore-shared`` migration, plus ``meta.json`` (the
  key's inputs, the state file's sha256, the memory file's identity) under ``<template_dir>/<key>``.

A clone loads the device state with ``-incoming defer`` + ``migrate-incoming``, reconnects to the
agent, and makes itself its own machine in its handshake (``resume_clone``, in place of hello:
kernel entropy reseeded from the host, wall clock set, hostname = its VM id). A template whose
files do not match its meta is corrupt: never resumed, removed, rebuilt. Lookups and builds are
safe across processes (one flock per key).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel, ConfigDict, ValidationError

from schemas.uvm_config import NEW_NETNS, Share, UvmConfig
from uvm import builder
from uvm.builder import PLACEHOLDER_MAC, Nic
from uvm.errors import TemplateError

if TYPE_CHECKING:
    from schemas.agent_models import HelloResult
    from uvm.link import AgentClient

FORMAT = "1"
META = "meta.json"
STATE = "state"
MEMORY_NOTE = "memory-file"  # in a build's work directory: the guest RAM file it creates
LOCK_WAIT_S = 600.0
log = logging.getLogger("uvm.template")


def template_dir(config: UvmConfig) -> Path:
    return (config.template_dir or config.state_dir / "templates").absolute()


def _file_identity(path: Path) -> list[Any]:
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns, st.st_ino]


def key_inputs(spec: builder.LaunchSpec) -> dict[str, Any]:
    """What a template depends on: change any of it and the template no longer fits."""
    qemu = shutil.which(spec.qemu_binary) or spec.qemu_binary
    try:
        qemu_id = _file_identity(Path(qemu).resolve())
    except OSError as e:
        raise TemplateError(f"QEMU binary {spec.qemu_binary}: {e.strerror}") from None
    return {
        "format": FORMAT,
        "image": [spec.image_id, *(_file_identity(p) for p in (spec.kernel, spec.initrd, spec.rootfs))],
        "qemu": qemu_id,
        "cpus": spec.cpus, "memory_mib": spec.memory_mib, "accel": spec.accel, "cpu_model": spec.cpu_model,
        "tb_size_mib": spec.tb_size_mib,
        # The VM id is part of the boot command line; a clone takes its own at resume.
        "cmdline": " ".join(w for w in spec.cmdline.split() if not w.startswith("uvm.id=")),
        "shares": [[s.tag, s.readonly] for s in spec.shares],
        "extra_ports": list(spec.extra_ports), "scsi_controllers": spec.scsi_controllers,
        # A NIC (ssh_port) is a device the saved state must have; its host port is the clone's own.
        **({"nic": True} if spec.ssh_port is not None else {}),
        # So are the NICs of a container's network (their taps are the clone's own); one queue per vCPU.
        **({"nics": len(spec.nics)} if spec.nics else {}),
    }


def template_key(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]


class TemplateMeta(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format: str
    key: str
    inputs: dict[str, Any]
    cmdline: str
    vm_id: str
    memory_file: Path
    memory_identity: list[Any]
    state_sha256: str
    state_size: int
    created: float
    build_seconds: float


@dataclass(frozen=True)
class Template:
    key: str
    path: Path  # <template_dir>/<key>
    meta: TemplateMeta

    @property
    def state(self) -> Path:
        return self.path / STATE

    @property
    def memory(self) -> Path:
        return self.meta.memory_file

    def clone_spec(self, spec: builder.LaunchSpec) -> builder.LaunchSpec:
        """spec started from this template: the template's command line, its RAM copy-on-write."""
        return dataclasses.replace(spec, cmdline=self.meta.cmdline, memory_file=self.memory, memory_shared=False,
                                   incoming=self.state)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def check(path: Path, inputs: dict[str, Any] | None = None) -> Template:
    """The template at path if its files match its meta (and inputs, when given). Raises
    TemplateError naming what is missing, stale or corrupt."""
    try:
        raw = (path / META).read_bytes()
    except FileNotFoundError:
        raise TemplateError(f"template {path.name}: not built", missing=True) from None
    except OSError as e:
        raise TemplateError(f"template {path.name}: {META}: {e.strerror}") from None
    try:
        meta = TemplateMeta.model_validate_json(raw)
    except ValidationError as e:
        raise TemplateError(f"template {path.name}: corrupt {META}: {e.errors()[0]['msg']}") from None
    if meta.format != FORMAT or meta.key != path.name:
        raise TemplateError(f"template {path.name}: format {meta.format} key {meta.key}: not this version's")
    if inputs is not None and meta.inputs != inputs:
        changed = sorted(k for k in inputs.keys() | meta.inputs.keys() if inputs.get(k) != meta.inputs.get(k))
        raise TemplateError(f"template {path.name}: stale: {', '.join(changed)} changed since it was built")
    state = path / STATE
    try:
        size = state.stat().st_size
        if size != meta.state_size:
            raise TemplateError(f"template {path.name}: corrupt: state file is {size} bytes, was {meta.state_size}")
        if _sha256(state) != meta.state_sha256:
            raise TemplateError(f"template {path.name}: corrupt: state file content changed since it was saved")
        memory = _file_identity(meta.memory_file)
    except FileNotFoundError as e:
        raise TemplateError(f"template {path.name}: {e.filename} is missing (tmpfs cleared by a reboot?)") from None
    except OSError as e:
        raise TemplateError(f"template {path.name}: {e.filename}: {e.strerror}") from None
    if memory != meta.memory_identity:
        raise TemplateError(f"template {path.name}: memory file {meta.memory_file} changed since it was saved")
    return Template(path.name, path, meta)


def find(config: UvmConfig, spec: builder.LaunchSpec) -> Template:
    """The valid template for spec, or TemplateError saying why there is none. Its directory's
    mtime records the use (prune keeps the most recently used)."""
    if spec.backend != "qemu":
        raise TemplateError(f"templates need the qemu backend (this VM uses {spec.backend})")
    inputs = key_inputs(spec)
    found = check(template_dir(config) / template_key(inputs), inputs)
    with contextlib.suppress(OSError):
        os.utime(found.path)
    return found


def remove(path: Path) -> None:
    """Remove a template (its memory file too). Running clones keep their own mapping."""
    with contextlib.suppress(OSError, ValidationError):
        meta = TemplateMeta.model_validate_json((path / META).read_bytes())
        meta.memory_file.unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def delete(path: Path) -> None:
    """Remove the template at path and its lock file (`runuvm template rm`). While a builder holds its
    lock, the template is removed all the same (a new one is coming) and the lock file stays."""
    try:
        with _locked(path.parent, path.name):
            _remove_locked(path)
            return
    except TemplateError:
        pass
    remove(path)


def _outdated(meta: TemplateMeta) -> str | None:
    """Why no VM can use this template any more (its image files or QEMU binary changed), if so."""
    identities = [*meta.inputs.get("image", [])[1:], meta.inputs.get("qemu")]
    for identity in identities:
        if not isinstance(identity, list) or not identity:
            return "its inputs do not name their files"
        try:
            now = _file_identity(Path(identity[0]))
        except OSError:
            now = None
        if now != identity:
            return f"{identity[0]} changed since it was built"
    return None


def prune(root: Path, max_count: int, keep: str | None = None) -> list[str]:
    """Remove the templates under root that cannot be used again (corrupt, their memory file gone,
    their image or QEMU changed) and, of the rest, the least recently used beyond max_count (keep is
    never removed). A template whose lock is held (being built, or discarded) is left alone. Returns
    the keys removed."""
    usable: list[tuple[float, Path]] = []
    removed: list[str] = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        if not path.is_dir() or path.name.startswith(".") or path.name == keep:
            continue
        try:
            with _locked(root, path.name):
                try:
                    why = _outdated(check(path).meta)
                except TemplateError as e:
                    why = str(e)
                if why is None:
                    usable.append((path.stat().st_mtime, path))
                    continue
                log.info("removing template %s: %s", path.name, why)
                _remove_locked(path)
                removed.append(path.name)
        except (TemplateError, OSError):
            continue  # a builder holds it, or it went away meanwhile
    usable.sort(reverse=True)
    for _, path in usable[max_count - (1 if keep else 0):]:
        try:
            with _locked(root, path.name):
                log.info("removing template %s: least recently used of more than %d", path.name, max_count)
                _remove_locked(path)
                removed.append(path.name)
        except (TemplateError, OSError):
            continue
    return removed


def discard(tmpl: Template) -> bool:
    """Remove tmpl after a clone of it failed to load, unless it is no longer the template at its path
    (another process rebuilt it meanwhile) or a builder holds its lock (a new one is coming). Whether
    it was removed."""
    try:
        with _locked(tmpl.path.parent, tmpl.key):
            try:
                current = TemplateMeta.model_validate_json((tmpl.path / META).read_bytes())
            except (OSError, ValidationError):
                current = None
            if current is not None and current.memory_file != tmpl.meta.memory_file:
                return False  # each build has its own memory file: this is a newer template
            _remove_locked(tmpl.path)
            return True
    except (TemplateError, OSError):
        return False


def list_templates(config: UvmConfig) -> list[dict[str, Any]]:
    out = []
    root = template_dir(config)
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        if not path.is_dir() or path.name.startswith("."):
            continue
        row: dict[str, Any] = {"key": path.name, "path": str(path)}
        try:
            t = check(path)
            row.update(valid=True, memory_file=str(t.memory), memory_mib=t.meta.inputs.get("memory_mib"),
                       cpus=t.meta.inputs.get("cpus"), created=t.meta.created, build_seconds=t.meta.build_seconds)
        except TemplateError as e:
            row.update(valid=False, problem=str(e))
        out.append(row)
    return out


WARMUP_ROOT = "/run/uvmshim/warmup"


async def _warm_up(vm: Any) -> None:
    """One throwaway container (busybox from the guest image, bind-mounted read-only) run to its end
    and deleted: what the guest initialises on its first container (crun's state, the cgroup and
    namespace paths, the agent's create path) is then ready in every clone."""
    from schemas import oci
    from uvm.container import Rootfs

    setup = (f"mkdir -p {WARMUP_ROOT}/bin && mount --bind /usr/bin {WARMUP_ROOT}/bin && "
             f"mount -o remount,bind,ro {WARMUP_ROOT}/bin")
    res = await vm.run(["sh", "-c", setup])
    if res.exit_status != 0:
        raise TemplateError(f"template warm-up: {res.stderr.decode(errors='replace').strip()}")
    c = await vm.create_container("template-warmup", oci.default_spec(["/bin/busybox", "true"], env=["PATH=/bin"]),
                                  Rootfs(path=WARMUP_ROOT), stdout=False, stderr=False)
    await c.start()
    status = await c.wait_timeout(60)
    await c.close()
    res = await vm.run(["sh", "-c", f"umount {WARMUP_ROOT}/bin && rm -rf {WARMUP_ROOT}"])
    if status.exit_code != 0 or res.exit_status != 0:
        raise TemplateError(f"template warm-up container: exit {status.exit_code}; "
                            f"{res.stderr.decode(errors='replace').strip()}")


def _lock_path(root: Path, key: str) -> Path:
    return root / f".{key}.lock"


def _lock_file(root: Path, key: str) -> int:
    try:
        root.mkdir(parents=True, exist_ok=True)
        return os.open(_lock_path(root, key), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise TemplateError(f"template directory {root}: {e.strerror or e}") from None


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _is_current(fd: int, path: Path) -> bool:
    """Whether the lock file open as fd is still the one at path (a template's lock file goes with it:
    a lock taken on a file unlinked meanwhile locks nothing another process would see)."""
    st = os.fstat(fd)
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino)


def _unlink_lock(root: Path, key: str) -> None:
    """Remove key's lock file, as the last step of removing its template while holding that lock."""
    with contextlib.suppress(OSError):
        _lock_path(root, key).unlink()


def _remove_locked(path: Path) -> None:
    """Remove the template at path and then its lock file, which the caller holds."""
    remove(path)
    _unlink_lock(path.parent, path.name)


def _acquire(root: Path, key: str) -> int | None:
    """key's lock file, open and locked by us; None while another process holds it."""
    path = _lock_path(root, key)
    while True:
        fd = _lock_file(root, key)
        try:
            locked = _try_lock(fd)
            current = locked and _is_current(fd, path)
        except BaseException:
            os.close(fd)
            raise
        if current:
            return fd
        os.close(fd)
        if not locked:
            return None
        # Locked a file its holder removed with the template meanwhile: the lock is the new file's now.


@contextlib.contextmanager
def _locked(root: Path, key: str) -> Iterator[None]:
    """key's builder lock, if no builder holds it now (else TemplateError)."""
    fd = _acquire(root, key)
    if fd is None:
        raise TemplateError(f"template {key}: another process is building it")
    try:
        yield
    finally:
        os.close(fd)


@contextlib.asynccontextmanager
async def _building(root: Path, key: str, wait: float = LOCK_WAIT_S) -> AsyncIterator[None]:
    """One builder per key across processes: waits (bounded, and cancellable: no thread is left
    waiting for the lock, and nothing is held while waiting) while another process builds it."""
    deadline = time.monotonic() + wait
    while (fd := _acquire(root, key)) is None:
        if time.monotonic() > deadline:
            raise TemplateError(f"template {key}: another process has been building it for {wait:g}s")
        await asyncio.sleep(0.1)
    try:
        yield
    finally:
        os.close(fd)


def _sweep(root: Path, key: str) -> None:
    """Remove what a killed builder of key left (its work directory, the memory file it names). Only
    a builder holding key's lock calls this, so no live builder owns any of it."""
    for work in root.glob(f".{key}-*"):
        if not work.is_dir():
            continue
        with contextlib.suppress(OSError, ValueError):
            memory = Path((work / MEMORY_NOTE).read_text())
            if memory.name.startswith(f"{key}-") and memory.suffix == ".mem":
                memory.unlink(missing_ok=True)
        log.warning("template %s: removing what a killed builder left: %s", key, work)
        shutil.rmtree(work, ignore_errors=True)


def _check_room(memdir: Path, memory_mib: int) -> None:
    try:
        memdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.statvfs(memdir)
    except OSError as e:
        raise TemplateError(f"template memory directory {memdir}: {e.strerror}") from None
    free_mib = st.f_bavail * st.f_frsize >> 20
    if free_mib < memory_mib:
        raise TemplateError(f"template memory directory {memdir}: {free_mib} MiB free, a {memory_mib} MiB guest "
                            "needs that much room", free_mib=free_mib)


class TemplateVm(Protocol):
    """What build needs of the VM it boots (uvm/vm.py's UtilityVM, passed in: this module never imports
    the VM, which imports it)."""

    hello: HelloResult | None
    spec: builder.LaunchSpec | None

    async def start(self) -> None: ...
    def agent_client(self, op: str) -> AgentClient: ...
    async def save_state(self, path: Path) -> None: ...
    async def close(self) -> None: ...


NewVm = Callable[..., TemplateVm]  # UtilityVM(config, spec_update=...)


async def build(config: UvmConfig, new_vm: NewVm, *, force: bool = False) -> Template:
    """Boot a VM of config's image and shape (made by new_vm: UtilityVM), warm it, save it as the
    template. Returns the valid template (another process's, if it built one meanwhile). Raises
    TemplateError; leaves nothing behind on failure (no QEMU, no memory file, no partial template).
    uvm/template_builder.py's build passes UtilityVM."""
    spec = await asyncio.to_thread(builder.build, config)
    if spec.backend != "qemu":
        raise TemplateError(f"templates need the qemu backend (this VM uses {spec.backend})")
    # A VM with a network has one NIC from its start (uvm/network.py): the template has it too, on a tap
    # of a new namespace of its own.
    nic = (Nic(id="nic0", mac=PLACEHOLDER_MAC, tap_fds=()),) if config.network_namespace is not None else ()
    inputs = key_inputs(dataclasses.replace(spec, nics=nic))
    key = template_key(inputs)
    root = template_dir(config)
    final = root / key
    async with _building(root, key):  # held until the end: one builder per key
        if not force:
            with contextlib.suppress(TemplateError):
                return check(final, inputs)
        await asyncio.to_thread(_sweep, root, key)
        bid = secrets.token_hex(4)
        memory = config.template_memory_dir.absolute() / f"{key}-{bid}.mem"
        work = root / f".{key}-{bid}"
        t0 = time.monotonic()
        try:
            await asyncio.to_thread(_check_room, config.template_memory_dir, config.memory_mib)
            work.mkdir(mode=0o700)
            (work / MEMORY_NOTE).write_text(str(memory))  # for _sweep, if this builder gets killed
            # Made here, not by QEMU: the template's and every clone's confined QEMU runs as a uid of its own
            # and gets the file bound into its jail, read-write (QEMU 7.2 opens it so even for a private
            # mapping). Only the jails reach it: its directory is root's, 0700.
            os.close(os.open(memory, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600))
            os.chmod(memory, 0o666)
            shares = []
            for n, share in enumerate(config.shares):  # same devices, placeholder directories
                (work / f"share{n}").mkdir()
                shares.append(Share(tag=share.tag, host_path=work / f"share{n}", readonly=share.readonly))
            tconfig = config.model_copy(update={
                "id": f"template-{bid}", "shares": shares, "start": "cold", "console_log": work / "console.log",
                "network_namespace": NEW_NETNS if config.network_namespace is not None else None})
            vm = new_vm(tconfig, spec_update={"memory_file": memory, "memory_shared": True})
            try:
                await vm.start()
                if vm.hello is None or "clone" not in vm.hello.capabilities:
                    raise TemplateError("the guest image's agent cannot resume clones (rebuild it: make image)")
                assert vm.spec is not None
                cmdline = vm.spec.cmdline
                await vm.agent_client("prepare template").prepare_template()
                await _warm_up(vm)
                await vm.save_state(work / STATE)
            finally:
                await vm.close()
            (work / "console.log").unlink(missing_ok=True)
            (work / MEMORY_NOTE).unlink()
            for n in range(len(shares)):
                (work / f"share{n}").rmdir()
            meta = TemplateMeta(
                format=FORMAT, key=key, inputs=inputs, cmdline=cmdline, vm_id=tconfig.id, memory_file=memory,
                memory_identity=_file_identity(memory), state_sha256=_sha256(work / STATE),
                state_size=(work / STATE).stat().st_size, created=time.time(), build_seconds=time.monotonic() - t0)
            (work / META).write_text(meta.model_dump_json(indent=1))
            if final.exists():
                remove(final)
            work.rename(final)
        except BaseException as e:
            shutil.rmtree(work, ignore_errors=True)
            memory.unlink(missing_ok=True)
            if not final.exists():
                _unlink_lock(root, key)  # no template of this key: nothing left of the attempt
            if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                raise TemplateError(f"template {key}: no room left: {e}") from None
            if isinstance(e, TemplateError) or not isinstance(e, Exception):
                raise
            raise TemplateError(f"template {key}: build failed: {e}") from e
        log.info("template %s built in %.2fs (%s)", key, meta.build_seconds, memory)
    with contextlib.suppress(OSError):
        await asyncio.to_thread(prune, root, config.template_max_count, key)
    return Template(key, final, meta)


def build_in_background(config: UvmConfig) -> None:
    """Start a detached builder for config's template (auto start: this VM boots cold meanwhile).
    Its own lock makes concurrent requests for the same key build once."""
    import subprocess
    import sys

    try:
        subprocess.Popen([sys.executable, "-m", "uvm.template_builder", config.model_dump_json()],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True, close_fds=True, cwd="/")
    except OSError as e:
        log.warning("cannot start a background template build: %s", e)
