"""Template figures for `make bench` (issue: fast start), each against a floor of the same run.

* clone start: ``UtilityVM.start()`` with ``start="template"`` to the answer of the clone's handshake (resume_clone),
  interleaved with F0 boots: target <= 0.1x F0;
* ``ctr run --rm ... date`` to workload with the runtime config's ``start = "template"`` against the
  same with a cold UVM, interleaved: target <= 0.3x;
* host PSS per idle clone (QEMU; the template's RAM file, shared by all clones, reported apart):
  target <= 40 MiB; and a cold UVM's QEMU with the TCG translation buffer bounded: target <= 100 MiB,
  alone and, three at once, with the host's KSM merging their identical guest pages;
* density: 20 clones each running a container at once, all answering, all cleaned up.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from measure import alive, median, smaps_split  # bench/ (the bench script's directory) is on sys.path

from schemas import oci
from schemas.uvm_config import Share, UvmConfig
from uvm import template, template_builder
from uvm.container import Rootfs
from uvm.vm import UtilityVM

IDLE_SETTLE_S = 3.0
DENSITY = 20


async def clone_start_figures(config: Callable[..., UvmConfig], f0: Callable[[], float], n: int) -> dict[str, Any]:
    t0 = time.monotonic()
    built = await template_builder.build(config())
    build_s = time.monotonic() - t0
    runs: dict[str, list[float]] = {"F0": [], "clone": []}
    for i in range(n):
        runs["F0"].append(f0())
        vm = UtilityVM(config(start="template"))
        try:
            await vm.start()
            if vm.started_from != "template":
                raise RuntimeError(f"clone {i} booted cold: {vm.start_note}")
            runs["clone"].append(vm.boot_seconds or 0.0)
        finally:
            await vm.close()
        print(f"  clone {i + 1}: F0 {runs['F0'][-1]:.2f}s  clone to agent ready {runs['clone'][-1]:.3f}s", flush=True)
    m = {k: median(v) for k, v in runs.items()}
    return {"build_s": build_s, "state_bytes": built.meta.state_size, "F0": m["F0"], "clone_s": m["clone"],
            "clone_vs_F0": m["clone"] / m["F0"], "n": n, "runs": runs}


async def idle_clone_pss(config: Callable[..., UvmConfig], k: int = 3) -> dict[str, Any]:
    """k idle clones at once: per-clone QEMU PSS, split into the template file's share and the rest."""
    t = await template_builder.build(config())
    vms = [UtilityVM(config(start="template")) for _ in range(k)]
    try:
        for vm in vms:
            await vm.start()
        await asyncio.sleep(IDLE_SETTLE_S)
        per = [smaps_split(vm.backend.pid, str(t.memory)) for vm in vms if vm.backend and vm.backend.pid]
        st = os.stat(t.memory)
        return {"clones": k, **{key: statistics.mean(p[key] for p in per) for key in per[0]},
                "template_resident_mib": st.st_blocks * 512 / (1 << 20)}
    finally:
        await asyncio.gather(*(vm.close() for vm in vms))


async def cold_pss(config: Callable[..., UvmConfig], tb_size_mib: int | None) -> dict[str, float]:
    """One idle cold UVM's QEMU PSS, with the TCG translation buffer bounded (or QEMU's default)."""
    vm = UtilityVM(config(tb_size_mib=tb_size_mib))
    try:
        await vm.start()
        await asyncio.sleep(IDLE_SETTLE_S)
        assert vm.backend is not None and vm.backend.pid is not None
        split = smaps_split(vm.backend.pid, "")
        return {"start_s": vm.boot_seconds or 0.0, "pss_mib": split["pss_mib"], "uss_mib": split["uss_mib"]}
    finally:
        await vm.close()


KSM = Path("/sys/kernel/mm/ksm")
KSM_SETTLE_S = 30.0


async def cold_pss_with_ksm(config: Callable[..., UvmConfig], tb_size_mib: int, k: int = 3) -> dict[str, Any] | None:
    """k idle cold UVMs' QEMU PSS before and after the host's KSM merged their identical guest pages
    (QEMU marks guest RAM mergeable; KSM itself is the host operator's switch). The bench turns
    KSM on for this measurement only and restores the host's settings (unmerging first)."""
    if not (KSM / "run").exists() or not os.access(KSM / "run", os.W_OK):
        return None
    keys = ("run", "pages_to_scan", "sleep_millisecs")
    saved = {key: (KSM / key).read_text().strip() for key in keys}
    vms = [UtilityVM(config(tb_size_mib=tb_size_mib)) for _ in range(k)]

    def per_vm() -> float:
        return statistics.mean(smaps_split(vm.backend.pid, "")["pss_mib"] for vm in vms if vm.backend and vm.backend.pid)

    try:
        for vm in vms:
            await vm.start()
        await asyncio.sleep(IDLE_SETTLE_S)
        before = per_vm()
        (KSM / "pages_to_scan").write_text("5000")
        (KSM / "sleep_millisecs").write_text("20")
        (KSM / "run").write_text("1")
        sharing, deadline = -1, time.monotonic() + KSM_SETTLE_S
        while time.monotonic() < deadline:  # until a scan merges nothing more
            await asyncio.sleep(5)
            now = int((KSM / "pages_sharing").read_text())
            if now == sharing:
                break
            sharing = now
        return {"vms": k, "tb_size_mib": tb_size_mib, "before_mib": before, "after_mib": per_vm(),
                "pages_sharing": sharing}
    finally:
        (KSM / "run").write_text("2")  # unmerge everything it merged
        for key in ("pages_to_scan", "sleep_millisecs", "run"):
            (KSM / key).write_text(saved[key])
        await asyncio.gather(*(vm.close() for vm in vms))


async def density(config: Callable[..., UvmConfig], rootfs: Path, count: int = DENSITY,
                  parallel: int = 4) -> dict[str, Any]:
    """count clones at once, each running a container; every container must answer an exec."""
    share = [Share(tag="rootfs", host_path=rootfs)]
    await template_builder.build(config(shares=share))
    vms = [UtilityVM(config(start="template", shares=share)) for _ in range(count)]
    gate = asyncio.Semaphore(parallel)
    t0 = time.monotonic()

    async def one(vm: UtilityVM) -> bool:
        async with gate:
            await vm.start()
            c = await vm.create_container("c", oci.default_spec(["sh", "-c", "sleep 600"], env=["PATH=/bin"]),
                                          Rootfs(share="rootfs"))
            await c.start()
        p = await c.create_process(oci.Process(args=["sh", "-c", "echo $((6*7))"], env=["PATH=/bin"]))
        assert p.stdout is not None
        out = await p.stdout.read_all()
        await p.wait_timeout(120)
        return out == b"42\n" and vm.started_from == "template"

    try:
        results = await asyncio.gather(*(one(vm) for vm in vms), return_exceptions=True)
        all_up = time.monotonic() - t0
        pss = sum(smaps_split(vm.backend.pid, "")["pss_mib"] for vm in vms if vm.backend and vm.backend.pid)
        errors = [repr(r) for r in results if isinstance(r, BaseException)]
        answered = sum(1 for r in results if r is True)
    finally:
        await asyncio.gather(*(vm.close() for vm in vms), return_exceptions=True)
    left = [vm.id for vm in vms if vm.backend is not None and vm.backend.pid is not None and alive(vm.backend.pid)]
    return {"clones": count, "answered": answered, "all_up_s": all_up, "total_qemu_pss_mib": pss,
            "errors": errors[:3], "qemu_left": left}


def print_figures(f: dict[str, Any]) -> None:
    c, p, d = f["clone"], f["idle_pss"], f["density"]
    print(f"template: built in {c['build_s']:.1f}s, device state {c['state_bytes'] / 1024:.0f} KiB; clone to agent "
          f"ready {c['clone_s']:.3f}s vs F0 {c['F0']:.2f}s in the same runs: {c['clone_vs_F0']:.3f}x (target <= 0.1x, "
          f"medians of {c['n']})")
    if "ctr" in f:
        r = f["ctr"]
        print(f"template: `ctr run --rm` of date to workload {r['template_s']:.2f}s vs cold {r['cold_s']:.2f}s: "
              f"{r['ratio']:.2f}x (target <= 0.3x, medians of {r['n']})")
    print(f"template: idle clone QEMU PSS {p['own_pss_mib']:.1f} MiB + {p['template_pss_mib']:.1f} MiB share of the "
          f"template RAM file ({p['template_resident_mib']:.0f} MiB resident, shared by all) with {p['clones']} "
          f"running (target <= 40 MiB + the template); USS {p['uss_mib']:.1f} MiB")
    for name, cold in f["cold_pss"].items():
        print(f"template: cold UVM QEMU PSS with tb-size {name}: {cold['pss_mib']:.1f} MiB (start {cold['start_s']:.2f}s)"
              f"{' (target <= 100 MiB)' if name != 'default' else ''}")
    if f.get("cold_ksm"):
        m = f["cold_ksm"]
        print(f"template: cold UVM QEMU PSS with tb-size {m['tb_size_mib']} MiB and the host's KSM on, {m['vms']} idle: "
              f"{m['after_mib']:.1f} MiB each (before merging {m['before_mib']:.1f}; {m['pages_sharing']} pages "
              "sharing) (target <= 100 MiB; KSM is the operator's choice, see README)")
    print(f"template: density {d['answered']}/{d['clones']} clones each running a container answered, all up in "
          f"{d['all_up_s']:.1f}s, QEMU PSS {d['total_qemu_pss_mib']:.0f} MiB in total; QEMU left after close: "
          f"{len(d['qemu_left'])}{'; errors: ' + '; '.join(d['errors']) if d['errors'] else ''}")


async def figures(tmp: Path, run_dir: Path, state_dir: Path, f0: Callable[[], float], n: int,
                  rootfs: Path) -> dict[str, Any]:
    memdir = Path("/dev/shm") / f"uvm-bench-{os.getpid()}"

    def config(**kw: Any) -> UvmConfig:
        return UvmConfig(run_dir=run_dir, state_dir=state_dir, template_memory_dir=memdir, boot_timeout=120, **kw)

    try:
        out: dict[str, Any] = {"clone": await clone_start_figures(config, f0, n)}
        out["idle_pss"] = await idle_clone_pss(config)
        out["cold_pss"] = {"default": await cold_pss(config, None), "32 MiB": await cold_pss(config, 32),
                           "16 MiB": await cold_pss(config, 16)}
        out["cold_ksm"] = await cold_pss_with_ksm(config, 32)
        out["density"] = await density(config, rootfs)
        return out
    finally:
        for row in template.list_templates(config()):
            template.remove(Path(row["path"]))
        for leftover in memdir.iterdir() if memdir.exists() else []:
            leftover.unlink()
        if memdir.exists():
            memdir.rmdir()
