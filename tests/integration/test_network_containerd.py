"""Container networking through containerd: a namespace CNI filled (Debian's bridge and host-local
plugins, run by the test on a private configuration) joined by a task of the shim, then CNI DEL; and
`ctr run --cni` with runc and with the shim side by side (ctr reads /etc/cni/net.d and /opt/cni/bin:
the test provides them for its run and restores what was there)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import netns as pyroute2_netns

from shim.containerd_env import PrivateContainerd
from tests.integration.ctr import RUNTIME, assert_clean, run, wait_status
from tests.integration.ctr import nothing_outlives_its_test as _nothing_outlives_its_test
from tests.netfixtures import (
    CNI_BIN,
    cni,
    cni_bridge_conf,
    delete_link,
    fetch,
    free_subnet,
    host_links,
    host_page,
    in_ns,
)

pytestmark = [pytest.mark.vm,
              pytest.mark.skipif(not os.path.exists(f"{CNI_BIN}/bridge"), reason="no CNI plugins in /usr/lib/cni")]

CNI_CONF_DIR = Path("/etc/cni/net.d")
CNI_BIN_DIR = Path("/opt/cni/bin")


@pytest.fixture(scope="module")
def env(containerd_env: tuple[PrivateContainerd, Path]) -> tuple[PrivateContainerd, Path]:
    return containerd_env


@pytest.fixture(autouse=True)
def nothing_outlives_its_test(env: tuple[PrivateContainerd, Path]) -> Iterator[None]:
    yield from _nothing_outlives_its_test(env)


@pytest.fixture
def network(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A private CNI network: its conf (a unique bridge, a free subnet, IPAM data in tmp_path); the bridge
    the plugin makes is removed afterwards."""
    sfx = secrets.token_hex(3)
    subnet = free_subnet()
    conf = cni_bridge_conf(f"uvmtest-{sfx}", f"uvbr{sfx}", subnet, str(tmp_path / "ipam"))
    try:
        yield {"conf": conf, "subnet": subnet, "gateway": f"{subnet}.1"}
    finally:
        delete_link(conf["bridge"])


def our_qdiscs_and_taps(netns_path: str) -> list[str]:
    from uvm.network import open_netns

    fd = open_netns(netns_path)
    try:
        def look(ipr: Any) -> list[str]:
            names = {int(link["index"]): str(link.get("IFLA_IFNAME")) for link in ipr.get_links()}
            return sorted([n for n in names.values() if n.endswith("_uvm")] +
                          [f"{names.get(q['index'])}:{q.get('TCA_KIND')}" for q in ipr.get_qdiscs()
                           if q.get("TCA_KIND") == "ingress"])

        found: list[str] = in_ns(fd, look)
        return found
    finally:
        os.close(fd)


def test_a_task_joins_the_namespace_cni_filled_and_cni_del_succeeds(env: tuple[PrivateContainerd, Path],
                                                                      network: dict[str, Any]) -> None:
    ctd, rootfs = env
    name = f"uvmt-cni-{secrets.token_hex(3)}"
    pyroute2_netns.create(name)
    netns = f"/var/run/netns/{name}"
    tid = "cnijoin"
    try:
        result = cni("ADD", network["conf"], name, netns)
        address = result["ips"][0]["address"].split("/")[0]
        veth_mac = next(i["mac"] for i in result["interfaces"] if i.get("sandbox") == netns)
        res = run(ctd, "run", "-d", *RUNTIME, "--with-ns", f"network:{netns}", "--rootfs", str(rootfs), tid,
                  "/bin/sh", "-c", "mkdir -p /tmp/www && echo from the container > /tmp/www/index.html && "
                                   "exec httpd -f -p 8080 -h /tmp/www")
        assert res.returncode == 0, res.stderr
        assert fetch(f"http://{address}:8080/") == b"from the container\n"  # host -> container
        with host_page(network["gateway"]) as port:
            res = run(ctd, "task", "exec", "--exec-id", "e1", tid, "/bin/sh", "-c",
                      f"cat /sys/class/net/eth0/address; ip -o -4 addr show dev eth0; ip route; "
                      f"wget -q -O - http://{network['gateway']}:{port}/")
        out = res.stdout.decode()
        assert res.returncode == 0, res.stderr
        assert out.splitlines()[0] == veth_mac and f"inet {address}/24" in out, out
        assert re.search(rf"default via {re.escape(network['gateway'])} dev eth0", out), out
        assert out.endswith("from the host\n"), out  # container -> host
        assert our_qdiscs_and_taps(netns) == ["eth0:ingress", "tap0_uvm", "tap0_uvm:ingress"]
        assert run(ctd, "task", "kill", "-s", "SIGKILL", tid).returncode == 0
        wait_status(ctd, tid, "STOPPED")
        assert run(ctd, "task", "rm", tid).returncode == 0
        assert run(ctd, "container", "rm", tid).returncode == 0
        assert our_qdiscs_and_taps(netns) == []  # left as CNI made it
        cni("DEL", network["conf"], name, netns)
        assert not list((Path(network["conf"]["ipam"]["dataDir"]) / network["conf"]["name"]).glob("10.*"))
    finally:
        run(ctd, "task", "rm", "-f", tid)
        run(ctd, "container", "rm", tid)
        pyroute2_netns.remove(name)
    assert_clean(ctd, tid)


def test_a_sigkilled_shim_leaves_no_tap_or_filter_after_the_delete_action(env: tuple[PrivateContainerd, Path],
                                                                          network: dict[str, Any]) -> None:
    from tests.integration.ctr import shim_processes, vm_processes

    ctd, rootfs = env
    name = f"uvmt-cni-{secrets.token_hex(3)}"
    pyroute2_netns.create(name)
    netns = f"/var/run/netns/{name}"
    tid = "cnikill"
    try:
        cni("ADD", network["conf"], name, netns)
        res = run(ctd, "run", "-d", *RUNTIME, "--with-ns", f"network:{netns}", "--rootfs", str(rootfs), tid,
                  "/bin/sh", "-c", "while true; do sleep 1; done")
        assert res.returncode == 0, res.stderr
        assert our_qdiscs_and_taps(netns) == ["eth0:ingress", "tap0_uvm", "tap0_uvm:ingress"]
        shim = [p for p in shim_processes(ctd) if f"\0{tid}\0".encode() in Path(f"/proc/{p}/cmdline").read_bytes()]
        os.kill(shim[0], 9)
        deadline = time.monotonic() + 60  # containerd runs the delete action, which kills QEMU
        while vm_processes(ctd, tid) or our_qdiscs_and_taps(netns):
            assert time.monotonic() < deadline, our_qdiscs_and_taps(netns)
            time.sleep(0.2)
        cni("DEL", network["conf"], name, netns)
    finally:
        run(ctd, "task", "rm", "-f", tid)
        run(ctd, "container", "rm", tid)
        pyroute2_netns.remove(name)
    from tests.integration.ctr import remove_ctr_fifos

    remove_ctr_fifos(ctd, tid)
    assert_clean(ctd, tid)


@contextlib.contextmanager
def cni_for_ctr(conf: dict[str, Any]) -> Iterator[None]:
    """What `ctr run --cni` reads (/etc/cni/net.d, /opt/cni/bin), ours for the block, then as it was."""
    made: list[Path] = []
    moved: list[tuple[Path, Path]] = []
    backup = Path(f"/tmp/uvmt-cni-backup-{os.getpid()}")
    try:
        for d in (CNI_CONF_DIR, CNI_BIN_DIR.parent):
            missing = [p for p in (d, *d.parents) if not p.exists()]
            if missing:
                d.mkdir(parents=True)
                made.append(missing[-1])  # the topmost it made
        if CNI_CONF_DIR.exists():
            backup.mkdir()
            for f in sorted(CNI_CONF_DIR.iterdir()):  # ctr takes the first configuration: only ours is there
                moved.append((f, backup / f.name))
                shutil.move(f, backup / f.name)
        (CNI_CONF_DIR / "10-uvmtest.conflist").write_text(json.dumps(
            {"cniVersion": conf["cniVersion"], "name": conf["name"], "plugins": [conf]}))
        if not CNI_BIN_DIR.exists():
            CNI_BIN_DIR.symlink_to(CNI_BIN)
            made.append(CNI_BIN_DIR)
        yield
    finally:
        (CNI_CONF_DIR / "10-uvmtest.conflist").unlink(missing_ok=True)
        for original, kept in moved:
            shutil.move(kept, original)
        with contextlib.suppress(OSError):
            backup.rmdir()
        for d in reversed(made):
            if d.is_symlink():
                d.unlink()
            else:
                shutil.rmtree(d, ignore_errors=True)


def test_ctr_run_cni_with_runc_and_with_the_shim(env: tuple[PrivateContainerd, Path], network: dict[str, Any]) -> None:
    """ctr run --cni configures /proc/<task pid>/ns/net after the create: with the shim that is QEMU's
    namespace, whose NIC then takes the veth over. Both runtimes give the container an address in the
    network and reach the host; the host's own namespace gains no link (taps, eth0) from either."""
    ctd, rootfs = env
    before = host_links()
    with cni_for_ctr(network["conf"]), host_page("0.0.0.0") as port:  # (the bridge comes with the first ADD)
        for runtime in ("io.containerd.runc.v2", "io.containerd.uvm.v1"):
            tid = f"cnirun{runtime.split('.')[2]}"
            res = run(ctd, "run", "--rm", "--cni", "--runtime", runtime, "--rootfs", str(rootfs), tid, "/bin/sh", "-c",
                      f"ip -o -4 addr show dev eth0; wget -q -O - http://{network['gateway']}:{port}/")
            out = res.stdout.decode()
            assert res.returncode == 0, (runtime, res.stderr)
            assert re.search(rf"inet {re.escape(network['subnet'])}\.\d+/24", out), (runtime, out)
            assert out.endswith("from the host\n"), (runtime, out)
            assert_clean(ctd, tid)
    left = host_links() - before - {network["conf"]["bridge"]}
    assert not left, f"links left in the host's namespace: {left}"
