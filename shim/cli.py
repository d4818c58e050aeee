"""`runuvm`: the runc/runhcs-style command line (`boot` and `create-scratch` so far).

``runuvm boot [--cpus N] [--memory MiB] [--kernel-args S] [--accel A] [--exec CMD]`` boots a
debug UVM, runs CMD in it through the agent (streaming nothing yet: its output is printed when it
ends), and exits with CMD's exit code.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shlex
import sys
from pathlib import Path

USAGE_EPILOG = "Container commands (create, start, run, exec, ...) are not implemented yet."


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="runuvm", description="Run containers in utility VMs.", epilog=USAGE_EPILOG)
    p.add_argument("--debug", action="store_true", help="log at DEBUG level to stderr")
    sub = p.add_subparsers(dest="command")
    boot = sub.add_parser("boot", help="boot a debug UVM")
    boot.add_argument("--cpus", type=int, default=1)
    boot.add_argument("--memory", type=int, default=256, help="MiB")
    boot.add_argument("--kernel-args", default="")
    boot.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
    boot.add_argument("--backend", choices=("qemu", "libvirt"), default="qemu")
    boot.add_argument("--libvirt-uri", default="qemu:///system")
    boot.add_argument("--boot-timeout", type=float, default=60.0)
    boot.add_argument("--exec", dest="exec_cmd", default=None, help="command to run in the UVM (shell words)")
    boot.add_argument("--measure", action="store_true", help="print the boot time")
    scratch = sub.add_parser("create-scratch", help="create a sparse ext4 scratch disk image")
    scratch.add_argument("dest", type=Path)
    scratch.add_argument("--size-gb", type=int, default=20)
    scratch.add_argument("--cache-path", type=Path, default=None)
    return p


def _create_scratch(args: argparse.Namespace) -> int:
    from uvm.errors import UvmError
    from uvm.scratch import create_scratch

    try:
        s = create_scratch(args.dest, args.size_gb, args.cache_path)
    except UvmError as e:
        print(f"runuvm {e}", file=sys.stderr)
        return 1
    print(f"{s.path}: {s.size_bytes >> 30} GB ext4, {s.allocated_bytes // 1024} KiB on disk"
          f"{' (from cache)' if s.from_cache else ''}")
    return 0


async def _boot(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from schemas.uvm_config import UvmConfig
    from uvm.errors import UvmError
    from uvm.vm import UtilityVM

    try:
        config = UvmConfig(cpus=args.cpus, memory_mib=args.memory, kernel_args=args.kernel_args,
                           accel=args.accel, boot_timeout=args.boot_timeout, backend=args.backend,
                           libvirt_uri=args.libvirt_uri)
    except ValidationError as e:
        err = e.errors()[0]
        print(f"runuvm boot: {'.'.join(map(str, err['loc']))}: {err['msg']}", file=sys.stderr)
        return 2
    vm = UtilityVM(config)
    try:
        await vm.start()
        if args.measure:
            print(f"boot: {vm.boot_seconds:.3f}s to agent ready", file=sys.stderr)
        code = 0
        if args.exec_cmd:
            res = await vm.run(shlex.split(args.exec_cmd))
            sys.stdout.buffer.write(res.stdout)
            sys.stderr.buffer.write(res.stderr)
            code = res.exit_status if res.exit_status is not None else 128 + (res.signal or 0)
        await vm.shutdown()
        await vm.wait_timeout(30)
        return code
    except UvmError as e:
        print(f"runuvm boot: {e}", file=sys.stderr)
        return 1
    finally:
        await vm.close()


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "boot":
        return asyncio.run(_boot(args))
    if args.command == "create-scratch":
        return _create_scratch(args)
    parser.print_help()
    return 0 if args.command is None else 2


if __name__ == "__main__":
    sys.exit(main())
