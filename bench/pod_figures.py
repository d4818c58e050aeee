"""Pod figures for `make bench` (`--only pod`): Kubernetes pods through containerd's own CRI plugin, as the
kubelet drives it (tests/cri: a private containerd with the handlers ``runc`` and ``uvm``), measured
against runc's pods in the same run.

* Pod to workload, one container: from RunPodSandbox through CreateContainer and StartContainer until
  the container's first line (it prints once, then sleeps) is in its CRI log file under the pod's
  log_directory (a thread watches the files from RunPodSandbox on). Three variants, interleaved (in an
  order that changes every round) so drift and any after-effect of the previous pod hit all alike:
  handler ``uvm`` booting cold, handler ``uvm`` cloning a template (the shim config's ``[uvm] start =
  "template"``, its template_dir and template_memory_dir private to the run; a warm-up pod builds the
  template, not timed), and handler ``runc``, the floor. Medians and the ratios uvm-cold/runc and
  uvm-template/runc.
* Three containers against one (uvm, cold, the same rounds): pod to all three containers' first lines
  against pod to the one-container pod's line: target <= 1.3x (later containers join the pod's running
  UVM: they must not pay for a boot).
* Host PSS per pod (the pod's shim daemon + its QEMU, idle after a settle): uvm pods of 1 and of 3 busybox
  ``sleep`` containers, each alone; then 10 such one-container pods at once (total and per pod).
  Afterwards every pod is stopped and removed, and nothing of them may be left: no QEMU, no shim daemon,
  no pod netns (/var/run/netns/cni-*), no mount under the environment's base directory.

The shim reads its config file (the handler's ConfigPath, tests/cri/env.py's ``shim_config``) when a
pod's shim starts, so the bench rewrites that file before each RunPodSandbox: empty for a cold pod,
``start = "template"`` for a clone. Only one pod is being started at a time.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from measure import alive, mapping_pss_kib, median, pss_kib  # bench/ (the bench script's directory) is on sys.path

from schemas.uvm_config import default_image_dir
from shim.containerd.leftovers import processes_using
from shim.containerd.task import vm_id_for
from shim.containerd_env import mounts_under, shim_daemons
from tests.cri import api_pb2 as api
from tests.cri.env import CRI_NAMESPACE, RUNC_HANDLER, UVM_HANDLER, CriContainerd, container_config

PRINT_ONCE = ["sh", "-c", "echo ready; exec sleep 3600"]  # the workload's one line, then it waits
SLEEP = ["sleep", "3600"]
READY_LINE = " stdout F ready"  # CRI's log line: "<time> stdout F ready"
WORKLOAD_TIMEOUT_S = 180.0
IDLE_SETTLE_S = 5.0
DENSITY = 10
THREE_TARGET = 1.3


@dataclass
class PodTracker:
    """Every pod the section made, and what it had on the host, for the final check that nothing is left."""

    env: CriContainerd
    run_dir: Path
    netns: dict[str, Path] = field(default_factory=dict)
    pids: dict[str, list[int]] = field(default_factory=dict)  # pod id -> its shim and QEMU pids

    def run_pod(self, config: api.PodSandboxConfig, handler: str) -> str:
        """RunPodSandbox; the pod's id (its netns is remembered)."""
        pod_id = self.env.cri.run_pod(config, handler, timeout=WORKLOAD_TIMEOUT_S).pod_sandbox_id
        self.netns[pod_id] = self.env.netns_of(pod_id) or Path()
        return pod_id

    def note_processes(self, pod_id: str) -> tuple[list[int], list[int]]:
        """The pod's shim daemon(s) and QEMU(s), remembered for the final check."""
        shims, qemus = pod_shims(self.env, pod_id), pod_qemus(self.run_dir, pod_id)
        self.pids[pod_id] = shims + qemus
        return shims, qemus

    def remove(self, pod_id: str) -> float:
        """StopPodSandbox then RemovePodSandbox, as the kubelet does; seconds both took."""
        t0 = time.monotonic()
        self.env.cri.stop_pod(pod_id)
        self.env.cri.remove_pod(pod_id)
        return time.monotonic() - t0


def pod_shims(env: CriContainerd, pod_id: str) -> list[int]:
    """The shim daemons of this containerd serving a pod (the shim's id is its sandbox's)."""
    found = []
    for pid in shim_daemons(address=str(env.address)):
        with contextlib.suppress(OSError):
            if pod_id.encode() in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                found.append(pid)
    return found


def qemu_argv(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def is_qemu(pid: int) -> bool:
    argv = qemu_argv(pid)
    return bool(argv) and Path(argv[0].decode(errors="replace")).name.startswith("qemu-system")


def pod_qemus(run_dir: Path, pod_id: str) -> list[int]:
    """The QEMU of a pod's UVM: it holds the UVM's run directory (its lock) open."""
    return [p for p in processes_using(str(run_dir / vm_id_for(CRI_NAMESPACE, pod_id))) if is_qemu(p)]


class FirstLines:
    """Watches the CRI log files of a pod's containers from t0 on, in a thread of its own (polling every
    10 ms), so that a container's line is timed when it appears even while later containers are still
    being created and started."""

    def __init__(self, pod_config: api.PodSandboxConfig, names: Sequence[str], t0: float) -> None:
        self.paths = {name: Path(pod_config.log_directory) / f"{name}.log" for name in names}
        self.pod = pod_config.metadata.name
        self.t0 = t0
        self.seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"first-lines-{self.pod}", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while len(self.seen) < len(self.paths) and not self._stop.is_set():
            for name, path in self.paths.items():
                if name not in self.seen:
                    with contextlib.suppress(FileNotFoundError):
                        if READY_LINE in path.read_text():
                            self.seen[name] = time.monotonic() - self.t0
            time.sleep(0.01)

    def wait(self, timeout: float = WORKLOAD_TIMEOUT_S) -> dict[str, float]:
        """Seconds since t0 at which each container's first line appeared. Raises RuntimeError after timeout."""
        self._thread.join(timeout)
        self.close()
        if len(self.seen) < len(self.paths):
            raise RuntimeError(f"pod {self.pod}: no first line from {sorted(set(self.paths) - set(self.seen))} "
                               f"after {timeout:g}s")
        return dict(self.seen)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def pod_to_workload(pods: PodTracker, name: str, handler: str, containers: int = 1,
                    expect_clone: bool | None = None) -> dict[str, float]:
    """One pod of `containers` containers that print once: seconds to the pod (RunPodSandbox), to every
    container started, to the first and to the last first line; then the pod is stopped and removed.
    With expect_clone, the pod's QEMU must (True) or must not (False) have been cloned from a template."""
    config = pods.env.pod_config(name)
    names = [f"c{i}" for i in range(containers)]
    t0 = time.monotonic()
    watcher = FirstLines(config, names, t0)
    try:
        pod_id = pods.run_pod(config, handler)
    except BaseException:
        watcher.close()
        raise
    try:
        pod_s = time.monotonic() - t0
        for c in names:
            cid = pods.env.cri.create_container(pod_id, container_config(c, PRINT_ONCE, pod=config), config,
                                                timeout=WORKLOAD_TIMEOUT_S).container_id
            pods.env.cri.start_container(cid, timeout=WORKLOAD_TIMEOUT_S)
        started_s = time.monotonic() - t0
        lines = watcher.wait()
        if handler == UVM_HANDLER:
            _, qemus = pods.note_processes(pod_id)
            if len(qemus) != 1:
                raise RuntimeError(f"pod {name} ({pod_id}): expected one QEMU, found {qemus}")
            cloned = b"-incoming" in qemu_argv(qemus[0])
            if expect_clone is not None and cloned != expect_clone:
                raise RuntimeError(f"pod {name} ({pod_id}): its UVM was {'cloned' if cloned else 'booted cold'}, "
                                   f"not {'cloned from the template' if expect_clone else 'booted cold'}")
    finally:
        watcher.close()
        teardown_s = pods.remove(pod_id)
    return {"pod_s": pod_s, "started_s": started_s, "first_line_s": min(lines.values()),
            "all_lines_s": max(lines.values()), "teardown_s": teardown_s}


@contextlib.contextmanager
def shim_environ(run_dir: Path, state_dir: Path, config: Path) -> Iterator[None]:
    """What containerd passes to the shims it starts (as tests/integration/test_cri.py's `env` fixture sets
    it): the bench's run and state directories, the checkout's guest image, the env's shim config."""
    saved = dict(os.environ)
    os.environ.update(UVMSHIM_RUN_DIR=str(run_dir), UVMSHIM_STATE_DIR=str(state_dir),
                      UVMSHIM_IMAGE_DIR=str(default_image_dir()), UVMSHIM_CONFIG=str(config))
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def balanced_orders(k: int) -> list[list[int]]:
    """Orders of k variants (k even) in which, over k rounds, each variant comes right after every other one
    exactly once (a Williams square): what a pod's teardown may still cost the host while the next pod
    starts is spread over all variants, where a rotation of one order would keep every variant's
    predecessor."""
    first = [0]
    for j in range(1, k):
        first.append((j + 1) // 2 if j % 2 else k - j // 2)
    return [[(x + i) % k for x in first] for i in range(k)]


def workload_figures(pods: PodTracker, cold_config: str, template_config: str, n: int) -> dict[str, Any]:
    """n interleaved rounds of runc, uvm cold, uvm template (one container each) and uvm cold with three,
    after one warm-up pod of each kind (the first template pod builds the template)."""
    shim_config = pods.env.shim_config

    def one(name: str, variant: str) -> dict[str, float]:
        if variant == "runc":
            return pod_to_workload(pods, name, RUNC_HANDLER)
        shim_config.write_text(template_config if variant == "uvm_template" else cold_config)
        # The template's warm-up pod builds it (then clones it): whether it cloned is not asked.
        expect = None if name.endswith("warm") and variant == "uvm_template" else variant == "uvm_template"
        return pod_to_workload(pods, name, UVM_HANDLER, 3 if variant == "uvm_cold_three" else 1, expect_clone=expect)

    variants = ("runc", "uvm_cold", "uvm_template", "uvm_cold_three")
    warmup = {v: one(f"{v.replace('_', '-')}-warm", v) for v in variants}
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    orders = balanced_orders(len(variants))
    for i in range(n):
        for k in orders[i % len(orders)]:
            v = variants[k]
            runs[v].append(one(f"{v.replace('_', '-')}-{i}", v))
        print(f"  round {i + 1}: runc {runs['runc'][-1]['first_line_s']:.2f}s  uvm cold "
              f"{runs['uvm_cold'][-1]['first_line_s']:.2f}s  uvm template {runs['uvm_template'][-1]['first_line_s']:.2f}s  "
              f"uvm cold, three containers {runs['uvm_cold_three'][-1]['all_lines_s']:.2f}s", flush=True)
    med = {v: {k: median([r[k] for r in rs]) for k in rs[0]} for v, rs in runs.items()}
    runc, cold, tmpl = (med[v]["first_line_s"] for v in ("runc", "uvm_cold", "uvm_template"))
    three = med["uvm_cold_three"]["all_lines_s"]
    return {
        "n": n, "measured_by": "each container's first line in its CRI log file, watched every 10 ms from RunPodSandbox on",
        "pod_to_workload_s": {"runc": runc, "uvm_cold": cold, "uvm_template": tmpl},
        "ratios": {"uvm_cold/runc": cold / runc, "uvm_template/runc": tmpl / runc},
        "three_vs_one": {"three_s": three, "one_s": cold, "ratio": three / cold, "target": THREE_TARGET,
                         "three_first_line_s": med["uvm_cold_three"]["first_line_s"]},
        "medians": med, "warmup": warmup,
        "order": [[variants[k] for k in orders[i % len(orders)]] for i in range(n)],
        "runs": {v: {k: [r[k] for r in rs] for k in rs[0]} for v, rs in runs.items()},
    }


def pod_pss(pods: PodTracker, pod_id: str) -> dict[str, float]:
    """Host PSS (MiB) of a running pod's shim daemon and QEMU, and of that QEMU's, its guest RAM."""
    shims, qemus = pods.note_processes(pod_id)
    if len(shims) != 1 or len(qemus) != 1:
        raise RuntimeError(f"pod {pod_id}: expected one shim daemon and one QEMU, found {shims} and {qemus}")
    argv = qemu_argv(qemus[0])
    guest_mib = int(argv[argv.index(b"-m") + 1].rstrip(b"MmGg"))  # the bench's UVMs give -m in MiB
    shim, qemu = pss_kib(shims[0]) / 1024, pss_kib(qemus[0]) / 1024
    guest_ram, qemu_file = mapping_pss_kib(qemus[0], guest_mib << 10) / 1024, pss_kib(qemus[0], "Pss_File") / 1024
    # The rest of QEMU's: its own anonymous memory, under TCG mostly the translation buffer (tb_size_mib unset:
    # QEMU's default size), and shared memory.
    return {"shim_mib": shim, "qemu_mib": qemu, "total_mib": shim + qemu, "guest_mib": float(guest_mib),
            "qemu_guest_ram_mib": guest_ram, "qemu_file_mib": qemu_file,
            "qemu_other_mib": qemu - guest_ram - qemu_file}


def start_sleeping_pod(pods: PodTracker, name: str, containers: int) -> str:
    config = pods.env.pod_config(name)
    pod_id = pods.run_pod(config, UVM_HANDLER)
    for i in range(containers):
        cid = pods.env.cri.create_container(pod_id, container_config(f"s{i}", SLEEP, pod=config), config,
                                            timeout=WORKLOAD_TIMEOUT_S).container_id
        pods.env.cri.start_container(cid, timeout=WORKLOAD_TIMEOUT_S)
    return pod_id


def pss_figures(pods: PodTracker, cold_config: str) -> dict[str, Any]:
    """Idle pods' host PSS: one pod of 1 sleep container alone, one of 3 alone, then DENSITY pods of 1 at once."""
    pods.env.shim_config.write_text(cold_config)
    out: dict[str, Any] = {"settle_s": IDLE_SETTLE_S}
    for containers in (1, 3):
        pod_id = start_sleeping_pod(pods, f"pss-{containers}", containers)
        try:
            time.sleep(IDLE_SETTLE_S)
            out[f"containers_{containers}"] = pod_pss(pods, pod_id)
        finally:
            pods.remove(pod_id)
    started: list[str] = []
    t0 = time.monotonic()
    try:
        for i in range(DENSITY):
            started.append(start_sleeping_pod(pods, f"many-{i}", 1))
        all_up = time.monotonic() - t0
        time.sleep(IDLE_SETTLE_S)
        each = [pod_pss(pods, p) for p in started]
    finally:
        teardown_t0 = time.monotonic()
        for pod_id in started:
            pods.remove(pod_id)
        teardown = time.monotonic() - teardown_t0
    total = {k: sum(m[k] for m in each) for k in each[0]}
    out["many"] = {"pods": DENSITY, "all_up_s": all_up, "teardown_s": teardown, "total": total,
                   "per_pod": {k: v / DENSITY for k, v in total.items()},
                   "per_pod_max_total_mib": max(m["total_mib"] for m in each)}
    return out


def leftovers(pods: PodTracker, wait_s: float = 30.0) -> dict[str, list[str]]:
    """What is left of the section's pods once all were removed (shims exit a little after their last
    task's delete: waited for up to wait_s): empty lists if nothing."""
    deadline = time.monotonic() + wait_s
    while True:
        left = {
            "processes": [f"{pid} ({qemu_argv(pid)[0].decode(errors='replace') if qemu_argv(pid) else '?'}) of pod {pod}"
                          for pod, pids in pods.pids.items() for pid in pids if alive(pid)],
            "shim_daemons": [str(p) for p in shim_daemons(address=str(pods.env.address))],
            "qemu_in_run_dir": [str(p) for p in processes_using(str(pods.run_dir)) if is_qemu(p)],
            "netns": [str(ns) for ns in pods.netns.values() if ns != Path() and ns.exists()],
            "mounts": [str(m) for m in mounts_under(pods.env.base_dir)],
            "pods_in_cri": [p.id for p in pods.env.cri.list_pods().items],
        }
        if not any(left.values()) or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def figures(tmp: Path, state_dir: Path, n: int) -> dict[str, Any]:
    """The pod section: pod to workload (uvm cold, uvm template, runc; three containers against one),
    idle PSS per pod, then the check that nothing of any pod is left. The UVMs' run directory, templates
    and their RAM files are directories of this run, removed at the end.

    The run directory is a short one of its own, not the bench's: a pod's UVM id names the CRI namespace
    and the 64-hex sandbox id (64 characters, shim/containerd/task.py's vm_id_for), and its agent socket's path
    must fit a unix socket address (uvm/builder.py: at most 24 characters are left for the directory)."""
    run_dir = Path(tempfile.mkdtemp(prefix="uvmp-", dir="/tmp"))
    template_dir = tmp / "pod-templates"
    memdir = Path(tempfile.mkdtemp(prefix="uvm-bench-pod-", dir="/dev/shm"))
    cold_config = ""
    template_config = (f'[uvm]\nstart = "template"\ntemplate_dir = "{template_dir}"\n'
                       f'template_memory_dir = "{memdir}"\n')
    env = CriContainerd()
    try:
        with shim_environ(run_dir, state_dir, env.shim_config), env:
            pods = PodTracker(env, run_dir)
            out = workload_figures(pods, cold_config, template_config, n)
            out["template_resident_mib"] = sum(f.stat().st_blocks * 512 for f in memdir.glob("*")) / (1 << 20)
            out["pss"] = pss_figures(pods, cold_config)
            out["left"] = leftovers(pods)
            out["pods_made"] = len(pods.netns)
        out["left"]["run_dir"] = [str(p) for p in run_dir.iterdir()]
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.rmtree(template_dir, ignore_errors=True)
        shutil.rmtree(memdir, ignore_errors=True)
    return out


def print_figures(f: dict[str, Any]) -> None:
    w, r, t, med = f["pod_to_workload_s"], f["ratios"], f["three_vs_one"], f["medians"]
    print(f"pods: pod to workload (RunPodSandbox to the container's first log line), medians of {f['n']}: runc "
          f"{w['runc']:.2f}s; uvm cold {w['uvm_cold']:.2f}s ({r['uvm_cold/runc']:.2f}x runc); uvm from a template "
          f"{w['uvm_template']:.2f}s ({r['uvm_template/runc']:.2f}x runc); the first template pod, which built the "
          f"template, {f['warmup']['uvm_template']['first_line_s']:.2f}s (not counted)")
    print("pods: of which RunPodSandbox " + ", ".join(f"{v} {med[v]['pod_s']:.2f}s" for v in med)
          + "; CreateContainer + StartContainer " + ", ".join(f"{v} {med[v]['started_s'] - med[v]['pod_s']:.2f}s"
                                                           for v in med)
          + "; stop + remove " + ", ".join(f"{v} {med[v]['teardown_s']:.2f}s" for v in med))
    print(f"pods: uvm cold, three containers to all three lines {t['three_s']:.2f}s against one {t['one_s']:.2f}s: "
          f"{t['ratio']:.2f}x (target <= {t['target']}x){'' if t['ratio'] <= t['target'] else ' MISSED'}")
    p = f["pss"]
    for k in (1, 3):
        m = p[f"containers_{k}"]
        print(f"pods: idle uvm pod of {k} sleep container{'s' if k > 1 else ''} ({m['guest_mib']:.0f} MiB guest), host "
              f"PSS shim {m['shim_mib']:.1f} + QEMU {m['qemu_mib']:.1f} = {m['total_mib']:.1f} MiB; of QEMU's, guest "
              f"RAM {m['qemu_guest_ram_mib']:.1f}, file-backed {m['qemu_file_mib']:.1f}, the rest (TCG's translation "
              f"buffer, QEMU's heap) {m['qemu_other_mib']:.1f} MiB")
    many = p["many"]
    tot, per = many["total"], many["per_pod"]
    print(f"pods: {many['pods']} uvm pods at once (all up in {many['all_up_s']:.0f}s): {tot['total_mib']:.0f} MiB in "
          f"total, {per['total_mib']:.1f} MiB per pod (shim {per['shim_mib']:.1f} + QEMU {per['qemu_mib']:.1f}; the "
          f"largest {many['per_pod_max_total_mib']:.1f}); stopped and removed in {many['teardown_s']:.0f}s")
    left = {k: v for k, v in f["left"].items() if v}
    print(f"pods: after removing all {f['pods_made']} pods: " + ("nothing left" if not left else f"LEFT {left}"))
