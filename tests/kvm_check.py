"""An independent answer to "does KVM run guests on this host?", for tests that check the product's own
probe (uvm/accel.py boots a 64 KiB firmware and waits for its isa-debug-exit). This one boots the suite's
guest kernel under KVM, with no initramfs and no disk, so the kernel panics once it looks for a root
filesystem. A kernel that printed its banner and got to that panic within the deadline ran guest code
under KVM; an abort (e.g. "failed to set MSR"), an exit before it, or a hang did not.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

CHECK_TIMEOUT_S = 30.0


def kvm_runs_guests(kernel: Path, qemu: str = "qemu-system-x86_64", timeout: float = CHECK_TIMEOUT_S) -> bool:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    with tempfile.TemporaryDirectory(prefix="uvmt-kvmcheck-") as tmp:
        console = Path(tmp) / "console"
        argv = [qemu, "-machine", "microvm", "-accel", "kvm", "-cpu", "host", "-m", "128", "-nodefaults",
                "-no-user-config", "-display", "none", "-no-reboot", "-kernel", str(kernel),
                "-append", "console=ttyS0 panic=-1 reboot=t", "-serial", f"file:{console}"]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                text = console.read_text(errors="replace") if console.exists() else ""
                if "Linux version" in text and "Kernel panic" in text:
                    return True
                if proc.poll() is not None:  # ended before the panic: an abort
                    return False
                time.sleep(0.1)
            return False
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
