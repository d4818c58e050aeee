"""`make demo`, the Kubernetes half: containerd's own CRI plugin runs a pod with the `uvm` runtime handler,
driven as the kubelet drives it (this package's CRI client stands in for the kubelet): two containers in
one UVM, the pod's address printed, the host fetching a page served in the pod, one container reaching
the other over localhost; then the pod is stopped and removed and nothing of it is left."""

from __future__ import annotations

import os
import sys
import time
import urllib.request
from pathlib import Path

from shim.containerd_env import ContainerdEnvError, shim_daemons
from tests.cri.client import CriError
from tests.cri.env import CriContainerd, container_config

PAGE = "hello from a pod in a UVM"
HTTPD = ["sh", "-c", f"mkdir -p /www && echo '{PAGE}' > /www/index.html && exec httpd -f -p 8080 -h /www"]


def fetch(url: str, patience: float = 60.0) -> str:
    deadline = time.monotonic() + patience
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return bytes(r.read()).decode().strip()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def qemu_of(pod_id: str) -> list[int]:
    """The QEMU processes whose command line names the pod's UVM (its id ends in the sandbox id's start)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if Path(argv[0].decode(errors="replace")).name.startswith("qemu-system") and \
                any(pod_id[:32].encode() in a for a in argv):
            found.append(int(pid))
    return found


def running(pid: int) -> bool:
    """True while the process exists and is not a zombie waiting for its parent (containerd) to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def gone(pids: list[int], patience: float = 15.0) -> list[int]:
    """The pids still running after waiting up to `patience` seconds for them to end: a shim ends shortly
    after containerd's Shutdown returns, not before."""
    deadline = time.monotonic() + patience
    while (left := [p for p in pids if running(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def step(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def main() -> int:
    env = CriContainerd()
    os.environ["UVMSHIM_CONFIG"] = str(env.shim_config)  # containerd passes it on to the shim
    try:
        step("starting a private containerd with its CRI plugin (CNI bridge, runtime handler uvm) ...")
        with env:
            config = env.pod_config("demo")
            t0 = time.monotonic()
            pod = env.cri.run_pod(config, "uvm").pod_sandbox_id
            web = env.cri.create_container(pod, container_config("web", HTTPD, pod=config), config).container_id
            env.cri.start_container(web)
            client = env.cri.create_container(pod, container_config("client", ["sleep", "3600"], pod=config),
                                              config).container_id
            env.cri.start_container(client)
            took = time.monotonic() - t0
            ip = env.cri.pod_status(pod).status.network.ip
            qemus = qemu_of(pod)
            shims = [p for p in shim_daemons(address=str(env.address)) if pod.encode() in
                     Path(f"/proc/{p}/cmdline").read_bytes()]
            step(f"pod {pod[:12]}: 2 containers running in {len(qemus)} UVM (QEMU pid {qemus}), served by "
                 f"{len(shims)} shim, address {ip} ({took:.1f}s from RunPodSandbox to both started)")
            step(f"host: GET http://{ip}:8080/ -> {fetch(f'http://{ip}:8080/')!r}")
            res = env.cri.exec_sync(client, ["wget", "-q", "-O", "-", "http://127.0.0.1:8080/"], exec_timeout=30)
            step(f"client container: wget http://127.0.0.1:8080/ -> {res.stdout.decode().strip()!r} "
                 f"(exit {res.exit_code})")
            kernels = {env.cri.exec_sync(c, ["uname", "-r"]).stdout.decode().strip() for c in (web, client)}
            step(f"both containers see one kernel: {', '.join(sorted(kernels))} (the host runs {os.uname().release})")
            if res.exit_code != 0 or len(qemus) != 1 or len(shims) != 1 or len(kernels) != 1:
                step("FAILED: the pod is not one UVM serving both containers")
                return 1
            env.cri.stop_pod(pod)
            env.cri.remove_pod(pod)
            left = {"QEMU": qemu_of(pod), "shims": gone(shims),
                    "pods": [p.id for p in env.cri.list_pods().items]}
            if any(left.values()):
                step(f"FAILED: left after RemovePodSandbox: {left}")
                return 1
            step("pod stopped and removed: no QEMU, no shim, no pod left; stopping containerd")
        return 0
    except (ContainerdEnvError, CriError, OSError) as e:
        step(f"FAILED: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
