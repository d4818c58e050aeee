"""The host side of a UVM's network: a container's network namespace, connected to the VM's NIC.

A container runtime is handed a network namespace that CNI has already filled (or fills a moment
later): a veth whose peer sits on a bridge, with an address, routes and perhaps neighbour entries.
A VM cannot join that namespace; its NIC is a tap device whose other end is a file descriptor that
QEMU reads and writes. Kata Containers' default answer ("tcfilter"), copied here:

* Read the namespace: every non-loopback link with an address, its MAC, MTU and addresses; the
  routes over those links (not the connected routes the kernel makes for an address: the guest's
  kernel makes its own); the permanent neighbour entries. The guest agent is told all of it and
  gives the VM's NIC the same configuration, finding the NIC by the veth's MAC.
* Beside each veth, in the same namespace, create a tap ``tap<N>_uvm`` with
  IFF_TAP|IFF_NO_PI|IFF_VNET_HDR (and IFF_MULTI_QUEUE, one fd per queue, for a multi-queue NIC).
  The tap is NOT persistent: it lives as long as one of the fds returned by TUNSETIFF is open.
  Those fds are handed to QEMU (``-netdev tap,fds=…``), so when QEMU dies, however it dies, the
  tap goes with it.
* Glue the two with tc: an ``ingress`` qdisc on both, and on each a match-all u32 filter whose
  action is ``mirred egress redirect`` to the other. A frame the bridge sends to the veth is
  stolen before the namespace's own stack sees it and leaves through the tap to the guest; a frame
  the guest sends arrives on the tap's ingress and leaves through the veth to the bridge. mirred
  needs both devices in one namespace, hence the tap beside the veth.
* The guest NIC takes the veth's MAC (the bridge and its neighbours know that MAC for the pod's
  address); the veth keeps its MAC and addresses, so CNI's DEL finds everything as it left it.
* Teardown removes the ingress qdisc from the veth (its filters go with it) and closes the fds,
  which deletes the tap.

setns(2) switches only the calling thread, and Python 3.11 has no ``os.setns``: every function
that works inside a namespace runs its work in a short-lived thread of its own that enters the
namespace (libc's setns through ctypes) and then ends, so no thread of the caller ever changes
namespace. A netlink socket, a /dev/net/tun open and an unshare take the namespace of the thread
that makes them, which is why the tap fds are opened in that thread too.

Every public function but ``wait_for_interfaces`` blocks (netlink round trips, thread joins):
asyncio code calls them through ``asyncio.to_thread``. They take a namespace as an open fd (kept
open by the caller) or a path (``/var/run/netns/<name>``, ``/proc/<pid>/ns/net``), opened and
closed around the call.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import ipaddress
import logging
import os
import socket
import stat
import struct
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, cast

from pyroute2.iproute.linux import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from schemas.uvm_config import NEW_NETNS
from uvm.builder import Nic
from uvm.errors import NetworkError

log = logging.getLogger("uvm.network")

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3), Linux 4.11
IFNAMSIZ = 16  # with the terminating NUL

TUN_DEVICE = "/dev/net/tun"
VHOST_NET_DEVICE = "/dev/vhost-net"
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_MULTI_QUEUE = 0x0100
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000

IFF_LOOPBACK = 0x8
ETH_P_ALL = 0x0003
INGRESS_HANDLE = 0xFFFF0000  # ffff:
TC_H_INGRESS = 0xFFFFFFF1  # the parent the kernel reports for an ingress qdisc
FILTER_PRIO = 1
RT_TABLE_MAIN = 254
RTPROT_KERNEL = 2
RTN_UNICAST = 1
NUD_PERMANENT = 0x80
RTNH_F_ONLINK = 0x4
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_IFADDR = 0x100
RTMGRP_IPV6_ROUTE = 0x400
WATCH_GROUPS = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE

Family = Literal[4, 6]
NetnsRef = int | str  # an open netns fd (the caller's) or a netns file's path

_libc = ctypes.CDLL(None, use_errno=True)


class NetworkTimeoutError(NetworkError, TimeoutError):
    """wait_for_interfaces() expired before an interface with an address appeared."""


# --- namespaces -------------------------------------------------------------------------------


def _nsfs_dev() -> int:
    return os.stat("/proc/thread-self/ns/net").st_dev


def open_netns(path: str) -> int:
    """An O_RDONLY|O_CLOEXEC fd on the network namespace at path; the caller closes it.

    Raises NetworkError naming path when it does not exist or is not a network namespace (a
    regular file, a directory, another kind of namespace). On kernels without NS_GET_NSTYPE
    (before 4.11) any namespace file passes, and a wrong kind fails later at setns.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetworkError(f"netns {path}: not found (the container or its namespace is gone?)", netns=path) from None
    except OSError as e:
        raise NetworkError(f"netns {path}: cannot be opened: {e.strerror}", netns=path) from None
    try:
        _check_netns(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_netns(fd: int, path: str) -> None:
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode) or st.st_dev != _nsfs_dev():
        what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a namespace file"
        raise NetworkError(f"netns {path}: {what}, not a network namespace", netns=path)
    try:
        nstype = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError as e:
        if e.errno in (errno.ENOTTY, errno.EINVAL):
            return  # an old kernel: the nsfs device is all we can check
        raise NetworkError(f"netns {path}: cannot tell its type: {e.strerror}", netns=path) from None
    if nstype != CLONE_NEWNET:
        raise NetworkError(f"netns {path}: a namespace of another kind (type {nstype:#x}), not a network one",
                           netns=path, nstype=nstype)


@contextlib.contextmanager
def _netns_fd(netns: NetnsRef) -> Iterator[tuple[int, str]]:
    """(fd, label for messages): a path is opened (and checked) for the block, an fd is used as is."""
    if isinstance(netns, int):
        yield netns, f"netns fd {netns}"
        return
    fd = open_netns(netns)
    try:
        yield fd, f"netns {netns}"
    finally:
        os.close(fd)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _in_new_thread(work: Callable[[], T], name: str) -> T:
    """work() run in a thread of its own, which ends afterwards: its result, or its exception."""
    outcome: list[tuple[bool, Any]] = []

    def run() -> None:
        try:
            outcome.append((True, work()))
        except BaseException as e:  # handed to the caller's thread
            outcome.append((False, e))

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return cast(T, value)


def run_in_netns(netns_fd: int, work: Callable[[], T], label: str = "") -> T:
    """work() run in a new thread that entered the network namespace netns_fd; blocks until done.

    The thread ends afterwards, so nothing else ever runs in that namespace by mistake. Raises
    NetworkError when the namespace cannot be entered, and whatever work raises.
    """
    label = label or f"netns fd {netns_fd}"

    def entered() -> T:
        try:
            _setns(netns_fd)
        except OSError as e:
            why = "not a network namespace" if e.errno == errno.EINVAL else os.strerror(e.errno or 0)
            raise NetworkError(f"{label}: cannot enter it: {why}", netns=label) from None
        return work()

    return _in_new_thread(entered, name="uvm-netns")


def new_netns() -> int:
    """A fresh anonymous network namespace with lo up, as an O_CLOEXEC fd the caller owns. Blocks.

    It lives as long as that fd (or a process in it). Raises NetworkError when it cannot be made.
    """

    def make() -> int:
        if _libc.unshare(CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetworkError(f"new netns: unshare(CLONE_NEWNET) failed: {os.strerror(err)}")
        fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            with IPRoute(groups=0) as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        except (NetlinkError, OSError, IndexError) as e:
            os.close(fd)
            raise NetworkError(f"new netns: cannot bring lo up: {e}") from None
        return fd

    return _in_new_thread(make, name="uvm-new-netns")


def enter_netns_preexec(netns_fd: int) -> Callable[[], None]:
    """A subprocess ``preexec_fn`` that moves the forked child (one thread) into netns_fd.

    For starting QEMU inside a namespace of ``new_netns()``: the fd is inherited by the child
    whatever its O_CLOEXEC, since the call happens before exec. The child fails to start
    (subprocess raises) when setns fails.
    """
    setns = _libc.setns

    def preexec() -> None:
        if setns(netns_fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into netns fd {netns_fd}: {os.strerror(err)}")

    return preexec


# --- what the namespace holds -----------------------------------------------------------------


@dataclass(frozen=True)
class Address:
    family: Family
    address: str
    prefixlen: int

    def wire(self) -> dict[str, Any]:
        return {"family": self.family, "address": self.address, "prefixlen": self.prefixlen}


@dataclass(frozen=True)
class Interface:
    """A link of the namespace the guest's NIC takes over: the guest finds its NIC by mac."""

    name: str
    mac: str
    mtu: int
    addresses: tuple[Address, ...]

    def wire(self) -> dict[str, Any]:
        return {"name": self.name, "mac": self.mac, "mtu": self.mtu, "addresses": [a.wire() for a in self.addresses]}


@dataclass(frozen=True)
class Route:
    family: Family
    dest: str | None  # None: the default route
    dest_prefixlen: int
    gateway: str | None
    source: str | None
    device: str
    scope: int
    metric: int | None
    onlink: bool = False  # the gateway is on the link whatever the addresses say (Calico's 169.254.1.1)

    def wire(self) -> dict[str, Any]:
        return {"family": self.family, "dest": self.dest, "dest_prefixlen": self.dest_prefixlen,
                "gateway": self.gateway, "source": self.source, "device": self.device, "scope": self.scope,
                "metric": self.metric, "onlink": self.onlink}


@dataclass(frozen=True)
class Neighbour:
    family: Family
    address: str
    mac: str
    device: str

    def wire(self) -> dict[str, Any]:
        return {"family": self.family, "address": self.address, "mac": self.mac, "device": self.device}


@dataclass(frozen=True)
class NetworkConfig:
    """What the guest sets up: routes without a gateway come first (the guest adds them in order)."""

    interfaces: tuple[Interface, ...]
    routes: tuple[Route, ...]
    neighbours: tuple[Neighbour, ...]

    def wire(self) -> dict[str, Any]:
        return {"interfaces": [i.wire() for i in self.interfaces], "routes": [r.wire() for r in self.routes],
                "neighbours": [n.wire() for n in self.neighbours]}


def _family(af: int) -> Family | None:
    return 4 if af == socket.AF_INET else 6 if af == socket.AF_INET6 else None


def read_config(netns: NetnsRef) -> NetworkConfig:
    """The interfaces, routes and permanent neighbours of netns the guest must reproduce. Blocks.

    Interfaces: links other than loopback with at least one address that is not IPv6 link-local.
    Routes: the main table's unicast routes over those links, less the kernel's connected routes
    (proto kernel) and multipath routes. Raises NetworkError when netns cannot be opened or read.
    """
    with _netns_fd(netns) as (fd, label):
        return run_in_netns(fd, lambda: _read_config(label), label)


def _read_config(label: str) -> NetworkConfig:
    try:
        with IPRoute(groups=0) as ipr:
            links = list(ipr.get_links())
            addrs = list(ipr.get_addr())
            routes = list(ipr.get_routes())
            neighbours = list(ipr.get_neighbours())
    except (NetlinkError, OSError) as e:
        raise NetworkError(f"{label}: cannot read its links, addresses and routes: {e}", netns=label) from None

    addresses: dict[int, list[Address]] = {}
    for msg in addrs:
        family = _family(msg["family"])
        address = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
        if family is None or address is None:
            continue
        if family == 6 and ipaddress.IPv6Address(address).is_link_local:
            continue
        addresses.setdefault(msg["index"], []).append(Address(family, address, msg["prefixlen"]))

    names: dict[int, str] = {}
    interfaces = []
    for msg in sorted(links, key=lambda m: int(m["index"])):
        index = msg["index"]
        if msg["flags"] & IFF_LOOPBACK or index not in addresses:
            continue
        names[index] = msg.get("IFLA_IFNAME")
        interfaces.append(Interface(name=names[index], mac=msg.get("IFLA_ADDRESS"), mtu=msg.get("IFLA_MTU"),
                                    addresses=tuple(addresses[index])))

    direct: list[Route] = []
    via_gateway: list[Route] = []
    for msg in routes:
        family = _family(msg["family"])
        oif = msg.get("RTA_OIF")
        table = msg.get("RTA_TABLE") or msg["table"]
        if (family is None or table != RT_TABLE_MAIN or msg["proto"] == RTPROT_KERNEL or msg["type"] != RTN_UNICAST
                or oif not in names):
            continue
        dest = msg.get("RTA_DST") if msg["dst_len"] else None
        if family == 6 and dest is not None:
            net = ipaddress.IPv6Network(f"{dest}/{msg['dst_len']}", strict=False)
            if net.is_link_local or net.is_multicast:
                continue
        route = Route(family=family, dest=dest, dest_prefixlen=msg["dst_len"],
                      gateway=msg.get("RTA_GATEWAY"), source=msg.get("RTA_PREFSRC"), device=names[oif],
                      scope=msg["scope"], metric=msg.get("RTA_PRIORITY"), onlink=bool(msg["flags"] & RTNH_F_ONLINK))
        (via_gateway if route.gateway else direct).append(route)

    permanent = []
    for msg in neighbours:
        family = _family(msg["family"])
        mac = msg.get("NDA_LLADDR")
        if family is None or not msg["state"] & NUD_PERMANENT or msg["ifindex"] not in names or not mac:
            continue
        permanent.append(Neighbour(family, msg.get("NDA_DST"), mac, names[msg["ifindex"]]))

    return NetworkConfig(tuple(interfaces), tuple(direct + via_gateway), tuple(permanent))


# --- taps beside the veths --------------------------------------------------------------------


@dataclass
class TapAttachment:
    """One interface connected to a tap: QEMU gets tap_fds (and vhost_fds) and the NIC gets mac.

    The fds are O_CLOEXEC: hand them to QEMU with ``pass_fds``. The tap exists as long as one of
    tap_fds is open here or in QEMU. ``close_fds`` closes ours, once (the lists are emptied).
    """

    veth: str
    tap: str
    mac: str
    mtu: int
    tap_fds: list[int] = field(default_factory=list)
    vhost_fds: list[int] = field(default_factory=list)

    def close_fds(self) -> None:
        fds, self.tap_fds, self.vhost_fds = self.tap_fds + self.vhost_fds, [], []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def tap_name(n: int) -> str:
    """The tap for the n-th interface. Raises NetworkError when it would not fit IFNAMSIZ."""
    name = f"tap{n}_uvm"
    if len(name) >= IFNAMSIZ:
        raise NetworkError(f"tap {name}: longer than {IFNAMSIZ - 1} characters (too many interfaces)")
    return name


@contextlib.contextmanager
def _step(label: str, link: str, step: str) -> Iterator[None]:
    """Translate netlink and OS errors of one step into a NetworkError naming link and step."""
    try:
        yield
    except NetlinkError as e:
        raise NetworkError(f"{label}: {link}: {step}: {os.strerror(e.code)}", netns=label, link=link, step=step,
                           errno=e.code) from None
    except OSError as e:
        raise NetworkError(f"{label}: {link}: {step}: {e.strerror or e}", netns=label, link=link, step=step,
                           errno=e.errno) from None


def _link(ipr: Any, name: str) -> Any | None:
    """The link message of name in the socket's namespace, or None."""
    try:
        return ipr.link("get", ifname=name)[0]
    except NetlinkError as e:
        if e.code == errno.ENODEV:
            return None
        raise


def _index(ipr: Any, name: str) -> int | None:
    indexes = ipr.link_lookup(ifname=name)
    return int(indexes[0]) if indexes else None


def _open_tap(name: str, queues: int) -> list[int]:
    """fds on a new non-persistent tap in the calling thread's namespace, one per queue."""
    flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if queues > 1 else 0)
    ifreq = struct.pack("16sH22x", name.encode(), flags)
    fds: list[int] = []
    try:
        for _ in range(queues):
            fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
            fds.append(fd)
            fcntl.ioctl(fd, TUNSETIFF, ifreq)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def _open_vhost(queues: int) -> list[int]:
    fds: list[int] = []
    try:
        for _ in range(queues):
            fds.append(os.open(VHOST_NET_DEVICE, os.O_RDWR | os.O_CLOEXEC))
    except OSError as e:
        for fd in fds:
            os.close(fd)
        log.warning("%s: cannot be opened (%s): QEMU's NICs run without vhost-net", VHOST_NET_DEVICE, e.strerror)
        return []
    return fds


def _ingress_qdisc(ipr: Any, index: int) -> bool:
    return any(q.get("TCA_KIND") == "ingress" and q["parent"] == TC_H_INGRESS for q in ipr.get_qdiscs(index))


def _remove_ingress(ipr: Any, index: int) -> bool:
    """Delete index's ingress qdisc and with it its filters; False when it had none."""
    if not _ingress_qdisc(ipr, index):
        return False
    try:
        ipr.tc("del", "ingress", index, INGRESS_HANDLE)
    except NetlinkError as e:
        if e.code in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
            return False  # gone meanwhile
        raise
    return True


def _redirect(ipr: Any, from_index: int, to_index: int) -> None:
    """On from_index's ingress: match every frame (u32 match u8 0 0) and redirect it out of to_index."""
    ipr.tc("add-filter", "u32", from_index, parent=INGRESS_HANDLE, prio=FILTER_PRIO, protocol=ETH_P_ALL,
           target=0, keys=["0x0/0x0+0"],
           action={"kind": "mirred", "direction": "egress", "action": "redirect", "ifindex": to_index})


def attach(netns: NetnsRef, interfaces: Sequence[Interface], queues: int = 1, vhost: bool = True) -> list[TapAttachment]:
    """Connect each interface of netns to a new tap ``tap<N>_uvm`` beside it. Blocks.

    interfaces come from ``read_config``; each must still exist with the same MAC. Returns one
    TapAttachment per interface, in order, with ``queues`` tap fds and, when vhost and
    /dev/vhost-net opens, as many vhost-net fds (else none, with a warning). Raises NetworkError
    naming the link and the step when anything fails, after undoing everything made so far.
    """
    if queues < 1:
        raise NetworkError(f"queues {queues}: at least one is needed", queues=queues)
    with _netns_fd(netns) as (fd, _):
        made = open_taps(fd, len(interfaces), queues, vhost)
        try:
            for attachment, interface in zip(made, interfaces, strict=True):
                connect(fd, attachment, interface)
        except BaseException:
            detach(fd, made)
            raise
        return made


def open_taps(netns: NetnsRef, count: int, queues: int = 1, vhost: bool = True) -> list[TapAttachment]:
    """count new taps ``tap<N>_uvm`` in netns, down and connected to nothing yet (``connect`` does that
    once the veth they stand in for exists: at once, or when CNI has run). Blocks. Each has ``queues``
    tap fds and, when vhost and /dev/vhost-net opens, as many vhost-net fds. Raises NetworkError naming
    the tap and the step, after closing what was opened."""
    if queues < 1:
        raise NetworkError(f"queues {queues}: at least one is needed", queues=queues)
    names = [tap_name(n) for n in range(count)]
    with _netns_fd(netns) as (fd, label):
        return run_in_netns(fd, lambda: _open_all(label, names, queues, vhost), label)


def _open_all(label: str, names: list[str], queues: int, vhost: bool) -> list[TapAttachment]:
    made: list[TapAttachment] = []
    try:
        with _step(label, "netlink", "open"), IPRoute(groups=0) as ipr:
            for tap in names:
                with _step(label, tap, "look up"):
                    if _index(ipr, tap) is not None:
                        raise NetworkError(f"{label}: {tap}: already exists (another UVM's? the shim's cleanup "
                                           "removes it)", netns=label, link=tap, step="create tap")
                with _step(label, tap, f"create tap on {TUN_DEVICE}"):
                    made.append(TapAttachment(veth="", tap=tap, mac="", mtu=0, tap_fds=_open_tap(tap, queues)))
        for attachment in made if vhost else []:
            attachment.vhost_fds = _open_vhost(queues)
            if not attachment.vhost_fds:
                break  # logged once: the others would fail the same way
    except BaseException:
        for attachment in made:
            attachment.close_fds()  # a tap goes with its last fd
        raise
    return made


def connect(netns: NetnsRef, attachment: TapAttachment, interface: Interface) -> None:
    """Stand attachment's tap in for interface's veth: the tap takes the veth's MTU and goes up, both get
    an ingress qdisc, and two match-all filters redirect each one's frames out of the other. Blocks.
    Records veth, mac and mtu in attachment. Raises NetworkError naming the link and the step, after
    undoing what it made (the veth keeps nothing of ours; the tap stays, unconnected)."""
    with _netns_fd(netns) as (fd, label):
        run_in_netns(fd, lambda: _connect(label, attachment, interface), label)


def _connect(label: str, attachment: TapAttachment, interface: Interface) -> None:
    with _step(label, "netlink", "open"), IPRoute(groups=0) as ipr:
        veth, tap = interface.name, attachment.tap
        with _step(label, veth, "look up"):
            link = _link(ipr, veth)
            tap_index = _index(ipr, tap)
        if link is None:
            raise NetworkError(f"{label}: {veth}: not found (deleted since its configuration was read?)",
                               netns=label, link=veth, step="look up")
        if tap_index is None:
            raise NetworkError(f"{label}: {tap}: not found (its QEMU gone?)", netns=label, link=tap, step="look up")
        mac, mtu = link.get("IFLA_ADDRESS"), int(link.get("IFLA_MTU"))
        if mac != interface.mac:
            raise NetworkError(f"{label}: {veth}: its MAC is {mac}, not {interface.mac} (replaced since its "
                               "configuration was read?)", netns=label, link=veth, step="look up")
        veth_index = int(link["index"])
        veth_qdisc = tap_qdisc = False
        try:
            with _step(label, tap, f"set MTU {mtu} and up"):
                ipr.link("set", index=tap_index, mtu=mtu, state="up")
            with _step(label, veth, "add ingress qdisc"):
                if _ingress_qdisc(ipr, veth_index):
                    raise OSError(errno.EEXIST, "it already has one (a leftover? the shim's cleanup removes it)")
                ipr.tc("add", "ingress", veth_index, INGRESS_HANDLE)
                veth_qdisc = True
            with _step(label, tap, "add ingress qdisc"):
                ipr.tc("add", "ingress", tap_index, INGRESS_HANDLE)
                tap_qdisc = True
            with _step(label, veth, f"add filter redirecting to {tap}"):
                _redirect(ipr, veth_index, tap_index)
            with _step(label, tap, f"add filter redirecting to {veth}"):
                _redirect(ipr, tap_index, veth_index)
        except BaseException:
            for index, made in ((veth_index, veth_qdisc), (tap_index, tap_qdisc)):
                if made:
                    with contextlib.suppress(NetlinkError, OSError):
                        _remove_ingress(ipr, index)
            with contextlib.suppress(NetlinkError, OSError):
                ipr.link("set", index=tap_index, state="down")
            raise
    attachment.veth, attachment.mac, attachment.mtu = veth, mac, mtu
    log.debug("%s: %s -> %s (mtu %d) redirected both ways", label, veth, tap, mtu)


def _undo(ipr: Any, attachment: TapAttachment) -> None:
    """Best effort, for a failed attach: our ingress qdisc off the veth, our fds closed."""
    with contextlib.suppress(NetlinkError, OSError):
        index = _index(ipr, attachment.veth)
        if index is not None:
            _remove_ingress(ipr, index)
    attachment.close_fds()


def detach(netns: NetnsRef, attachments: Sequence[TapAttachment]) -> None:
    """Undo attach: the ingress qdiscs and filters off the veths, our fds closed, the taps gone. Blocks.

    Leaves the namespace as CNI made it. Idempotent: a link, or a namespace path, already gone is
    fine. The fds are closed whatever happens. Raises NetworkError (after doing all it could) when
    a qdisc or a tap cannot be removed.
    """
    try:
        with _netns_fd(netns) as (fd, label):
            run_in_netns(fd, lambda: _detach(label, attachments), label)
    except NetworkError as e:
        if not (isinstance(netns, str) and not os.path.lexists(netns)):
            raise
        log.debug("%s", e)  # the namespace is gone, and all in it
    finally:
        for attachment in attachments:
            attachment.close_fds()


def _detach(label: str, attachments: Sequence[TapAttachment]) -> None:
    failures: list[str] = []
    with _step(label, "netlink", "open"), IPRoute(groups=0) as ipr:
        for attachment in attachments:
            for link in (attachment.veth, attachment.tap):
                try:
                    with _step(label, link, "remove ingress qdisc"):
                        index = _index(ipr, link)
                        if index is not None:
                            _remove_ingress(ipr, index)
                except NetworkError as e:
                    failures.append(str(e))
            attachment.close_fds()
            try:
                with _step(label, attachment.tap, "delete tap"):
                    index = _index(ipr, attachment.tap)
                    if index is not None:  # someone else (QEMU?) still holds a queue
                        ipr.link("del", index=index)
            except NetworkError as e:
                failures.append(str(e))
    if failures:
        raise NetworkError("; ".join(failures), netns=label)


def cleanup(netns_path: str, veths: Sequence[str], taps: Sequence[str]) -> list[str]:
    """After a crash: remove our ingress qdisc from veths and delete taps, where still there. Blocks.

    For the shim's ``delete`` after its process was SIGKILLed: quick and idempotent. A missing
    namespace or link is nothing to do. Returns what was done, one line per action (empty: nothing
    was left). Raises NetworkError when netns_path is not a network namespace or netlink fails.
    """
    try:
        fd = open_netns(netns_path)
    except NetworkError:
        if not os.path.lexists(netns_path):
            return []
        raise
    label = f"netns {netns_path}"
    try:
        return run_in_netns(fd, lambda: _cleanup(label, veths, taps), label)
    finally:
        os.close(fd)


def _cleanup(label: str, veths: Sequence[str], taps: Sequence[str]) -> list[str]:
    done = []
    with _step(label, "netlink", "open"), IPRoute(groups=0) as ipr:
        for veth in veths:
            with _step(label, veth, "remove ingress qdisc"):
                index = _index(ipr, veth)
                if index is not None and _remove_ingress(ipr, index):
                    done.append(f"{label}: removed the ingress qdisc (and its redirect filter) from {veth}")
        for tap in taps:
            with _step(label, tap, "delete tap"):
                index = _index(ipr, tap)
                if index is not None:
                    try:
                        ipr.link("del", index=index)
                    except NetlinkError as e:
                        if e.code != errno.ENODEV:
                            raise
                    else:
                        done.append(f"{label}: deleted tap {tap}")
    return done


# --- waiting for CNI --------------------------------------------------------------------------


def _event_socket() -> socket.socket:
    """A non-blocking rtnetlink socket, in the calling thread's namespace, on link/address/route events."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                         socket.NETLINK_ROUTE)
    try:
        sock.bind((0, WATCH_GROUPS))
    except BaseException:
        sock.close()
        raise
    return sock


async def _next_events(sock: socket.socket) -> None:
    """Wait for at least one event, then drain whatever else is queued (the content does not matter)."""
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_recv(sock, 65536)
    except OSError as e:
        if e.errno != errno.ENOBUFS:  # overrun: events were lost, which is an event too
            raise
    while True:
        try:
            sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as e:
            if e.errno != errno.ENOBUFS:
                raise


async def wait_for_interfaces(netns_fd: int, timeout: float | None, settle: float = 0.1) -> NetworkConfig:
    """The namespace's config once it has an interface to attach (CNI's ADD ran). Never blocks the loop.

    Listens to the namespace's rtnetlink link, address and route events (no polling), reading the
    config again after each burst of them. CNI adds the address, then the routes: once a config has
    an interface, it is returned only when no event followed it for ``settle`` seconds. Cancellable.
    Raises NetworkTimeoutError after timeout seconds without an interface, NetworkError when the
    namespace cannot be watched or read.
    """
    label = f"netns fd {netns_fd}"
    creating = asyncio.ensure_future(asyncio.to_thread(run_in_netns, netns_fd, _event_socket))
    try:
        sock = await asyncio.shield(creating)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):  # the thread is quick: wait for its socket and close it
            (await creating).close()
        raise
    except OSError as e:
        raise NetworkError(f"{label}: cannot listen to its netlink events: {e.strerror}", netns=label) from None
    try:
        async with asyncio.timeout(timeout):
            while True:
                config = await asyncio.to_thread(read_config, netns_fd)
                if not config.interfaces:
                    await _next_events(sock)
                    continue
                try:
                    async with asyncio.timeout(settle):
                        await _next_events(sock)
                except TimeoutError:
                    return config  # nothing changed since it was read
    except TimeoutError:
        raise NetworkTimeoutError(f"{label}: no interface with an address appeared within {timeout:g} s "
                                  "(did CNI run for this namespace?)", netns=label, timeout=timeout) from None
    except OSError as e:
        raise NetworkError(f"{label}: reading its netlink events: {e.strerror}", netns=label) from None
    finally:
        sock.close()


# --- one UVM's network --------------------------------------------------------------------------

NEW = NEW_NETNS


def guest_config(config: NetworkConfig, attachments: Sequence[TapAttachment], nic_macs: Sequence[str]) -> dict[str, Any]:
    """The configure_network request: each NIC, found by the MAC it has now, takes its veth's name, MAC,
    MTU and addresses; then the routes and permanent neighbours."""
    by_veth = {a.veth: (a, nic_mac) for a, nic_mac in zip(attachments, nic_macs, strict=True)}
    interfaces = []
    for itf in config.interfaces:
        attachment, nic_mac = by_veth[itf.name]
        interfaces.append({**itf.wire(), "nic_mac": nic_mac, "mac": attachment.mac, "mtu": attachment.mtu})
    wire = config.wire()
    return {"interfaces": interfaces, "routes": wire["routes"], "neighbours": wire["neighbours"]}


class VmNetwork:
    """A UVM's network: the namespace it takes over, the taps beside the veths, what the guest is told.

    ``namespace`` is a path (CNI has run there: a pod's namespace; every link with an address is taken
    over at once, and one that has none is an error) or "new" (a fresh namespace with one tap, taken
    over when CNI adds a link: ``take_over`` waits for it, and ``settle`` looks once, for a container
    about to start). QEMU starts inside ``netns_fd`` with ``nics()``. Blocking work runs in threads.
    """

    def __init__(self, vm_id: str, namespace: str, queues: int, vhost: bool) -> None:
        self.vm_id = vm_id
        self.namespace = namespace
        self.queues = queues
        self.vhost = vhost
        self.netns_fd: int | None = None
        self.attachments: list[TapAttachment] = []
        self.config: NetworkConfig | None = None  # once the NICs stand in for the veths
        self.configured = False  # the guest was told
        self._lock = asyncio.Lock()

    @property
    def label(self) -> str:
        return f"VM {self.vm_id}: netns {self.namespace if self.namespace != NEW else '(new)'}"

    async def open(self) -> None:
        """Enter the namespace and make the taps (connected at once when the namespace has its links).
        Raises NetworkError naming what was wrong; nothing is left behind then."""
        try:
            if self.namespace == NEW:
                self.netns_fd = await asyncio.to_thread(new_netns)
                try:
                    self.attachments = await asyncio.to_thread(open_taps, self.netns_fd, 1, self.queues, self.vhost)
                except NetworkError as e:
                    if e.context.get("errno") not in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
                        raise
                    # No tun device: a container that only asked for a namespace of its own still runs (CNI,
                    # if it comes, finds no NIC to stand in for its veth).
                    log.warning("%s: %s: the VM gets no NIC", self.label, e)
                return
            self.netns_fd = await asyncio.to_thread(open_netns, self.namespace)
            config = await asyncio.to_thread(read_config, self.netns_fd)
            if not config.interfaces:
                raise NetworkError(f"{self.label}: no link with an address to take over (did CNI run there?)",
                                   netns=self.namespace)
            self.attachments = await asyncio.to_thread(attach, self.netns_fd, config.interfaces, self.queues,
                                                       self.vhost)
            self.config = config
        except BaseException:
            await asyncio.shield(self.close())
            raise

    def nics(self, mac_for: Callable[[int, TapAttachment], str]) -> tuple[Nic, ...]:
        """The NICs QEMU is given, one per tap; mac_for(n, attachment) is the MAC the NIC boots with."""
        return tuple(Nic(id=f"nic{n}", mac=mac_for(n, a), tap_fds=tuple(a.tap_fds), vhost_fds=tuple(a.vhost_fds))
                     for n, a in enumerate(self.attachments))

    def launched(self) -> None:
        """QEMU holds the taps now: ours are closed, so its death is the taps' end."""
        for attachment in self.attachments:
            attachment.close_fds()

    async def configure_guest(self, configure: Callable[[dict[str, Any]], Awaitable[None]],
                              nic_macs: Sequence[str]) -> None:
        """Tell the guest, once the NICs stand in for veths (a joined namespace: at once)."""
        async with self._lock:
            await self._configure_locked(configure, nic_macs)

    async def _configure_locked(self, configure: Callable[[dict[str, Any]], Awaitable[None]],
                                nic_macs: Sequence[str]) -> None:
        if self.configured or self.config is None:
            return
        await configure(guest_config(self.config, self.attachments, nic_macs))
        self.configured = True
        log.info("%s: the guest took over %s", self.label,
                 ", ".join(f"{i.name} ({', '.join(f'{a.address}/{a.prefixlen}' for a in i.addresses)})"
                           for i in self.config.interfaces))

    async def settle(self, configure: Callable[[dict[str, Any]], Awaitable[None]], nic_macs: Sequence[str]) -> bool:
        """A new namespace: if CNI has added a link by now, take it over and tell the guest (a container
        about to start must see its network). Whether the guest has a network. Raises NetworkError."""
        async with self._lock:
            if self.config is None and self.netns_fd is not None and self.namespace == NEW and self.attachments:
                config = await asyncio.to_thread(read_config, self.netns_fd)
                if config.interfaces:
                    await self._take_over(config)
            await self._configure_locked(configure, nic_macs)
            return self.configured

    async def take_over(self, configure: Callable[[dict[str, Any]], Awaitable[None]], nic_macs: Sequence[str]) -> None:
        """A new namespace: wait (for the VM's life; cancel to stop) until CNI adds a link, then take it
        over and tell the guest. Raises NetworkError."""
        assert self.netns_fd is not None
        while not self.configured:
            config = await wait_for_interfaces(self.netns_fd, None)
            async with self._lock:
                if self.config is None:
                    await self._take_over(config)
                await self._configure_locked(configure, nic_macs)

    async def _take_over(self, config: NetworkConfig) -> None:
        if len(config.interfaces) > len(self.attachments):
            log.warning("%s: %d links with an address, the VM has %d NIC(s): taking over %s only", self.label,
                        len(config.interfaces), len(self.attachments), config.interfaces[0].name)
        interfaces = config.interfaces[:len(self.attachments)]
        assert self.netns_fd is not None
        for attachment, interface in zip(self.attachments, interfaces, strict=False):
            await asyncio.to_thread(connect, self.netns_fd, attachment, interface)
        names = {i.name for i in interfaces}
        self.config = NetworkConfig(interfaces, tuple(r for r in config.routes if r.device in names),
                                    tuple(n for n in config.neighbours if n.device in names))

    def record(self) -> dict[str, Any]:
        """What the shim's delete action must undo if the shim dies: the joined namespace's qdiscs. (A new
        namespace dies with QEMU, the only process in it.)"""
        if self.namespace == NEW:
            return {}
        return {"netns": self.namespace, "veths": [a.veth for a in self.attachments if a.veth],
                "taps": [a.tap for a in self.attachments]}

    async def close(self) -> None:
        """Leave the namespace as CNI made it (our qdiscs and filters off the veths, the taps gone with
        their fds). Idempotent; shielded. Logs what it could not undo."""
        fd, self.netns_fd = self.netns_fd, None
        attachments, self.attachments = self.attachments, []
        try:
            if fd is not None and attachments:
                await asyncio.shield(asyncio.to_thread(detach, fd, attachments))
        except NetworkError as e:
            log.error("%s: %s", self.label, e)
        finally:
            for attachment in attachments:
                attachment.close_fds()
            if fd is not None:
                os.close(fd)
