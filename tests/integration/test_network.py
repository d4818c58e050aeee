"""A UVM takes over a container's network namespace (uvm/network.py, uvm/guest/net.py), on real VMs and
real namespaces: a namespace as CNI's bridge plugin leaves it (tests/netfixtures.py), the host on the
bridge's side. The container shares its UVM's network namespace, so it sees the veth's identity."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import netns as pyroute2_netns

from schemas import oci
from schemas.uvm_config import Share, UvmConfig
from tests.conftest import assert_no_leftovers
from tests.netfixtures import NEIGH_MAC, PodNet, fetch, host_page, in_ns, pod_network
from uvm import errors
from uvm import network as net
from uvm.container import Container, Rootfs
from uvm.vm import UtilityVM

pytestmark = [pytest.mark.vm,
              pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces, veths and taps need root")]

ROOTFS = Rootfs(share="shares", path="busybox")
ENV = ["PATH=/bin"]
_seq = iter(range(1, 1_000_000))


@pytest.fixture
def pod() -> Iterator[PodNet]:
    with pod_network(inside="eth0") as made:  # named as CNI names it
        yield made


def networked(make_config: Callable[..., UvmConfig], busybox_rootfs: Path, namespace: str, **kw: object) -> UtilityVM:
    return UtilityVM(make_config(shares=[Share(tag="shares", host_path=busybox_rootfs.parent)], network_namespace=namespace,
                                 **kw))


def container_spec(*args: str) -> oci.Spec:
    """A spec whose container shares its UVM's network namespace (what the shim's task makes of one)."""
    spec = oci.default_spec(list(args), env=ENV)
    assert spec.linux is not None
    spec.linux["namespaces"] = [ns for ns in spec.linux["namespaces"] if ns["type"] != "network"]
    return spec


async def run_in_container(vm: UtilityVM, *args: str) -> tuple[int | None, str]:
    c = await vm.create_container(f"net{next(_seq)}", container_spec(*args), ROOTFS)
    await c.start()
    assert c.init.stdout is not None
    out = await asyncio.wait_for(c.init.stdout.read_all(), 120)
    code = (await c.wait_timeout(120)).exit_code
    await c.close()
    return code, out.decode(errors="replace")


@contextlib.asynccontextmanager
async def serving(vm: UtilityVM, *args: str) -> AsyncIterator[Container]:
    c = await vm.create_container(f"srv{next(_seq)}", container_spec(*args), ROOTFS)
    await c.start()
    try:
        yield c
    finally:
        await c.terminate()
        await c.wait_timeout(60)
        await c.close()


def namespace_state(pod: PodNet) -> dict[str, Any]:
    """The links and qdiscs of the pod's namespace, and its veth's addresses."""

    def look(ipr: Any) -> dict[str, object]:
        links = {int(link["index"]): link.get("IFLA_IFNAME") for link in ipr.get_links()}
        qdiscs = sorted((links.get(q["index"]), q.get("TCA_KIND")) for q in ipr.get_qdiscs())
        addrs = sorted(a.get("IFA_ADDRESS") for a in ipr.get_addr(family=2))
        return {"links": sorted(links.values()), "qdiscs": qdiscs, "addresses": addrs}

    state: dict[str, Any] = in_ns(pod.fd, look)
    return state


async def check_the_pod_network(vm: UtilityVM, pod: PodNet) -> None:
    """The container sees the veth's address, MAC, MTU and routes; traffic flows both ways."""
    code, out = await run_in_container(vm, "sh", "-c", "cat /sys/class/net/eth0/address /sys/class/net/eth0/mtu; "
                                                       "ip -4 addr show dev eth0; ip route")
    assert code == 0, out
    assert out.splitlines()[:2] == [pod.veth_mac, "1400"], out
    assert f"inet {pod.address}/24" in out
    assert re.search(rf"default via {re.escape(pod.gateway)} dev eth0", out), out
    assert re.search(rf"{re.escape(pod.extra_route)}/24 dev eth0 scope link", out), out
    code, out = await run_in_container(vm, "sh", "-c", f"arp -n | grep {pod.neighbour}")
    assert code == 0 and "PERM" in out, out  # the permanent neighbour
    # host -> container: an HTTP server in the container, fetched from the bridge's side
    async with serving(vm, "sh", "-c", "mkdir -p /tmp/www && echo from the container > /tmp/www/index.html && "
                                       "exec httpd -f -p 8080 -h /tmp/www"):
        page = await asyncio.to_thread(fetch, f"http://{pod.address}:8080/")
        assert page == b"from the container\n"
    # container -> host: a server on the bridge's address
    with host_page(pod.gateway) as port:
        code, out = await run_in_container(vm, "wget", "-q", "-O", "-", f"http://{pod.gateway}:{port}/")
        assert (code, out) == (0, "from the host\n")
    # ping both ways (from the UVM itself: the container shares its network; ping needs raw sockets)
    res = await vm.run(["ping", "-c", "1", "-W", "10", pod.gateway])
    assert res.exit_status == 0, res.stdout
    host_ping = await asyncio.to_thread(subprocess.run, ["busybox", "ping", "-c", "1", "-W", "10", pod.address],
                                        capture_output=True, check=False)
    assert host_ping.returncode == 0, host_ping.stdout


async def test_a_uvm_takes_over_a_pod_namespace_and_leaves_it_as_cni_made_it(
        make_config: Callable[..., UvmConfig], busybox_rootfs: Path, suite_dir: Path, pod: PodNet) -> None:
    before = namespace_state(pod)
    vm = networked(make_config, busybox_rootfs, pod.path)
    try:
        await vm.start()
        assert vm.backend is not None and vm.backend.pid is not None
        # QEMU runs in the pod's namespace: /proc/<pid>/ns/net is it (CRI names that in a pod's specs)
        assert os.stat(f"/proc/{vm.backend.pid}/ns/net").st_ino == os.fstat(pod.fd).st_ino
        during = namespace_state(pod)
        assert "tap0_uvm" in during["links"] and (pod.veth, "ingress") in during["qdiscs"]
        await check_the_pod_network(vm, pod)
    finally:
        await vm.close()
    assert namespace_state(pod) == before  # no tap, no qdisc; the veth keeps its address
    assert_no_leftovers(suite_dir)


async def test_a_new_namespace_is_taken_over_once_cni_fills_it(
        make_config: Callable[..., UvmConfig], busybox_rootfs: Path, suite_dir: Path, pod: PodNet) -> None:
    """`ctr run --cni`: QEMU starts in a namespace of its own with a NIC; CNI then adds the veth in
    /proc/<QEMU's pid>/ns/net (here: the pod fixture's veth moved there), and the guest takes it over
    without a restart."""
    vm = networked(make_config, busybox_rootfs, "new")
    try:
        await vm.start()
        assert vm.backend is not None and vm.backend.pid is not None
        assert await vm.settle_network() is False  # nothing there yet
        code, out = await run_in_container(vm, "ip", "-o", "-4", "addr")
        assert code == 0 and "eth0" not in out, out  # (the NIC is there but unconfigured)
        qemu_ns = net.open_netns(f"/proc/{vm.backend.pid}/ns/net")
        try:
            in_ns(pod.fd, lambda ipr: ipr.link("set", index=ipr.link_lookup(ifname=pod.veth)[0], net_ns_fd=qemu_ns))

            def configure(ipr: Any) -> None:  # moving a link drops its addresses and routes: CNI sets them there
                i = ipr.link_lookup(ifname=pod.veth)[0]
                ipr.link("set", index=i, mtu=1400, state="up")
                ipr.addr("add", index=i, address=pod.address, prefixlen=24)
                ipr.route("add", dst="0.0.0.0/0", gateway=pod.gateway, oif=i)
                ipr.route("add", dst=f"{pod.extra_route}/24", oif=i, scope=253)
                ipr.neigh("add", dst=pod.neighbour, lladdr=NEIGH_MAC, ifindex=i, state=0x80)

            in_ns(qemu_ns, configure)
            assert await vm.settle_network() is True  # what a container's start does
            await check_the_pod_network(vm, pod)
        finally:
            os.close(qemu_ns)
    finally:
        await vm.close()
    assert_no_leftovers(suite_dir)


async def test_bad_network_namespaces_are_refused_by_name_and_leave_nothing(
        make_config: Callable[..., UvmConfig], busybox_rootfs: Path, suite_dir: Path, pod: PodNet,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = f"uvmt-empty-{os.getpid()}"
    pyroute2_netns.create(empty)
    try:
        for namespace, problem in (
                (str(tmp_path / "gone"), f"netns {tmp_path / 'gone'}: not found"),
                ("/etc/hostname", "not a namespace file, not a network namespace"),
                (f"/var/run/netns/{empty}", "no link with an address to take over")):
            with pytest.raises(errors.NetworkError, match=re.escape(problem)):
                await networked(make_config, busybox_rootfs, namespace).start()
            assert_no_leftovers(suite_dir)
    finally:
        pyroute2_netns.remove(empty)
    before = namespace_state(pod)
    monkeypatch.setattr(net, "TUN_DEVICE", "/nonexistent/tun")  # a host without /dev/net/tun
    with pytest.raises(errors.NetworkError, match="tap0_uvm: create tap on /nonexistent/tun"):
        await networked(make_config, busybox_rootfs, pod.path).start()
    monkeypatch.undo()
    assert namespace_state(pod) == before
    # What the guest refuses (its busybox adds no permanent IPv6 neighbour): the start fails, nothing left.
    in_ns(pod.fd, lambda ipr: ipr.neigh("add", dst="fd00::9", lladdr="02:00:5e:10:00:0a",
                                        ifindex=ipr.link_lookup(ifname=pod.veth)[0], state=0x80))
    with pytest.raises(errors.StartError, match="permanent IPv6 neighbour"):
        await networked(make_config, busybox_rootfs, pod.path).start()
    after = namespace_state(pod)
    assert after == before
    assert_no_leftovers(suite_dir)


async def test_a_clone_takes_over_the_namespace_too(make_config: Callable[..., UvmConfig], busybox_rootfs: Path,
                                                    suite_dir: Path, pod: PodNet) -> None:
    """A template of a networked shape has a NIC (on a tap of its own, in a namespace of its own); a clone's
    NIC has the template's MAC until the guest gives it the veth's."""
    vm = networked(make_config, busybox_rootfs, pod.path, start="template")
    try:
        await vm.start()
        assert vm.started_from == "template", vm.start_note
        await check_the_pod_network(vm, pod)
    finally:
        await vm.close()
    assert_no_leftovers(suite_dir)
