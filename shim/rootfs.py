"""A task's root filesystem on the host, which the UVM then sees over virtio-9p.

Two cases, as containerd presents them:
* `ctr run --rootfs DIR`: no mounts in the create request; config.json's root.path is the host DIR.
* image-based runs: the snapshotter's mounts (overlay, or a bind for the native snapshotter) arrive in
  CreateTaskRequest.rootfs; they are mounted on <bundle>/rootfs, as runc's shim does, and unmounted
  at delete (or by the `delete` action when the shim died).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from uvm import errors

MOUNT_TIMEOUT_S = 30


@dataclass(frozen=True)
class HostMount:
    type: str
    source: str
    options: tuple[str, ...]


def is_mountpoint(path: Path) -> bool:
    target = str(path.resolve())
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def _run(argv: list[str], what: str) -> None:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=MOUNT_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise errors.InvalidArgumentError(f"{what}: {e}") from None
    if res.returncode != 0:
        raise errors.InvalidArgumentError(f"{what}: {res.stderr.strip() or f'exit {res.returncode}'}")


def mount_all(mounts: list[HostMount], target: Path) -> None:
    """Mount containerd's rootfs mounts on target, in order. Raises InvalidArgumentError (all undone)."""
    done = 0
    try:
        for m in mounts:
            if m.type not in ("overlay", "bind", "rbind") and not m.type.startswith("ext"):
                raise errors.InvalidArgumentError(f"rootfs mount type {m.type!r} is not supported (overlay, bind, ext4)")
            opts = [o for o in m.options if o not in ("bind", "rbind")]
            argv = ["mount", "-t", m.type, m.source, str(target)] if m.type not in ("bind", "rbind") else \
                ["mount", "--rbind" if m.type == "rbind" or "rbind" in m.options else "--bind", m.source, str(target)]
            if opts:
                argv[1:1] = ["-o", ",".join(opts)]
            _run(argv, f"rootfs mount {m.type} {m.source} on {target}")
            done += 1
    except BaseException:
        for _ in range(done):
            unmount(target)
        raise


def unmount(target: Path) -> bool:
    """Unmount everything on target (lazily if busy). True if something was mounted there."""
    if not target.exists():
        return False
    found = False
    while is_mountpoint(target):
        found = True
        res = subprocess.run(["umount", str(target)], capture_output=True, timeout=MOUNT_TIMEOUT_S, check=False)
        if res.returncode != 0:
            subprocess.run(["umount", "-l", str(target)], capture_output=True, timeout=MOUNT_TIMEOUT_S, check=False)
            if is_mountpoint(target):
                raise errors.UvmError(f"rootfs {target}: cannot unmount: {res.stderr.decode().strip()}")
    return found


def host_root(bundle: Path, root_path: str) -> Path:
    """The directory to share into the UVM: root.path, absolute or relative to the bundle.

    Raises InvalidArgumentError when it is not a non-empty directory."""
    root = Path(root_path) if os.path.isabs(root_path) else bundle / root_path
    if not root.is_dir():
        raise errors.InvalidArgumentError(f"rootfs {root}: not a directory (set root.path or use a snapshotter)")
    if not any(root.iterdir()):
        raise errors.InvalidArgumentError(f"rootfs {root}: is empty: no usable root filesystem in the bundle")
    return root
