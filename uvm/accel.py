"""Choose the accelerator: KVM when a bounded probe shows it really runs guest code, else TCG.

/dev/kvm existing proves nothing (on some hosts KVM vCPUs abort or spin forever), so the probe
boots a 64 KiB firmware whose reset vector writes to QEMU's isa-debug-exit port: QEMU then exits
with status 99 at once. Anything else within the deadline (an abort, a hang, no /dev/kvm) means
TCG. The answer is cached per host boot and QEMU binary, so it is paid once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Literal

log = logging.getLogger("uvm.accel")

Accel = Literal["kvm", "tcg"]
PROBE_TIMEOUT_S = 5.0
PROBE_EXIT = 99  # isa-debug-exit: (0x31 << 1) | 1
# Real-mode code at the reset vector (top 16 bytes): mov al,0x31; out 0xf4,al; hlt; jmp $-3
_RESET_CODE = bytes([0xB0, 0x31, 0xE6, 0xF4, 0xF4, 0xEB, 0xFD])


def probe_firmware() -> bytes:
    rom = bytearray(b"\xf4" * 65536)
    rom[0xFFF0:0xFFF0 + len(_RESET_CODE)] = _RESET_CODE
    return bytes(rom)


def _cache_key(qemu: str) -> str:
    path = shutil.which(qemu) or qemu
    try:
        st = os.stat(path)
        ident = f"{path}:{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        ident = path
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = "unknown"
    return f"{boot_id}|{ident}"


def probe_kvm(qemu: str, timeout: float | None = None) -> tuple[bool, str]:
    """(usable, why): boot the probe firmware under KVM with a deadline (PROBE_TIMEOUT_S)."""
    timeout = PROBE_TIMEOUT_S if timeout is None else timeout
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is missing or not accessible"
    with tempfile.TemporaryDirectory(prefix="uvm-kvm-probe-") as tmp:
        fw = Path(tmp) / "probe.bin"
        fw.write_bytes(probe_firmware())
        argv = [qemu, "-machine", "pc,accel=kvm", "-cpu", "host", "-m", "16", "-nodefaults",
                "-no-user-config", "-display", "none", "-bios", str(fw),
                "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, start_new_session=True)
        except OSError as e:
            return False, f"cannot run {qemu}: {e}"
        try:
            _, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the whole group: a wrapper's children too
            proc.communicate()
            return False, f"KVM guest did not run within {timeout:g}s (vCPU hangs)"
    if proc.returncode == PROBE_EXIT:
        return True, "KVM probe guest ran"
    err = stderr.decode(errors="replace").strip().splitlines()
    return False, f"KVM probe exited {proc.returncode}: {err[-1] if err else 'no message'}"


def resolve_accel(requested: str, qemu: str, cache_dir: Path | None) -> Accel:
    """The accelerator to use: requested if kvm/tcg, else the (cached) probe's verdict."""
    if requested in ("kvm", "tcg"):
        return requested  # type: ignore[return-value]
    key = _cache_key(qemu)
    cache = cache_dir / "accel-probe.json" if cache_dir else None
    if cache is not None:
        try:
            data = json.loads(cache.read_text())
            if isinstance(data, dict) and data.get("key") == key and data.get("accel") in ("kvm", "tcg"):
                return data["accel"]  # type: ignore[no-any-return]
        except (OSError, ValueError):
            pass
    ok, why = probe_kvm(qemu)
    accel: Accel = "kvm" if ok else "tcg"
    log.info("accelerator: %s (%s)", accel, why)
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f".{cache.name}.{os.getpid()}")
            tmp.write_text(json.dumps({"key": key, "accel": accel, "why": why}))
            os.replace(tmp, cache)
        except OSError as e:
            log.warning("cannot cache the KVM probe result in %s: %s", cache, e)
    return accel
