"""`make demo`: boot a UVM, run `uname -a` in it through the agent, then a container (a busybox
rootfs from a host directory shared over 9p) that prints a line, and shut the VM down cleanly."""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from schemas import oci
from schemas.uvm_config import Share, UvmConfig
from uvm.container import Rootfs
from uvm.errors import UvmError
from uvm.vm import UtilityVM


def busybox_rootfs(parent: Path) -> Path:
    """<parent>/busybox: /bin/busybox (Debian's busybox-static) with a link per applet."""
    root = parent / "busybox"
    for d in ("bin", "proc", "sys", "dev", "tmp", "etc"):
        (root / d).mkdir(parents=True)
    shutil.copy2("/bin/busybox", root / "bin" / "busybox")
    applets = subprocess.run(["/bin/busybox", "--list"], capture_output=True, text=True, check=True).stdout.split()
    for a in applets:
        if a != "busybox":
            (root / "bin" / a).symlink_to("busybox")
    return root


async def demo(share_dir: Path) -> int:
    busybox_rootfs(share_dir)
    vm = UtilityVM(UvmConfig(shares=[Share(tag="rootfs", host_path=share_dir)]))
    try:
        print(f"[demo] booting UVM {vm.id} ...", flush=True)
        await vm.start()
        assert vm.spec is not None and vm.hello is not None
        print(f"[demo] agent ready after {vm.boot_seconds:.2f}s (accel {vm.spec.accel}, "
              f"agent protocol v{vm.hello.version})")
        res = await vm.run(["uname", "-a"])
        print(f"[demo] uname -a in the UVM (exit {res.exit_status}): {res.stdout.decode().strip()}")
        t0 = time.monotonic()
        spec = oci.default_spec(["sh", "-c", "echo hello from container $(hostname), pid $$ in $(uname -r)"],
                                env=["PATH=/bin"], hostname="demo")
        container = await vm.create_container("demo", spec, Rootfs(share="rootfs", path="busybox"))
        await container.start()
        assert container.init.stdout is not None
        out = await container.init.stdout.read_all()
        exit_info = await container.wait_timeout(60)
        print(f"[demo] container (exit {exit_info.exit_code}, {time.monotonic() - t0:.2f}s): {out.decode().strip()}")
        await container.close()
        t0 = time.monotonic()
        await vm.shutdown()
        vm_exit = await vm.wait_timeout(30)
        print(f"[demo] {vm_exit.reason} in {time.monotonic() - t0:.2f}s (QEMU {vm_exit.hypervisor.describe()})")
        ok = res.exit_status == 0 and exit_info.exit_code == 0 and vm_exit.reason == "shutdown"
        return 0 if ok else 1
    except UvmError as e:
        print(f"[demo] FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        await vm.close()


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="uvm-demo-") as tmp:
        return asyncio.run(demo(Path(tmp)))


if __name__ == "__main__":
    sys.exit(main())
