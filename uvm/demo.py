"""`make demo`: boot a UVM, run `uname -a` in it through the agent, print it and the boot time,
shut the VM down cleanly."""

from __future__ import annotations

import asyncio
import logging
import sys
import time

from schemas.uvm_config import UvmConfig
from uvm.errors import UvmError
from uvm.vm import UtilityVM


async def demo() -> int:
    vm = UtilityVM(UvmConfig())
    try:
        print(f"[demo] booting UVM {vm.id} ...", flush=True)
        await vm.start()
        assert vm.spec is not None and vm.hello is not None
        print(f"[demo] agent ready after {vm.boot_seconds:.2f}s (accel {vm.spec.accel}, "
              f"agent protocol v{vm.hello.version})")
        res = await vm.run(["uname", "-a"])
        print(f"[demo] uname -a in the UVM (exit {res.exit_status}): {res.stdout.decode().strip()}")
        t0 = time.monotonic()
        await vm.shutdown()
        exit_info = await vm.wait_timeout(30)
        print(f"[demo] {exit_info.reason} in {time.monotonic() - t0:.2f}s "
              f"(QEMU {exit_info.hypervisor.describe()})")
        return 0 if res.exit_status == 0 and exit_info.reason == "shutdown" else 1
    except UvmError as e:
        print(f"[demo] FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        await vm.close()


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return asyncio.run(demo())


if __name__ == "__main__":
    sys.exit(main())
