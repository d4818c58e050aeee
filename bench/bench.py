"""`make bench`: the foundation's figures, as ratios against floors measured in the same run.

* F0: raw qemu-system, same kernel and machine options, a busybox-only initramfs whose /init
  prints READY (time from spawn to READY on the serial console).
* F1: the same, but /init loads the boot modules, mounts the guest image's erofs root and starts
  ``python3 -S`` from it, which prints READY: the cost of Python's own cold start under emulation.
* UVM: ``UtilityVM.start()`` through the project's API, to the agent's hello answer.
Runs are interleaved (F0, F1, UVM, F0, ...) so drift hits all three alike. Then the boot loop:
N more UVM boots, counting hangs (a boot that misses its deadline).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from schemas import oci  # noqa: E402
from schemas.uvm_config import UvmConfig  # noqa: E402
from uvm import builder  # noqa: E402
from uvm.backends.qemu import qemu_argv  # noqa: E402
from uvm.scratch import create_scratch  # noqa: E402
from uvm.vm import UtilityVM  # noqa: E402

_spec = importlib.util.spec_from_file_location("image_build", REPO / "images" / "build.py")
assert _spec and _spec.loader
image_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(image_build)

F0_INIT = b"#!/bin/busybox sh\n/bin/busybox echo READY\n/bin/busybox poweroff -f\n"


def floor_initramfs(tmp: Path, spec: builder.LaunchSpec) -> tuple[Path, Path]:
    """(F0 initramfs, F1 initramfs) built next to the real one."""
    cache = REPO / "images" / "cache"
    base = next(p for p in cache.iterdir() if p.name.startswith("base-") and (p / ".done").exists())
    busybox = (base / "usr/bin/busybox").read_bytes()
    c = image_build.Cpio()
    for d in ("bin", "dev"):
        c.dir(d)
    c.chardev("dev/console", 5, 1)
    c.file("bin/busybox", busybox, 0o755)
    c.file("init", F0_INIT, 0o755)
    f0 = tmp / "f0.cpio"
    f0.write_bytes(c.finish())
    # F1: the real initramfs with /init's last step replaced by `python3 -S` printing READY.
    init = (REPO / "images" / "init").read_text()
    start = init.index("exec switch_root")
    end = init.index("\n", start)
    init = init[:start] + "exec switch_root /newroot /usr/bin/python3 -S -c \"print('READY')\"" + init[end:]
    f1 = tmp / "f1.cpio"
    real = spec.initrd.read_bytes()
    # A second cpio appended to the first overrides /init (the kernel unpacks both in order).
    c = image_build.Cpio()
    c.file("init", init.encode(), 0o755)
    f1.write_bytes(real + c.finish())
    return f0, f1


def raw_argv(spec: builder.LaunchSpec, initrd: Path, tmp: Path, with_root: bool) -> list[str]:
    argv = qemu_argv(spec, tmp)
    out: list[str] = []
    skip = False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        nxt = argv[i + 1] if i + 1 < len(argv) else ""
        if a in ("-chardev", "-device", "-qmp", "-serial", "-drive") and (
            "agent" in nxt or "virtio-serial" in nxt or a == "-qmp" or "console" in nxt
            or (not with_root and ("rootfs" in nxt))
        ):
            skip = True
            continue
        out.append(a)
    out[out.index("-initrd") + 1] = str(initrd)
    return [*out, "-serial", "stdio"]


def time_to_ready(argv: list[str], timeout: float = 120.0) -> float:
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    buf = b""
    try:
        while b"READY" not in buf:
            chunk = proc.stdout.read1(4096)  # type: ignore[attr-defined]
            if not chunk:
                raise RuntimeError(f"QEMU exited before READY: {buf[-300:]!r}")
            buf += chunk
            if time.monotonic() - t0 > timeout:
                raise RuntimeError("floor run timed out")
        return time.monotonic() - t0
    finally:
        proc.kill()
        proc.wait()


async def uvm_start(run_dir: Path, state_dir: Path, timeout: float = 120.0, **config: object) -> float:
    """Seconds from start() to the agent's hello through the project's API (then the VM is closed)."""
    vm = UtilityVM(UvmConfig(run_dir=run_dir, state_dir=state_dir, boot_timeout=timeout, **config))  # type: ignore[arg-type]
    try:
        t0 = time.monotonic()
        await vm.start()
        return time.monotonic() - t0
    finally:
        await vm.close()


async def link_figures(run_dir: Path, state_dir: Path, rounds: int = 3) -> dict[str, float]:
    """Agent request round trip and stdout throughput, against a raw virtio-serial port in the same UVM."""
    vm = UtilityVM(UvmConfig(run_dir=run_dir, state_dir=state_dir, extra_ports=["bench"], boot_timeout=120))
    await vm.start()
    try:
        res = await vm.run(["sh", "-c", 'for d in /sys/class/virtio-ports/*; do '
                                        '[ "$(cat $d/name)" = bench ] && echo /dev/${d##*/}; done'])
        dev = res.stdout.decode().strip()
        sock = str(run_dir / vm.id / "port-bench.sock")
        size = 32 << 20
        out: dict[str, list[float]] = {"raw_rtt": [], "pyraw_rtt": [], "agent_rtt": [], "raw_mbps": [],
                                       "pyraw_mbps": [], "stream_mbps": []}
        py_echo = (f"import os\nfd = os.open({dev!r}, os.O_RDWR)\nbuf = memoryview(bytearray(1 << 20))\n"
                   "while True:\n    n = os.readv(fd, [buf])\n    w = 0\n"
                   "    while w < n:\n        w += os.write(fd, buf[w:n])\n")
        py_relay = (f"import os\nfd = os.open({dev!r}, os.O_RDWR)\nbuf = memoryview(bytearray(1 << 20))\n"
                    "while n := os.readv(0, [buf]):\n    w = 0\n"
                    "    while w < n:\n        w += os.write(fd, buf[w:n])\n")
        echoes = {"raw_rtt": ["sh", "-c", f"exec 3<>{dev}; exec cat <&3 >&3"],
                  "pyraw_rtt": ["python3", "-S", "-c", py_echo]}
        for _ in range(rounds):
            # Raw echoes on the second port: C (busybox cat) and the same interpreter as the agent.
            for key, argv in echoes.items():
                reader, writer = await asyncio.open_unix_connection(sock)
                echo = await vm.create_process(oci.Process(args=argv), stdout=False, stderr=False)
                msg = b"x" * 64
                writer.write(msg)
                await asyncio.wait_for(reader.readexactly(len(msg)), 60)  # warm up: the echo is running
                times = []
                for _ in range(200):
                    t0 = time.perf_counter()
                    writer.write(msg)
                    await reader.readexactly(len(msg))
                    times.append(time.perf_counter() - t0)
                out[key].append(median(times))
                await echo.kill()
                await echo.wait()
                writer.close()
            times = []
            for i in range(200):
                t0 = time.perf_counter()
                await vm.ping(i)
                times.append(time.perf_counter() - t0)
            out["agent_rtt"].append(median(times))
            # Raw throughput: dd into the port directly, and through a Python relay (pipe -> port).
            writers = {"raw_mbps": f"exec 3<>{dev}; dd if=/dev/zero bs=65536 count={size >> 16} >&3 2>/dev/null",
                       "pyraw_mbps": f'dd if=/dev/zero bs=65536 count={size >> 16} 2>/dev/null | python3 -S -c "$RELAY"'}
            for key, script in writers.items():
                reader, writer = await asyncio.open_unix_connection(sock, limit=1 << 22)
                t0 = time.perf_counter()
                dd = await vm.create_process(oci.Process(args=["sh", "-c", script], env=["PATH=/usr/bin:/bin",
                                                                                          f"RELAY={py_relay}"]),
                                             stdout=False, stderr=False)
                await asyncio.wait_for(reader.readexactly(size), 300)
                out[key].append(size / (time.perf_counter() - t0) / 1e6)
                await dd.wait()
                writer.close()
            # The same bytes as a process's stdout stream through the agent.
            t0 = time.perf_counter()
            p = await vm.create_process(oci.Process(args=["dd", "if=/dev/zero", "bs=65536", f"count={size >> 16}"]),
                                        stderr=False)
            assert p.stdout is not None
            n = 0
            while chunk := await p.stdout.read():
                n += len(chunk)
            assert n == size, n
            out["stream_mbps"].append(size / (time.perf_counter() - t0) / 1e6)
            await p.wait()
        return {k: median(v) for k, v in out.items()}
    finally:
        await vm.close()


def scratch_figures(tmp: Path, n: int = 10) -> dict[str, float]:
    """create-scratch of 20 GB: cold, from the cache, and bytes on disk (medians of n)."""
    cold, cached, sizes = [], [], []
    for i in range(n):
        t0 = time.perf_counter()
        s = create_scratch(tmp / f"cold{i}.img")
        cold.append(time.perf_counter() - t0)
        sizes.append(s.allocated_bytes)
        s.path.unlink()
    cache = tmp / "cache.img"
    create_scratch(tmp / "fill.img", cache_path=cache).path.unlink()
    for i in range(n):
        t0 = time.perf_counter()
        s = create_scratch(tmp / f"c{i}.img", cache_path=cache)
        cached.append(time.perf_counter() - t0)
        s.path.unlink()
    cache.unlink()
    return {"cold_s": median(cold), "cache_s": median(cached), "bytes_on_disk": median([float(x) for x in sizes])}


async def disk_figures(run_dir: Path, state_dir: Path, tmp: Path, n: int = 10) -> dict[str, float]:
    """attach + mount of a scratch disk in a running UVM, and unmount + detach (medians of n)."""
    vm = UtilityVM(UvmConfig(run_dir=run_dir, state_dir=state_dir, boot_timeout=120))
    await vm.start()
    try:
        img = create_scratch(tmp / "bench-scratch.img", size_gb=1).path
        warm = await vm.add_scsi_disk(img, "/mnt/bench")  # first use loads the SCSI and ext4 modules
        await vm.remove_scsi_disk(warm)
        add, remove = [], []
        for _ in range(n):
            t0 = time.perf_counter()
            disk = await vm.add_scsi_disk(img, "/mnt/bench")
            add.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            await vm.remove_scsi_disk(disk)
            remove.append(time.perf_counter() - t0)
        img.unlink()
        return {"attach_mount_s": median(add), "unmount_detach_s": median(remove)}
    finally:
        await vm.close()


def q35_argv(spec: builder.LaunchSpec, initrd: Path, with_root: bool) -> list[str]:
    """Raw QEMU on q35 (libvirt's machine), same kernel and command line, console on stdio."""
    argv = [spec.qemu_binary, "-machine", "q35", "-accel", spec.accel, "-cpu", spec.cpu_model, "-m", str(spec.memory_mib),
            "-smp", str(spec.cpus), "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", str(spec.kernel), "-initrd", str(initrd), "-append", spec.cmdline, "-serial", "stdio"]
    if with_root:
        argv += ["-drive", f"if=none,id=rootfs,file={spec.rootfs},format=raw,readonly=on",
                 "-device", "virtio-blk-pci,drive=rootfs"]
    return argv


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


async def boot_loop(n: int, run_dir: Path, state_dir: Path, timeout: float) -> tuple[int, int, list[float]]:
    hangs = failures = 0
    times: list[float] = []
    for i in range(n):
        try:
            times.append(await uvm_start(run_dir, state_dir, timeout))
        except Exception as e:
            if "boot timeout" in str(e):
                hangs += 1
            else:
                failures += 1
            print(f"  boot {i + 1}: FAILED: {str(e).splitlines()[0]}", flush=True)
        if (i + 1) % 10 == 0:
            print(f"  boot loop: {i + 1}/{n} (hangs {hangs}, failures {failures})", flush=True)
    return hangs, failures, times


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=int(os.environ.get("BENCH_N", "5")), help="runs of each kind")
    ap.add_argument("--boot-loop", type=int, default=int(os.environ.get("BENCH_BOOT_LOOP", "50")))
    ap.add_argument("--boot-timeout", type=float, default=30.0)
    ap.add_argument("--no-link", dest="link", action="store_false", help="skip the agent link figures")
    ap.add_argument("--no-disks", dest="disks", action="store_false", help="skip the disk figures")
    ap.add_argument("--no-libvirt", dest="libvirt", action="store_false", help="skip the libvirt figures")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="uvm-bench-", dir="/tmp") as t:
        tmp = Path(t)
        run_dir, state_dir = tmp / "run", tmp / "state"
        spec = builder.build(UvmConfig(run_dir=run_dir, state_dir=state_dir))
        f0_initrd, f1_initrd = floor_initramfs(tmp, spec)
        f0_argv = raw_argv(spec, f0_initrd, tmp, with_root=False)
        f1_argv = raw_argv(spec, f1_initrd, tmp, with_root=True)
        print(f"bench: accel {spec.accel}, image {spec.image_id}, n={args.n} interleaved", flush=True)
        res: dict[str, list[float]] = {"F0": [], "F1": [], "UVM": []}
        for i in range(args.n):
            res["F0"].append(time_to_ready(f0_argv))
            res["F1"].append(time_to_ready(f1_argv))
            res["UVM"].append(asyncio.run(uvm_start(run_dir, state_dir)))
            print(f"  run {i + 1}: F0 {res['F0'][-1]:.2f}s  F1 {res['F1'][-1]:.2f}s  UVM {res['UVM'][-1]:.2f}s",
                  flush=True)
        f0, f1, uvm = (median(res[k]) for k in ("F0", "F1", "UVM"))
        print(f"medians: F0 {f0:.2f}s  F1 {f1:.2f}s  UVM cold start to agent ready {uvm:.2f}s")
        print(f"ratios:  UVM/F0 {uvm / f0:.2f}x (target <= 2.0x)   UVM/F1 {uvm / f1:.2f}x (target <= 1.3x)")
        summary: dict[str, object] = {"medians": {"F0": f0, "F1": f1, "UVM": uvm}, "runs": res,
                                      "ratios": {"UVM/F0": uvm / f0, "UVM/F1": uvm / f1}}
        if args.link:
            link = asyncio.run(link_figures(run_dir, state_dir))
            ratios = {"rtt_vs_c": link["agent_rtt"] / link["raw_rtt"], "rtt_vs_py": link["agent_rtt"] / link["pyraw_rtt"],
                      "tput_vs_c": link["stream_mbps"] / link["raw_mbps"],
                      "tput_vs_py": link["stream_mbps"] / link["pyraw_mbps"]}
            print(f"agent ping round trip {link['agent_rtt'] * 1e3:.2f} ms; raw virtio-serial echo: busybox cat "
                  f"{link['raw_rtt'] * 1e3:.2f} ms ({ratios['rtt_vs_c']:.2f}x), python3 "
                  f"{link['pyraw_rtt'] * 1e3:.2f} ms ({ratios['rtt_vs_py']:.2f}x) (target <= 1.5x)")
            print(f"stdout stream {link['stream_mbps']:.1f} MB/s; raw virtio-serial: dd {link['raw_mbps']:.1f} MB/s "
                  f"({ratios['tput_vs_c']:.2f}x), python3 relay {link['pyraw_mbps']:.1f} MB/s "
                  f"({ratios['tput_vs_py']:.2f}x) (target >= 0.5x)")
            summary["link"] = {**link, **ratios}
        if args.libvirt:
            from uvm.testing import libvirt_daemons

            q0_argv = q35_argv(spec, f0_initrd, with_root=False)
            q1_argv = q35_argv(spec, f1_initrd, with_root=True)
            lv: dict[str, list[float]] = {"q35_F0": [], "q35_F1": [], "libvirt": []}
            with libvirt_daemons():
                asyncio.run(uvm_start(run_dir, state_dir, 180, backend="libvirt"))  # warm-up: libvirt's first start
                for _ in range(max(args.n, 3)):
                    lv["q35_F0"].append(time_to_ready(q0_argv))
                    lv["q35_F1"].append(time_to_ready(q1_argv))
                    lv["libvirt"].append(asyncio.run(uvm_start(run_dir, state_dir, 180, backend="libvirt")))
            m = {k: median(v) for k, v in lv.items()}
            print(f"libvirt: cold start to agent ready {m['libvirt']:.2f}s; raw q35 boot of the same kernel: "
                  f"busybox {m['q35_F0']:.2f}s ({m['libvirt'] / m['q35_F0']:.2f}x), python3 -S from the image "
                  f"{m['q35_F1']:.2f}s ({m['libvirt'] / m['q35_F1']:.2f}x) (target <= 1.3x)")
            summary["libvirt"] = {**m, "vs_q35_F0": m["libvirt"] / m["q35_F0"], "vs_q35_F1": m["libvirt"] / m["q35_F1"]}
        if args.disks:
            sc = scratch_figures(tmp)
            print(f"create-scratch 20 GB: cold {sc['cold_s'] * 1e3:.1f} ms (target <= 200), from cache "
                  f"{sc['cache_s'] * 1e3:.1f} ms (target <= 100), {sc['bytes_on_disk'] / 1024:.0f} KiB on disk "
                  f"(target <= 1024)")
            dk = asyncio.run(disk_figures(run_dir, state_dir, tmp))
            ratio = dk["attach_mount_s"] / f0 if res["F0"] else float("nan")
            print(f"scsi disk in a running UVM: attach+mount {dk['attach_mount_s'] * 1e3:.0f} ms ({ratio:.3f}x F0), "
                  f"unmount+detach {dk['unmount_detach_s'] * 1e3:.0f} ms (medians of 10)")
            summary["disks"] = {**sc, **dk, "attach_mount_vs_F0": ratio}
        if args.boot_loop:
            print(f"boot loop: {args.boot_loop} UVM boots, deadline {args.boot_timeout:g}s each", flush=True)
            hangs, failures, times = asyncio.run(boot_loop(args.boot_loop, run_dir, state_dir, args.boot_timeout))
            print(f"boot loop: {args.boot_loop} boots, {hangs} hangs, {failures} other failures, "
                  f"median {median(times):.2f}s, max {max(times, default=float('nan')):.2f}s")
            summary["boot_loop"] = {"boots": args.boot_loop, "hangs": hangs, "failures": failures,
                                    "median": median(times), "max": max(times, default=None)}
        out = REPO / "bench" / "results"
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"foundation-{time.strftime('%Y%m%d-%H%M%S')}.json"
        path.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"results: {path}")
        leftovers = list(run_dir.iterdir()) if run_dir.exists() else []
        if leftovers:
            print(f"LEAK: {leftovers}")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
