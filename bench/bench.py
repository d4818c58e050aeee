"""`make bench`: the foundation's figures, as ratios against floors measured in the same run.

* F0: raw qemu-system, same kernel and machine options, a busybox-only initramfs whose /init
  prints READY (time from spawn to READY on the serial console).
* F1: the same, but /init loads the boot modules, mounts the guest image's erofs root and starts
  ``python3 -S`` from it, which prints READY: the cost of Python's own cold start under emulation.
* UVM: ``UtilityVM.start()`` through the project's API, to the agent's hello answer.
Runs are interleaved (F0, F1, UVM, F0, ...) so drift hits all three alike. Then the boot loop:
N more UVM boots, counting hangs (a boot that misses its deadline).

The containerd shim's figures (``--only shim`` runs just these, with their own F0 runs; ``--only link``,
``--only libvirt``, ``--only template``, ``--only net``, ``--only confine``, ``--only pod`` and ``--only rootfs`` likewise for
theirs; pod_figures.py: Kubernetes pods through containerd's CRI, the uvm handler against runc's):
* ``ctr run --rm ... date`` through a private containerd, from spawning ctr to the first byte on its
  stdout, interleaved with F0 boots;
* the shim's ``start`` and ``delete`` actions against ``python -c pass`` on the same interpreter;
* host PSS of the shim daemon and its QEMU per idle UVM (one, then two at once).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib.util
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from measure import alive, mapping_pss_kib, median, pss_kib, smaps_split  # noqa: E402  (bench/, this script's directory)

from schemas import oci  # noqa: E402
from schemas.uvm_config import UvmConfig, default_image_dir  # noqa: E402
from shim.containerd_env import PrivateContainerd, busybox_rootfs, processes_with_arg  # noqa: E402
from uvm import builder  # noqa: E402
from uvm.backends.qemu import QemuFds, qemu_argv  # noqa: E402
from uvm.link import AgentClient, AgentConnection  # noqa: E402
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
    """The UVM's QEMU command line (unconfined: the floor is QEMU itself) without the agent's port, QMP and
    the console's log, its console on stdout."""
    argv = qemu_argv(dataclasses.replace(spec, confine=False), QemuFds(qmp=-1, agent=-1, console_log=-1))
    out: list[str] = []
    skip = False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        nxt = argv[i + 1] if i + 1 < len(argv) else ""
        if a in ("-chardev", "-device", "-mon", "-serial", "-drive", "-add-fd") and (
            "agent" in nxt or "virtio-serial" in nxt or a in ("-mon", "-add-fd") or "console" in nxt
            or "id=qmp" in nxt or (not with_root and ("rootfs" in nxt))
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


async def ping_median(client: UtilityVM | AgentClient, n: int = 200) -> float:
    """Median round trip of n pings (seq 0..n-1) to a UVM's agent or through a client."""
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        await client.ping(i)
        times.append(time.perf_counter() - t0)
    return median(times)


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
        out: dict[str, list[float]] = {"raw_rtt": [], "pyraw_rtt": [], "bare_rtt": [], "agent_rtt": [], "raw_mbps": [],
                                       "pyraw_mbps": [], "stream_mbps": []}
        py_echo = (f"import os\nfd = os.open({dev!r}, os.O_RDWR)\nbuf = memoryview(bytearray(1 << 20))\n"
                   "while True:\n    n = os.readv(fd, [buf])\n    w = 0\n"
                   "    while w < n:\n        w += os.write(fd, buf[w:n])\n")
        py_relay = (f"import os\nfd = os.open({dev!r}, os.O_RDWR)\nbuf = memoryview(bytearray(1 << 20))\n"
                    "while n := os.readv(0, [buf]):\n    w = 0\n"
                    "    while w < n:\n        w += os.write(fd, buf[w:n])\n")
        # A bare responder: answers each ping frame with its seq, none of the agent's work (no JSON,
        # no dispatch, no event loop), through the host's own AgentClient: what is left of the
        # round trip when the agent's guest side costs nothing.
        py_bare = (f"import os, struct\nfd = os.open({dev!r}, os.O_RDWR)\nh = struct.Struct('>HBBII')\n"
                   "while True:\n    d = os.read(fd, 65536)\n    seq = d[d.rindex(b':') + 1:-2]\n"
                   "    body = b'{\"seq\":' + seq + b'}'\n"
                   "    os.write(fd, h.pack(0x5556, 2, 0, h.unpack_from(d)[3], len(body)) + body)\n")
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
            bare_sock = socket.socket(socket.AF_UNIX)
            bare_sock.connect(sock)
            bare = AgentConnection("bench")
            await bare.open(bare_sock)
            responder = await vm.create_process(oci.Process(args=["python3", "-S", "-c", py_bare]), stdout=False,
                                                stderr=False)
            client = AgentClient(bare)
            await asyncio.wait_for(client.ping(1), 60)
            out["bare_rtt"].append(await ping_median(client))
            await responder.kill()
            await responder.wait()
            await bare.aclose()
            out["agent_rtt"].append(await ping_median(vm))
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


# --- the containerd shim ---------------------------------------------------------------------------

SHIM_RUNTIME = "io.containerd.uvm.v1"
SHIM_BINARY = Path(sys.executable).parent / "containerd-shim-uvm-v1"
# busybox's date has no %N: the guest prints whole seconds (and its clock comes from the CMOS RTC at
# boot, whole seconds too), so the figure is the first byte of ctr's stdout; the guest's clock is
# only checked against the host's.
DATE_ARGV = ["/bin/date", "+%s.%N"]
IDLE_ARGV = ["/bin/sh", "-c", "while true; do sleep 1; done"]
IDLE_SETTLE_S = 5.0


@contextlib.contextmanager
def shim_environ(run_dir: Path, state_dir: Path) -> Iterator[None]:
    """What containerd passes to the shims it starts: the bench's run and state directories (so the
    leak check sees their VMs), the same guest image as the floors, and no operator config file."""
    saved = dict(os.environ)
    os.environ.update(UVMSHIM_RUN_DIR=str(run_dir), UVMSHIM_STATE_DIR=str(state_dir),
                      UVMSHIM_IMAGE_DIR=str(default_image_dir()))
    os.environ.pop("UVMSHIM_CONFIG", None)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def ctr_argv(ctd: PrivateContainerd, *args: str) -> list[str]:
    return ["ctr", "--address", str(ctd.address), "--namespace", ctd.namespace, *args]


def ctr_run_date(ctd: PrivateContainerd, rootfs: Path, cid: str, timeout: float = 180.0,
                 extra: tuple[str, ...] = ()) -> dict[str, float]:
    """One `ctr run --rm ... date`: seconds from spawning ctr to the first byte on its stdout and to its
    exit, and the guest's clock (what date printed) minus the host's wall clock at the spawn."""
    argv = ctr_argv(ctd, "run", "--rm", "--runtime", SHIM_RUNTIME, *extra, "--rootfs", str(rootfs), cid, *DATE_ARGV)
    wall0, t0 = time.time(), time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    try:
        first = proc.stdout.read1(4096)  # type: ignore[attr-defined]
        first_byte = time.monotonic() - t0
        out, err = proc.communicate(timeout=timeout)
        total = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = first + out
    if proc.returncode != 0 or not first:
        raise RuntimeError(f"{' '.join(argv)}: exit status {proc.returncode}, stdout {out!r}, "
                           f"stderr {err.decode(errors='replace').strip()!r}")
    guest = float(out.split()[0].split(b".")[0])  # "SECONDS.%N": busybox prints the %N as is
    return {"first_byte_s": first_byte, "total_s": total, "guest_clock_s": guest - wall0}


def shim_run_figures(ctd: PrivateContainerd, rootfs: Path, f0_argv: list[str], n: int) -> dict[str, object]:
    """`ctr run --rm` to workload, interleaved with F0 boots (after one warm-up run, not counted)."""
    warmup = ctr_run_date(ctd, rootfs, "datewarm")
    runs: dict[str, list[float]] = {"F0": [], "first_byte_s": [], "total_s": [], "guest_clock_s": []}
    for i in range(n):
        runs["F0"].append(time_to_ready(f0_argv))
        for key, value in ctr_run_date(ctd, rootfs, f"date{i}").items():
            runs[key].append(value)
        print(f"  ctr run {i + 1}: F0 {runs['F0'][-1]:.2f}s  first stdout byte {runs['first_byte_s'][-1]:.2f}s  "
              f"ctr exits {runs['total_s'][-1]:.2f}s  guest clock {runs['guest_clock_s'][-1]:+.2f}s", flush=True)
    # The guest's whole second must fall between ctr's spawn (less the second it truncates) and the
    # first byte: then the guest clock agrees with the host's, to its one-second resolution.
    consistent = all(-1.0 <= g <= b for g, b in zip(runs["guest_clock_s"], runs["first_byte_s"], strict=True))
    lag = median([b - g for g, b in zip(runs["guest_clock_s"], runs["first_byte_s"], strict=True)])
    f0, to_workload = median(runs["F0"]), median(runs["first_byte_s"])
    return {"ctr_run_to_workload_s": to_workload, "F0": f0, "ratio_vs_F0": to_workload / f0,
            "ctr_total_s": median(runs["total_s"]), "n": n, "warmup_first_byte_s": warmup["first_byte_s"],
            "measured_by": "first_stdout_byte",
            "why": "busybox date has no %N and the guest clock is set from the CMOS RTC (whole seconds) at boot",
            "guest_clock_consistent": consistent, "guest_clock_lag_s": lag, "runs": runs}


def processes_of_shim(task_id: str) -> list[int]:
    """The serving shim daemon(s) of a task: `python -m shim.containerd.main ... -id ID ... serve`."""
    needle = f"\0-id\0{task_id}\0".encode()
    return [p for p in processes_with_arg("shim.containerd.main") if needle in _cmdline(p)]


def _cmdline(pid: int) -> bytes:
    try:
        return b"\0" + Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def descendants(pid: int) -> list[int]:
    """Every live process below pid (children first)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat[stat.rindex(")") + 2:].split()[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(0), [])
        found += kids
        todo += kids
    return found


def stop_process(pid: int, grace: float = 10.0) -> None:
    """SIGTERM (SIGKILL after grace) a process that is not our child, and wait until it is gone."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        if not alive(pid):
            return
    raise RuntimeError(f"pid {pid} survived SIGKILL")


def timed_run(argv: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, bytes]:
    t0 = time.perf_counter()
    res = subprocess.run(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    elapsed = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit status {res.returncode}: {res.stderr.decode(errors='replace')}")
    return elapsed, res.stdout


def shim_action_figures(tmp: Path, n: int = 10) -> dict[str, object]:
    """The shim's `start` and `delete` actions (as containerd runs them, in a bundle directory) against
    `python -c pass` on the same interpreter, interleaved; medians of n after one warm-up round.

    Each start spawns a serving daemon: it is stopped (SIGTERM) before the delete, which then finds the
    task's socket dead and removes it."""
    from shim.containerd.main import parse_flags, socket_path

    env = {k: v for k, v in os.environ.items() if k != "UVMSHIM_CONFIG"}
    address = str(tmp / "x.sock")  # never connected to: start and delete only hash it into the socket name
    times: dict[str, list[float]] = {"python_c_pass": [], "start": [], "delete": []}
    for i in range(n + 1):
        task_id = f"bench{i}"
        bundle = tmp / "bundles" / task_id
        bundle.mkdir(parents=True)
        flags = ["-namespace", "bench", "-address", address, "-publish-binary", "/usr/bin/containerd", "-id", task_id]
        sock = socket_path(parse_flags([*flags, "start"]))
        t_pass, _ = timed_run([sys.executable, "-c", "pass"], bundle, env)
        try:
            t_start, out = timed_run([str(SHIM_BINARY), *flags, "start"], bundle, env)
            if out.decode() != f"unix://{sock}":
                raise RuntimeError(f"shim start printed {out!r}, not unix://{sock}")
        finally:
            for pid in processes_of_shim(task_id):
                stop_process(pid)
        t_delete, _ = timed_run([str(SHIM_BINARY), *flags, "-bundle", str(bundle), "delete"], bundle, env)
        if sock.exists():
            sock.unlink()
            raise RuntimeError(f"shim delete left its dead socket {sock}")
        if i:  # round 0 warms the page cache
            for key, t in (("python_c_pass", t_pass), ("start", t_start), ("delete", t_delete)):
                times[key].append(t)
    m = {k: median(v) for k, v in times.items()}
    return {**{f"{k}_s": v for k, v in m.items()}, "start_vs_python": m["start"] / m["python_c_pass"],
            "delete_vs_python": m["delete"] / m["python_c_pass"], "n": n, "runs": times}


def task_status(ctd: PrivateContainerd, task_id: str) -> str:
    for line in ctd.ctr("task", "ls").stdout.decode().splitlines():
        fields = line.split()
        if fields and fields[0] == task_id:
            return fields[-1]
    return "missing"


def uvm_pss(task_id: str, template_dir: Path | None = None) -> dict[str, float]:
    """Host PSS (MiB) of a running task's shim daemon and of its QEMU (and of that, the guest's RAM and
    file-backed pages: the kernel image, binaries and libraries, shared between VMs; for a clone, its share
    of the template's RAM file under template_dir), and the guest's size."""
    shims = processes_of_shim(task_id)
    if len(shims) != 1:
        raise RuntimeError(f"task {task_id}: expected one shim daemon, found {shims}")
    qemus = [p for p in descendants(shims[0]) if b"qemu-system" in _cmdline(p).split(b"\0")[1]]
    if len(qemus) != 1:
        raise RuntimeError(f"task {task_id}: expected one QEMU below shim {shims[0]}, found {qemus}")
    argv = _cmdline(qemus[0]).split(b"\0")
    guest_mib = int(argv[argv.index(b"-m") + 1])
    return {"shim_mib": pss_kib(shims[0]) / 1024, "qemu_mib": pss_kib(qemus[0]) / 1024,
            "qemu_guest_ram_mib": mapping_pss_kib(qemus[0], guest_mib << 10) / 1024,
            "qemu_file_mib": pss_kib(qemus[0], "Pss_File") / 1024, "guest_mib": float(guest_mib),
            "qemu_template_mib": sum(smaps_split(qemus[0], str(f))["template_pss_mib"]
                                     for f in template_dir.glob("*.mem")) if template_dir else 0.0}


def idle_pss_figures(ctd: PrivateContainerd, rootfs: Path, timeout: float = 180.0, prefix: str = "idle",
                     config: Path | None = None, template_dir: Path | None = None) -> dict[str, object]:
    """Host PSS of shim + QEMU per idle UVM: one running, then two at once (mean per VM: sharing). With a
    runtime config of start = "template" (its memory under template_dir), of clones; the template's RAM
    file, resident in tmpfs and shared by every clone, is reported on its own."""
    started: list[str] = []
    extra = ("--runtime-config-path", str(config)) if config else ()

    def start_idle(task_id: str) -> None:
        ctd.ctr("run", "-d", "--runtime", SHIM_RUNTIME, *extra, "--rootfs", str(rootfs), task_id, *IDLE_ARGV,
                timeout=timeout)
        started.append(task_id)
        deadline = time.monotonic() + timeout
        while (status := task_status(ctd, task_id)) != "RUNNING":
            if time.monotonic() > deadline:
                raise RuntimeError(f"task {task_id} is {status}, not RUNNING, after {timeout:g}s")
            time.sleep(0.5)
        time.sleep(IDLE_SETTLE_S)

    try:
        start_idle(f"{prefix}0")
        one = uvm_pss(f"{prefix}0", template_dir)
        start_idle(f"{prefix}1")
        both = [uvm_pss(t, template_dir) for t in started]
        two = {k: statistics.mean(m[k] for m in both) for k in one}
        resident = (sum(f.stat().st_blocks * 512 for f in template_dir.glob("*.mem")) / (1 << 20)
                    if template_dir else 0.0)
        return {"guest_mib": one["guest_mib"], "one": {**one, "total_mib": one["shim_mib"] + one["qemu_mib"]},
                "two_mean": {**two, "total_mib": two["shim_mib"] + two["qemu_mib"]}, "settle_s": IDLE_SETTLE_S,
                "template_resident_mib": resident}
    finally:
        for task_id in started:
            ctd.ctr("task", "kill", "-s", "SIGKILL", task_id, check=False)
            ctd.ctr("task", "rm", "-f", task_id, check=False)
            ctd.ctr("container", "rm", task_id, check=False)


def template_runtime_config(base: Path, memdir: Path) -> Path:
    """A shim runtime config (`ctr run --runtime-config-path`) that clones each task's UVM from a template
    whose guest RAM file goes to memdir."""
    cfg = base / "template.toml"
    cfg.write_text(f'[uvm]\nstart = "template"\ntemplate_memory_dir = "{memdir}"\n')
    return cfg


def remove_templates(state_dir: Path, memdir: Path) -> None:
    """Remove the templates the bench's shims built under state_dir, and their RAM files' directory."""
    from uvm import template

    for row in template.list_templates(UvmConfig(state_dir=state_dir)):
        template.remove(Path(row["path"]))
    shutil.rmtree(memdir, ignore_errors=True)


def shim_figures(tmp: Path, run_dir: Path, state_dir: Path, f0_argv: list[str], n: int) -> dict[str, object]:
    """The containerd shim's figures: its actions, `ctr run` to workload against F0, idle PSS."""
    actions = shim_action_figures(tmp)
    base = Path(tempfile.mkdtemp(prefix="uvmcb-", dir="/tmp"))
    memdir = Path("/dev/shm") / f"uvm-bench-shim-{os.getpid()}"
    try:
        rootfs = busybox_rootfs(base)
        with shim_environ(run_dir, state_dir), PrivateContainerd(base / "c", extra_path=[SHIM_BINARY.parent]) as ctd:
            run = shim_run_figures(ctd, rootfs, f0_argv, n)
            pss = idle_pss_figures(ctd, rootfs)
            clone_pss = idle_pss_figures(ctd, rootfs, prefix="clone", config=template_runtime_config(base, memdir),
                                         template_dir=memdir)
    finally:
        remove_templates(state_dir, memdir)
        shutil.rmtree(base, ignore_errors=True)
    return {"ctr_run": run, "actions": actions, "idle_pss": pss, "idle_pss_clones": clone_pss}


def ctr_template_figures(tmp: Path, run_dir: Path, state_dir: Path, n: int) -> dict[str, object]:
    """`ctr run --rm ... date` to workload with start = "template" against cold, interleaved (after a
    warm-up of each: the first template run builds the template)."""
    memdir = Path("/dev/shm") / f"uvm-bench-ctr-{os.getpid()}"
    base = Path(tempfile.mkdtemp(prefix="uvmcb-", dir="/tmp"))
    cfg = template_runtime_config(base, memdir)
    runs: dict[str, list[float]] = {"cold": [], "template": []}
    try:
        rootfs = busybox_rootfs(base)
        with shim_environ(run_dir, state_dir), PrivateContainerd(base / "c", extra_path=[SHIM_BINARY.parent]) as ctd:
            ctr_run_date(ctd, rootfs, "coldwarm")
            ctr_run_date(ctd, rootfs, "tmplwarm", extra=("--runtime-config-path", str(cfg)))
            for i in range(n):
                runs["cold"].append(ctr_run_date(ctd, rootfs, f"cold{i}")["first_byte_s"])
                runs["template"].append(ctr_run_date(ctd, rootfs, f"tmpl{i}",
                                                     extra=("--runtime-config-path", str(cfg)))["first_byte_s"])
                print(f"  ctr run {i + 1}: cold {runs['cold'][-1]:.2f}s  from a template {runs['template'][-1]:.2f}s",
                      flush=True)
    finally:
        remove_templates(state_dir, memdir)
        shutil.rmtree(base, ignore_errors=True)
    cold, tmpl = median(runs["cold"]), median(runs["template"])
    return {"cold_s": cold, "template_s": tmpl, "ratio": tmpl / cold, "n": n, "runs": runs}


def print_shim_figures(shim: dict[str, Any]) -> None:
    run, act, pss = shim["ctr_run"], shim["actions"], shim["idle_pss"]
    print(f"containerd: `ctr run --rm` of date to workload {run['ctr_run_to_workload_s']:.2f}s (first stdout byte; "
          f"ctr exits after {run['ctr_total_s']:.2f}s), F0 {run['F0']:.2f}s in the same runs: "
          f"{run['ratio_vs_F0']:.2f}x (target <= 2.5x, medians of {run['n']}; the guest's whole-second clock is "
          f"{run['guest_clock_lag_s']:.2f}s behind the first byte"
          f"{'' if run['guest_clock_consistent'] else ', OUTSIDE [ctr spawn - 1 s, first byte]'})")
    print(f"shim actions: start {act['start_s'] * 1e3:.0f} ms ({act['start_vs_python']:.2f}x), delete "
          f"{act['delete_s'] * 1e3:.0f} ms ({act['delete_vs_python']:.2f}x) against `python -c pass` "
          f"{act['python_c_pass_s'] * 1e3:.0f} ms (target <= 5x, medians of {act['n']})")
    one, two = pss["one"], pss["two_mean"]
    print(f"idle UVM host PSS ({pss['guest_mib']:.0f} MiB guest): shim {one['shim_mib']:.1f} + QEMU "
          f"{one['qemu_mib']:.1f} = {one['total_mib']:.1f} MiB for one; two at once: {two['shim_mib']:.1f} + "
          f"{two['qemu_mib']:.1f} = {two['total_mib']:.1f} MiB each (target <= 100 MiB); of QEMU's, guest RAM "
          f"{one['qemu_guest_ram_mib']:.1f} MiB, file-backed {one['qemu_file_mib']:.1f} MiB (one VM)")
    if "idle_pss_clones" in shim:
        c = shim["idle_pss_clones"]
        one, two = c["one"], c["two_mean"]
        print(f"idle UVM host PSS with start = \"template\": shim {one['shim_mib']:.1f} + QEMU {one['qemu_mib']:.1f} "
              f"= {one['total_mib']:.1f} MiB for one clone; two at once: {two['shim_mib']:.1f} + {two['qemu_mib']:.1f} "
              f"= {two['total_mib']:.1f} MiB each (target <= 100 MiB), of which their share of the template's RAM file "
              f"{two['qemu_template_mib']:.1f} MiB; the template ({c['template_resident_mib']:.0f} MiB resident in "
              "tmpfs) is shared by every clone")


def confine_figures(run_dir: Path, state_dir: Path, memdir: Path, n: int) -> dict[str, Any]:
    """Cold UVM and template clone to agent ready, confined (uvm/jail.py) against unconfined, interleaved."""
    from uvm import template_builder

    runs: dict[str, list[float]] = {"cold_confined": [], "cold_unconfined": [], "clone_confined": [],
                                    "clone_unconfined": []}
    common: dict[str, Any] = {"template_memory_dir": memdir}
    asyncio.run(template_builder.build(UvmConfig(run_dir=run_dir, state_dir=state_dir, **common)))
    for _ in range(n):
        for confine in (True, False):
            kind = "confined" if confine else "unconfined"
            runs[f"cold_{kind}"].append(asyncio.run(uvm_start(run_dir, state_dir, confine=confine, **common)))
            runs[f"clone_{kind}"].append(asyncio.run(uvm_start(run_dir, state_dir, confine=confine, start="template",
                                                               **common)))
    m = {k: median(v) for k, v in runs.items()}
    return {**m, "cold_ratio": m["cold_confined"] / m["cold_unconfined"],
            "clone_ratio": m["clone_confined"] / m["clone_unconfined"], "runs": runs}


def q35_argv(spec: builder.LaunchSpec, initrd: Path, with_root: bool) -> list[str]:
    """Raw QEMU on q35 (libvirt's machine), same kernel and command line, console on stdio."""
    argv = [spec.qemu_binary, "-machine", "q35", "-accel", spec.accel, "-cpu", spec.cpu_model, "-m", str(spec.memory_mib),
            "-smp", str(spec.cpus), "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", str(spec.kernel), "-initrd", str(initrd), "-append", spec.cmdline, "-serial", "stdio"]
    if with_root:
        argv += ["-drive", f"if=none,id=rootfs,file={spec.rootfs},format=raw,readonly=on",
                 "-device", "virtio-blk-pci,drive=rootfs",
                 # as the UVM: python3's start would otherwise wait for the guest's entropy
                 "-object", "rng-random,id=rng0,filename=/dev/urandom", "-device", "virtio-rng-pci,rng=rng0"]
    return argv


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
    ap.add_argument("--no-shim", dest="shim", action="store_false", help="skip the containerd shim figures")
    ap.add_argument("--no-template", dest="template", action="store_false", help="skip the template figures")
    ap.add_argument("--no-net", dest="net", action="store_false", help="skip the network figures")
    ap.add_argument("--no-confine", dest="confine", action="store_false", help="skip the confinement figures")
    ap.add_argument("--no-pod", dest="pod", action="store_false", help="skip the CRI pod figures")
    ap.add_argument("--no-rootfs", dest="rootfs", action="store_false", help="skip the container rootfs I/O figures")
    ap.add_argument("--only", choices=("link", "libvirt", "shim", "template", "net", "confine", "pod", "rootfs"),
                    help="run only this section (with the floors it compares against)")
    args = ap.parse_args()
    if args.only:
        args.disks = False
        args.boot_loop = 0
        args.libvirt = args.only == "libvirt"
        args.link = args.only == "link"
        args.shim = args.only == "shim"
        args.template = args.only == "template"
        args.net = args.only == "net"
        args.confine = args.only == "confine"
        args.pod = args.only == "pod"
        args.rootfs = args.only == "rootfs"
    with tempfile.TemporaryDirectory(prefix="uvm-bench-", dir="/tmp") as t:
        tmp = Path(t)
        run_dir, state_dir = tmp / "run", tmp / "state"
        spec = builder.build(UvmConfig(run_dir=run_dir, state_dir=state_dir))
        f0_initrd, f1_initrd = floor_initramfs(tmp, spec)
        f0_argv = raw_argv(spec, f0_initrd, tmp, with_root=False)
        f1_argv = raw_argv(spec, f1_initrd, tmp, with_root=True)
        print(f"bench: accel {spec.accel}, image {spec.image_id}, n={args.n} interleaved", flush=True)
        res: dict[str, list[float]] = {"F0": [], "F1": [], "UVM": []}
        summary: dict[str, object] = {}
        if not args.only:
            for i in range(args.n):
                res["F0"].append(time_to_ready(f0_argv))
                res["F1"].append(time_to_ready(f1_argv))
                res["UVM"].append(asyncio.run(uvm_start(run_dir, state_dir)))
                print(f"  run {i + 1}: F0 {res['F0'][-1]:.2f}s  F1 {res['F1'][-1]:.2f}s  UVM {res['UVM'][-1]:.2f}s",
                      flush=True)
            f0, f1, uvm = (median(res[k]) for k in ("F0", "F1", "UVM"))
            print(f"medians: F0 {f0:.2f}s  F1 {f1:.2f}s  UVM cold start to agent ready {uvm:.2f}s")
            print(f"ratios:  UVM/F0 {uvm / f0:.2f}x (target <= 2.0x)   UVM/F1 {uvm / f1:.2f}x (target <= 1.3x)")
            summary.update({"medians": {"F0": f0, "F1": f1, "UVM": uvm}, "runs": res,
                            "ratios": {"UVM/F0": uvm / f0, "UVM/F1": uvm / f1}})
        if args.link:
            link = asyncio.run(link_figures(run_dir, state_dir))
            ratios = {"rtt_vs_c": link["agent_rtt"] / link["raw_rtt"], "rtt_vs_py": link["agent_rtt"] / link["pyraw_rtt"],
                      "bare_vs_c": link["bare_rtt"] / link["raw_rtt"],
                      "tput_vs_c": link["stream_mbps"] / link["raw_mbps"],
                      "tput_vs_py": link["stream_mbps"] / link["pyraw_mbps"]}
            print(f"agent ping round trip {link['agent_rtt'] * 1e3:.2f} ms; raw virtio-serial echo: busybox cat "
                  f"{link['raw_rtt'] * 1e3:.2f} ms ({ratios['rtt_vs_c']:.2f}x), python3 "
                  f"{link['pyraw_rtt'] * 1e3:.2f} ms ({ratios['rtt_vs_py']:.2f}x) (target <= 1.5x)")
            print(f"  a bare python3 ping responder (no agent work in the guest) through the same host client: "
                  f"{link['bare_rtt'] * 1e3:.2f} ms ({ratios['bare_vs_c']:.2f}x busybox cat)")
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
                # At least 10 of each: libvirt's start varies more from run to run than a raw boot does
                # (n=5 gave 1.24x and 1.39x against q35 + python3 on the same day; n=10, 1.26x).
                for _ in range(max(args.n, 10)):
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
        if args.shim:
            print(f"containerd shim: start/delete actions, `ctr run --rm` interleaved with F0 (n={args.n}), idle PSS",
                  flush=True)
            shim = shim_figures(tmp, run_dir, state_dir, f0_argv, args.n)
            print_shim_figures(shim)
            summary["shim"] = shim
        if args.template:
            import template_figures as templates  # bench/ (this script's directory) is on sys.path

            print(f"templates: clone start interleaved with F0 (n={args.n}), idle PSS, density", flush=True)
            base = Path(tempfile.mkdtemp(prefix="uvmtb-", dir="/tmp"))
            try:
                tf = asyncio.run(templates.figures(tmp, run_dir, state_dir, lambda: time_to_ready(f0_argv), args.n,
                                                   busybox_rootfs(base)))
            finally:
                shutil.rmtree(base, ignore_errors=True)
            print("templates: `ctr run --rm` from a template against cold, interleaved", flush=True)
            tf["ctr"] = ctr_template_figures(tmp, run_dir, state_dir, args.n)
            templates.print_figures(tf)
            summary["template"] = tf
        if args.net:
            import net_figures  # bench/ (this script's directory) is on sys.path

            print(f"network: TCP and HTTP against a raw guest on the same tap arrangement, start with/without "
                  f"(n={args.n})", flush=True)
            base = Path(tempfile.mkdtemp(prefix="uvmnb-", dir="/tmp"))
            try:
                nf = net_figures.figures(tmp, run_dir, state_dir, busybox_rootfs(base), raw_argv, args.n)
            finally:
                shutil.rmtree(base, ignore_errors=True)
            net_figures.print_figures(nf)
            summary["net"] = nf
        if args.confine:
            print(f"confinement: cold start and clone start, confined against unconfined, interleaved (n={args.n})",
                  flush=True)
            memdir = Path(tempfile.mkdtemp(prefix="uvm-bench-mem-", dir="/dev/shm"))
            try:
                cf = confine_figures(run_dir, state_dir, memdir, args.n)
            finally:
                remove_templates(state_dir, memdir)
            print(f"confined cold start {cf['cold_confined']:.2f}s, unconfined {cf['cold_unconfined']:.2f}s "
                  f"({cf['cold_ratio']:.3f}x, target <= 1.05x); clone {cf['clone_confined']:.3f}s, unconfined "
                  f"{cf['clone_unconfined']:.3f}s ({cf['clone_ratio']:.3f}x, target <= 1.1x)")
            summary["confine"] = cf
        if args.rootfs:
            import rootfs_figures  # bench/ (this script's directory) is on sys.path

            print("container rootfs I/O: block rootfs, ext4 on virtio-scsi and 9p in one UVM, runc's host overlayfs",
                  flush=True)
            rf = asyncio.run(rootfs_figures.figures(run_dir, state_dir))
            rootfs_figures.print_figures(rf)
            summary["rootfs"] = rf
        pod_left: dict[str, list[str]] = {}
        if args.pod:
            import pod_figures  # bench/ (this script's directory) is on sys.path

            print(f"pods through CRI: uvm cold, uvm from a template and runc interleaved, three containers against "
                  f"one (n={args.n}); idle PSS of 1, 3 and {pod_figures.DENSITY} pods", flush=True)
            pf = pod_figures.figures(tmp, state_dir, args.n)
            pod_figures.print_figures(pf)
            summary["pod"] = pf
            pod_left = {k: v for k, v in pf["left"].items() if v}
        if args.boot_loop:
            print(f"boot loop: {args.boot_loop} UVM boots, deadline {args.boot_timeout:g}s each", flush=True)
            hangs, failures, times = asyncio.run(boot_loop(args.boot_loop, run_dir, state_dir, args.boot_timeout))
            print(f"boot loop: {args.boot_loop} boots, {hangs} hangs, {failures} other failures, "
                  f"median {median(times):.2f}s, max {max(times, default=float('nan')):.2f}s")
            summary["boot_loop"] = {"boots": args.boot_loop, "hangs": hangs, "failures": failures,
                                    "median": median(times), "max": max(times, default=None)}
        out = REPO / "bench" / "results"
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{args.only or 'foundation'}-{time.strftime('%Y%m%d-%H%M%S')}.json"
        path.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"results: {path}")
        leftovers = list(run_dir.iterdir()) if run_dir.exists() else []
        if leftovers or pod_left:
            print(f"LEAK: {leftovers or ''}{pod_left or ''}")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
