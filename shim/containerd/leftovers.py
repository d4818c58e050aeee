"""What a dead shim leaves behind, and how the `delete` action removes it.

The serving shim records its UVM in <bundle>/uvmshim.json before the VM starts (id, backend, run
directory, mounted rootfs). containerd runs `containerd-shim-uvm-v1 ... delete` after every
disconnect, so this module must be idempotent, quick (no uvm/ or pydantic import) and thorough:
QEMU processes of the VM (found by their run directory on the command line), a libvirt domain, the
run directory, the rootfs mount.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

STATE_FILE = "uvmshim.json"
KILL_WAIT_S = 5.0


def write_atomic(path: Path, text: str) -> None:
    """Write path whole or not at all (a reader never sees half of it): a hidden file, renamed."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def record(bundle: Path, state: dict[str, Any]) -> None:
    """Write the state file atomically."""
    write_atomic(bundle / STATE_FILE, json.dumps(state))


def forget(bundle: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (bundle / STATE_FILE).unlink()


def process_cmdlines() -> Iterator[tuple[int, bytes]]:
    """(pid, NUL-separated command line) of every live process but this one; those that vanish
    while we look are skipped."""
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                yield int(entry), f.read()
        except OSError:
            continue


def processes_using(run_dir: str) -> list[int]:
    """Pids whose command line names a path inside run_dir, or that hold it (or a file in it) open: QEMU
    gets its sockets and logs as descriptors and holds its run directory's lock, so its command line may
    name nothing of it."""
    base = run_dir.rstrip("/")
    needle = (base + "/").encode()
    found = []
    for pid, cmdline in process_cmdlines():
        if needle in cmdline or _holds(pid, base):
            found.append(pid)
    return found


def _holds(pid: int, base: str) -> bool:
    """Whether pid has base, or something below it, open."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target == base or target.startswith(base + "/"):
            return True
    return False


def kill_and_wait(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + KILL_WAIT_S
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if os.path.exists(f"/proc/{p}") and not _zombie(p)]
        if pids:
            time.sleep(0.02)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _is_vm_run_dir(run_dir: Any, vm_id: Any) -> bool:
    """Only ever kill and remove what is plainly one VM's run directory (`delete` runs as root)."""
    if not isinstance(run_dir, str) or not isinstance(vm_id, str) or not vm_id:
        return False
    path = Path(run_dir)
    return path.is_absolute() and len(path.parts) >= 3 and path.name == vm_id and ".." not in path.parts


def _clean_network(network: dict[str, Any]) -> list[str]:
    """Our qdiscs and filters off the veths of the namespace the VM took over, its taps gone (they
    went with QEMU's fds, unless something else holds one)."""
    veths, taps = ([n for n in network.get(key) or [] if isinstance(n, str)] for key in ("veths", "taps"))
    try:
        from uvm.network import cleanup  # (pyroute2: only a task that had a network pays for it)

        return cleanup(network["netns"], veths, taps)
    except Exception as e:  # the rest of the cleanup must still run
        return [f"network of netns {network['netns']}: {e}"]


def clean(bundle: Path) -> list[str]:
    """Remove what the state file names; a list of what was done (for the cleanup warnings)."""
    try:
        state = json.loads((bundle / STATE_FILE).read_text())
    except (OSError, ValueError):
        state = {}
    if not isinstance(state, dict):
        state = {}
    done: list[str] = []
    helper = state.get("helper")  # a helper UVM the task was using (blockroot.py)
    for vm in (state, helper if isinstance(helper, dict) else {}):
        run_dir = vm.get("run_dir")
        if _is_vm_run_dir(run_dir, vm.get("vm_id")):
            assert isinstance(run_dir, str)
            pids = processes_using(run_dir)
            if pids:
                kill_and_wait(pids)
                done.append(f"killed VM processes {pids}")
            if os.path.isdir(run_dir):
                shutil.rmtree(run_dir, ignore_errors=True)
                done.append(f"removed {run_dir}")
    if state.get("backend") == "libvirt" and isinstance(state.get("vm_id"), str):
        from uvm.backends.libvirt import destroy_leftover  # only libvirt users pay for the import

        if destroy_leftover(state["vm_id"], state.get("libvirt_uri") or "qemu:///system"):
            done.append(f"destroyed libvirt domain of {state['vm_id']}")
    network = state.get("network")
    if isinstance(network, dict) and isinstance(network.get("netns"), str):
        done += _clean_network(network)
    from shim.containerd import pod, rootfs

    # A task's rootfs and binds (a pod's container), or the whole pod directory (the task whose UVM it was).
    for key, release in (("task_dir", pod.release_task_dir), ("pod_dir", lambda p: pod.PodDir(p).remove())):
        path = state.get(key)
        if isinstance(path, str) and os.path.isabs(path) and ".." not in Path(path).parts and release(Path(path)):
            done.append(f"unmounted and removed {path}")
    if rootfs.unmount(bundle / "rootfs"):  # (where an earlier version mounted a snapshot)
        done.append(f"unmounted {bundle / 'rootfs'}")
    forget(bundle)
    return done
