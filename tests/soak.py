"""`make soak`: the containerd shim under sustained use, bounded in count and time; not part of `make test`.

Through a private containerd (its own root, state and socket) and `ctr`, as a user would:
1. SOAK_CYCLES (default 200) `ctr run --rm` cycles, alternating cold and template starts, and in turn a
   rootfs directory (9p) and an imported image (the block rootfs: cached layers, a scratch, the writable
   layer back into the snapshot); each init reads a line piped into ctr's stdin and echoes it (the init's
   stdin path, containerd#4489's race), an image's also writes a file, and the output is checked; each
   cycle has a deadline.
2. SOAK_EXECS (default 1000) `ctr task exec ... /bin/cat` into one running task, a short line piped in
   then end of file (the `ctr exec` stdin hang): each must echo its line and exit 0 within its deadline.
3. Then nothing may be left: no QEMU process, shim, socket under /run/containerd/s of ours, mount, run
   directory, tap, cgroup of the namespace, extra open fd of containerd; the host's used memory back within
   5% of where it started. Latency percentiles are printed for each kind of cycle.
It stops by itself: after the counts, at the first hang (a deadline missed), or past SOAK_MAX_MINUTES
(default 90). The exit status is 0 only when every cycle passed and nothing leaked.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from shim.containerd.leftovers import processes_using  # noqa: E402
from shim.containerd.rootfs import mount_points_under  # noqa: E402
from shim.containerd_env import PrivateContainerd, build_busybox_image_tar, busybox_rootfs, shim_daemons  # noqa: E402

RUNTIME = ["--runtime", "io.containerd.uvm.v1"]
CYCLE_DEADLINE_S = 180.0
EXEC_DEADLINE_S = 60.0
MEMORY_DRIFT = 0.05
IMAGE_REF = "docker.io/library/uvmsoak:latest"
KINDS = ("cold", "template", "cold-image", "template-image")


def env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        sys.exit(f"soak: ${name} must be a whole number")


def memory_cgroups() -> int:
    """Memory cgroups the kernel still has, dying ones included (cgroup v1's /proc/cgroups counts them)."""
    with open("/proc/cgroups") as f:
        for line in f:
            fields = line.split()
            if fields and fields[0] == "memory":
                return int(fields[2])
    return 0


def settled_memory_kib(patience: float = 60.0) -> int:
    """Used memory once caches are dropped and the kernel has freed what it frees lazily: a removed memory
    cgroup lives on ("dying") while page cache is charged to it, so a run that made hundreds of cgroups (a
    task's, as under runc) leaves memory behind that is not a leak. Waits until the count of memory cgroups
    stops falling (at most `patience` seconds)."""
    deadline = time.monotonic() + patience
    last = -1
    while True:
        subprocess.run(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"], check=False)
        time.sleep(2)
        now = memory_cgroups()
        if now == last or time.monotonic() > deadline:
            return used_memory_kib()
        last = now


def used_memory_kib() -> int:
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":", 1)
            info[key] = int(value.split()[0])
    return info["MemTotal"] - info["MemAvailable"]


def percentiles(samples: list[float]) -> str:
    if not samples:
        return "none"
    ordered = sorted(samples)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return (f"n={len(ordered)} p50 {at(0.5):.2f}s p90 {at(0.9):.2f}s p99 {at(0.99):.2f}s max {ordered[-1]:.2f}s "
            f"mean {statistics.fmean(ordered):.2f}s")


def taps() -> list[str]:
    return sorted(name for name in os.listdir("/sys/class/net") if name.endswith("_uvm"))


def fds_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def containerd_pid(ctd: PrivateContainerd) -> int:
    proc = getattr(ctd, "_proc", None)
    assert proc is not None, "containerd is not running"
    return int(proc.pid)


def cgroups_of(namespace: str) -> list[str]:
    """cgroup directories named after the namespace (runc makes /sys/fs/cgroup/<ctrl>/<ns>/<id>; ours none)."""
    found = []
    for root in Path("/sys/fs/cgroup").glob("*"):
        if (root / namespace).is_dir():
            found.append(str(root / namespace))
    if Path("/sys/fs/cgroup", namespace).is_dir():
        found.append(f"/sys/fs/cgroup/{namespace}")
    return found


class Soak:
    def __init__(self, base: Path, run_dir: Path, cycles: int, execs: int, max_minutes: float) -> None:
        self.base = base
        self.run_dir = run_dir
        self.cycles = cycles
        self.execs = execs
        self.deadline = time.monotonic() + max_minutes * 60
        self.failures: list[str] = []
        self.latency: dict[str, list[float]] = {k: [] for k in (*KINDS, "exec")}

    def out_of_time(self) -> bool:
        if time.monotonic() > self.deadline:
            self.failures.append("stopped: SOAK_MAX_MINUTES passed")
            return True
        return False

    def ctr(self, ctd: PrivateContainerd, *args: str, data: bytes, deadline: float) -> subprocess.CompletedProcess[bytes]:
        return ctd.ctr(*args, input=data, timeout=deadline, check=False)

    def run_cycles(self, ctd: PrivateContainerd, rootfs: Path, configs: dict[str, Path]) -> None:
        for n in range(self.cycles):
            if self.out_of_time():
                return
            start = "template" if n % 2 else "cold"
            image = (n // 2) % 2 == 1
            kind = f"{start}-image" if image else start
            tid = f"soak{n}"
            line = f"cycle {n} {kind}\n".encode()
            source = [IMAGE_REF, tid] if image else ["--rootfs", str(rootfs), tid]
            script = "read line; echo \"got $line\"" + ("; echo $line > /written; cat /written" if image else "")
            want = b"got " + line + (line if image else b"")
            t0 = time.monotonic()
            try:
                res = self.ctr(ctd, "run", "--rm", *RUNTIME, "--runtime-config-path", str(configs[start]), *source,
                               "/bin/sh", "-c", script, data=line, deadline=CYCLE_DEADLINE_S)
            except subprocess.TimeoutExpired:
                self.failures.append(f"cycle {n} ({kind}): no answer within {CYCLE_DEADLINE_S:g}s (a hang)")
                return
            took = time.monotonic() - t0
            if res.returncode != 0 or res.stdout != want:
                self.failures.append(f"cycle {n} ({kind}): exit {res.returncode}, stdout {res.stdout!r}, "
                                     f"stderr {res.stderr.decode(errors='replace').strip()[:300]}")
                return
            self.latency[kind].append(took)
            if (n + 1) % 20 == 0:
                print(f"[soak] {n + 1}/{self.cycles} cycles; " +
                      "; ".join(f"{k} {percentiles(self.latency[k])}" for k in KINDS), flush=True)

    def run_execs(self, ctd: PrivateContainerd, rootfs: Path, config: Path) -> None:
        if not self.execs:
            return
        tid = "soakexec"
        res = ctd.ctr("run", "-d", *RUNTIME, "--runtime-config-path", str(config), "--rootfs", str(rootfs), tid,
                      "/bin/sh", "-c", "while true; do sleep 1; done", input=b"", timeout=CYCLE_DEADLINE_S, check=False)
        if res.returncode != 0:
            self.failures.append(f"exec target: {res.stderr.decode(errors='replace').strip()}")
            return
        try:
            for n in range(self.execs):
                if self.out_of_time():
                    return
                line = f"exec {n}\n".encode()
                t0 = time.monotonic()
                try:
                    res = self.ctr(ctd, "task", "exec", "--exec-id", f"e{n}", tid, "/bin/cat", data=line,
                                   deadline=EXEC_DEADLINE_S)
                except subprocess.TimeoutExpired:
                    self.failures.append(f"exec {n}: no answer within {EXEC_DEADLINE_S:g}s (a hang)")
                    return
                if res.returncode != 0 or res.stdout != line:
                    self.failures.append(f"exec {n}: exit {res.returncode}, stdout {res.stdout!r}, "
                                         f"stderr {res.stderr.decode(errors='replace').strip()[:300]}")
                    return
                self.latency["exec"].append(time.monotonic() - t0)
                if (n + 1) % 100 == 0:
                    print(f"[soak] {n + 1}/{self.execs} execs; {percentiles(self.latency['exec'])}", flush=True)
        finally:
            ctd.ctr("task", "rm", "-f", tid, check=False)  # -f: SIGKILL, then delete
            ctd.ctr("container", "rm", tid, check=False)

    def leaks(self, ctd: PrivateContainerd, fds_before: int, sockets_before: set[str]) -> list[str]:
        left = []
        deadline = time.monotonic() + 30  # the last delete actions may still be running
        while True:
            left = []
            if shims := shim_daemons(address=str(ctd.address)):
                left.append(f"shim processes {shims}")
            if qemu := processes_using(str(self.run_dir)):
                left.append(f"QEMU processes {qemu}")
            if run_dirs := sorted(os.listdir(self.run_dir)):
                left.append(f"run directories {run_dirs}")
            if mounts := mount_points_under(self.base):
                left.append(f"mounts {[str(m) for m in mounts]}")
            if sockets := sorted(set(os.listdir("/run/containerd/s")) - sockets_before):
                left.append(f"sockets {sockets}")
            if tap_list := taps():
                left.append(f"taps {tap_list}")
            if cgroups := cgroups_of(ctd.namespace):
                left.append(f"cgroups {cgroups}")
            if (fds := fds_of(containerd_pid(ctd))) > fds_before:
                left.append(f"containerd holds {fds} fds, {fds_before} before")
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.5)


def main() -> int:
    cycles, execs = env_int("SOAK_CYCLES", 200), env_int("SOAK_EXECS", 1000)
    max_minutes = float(env_int("SOAK_MAX_MINUTES", 90))
    base = Path(tempfile.mkdtemp(prefix="uvmsoak-", dir="/tmp"))
    run_dir = base / "run"
    run_dir.mkdir()
    os.environ["UVMSHIM_RUN_DIR"] = str(run_dir)  # containerd passes its environment on to the shims
    os.environ["UVMSHIM_STATE_DIR"] = str(base / "state")
    configs = {"cold": base / "cold.toml", "template": base / "template.toml"}
    layers = f'layer_cache_dir = "{base / "layers"}"\n'
    configs["cold"].write_text(f'{layers}[uvm]\nstart = "cold"\n')
    configs["template"].write_text(f'{layers}[uvm]\nstart = "template"\ntemplate_dir = "{base / "templates"}"\n'
                                   f'template_memory_dir = "/dev/shm/{base.name}"\n')
    os.environ["UVMSHIM_CONFIG"] = str(configs["cold"])
    print(f"[soak] {cycles} ctr run --rm cycles (cold and template alternating, a directory or an image in turn), "
          f"then {execs} piped execs; at most {max_minutes:g} minutes; in {base}", flush=True)
    soak = Soak(base, run_dir, cycles, execs, max_minutes)
    memory_before, cgroups_before = settled_memory_kib(), memory_cgroups()
    sockets_before = set(os.listdir("/run/containerd/s")) if os.path.isdir("/run/containerd/s") else set()
    started = time.monotonic()
    leaks: list[str] = []
    try:
        rootfs = busybox_rootfs(base)
        with PrivateContainerd(base / "c", extra_path=[Path(sys.executable).parent], namespace="soak") as ctd:
            ctd.import_image(build_busybox_image_tar(base / "image.tar", IMAGE_REF))
            fds_before = fds_of(containerd_pid(ctd))
            soak.run_cycles(ctd, rootfs, configs)
            if not soak.failures:
                soak.run_execs(ctd, rootfs, configs["template"])
            ctd.remove_tasks_and_containers()
            leaks = soak.leaks(ctd, fds_before, sockets_before)
    finally:
        from uvm import template

        for entry in sorted((base / "templates").iterdir()) if (base / "templates").is_dir() else []:
            if entry.is_dir() and not entry.name.startswith("."):
                template.remove(entry)
        shutil.rmtree(Path(f"/dev/shm/{base.name}"), ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)
    memory_after = settled_memory_kib()
    drift = (memory_after - memory_before) / max(memory_before, 1)
    minutes = (time.monotonic() - started) / 60
    print(f"[soak] done in {minutes:.1f} min: {sum(len(soak.latency[k]) for k in KINDS)} cycles, "
          f"{len(soak.latency['exec'])} execs, {len(soak.failures)} failures, {len(leaks)} leaks")
    for kind in (*KINDS, "exec"):
        print(f"[soak]   {kind:14} {percentiles(soak.latency[kind])}")
    print(f"[soak]   used memory (caches dropped) {memory_before // 1024} MiB before, {memory_after // 1024} MiB after, "
          f"drift {drift:+.1%} (limit {MEMORY_DRIFT:.0%}); memory cgroups {cgroups_before} before, "
          f"{memory_cgroups()} after")
    for problem in soak.failures + [f"leak: {leak}" for leak in leaks]:
        print(f"[soak] FAILED: {problem}")
    if drift > MEMORY_DRIFT:
        print(f"[soak] FAILED: used memory grew by {drift:.1%}")
    return 0 if not soak.failures and not leaks and drift <= MEMORY_DRIFT else 1


if __name__ == "__main__":
    sys.exit(main())
