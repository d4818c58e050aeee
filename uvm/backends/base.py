"""The backend Protocol: what the UtilityVM needs from a hypervisor, and nothing more.

Slot allocation, the agent protocol and the lifecycle contract live above this, once; a backend
only starts and stops a hypervisor, opens the agent channel and reports how the hypervisor ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from uvm.builder import LaunchSpec
from uvm.errors import AlreadyExistsError, StartError

RUN_DIR_ATTEMPTS = 5


def create_run_dir(spec: LaunchSpec, mode: int) -> int:
    """The VM's own run directory (sockets, logs), created and locked: the returned descriptor holds an
    exclusive flock on it for the VM's life (the backend closes it after removing the directory; QEMU may
    inherit it, so a VM that outlives its shim still holds it). A directory that exists but that no live
    process holds locked is what a crash left (shim, QEMU and containerd killed at once, so no `delete`
    action ran): it is emptied and reused. Raises AlreadyExistsError if a live VM holds it (id in use),
    StartError if it cannot be made."""
    log = logging.getLogger(f"uvm.{spec.vm_id}")
    try:
        spec.run_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StartError(f"VM {spec.vm_id}: cannot create {spec.run_dir.parent}: {e.strerror}", vm_id=spec.vm_id) \
            from None
    for _ in range(RUN_DIR_ATTEMPTS):
        created = True
        try:
            spec.run_dir.mkdir(mode=mode)
        except FileExistsError:
            created = False
        except OSError as e:
            raise StartError(f"VM {spec.vm_id}: cannot create {spec.run_dir}: {e.strerror}", vm_id=spec.vm_id) \
                from None
        try:
            fd = os.open(spec.run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue  # removed between mkdir and open (its owner's close): try again
        except OSError as e:
            raise StartError(f"VM {spec.vm_id}: cannot open {spec.run_dir}: {e.strerror}", vm_id=spec.vm_id) \
                from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AlreadyExistsError(f"VM {spec.vm_id}: run directory {spec.run_dir} exists and a running VM "
                                     f"holds it (id in use?)", vm_id=spec.vm_id) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(spec.run_dir))
        except OSError:
            same = False
        if not same:  # its owner removed it (and maybe another made it anew) while we locked: look again
            os.close(fd)
            continue
        if not created:
            log.warning("run directory %s was left by a VM that no longer runs: reclaiming it", spec.run_dir)
            empty_directory(spec.run_dir)
        os.chmod(fd, mode)
        return fd
    raise AlreadyExistsError(f"VM {spec.vm_id}: run directory {spec.run_dir} keeps changing (id in use?)",
                             vm_id=spec.vm_id)


def empty_directory(path: Path) -> None:
    """Remove everything inside path (not path itself)."""
    for entry in os.scandir(path):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)


def remove_run_dir(path: Path, lock_fd: int | None) -> None:
    """Remove a VM's run directory, then release its lock (in that order: a new VM of the same id that
    waits for the lock finds the directory gone, not half-removed)."""
    shutil.rmtree(path, ignore_errors=True)
    if lock_fd is not None:
        os.close(lock_fd)


@dataclass(frozen=True)
class HypervisorExit:
    """How the hypervisor ended: process status and the shutdown reason it reported, if any."""

    exit_status: int | None  # process exit code
    signal: int | None  # terminating signal of the hypervisor process
    shutdown_reason: str | None  # QMP SHUTDOWN reason: guest-shutdown, guest-reset, host-qmp-quit, ...
    detail: str = ""  # the hypervisor's own last words (stderr tail)

    def describe(self) -> str:
        if self.signal is not None:
            how = f"killed by signal {self.signal}"
        else:
            how = f"exited with status {self.exit_status}"
        if self.shutdown_reason:
            how += f" after {self.shutdown_reason}"
        if self.detail:
            how += f": {self.detail}"
        return how


class Backend(Protocol):
    name: str

    @property
    def pid(self) -> int | None: ...

    async def launch(self, spec: LaunchSpec) -> None:
        """Start the hypervisor. Raises StartError (nothing left running) if it does not come up."""

    async def connect_agent(self) -> socket.socket:
        """Open the host end of the agent channel: a connected, non-blocking stream socket."""

    async def request_powerdown(self) -> None:
        """Ask the guest to power off through the platform (ACPI); returns at once."""

    async def terminate(self) -> None:
        """Force the hypervisor to stop; returns at once (exit is observed by wait_exit)."""

    async def wait_exit(self) -> HypervisorExit:
        """Wait until the hypervisor has exited."""

    async def attach_scsi(self, controller: int, lun: int, path: str, readonly: bool, fmt: str) -> None:
        """Hot-plug the image at path as a SCSI disk at controller:lun. Raises DiskError (nothing left)."""

    async def detach_scsi(self, controller: int, lun: int) -> None:
        """Unplug the disk at controller:lun and release its host side. Raises DiskError."""

    async def scsi_inventory(self) -> dict[str, list[str]]:
        """{"devices": [...], "nodes": [...]}: what the hypervisor has attached (for checks)."""

    def console_tail(self, lines: int = 30) -> str:
        """The last lines the guest printed on its console."""

    async def aclose(self) -> None:
        """Stop the hypervisor if needed and release every host resource. Idempotent."""


async def connect_unix(path: str) -> socket.socket:
    """A non-blocking stream socket connected to the unix socket at path (for AgentConnection.open)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, path)
    except BaseException:
        sock.close()
        raise
    return sock
