"""uvm.network on real namespaces (no VM): what read_config sees, the taps and tc redirects attach
makes and detach removes, crash cleanup, namespace helpers, waiting for CNI, and frames that really
go through the redirect both ways.

Every fixture is private (names with a random suffix, a subnet no route of the host uses) and
removed afterwards, even when a test fails. All traffic is ARP on a bridge and a veth of our own.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import os
import secrets
import select
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pyroute2.iproute.linux import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from tests.netfixtures import NEIGH_MAC, PodNet, in_ns, index_of, pod_network
from uvm import network as net
from uvm.errors import NetworkError

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces, veths and taps need root"),
    pytest.mark.skipif(not os.path.exists("/dev/net/tun"), reason="no /dev/net/tun (the tun module is not loaded)"),
    pytest.mark.timeout(20),
]

IFF_UP = 0x1
TUNGETIFF = 0x800454D2
VNET_HDR_LEN = 10  # struct virtio_net_hdr, the default with IFF_VNET_HDR
ETH_P_ARP = 0x0806
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4


@pytest.fixture
def pod() -> Iterator[PodNet]:
    with pod_network() as made:
        yield made


@pytest.fixture
def attachments() -> Iterator[list[net.TapAttachment]]:
    """Attachments a test made: their fds are closed afterwards, whatever happened."""
    made: list[net.TapAttachment] = []
    yield made
    for a in made:
        a.close_fds()


def expected_config(pod: PodNet) -> net.NetworkConfig:
    return net.NetworkConfig(
        interfaces=(net.Interface(pod.veth, pod.veth_mac, 1400, (net.Address(4, pod.address, 24),)),),
        routes=(
            net.Route(4, pod.extra_route, 24, None, None, pod.veth, 253, None),
            net.Route(4, None, 0, pod.gateway, None, pod.veth, 0, None),
        ),
        neighbours=(net.Neighbour(4, pod.neighbour, NEIGH_MAC, pod.veth),),
    )


def snapshot(fd: int) -> dict[str, Any]:
    """What a user of the namespace sees: links, their qdiscs, and the config."""

    def look(ipr: Any) -> dict[str, Any]:
        names = {int(link["index"]): link.get("IFLA_IFNAME") for link in ipr.get_links()}
        qdiscs = sorted((names.get(q["index"]), q.get("TCA_KIND")) for q in ipr.get_qdiscs())
        return {"links": sorted(names.values()), "qdiscs": qdiscs}

    state: dict[str, Any] = in_ns(fd, look)
    state["config"] = net.read_config(fd)
    return state


def mirred_targets(fd: int, link: str) -> list[tuple[int, int, int, int]]:
    """(protocol, mirred eaction, action, target ifindex) of each filter with a mirred action on link's ingress."""

    def look(ipr: Any) -> list[tuple[int, int, int, int]]:
        found = []
        index = ipr.link_lookup(ifname=link)[0]
        for msg in ipr.get_filters(index=index, parent=net.INGRESS_HANDLE):
            options = msg.get_attr("TCA_OPTIONS")
            actions = options.get_attr("TCA_U32_ACT") if options is not None else None
            if actions is None:
                continue
            action = actions.get_attr("TCA_ACT_PRIO_1")
            assert action.get_attr("TCA_ACT_KIND") == "mirred"
            parms = action.get_attr("TCA_ACT_OPTIONS").get_attr("TCA_MIRRED_PARMS")
            found.append((socket.ntohs(msg["info"] & 0xFFFF), parms["eaction"], parms["action"], parms["ifindex"]))
        return found

    return list(in_ns(fd, look))


# --- read_config ------------------------------------------------------------------------------


def test_an_onlink_gateway_is_read_as_such(pod: PodNet) -> None:
    """Calico's default route: via 169.254.1.1, outside every address's subnet, onlink."""
    def add(ipr: Any) -> None:
        ipr.route("del", dst="0.0.0.0/0")
        ipr.route("add", dst="0.0.0.0/0", gateway="169.254.1.1", oif=ipr.link_lookup(ifname=pod.veth)[0],
                  flags=net.RTNH_F_ONLINK)

    in_ns(pod.fd, add)
    default = [r for r in net.read_config(pod.fd).routes if r.dest is None]
    assert [(r.gateway, r.onlink) for r in default] == [("169.254.1.1", True)]


def test_read_config_is_what_cni_made(pod: PodNet) -> None:
    config = net.read_config(pod.fd)
    assert config == expected_config(pod)  # no kernel-made connected route, no fe80::, no lo
    assert net.read_config(pod.path) == config
    assert json.loads(json.dumps(config.wire())) == {
        "interfaces": [{"name": pod.veth, "mac": pod.veth_mac, "mtu": 1400,
                        "addresses": [{"family": 4, "address": pod.address, "prefixlen": 24}]}],
        "routes": [
            {"family": 4, "dest": pod.extra_route, "dest_prefixlen": 24, "gateway": None, "source": None,
             "device": pod.veth, "scope": 253, "metric": None, "onlink": False},
            {"family": 4, "dest": None, "dest_prefixlen": 0, "gateway": pod.gateway, "source": None,
             "device": pod.veth, "scope": 0, "metric": None, "onlink": False},
        ],
        "neighbours": [{"family": 4, "address": pod.neighbour, "mac": NEIGH_MAC, "device": pod.veth}],
    }


def test_read_config_with_ipv6(pod: PodNet) -> None:
    def add_ipv6(ipr: Any) -> None:
        i = ipr.link_lookup(ifname=pod.veth)[0]
        ipr.addr("add", index=i, address="2001:db8::2", prefixlen=64)
        ipr.route("add", dst="::/0", gateway="2001:db8::1", oif=i)

    in_ns(pod.fd, add_ipv6)
    config = net.read_config(pod.fd)
    [interface] = config.interfaces
    assert interface.addresses == (net.Address(4, pod.address, 24), net.Address(6, "2001:db8::2", 64))  # no fe80::
    # no fe80::/64 nor 2001:db8::/64 (kernel-made), nor multicast; IPv6 routes always carry a metric
    assert [(r.family, r.dest, r.gateway, r.metric) for r in config.routes] == [
        (4, pod.extra_route, None, None), (4, None, pod.gateway, None), (6, None, "2001:db8::1", 1024)]


def test_read_config_of_an_empty_namespace() -> None:
    fd = net.new_netns()
    try:
        assert net.read_config(fd) == net.NetworkConfig((), (), ())
    finally:
        os.close(fd)


# --- open_netns -------------------------------------------------------------------------------


def test_open_netns_accepts_netns_files(pod: PodNet) -> None:
    for path in (pod.path, "/proc/self/ns/net", "/proc/thread-self/ns/net"):
        fd = net.open_netns(path)
        try:
            assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        finally:
            os.close(fd)


@pytest.mark.parametrize(("kind", "why"), [
    ("missing", "not found"),
    ("file", "not a namespace file"),
    ("directory", "a directory"),
    ("mnt", "another kind"),
])
def test_open_netns_refuses_what_is_not_a_netns(tmp_path: Path, kind: str, why: str) -> None:
    path = {"missing": str(tmp_path / "nope"), "file": "/etc/hostname", "directory": str(tmp_path),
            "mnt": "/proc/self/ns/mnt"}[kind]
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(NetworkError, match=why) as caught:
        net.open_netns(path)
    assert path in str(caught.value) and caught.value.context["netns"] == path
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_path_that_is_not_a_netns_is_refused_everywhere() -> None:
    with pytest.raises(NetworkError, match="another kind"):
        net.read_config("/proc/self/ns/mnt")
    with pytest.raises(NetworkError, match="another kind"):
        net.cleanup("/proc/self/ns/mnt", ["eth0"], [])


# --- attach / detach --------------------------------------------------------------------------


def test_attach_puts_a_tap_beside_the_veth(pod: PodNet, attachments: list[net.TapAttachment]) -> None:
    before = snapshot(pod.fd)
    config = net.read_config(pod.fd)
    attachments += net.attach(pod.fd, config.interfaces, queues=1, vhost=False)
    [a] = attachments
    assert (a.veth, a.tap, a.mac, a.mtu, len(a.tap_fds), a.vhost_fds) == (pod.veth, "tap0_uvm", pod.veth_mac, 1400, 1, [])

    tap = in_ns(pod.fd, lambda ipr: ipr.get_links(ipr.link_lookup(ifname="tap0_uvm")[0])[0])
    assert tap.get("IFLA_MTU") == 1400 and tap["flags"] & IFF_UP
    with IPRoute(groups=0) as ipr:
        assert ipr.link_lookup(ifname="tap0_uvm") == []  # in the pod's netns, not the host's
    state = snapshot(pod.fd)
    assert (pod.veth, "ingress") in state["qdiscs"] and ("tap0_uvm", "ingress") in state["qdiscs"]
    veth_index, tap_index = index_of(pod.fd, pod.veth), index_of(pod.fd, "tap0_uvm")
    # protocol all, egress redirect (1), stolen (4): every frame goes to the other side, none to the stack
    assert mirred_targets(pod.fd, pod.veth) == [(net.ETH_P_ALL, 1, 4, tap_index)]
    assert mirred_targets(pod.fd, "tap0_uvm") == [(net.ETH_P_ALL, 1, 4, veth_index)]
    assert state["config"] == config  # the veth keeps its MAC, address and routes; the tap has no address

    net.detach(pod.fd, attachments)
    assert a.tap_fds == [] and snapshot(pod.fd) == before
    net.detach(pod.fd, attachments)  # idempotent
    net.detach(pod.path, attachments)
    assert snapshot(pod.fd) == before


def test_two_queues_give_two_fds_on_one_tap(pod: PodNet, attachments: list[net.TapAttachment]) -> None:
    attachments += net.attach(pod.path, net.read_config(pod.fd).interfaces, queues=2, vhost=True)
    [a] = attachments
    assert len(a.tap_fds) == 2 and len(set(a.tap_fds)) == 2
    for fd in a.tap_fds:
        ifr = fcntl.ioctl(fd, TUNGETIFF, bytes(40))
        name, flags = struct.unpack("16sH22x", ifr)
        assert name.rstrip(b"\0") == b"tap0_uvm" and flags & net.IFF_MULTI_QUEUE and flags & net.IFF_VNET_HDR
    # vhost-net: one fd per queue when the host has it, else none (QEMU runs without)
    assert len(a.vhost_fds) == (2 if os.path.exists(net.VHOST_NET_DEVICE) else 0)
    os.close(a.tap_fds.pop())
    assert index_of(pod.fd, "tap0_uvm") is not None  # one queue still holds it
    a.close_fds()
    assert index_of(pod.fd, "tap0_uvm") is None


def test_closing_the_fds_removes_the_tap_and_cleanup_the_rest(pod: PodNet) -> None:
    before = snapshot(pod.fd)
    [a] = net.attach(pod.fd, net.read_config(pod.fd).interfaces, queues=1, vhost=False)
    a.close_fds()  # what QEMU's death does
    state = snapshot(pod.fd)
    assert "tap0_uvm" not in state["links"] and (pod.veth, "ingress") in state["qdiscs"]

    done = net.cleanup(pod.path, [pod.veth], ["tap0_uvm"])
    assert len(done) == 1 and "ingress qdisc" in done[0] and pod.veth in done[0]
    assert snapshot(pod.fd) == before
    assert net.cleanup(pod.path, [pod.veth], ["tap0_uvm"]) == []


def test_cleanup_deletes_a_tap_someone_still_holds(pod: PodNet, attachments: list[net.TapAttachment]) -> None:
    before = snapshot(pod.fd)
    attachments += net.attach(pod.fd, net.read_config(pod.fd).interfaces, queues=1, vhost=False)
    done = net.cleanup(pod.path, [pod.veth, "nosuch0"], ["tap0_uvm", "tap1_uvm"])
    assert [d.split(": ", 1)[1] for d in done] == [
        f"removed the ingress qdisc (and its redirect filter) from {pod.veth}", "deleted tap tap0_uvm"]
    assert snapshot(pod.fd) == before


def test_cleanup_of_a_namespace_already_gone(tmp_path: Path) -> None:
    assert net.cleanup(str(tmp_path / "gone"), ["eth0"], ["tap0_uvm"]) == []


def test_detach_deletes_a_tap_someone_still_holds(pod: PodNet, attachments: list[net.TapAttachment]) -> None:
    before = snapshot(pod.fd)
    attachments += net.attach(pod.fd, net.read_config(pod.fd).interfaces, queues=1, vhost=False)
    held = os.dup(attachments[0].tap_fds[0])  # as a QEMU that has not exited yet would
    try:
        net.detach(pod.fd, attachments)
        assert snapshot(pod.fd) == before
    finally:
        os.close(held)


def test_detach_after_the_namespace_is_gone(pod: PodNet) -> None:
    [a] = net.attach(pod.fd, net.read_config(pod.fd).interfaces, queues=1, vhost=False)
    net.detach("/var/run/netns/no-such-netns-here", [a])
    assert a.tap_fds == []


def test_attach_with_a_vanished_interface_leaves_nothing(pod: PodNet) -> None:
    config = net.read_config(pod.fd)
    in_ns(pod.fd, lambda ipr: ipr.link("del", index=ipr.link_lookup(ifname=pod.veth)[0]))
    before = snapshot(pod.fd)
    with pytest.raises(NetworkError, match=f"{pod.veth}: not found") as caught:
        net.attach(pod.fd, config.interfaces, queues=1, vhost=False)
    assert caught.value.context["link"] == pod.veth and caught.value.context["step"] == "look up"
    assert snapshot(pod.fd) == before and "tap0_uvm" not in before["links"]


def test_a_failure_on_the_second_interface_undoes_the_first(pod: PodNet) -> None:
    before = snapshot(pod.fd)
    config = net.read_config(pod.fd)
    gone = net.Interface("nosuch0", "02:00:00:00:00:01", 1500, (net.Address(4, "192.0.2.9", 24),))
    with pytest.raises(NetworkError, match="nosuch0: not found"):
        net.attach(pod.fd, [*config.interfaces, gone], queues=2, vhost=False)
    assert snapshot(pod.fd) == before


def test_an_ingress_qdisc_not_ours_is_refused_and_kept(pod: PodNet) -> None:
    in_ns(pod.fd, lambda ipr: ipr.tc("add", "ingress", ipr.link_lookup(ifname=pod.veth)[0], net.INGRESS_HANDLE))
    before = snapshot(pod.fd)
    with pytest.raises(NetworkError, match="add ingress qdisc: it already has one") as caught:
        net.attach(pod.fd, net.read_config(pod.fd).interfaces, queues=1, vhost=False)
    assert caught.value.context["link"] == pod.veth
    assert snapshot(pod.fd) == before  # the tap went with its fd; the qdisc someone else made is still there


def test_a_netlink_failure_on_the_last_step_undoes_the_others(pod: PodNet, monkeypatch: pytest.MonkeyPatch) -> None:
    before = snapshot(pod.fd)
    redirect = net._redirect

    def refuse_the_second(ipr: Any, from_index: int, to_index: int) -> None:
        if from_index != index_of_veth:
            raise NetlinkError(errno.EPERM)
        redirect(ipr, from_index, to_index)

    index_of_veth = index_of(pod.fd, pod.veth)
    monkeypatch.setattr(net, "_redirect", refuse_the_second)
    with pytest.raises(NetworkError, match=f"tap0_uvm: add filter redirecting to {pod.veth}: Operation not permitted"):
        net.attach(pod.fd, net.read_config(pod.fd).interfaces, queues=1, vhost=False)
    assert snapshot(pod.fd) == before  # the veth's qdisc and filter removed, the tap gone


def test_a_replaced_interface_is_refused(pod: PodNet) -> None:
    [interface] = net.read_config(pod.fd).interfaces
    stale = net.Interface(interface.name, "02:00:00:00:00:02", interface.mtu, interface.addresses)
    with pytest.raises(NetworkError, match="its MAC is"):
        net.attach(pod.fd, [stale], queues=1, vhost=False)
    assert index_of(pod.fd, "tap0_uvm") is None


def test_bad_arguments() -> None:
    with pytest.raises(NetworkError, match="queues 0"):
        net.attach("/nonexistent", [], queues=0)
    assert net.tap_name(0) == "tap0_uvm" and net.tap_name(99_999_999) == "tap99999999_uvm"
    with pytest.raises(NetworkError, match="longer than 15"):
        net.tap_name(100_000_000)


# --- frames through the redirect --------------------------------------------------------------


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def arp_frame(op: int, src_mac: str, src_ip: str, dst_ip: str, dst_mac: str = "ff:ff:ff:ff:ff:ff") -> bytes:
    target = "00:00:00:00:00:00" if op == 1 else dst_mac
    return (mac_bytes(dst_mac) + mac_bytes(src_mac) + struct.pack("!H", ETH_P_ARP)
            + struct.pack("!HHBBH", 1, 0x0800, 6, 4, op) + mac_bytes(src_mac) + socket.inet_aton(src_ip)
            + mac_bytes(target) + socket.inet_aton(dst_ip))


def parse_arp(frame: bytes) -> tuple[int, str, str, str] | None:
    """(op, sender MAC, sender IP, target IP) of an ARP frame, else None."""
    if len(frame) < 42 or frame[12:14] != struct.pack("!H", ETH_P_ARP):
        return None
    op = struct.unpack("!H", frame[20:22])[0]
    return op, frame[22:28].hex(":"), socket.inet_ntoa(frame[28:32]), socket.inet_ntoa(frame[38:42])


def wait_for_frame(read: Callable[[], bytes | None], fileno: int, wanted: Callable[[bytes], bool]) -> bytes:
    deadline = time.monotonic() + 3
    while (left := deadline - time.monotonic()) > 0:
        if select.select([fileno], [], [], left)[0]:
            frame = read()
            if frame is not None and wanted(frame):
                return frame
    raise AssertionError("the frame never came")


def test_frames_flow_both_ways_through_the_redirect(pod: PodNet, attachments: list[net.TapAttachment]) -> None:
    attachments += net.attach(pod.fd, net.read_config(pod.fd).interfaces, queues=1, vhost=False)
    tap_fd = attachments[0].tap_fds[0]
    os.set_blocking(tap_fd, False)

    def read_tap() -> bytes | None:
        data = os.read(tap_fd, 65536)
        return data[VNET_HDR_LEN:]  # the guest side sees a virtio_net_hdr before each frame

    # ETH_P_ALL: a socket for ETH_P_ARP alone sees nothing on a bridge port (the bridge takes the
    # frames before protocol handlers run; only "all" taps see them, and outgoing frames).
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL)) as host:
        host.bind((pod.host_veth, ETH_P_ALL))
        host.setblocking(False)

        def read_host() -> bytes | None:
            data, addr = host.recvfrom(65536)
            return None if addr[2] == PACKET_OUTGOING else data

        # The guest (the VM's NIC has the veth's MAC) asks for its gateway: out through the tap's
        # ingress, redirected out of the veth to the bridge; the host's answer comes back in through
        # the veth, redirected out of the tap to the guest.
        os.write(tap_fd, bytes(VNET_HDR_LEN) + arp_frame(1, pod.veth_mac, pod.address, pod.gateway))
        wait_for_frame(read_host, host.fileno(),
                       lambda f: parse_arp(f) == (1, pod.veth_mac, pod.address, pod.gateway))
        wait_for_frame(read_tap, tap_fd, lambda f: parse_arp(f) == (2, pod.bridge_mac, pod.gateway, pod.address))

        # Someone on the bridge asks for the pod's address: the guest gets the question, the
        # namespace's own stack never sees it (it would have answered, and learnt the asker).
        asker_mac, asker_ip = "02:00:5e:10:00:77", f"{pod.subnet}.77"
        host.send(arp_frame(1, asker_mac, asker_ip, pod.address))
        wait_for_frame(read_tap, tap_fd, lambda f: parse_arp(f) == (1, asker_mac, asker_ip, pod.address))
    learnt = in_ns(pod.fd, lambda ipr: [n.get("NDA_DST") for n in ipr.get_neighbours(family=socket.AF_INET)])
    assert asker_ip not in learnt


# --- namespaces of our own --------------------------------------------------------------------


def test_new_netns_is_fresh_with_lo_up() -> None:
    fd = net.new_netns()
    try:
        assert os.fstat(fd).st_ino != os.stat("/proc/self/ns/net").st_ino
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        links = in_ns(fd, lambda ipr: [(link.get("IFLA_IFNAME"), link["flags"] & IFF_UP) for link in ipr.get_links()])
        assert links == [("lo", IFF_UP)]
        # a child started with the preexec helper runs in it; this process's threads did not move
        out = subprocess.run(["readlink", "/proc/self/ns/net"], preexec_fn=net.enter_netns_preexec(fd),
                             capture_output=True, text=True, check=True).stdout.strip()
        assert out == f"net:[{os.fstat(fd).st_ino}]"
        assert os.readlink("/proc/thread-self/ns/net") != out
    finally:
        os.close(fd)


def test_run_in_netns_refuses_a_non_netns_fd() -> None:
    fd = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    try:
        with pytest.raises(NetworkError, match="not a network namespace"):
            net.run_in_netns(fd, lambda: None)
    finally:
        os.close(fd)


# --- waiting for CNI --------------------------------------------------------------------------


def delete_link(name: str) -> None:
    with IPRoute(groups=0) as ipr:
        for index in ipr.link_lookup(ifname=name):
            ipr.link("del", index=index)


def cni_add(netns_fd: int, sfx: str) -> str:
    """Like CNI's ADD: a veth's end moved into the namespace, given an address, up, then a route."""
    host_end, pod_end = f"uvw{sfx}", f"uvp{sfx}"
    with IPRoute(groups=0) as ipr:
        ipr.link("add", ifname=host_end, kind="veth", peer=pod_end)
        ipr.link("set", index=ipr.link_lookup(ifname=pod_end)[0], net_ns_fd=netns_fd)

    def configure(ipr: Any) -> None:
        i = ipr.link_lookup(ifname=pod_end)[0]
        ipr.addr("add", index=i, address="192.0.2.2", prefixlen=24)
        ipr.link("set", index=i, state="up")
        ipr.route("add", dst="0.0.0.0/0", gateway="192.0.2.1", oif=i)

    in_ns(netns_fd, configure)
    return pod_end


async def test_wait_for_interfaces_returns_when_cni_adds_one() -> None:
    fd = net.new_netns()
    sfx = secrets.token_hex(3)
    try:
        waiting = asyncio.create_task(net.wait_for_interfaces(fd, timeout=10, settle=0.05))
        done, _ = await asyncio.wait({waiting}, timeout=0.2)
        assert not done  # nothing to attach yet: it waits for netlink events
        pod_end = await asyncio.to_thread(cni_add, fd, sfx)
        config = await waiting
        [interface] = config.interfaces
        assert interface.name == pod_end and interface.addresses == (net.Address(4, "192.0.2.2", 24),)
        assert [r.gateway for r in config.routes] == ["192.0.2.1"]
    finally:
        await asyncio.to_thread(delete_link, f"uvw{sfx}")  # pyroute2's sync API cannot run in the loop's thread
        os.close(fd)


async def test_wait_for_interfaces_times_out_and_can_be_cancelled() -> None:
    fd = net.new_netns()
    try:
        fds_before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(net.NetworkTimeoutError, match="no interface with an address appeared within 0.2 s"):
            await net.wait_for_interfaces(fd, timeout=0.2)
        assert issubclass(net.NetworkTimeoutError, TimeoutError)
        with pytest.raises(TimeoutError):  # wait_for cancels it
            await asyncio.wait_for(net.wait_for_interfaces(fd, timeout=10), 0.2)
        assert len(os.listdir("/proc/self/fd")) == fds_before  # its netlink socket was closed both times
    finally:
        os.close(fd)
