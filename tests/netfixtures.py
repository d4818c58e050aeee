"""Networks for tests, made with pyroute2 as CNI's bridge plugin would make them: private names with a
random suffix and a 10.x.y.0/23 that no route of the host uses, removed afterwards whatever happens."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import secrets
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pyroute2 import netns as pyroute2_netns
from pyroute2.iproute.linux import IPRoute

from uvm import network as net

NEIGH_MAC = "02:00:5e:10:00:09"


def in_ns(fd: int, work: Callable[[Any], Any]) -> Any:
    """work(ipr) with an IPRoute socket inside the namespace fd."""

    def run() -> Any:
        with IPRoute(groups=0) as ipr:
            return work(ipr)

    return net.run_in_netns(fd, run)


def free_subnet() -> str:
    """10.x.y with y even, x.y random, and no route of the host overlapping 10.x.y.0/23."""
    with IPRoute(groups=0) as ipr:
        used = [ipaddress.ip_network(f"{r.get('RTA_DST')}/{r['dst_len']}", strict=False)
                for r in ipr.get_routes(family=socket.AF_INET) if r.get("RTA_DST")]
    for _ in range(100):
        subnet = f"10.{random.randint(200, 249)}.{2 * random.randint(0, 127)}"
        candidate = ipaddress.ip_network(f"{subnet}.0/23")  # the extra route takes the next /24
        if not any(candidate.overlaps(u) for u in used):
            return subnet
    raise RuntimeError("no free 10.x.y.0/23 for the test")


@dataclass
class PodNet:
    """A netns as CNI's bridge plugin leaves it, plus the host side of it."""

    name: str
    path: str
    fd: int
    veth: str  # inside the netns
    veth_mac: str
    host_veth: str  # its peer, on the bridge
    bridge: str
    bridge_mac: str
    subnet: str  # "10.x.y"
    address: str  # subnet.2, on veth
    gateway: str  # subnet.1, on the bridge
    neighbour: str  # subnet.9, a permanent entry on veth
    extra_route: str  # a route without a gateway, added after the default one


def index_of(fd: int, name: str) -> int | None:
    found = in_ns(fd, lambda ipr: ipr.link_lookup(ifname=name))
    return int(found[0]) if found else None


@contextlib.contextmanager
def pod_network(mtu: int = 1400, inside: str | None = None) -> Iterator[PodNet]:
    """A namespace /var/run/netns/uvmt-<sfx> as CNI's bridge plugin leaves it: a veth with subnet.2/24 and
    the MTU, a default route via the bridge's subnet.1, a route without a gateway and a permanent
    neighbour; its peer on a bridge of the host's with subnet.1/24. inside: the veth's name in the namespace
    (CNI's eth0), else a unique one. Everything is removed afterwards."""
    sfx = secrets.token_hex(3)
    name, veth, host_veth, bridge = f"uvmt-{sfx}", f"uvc{sfx}", f"uvh{sfx}", f"uvb{sfx}"
    subnet = free_subnet()
    x, y = (int(p) for p in subnet.split(".")[1:])
    fd = -1
    pyroute2_netns.create(name)
    try:
        fd = net.open_netns(f"/var/run/netns/{name}")
        with IPRoute(groups=0) as ipr:
            ipr.link("add", ifname=bridge, kind="bridge")
            br = ipr.link_lookup(ifname=bridge)[0]
            ipr.addr("add", index=br, address=f"{subnet}.1", prefixlen=24)
            ipr.link("set", index=br, state="up")
            ipr.link("add", ifname=host_veth, kind="veth", peer=veth)
            host = ipr.link_lookup(ifname=host_veth)[0]
            ipr.link("set", index=host, master=br, state="up")
            ipr.link("set", index=ipr.link_lookup(ifname=veth)[0], net_ns_fd=fd)
            bridge_mac = ipr.get_links(br)[0].get("IFLA_ADDRESS")
        extra_route = f"10.{x}.{y + 1}.0"

        def setup(ipr: Any) -> str:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            i = ipr.link_lookup(ifname=veth)[0]
            if inside:
                ipr.link("set", index=i, ifname=inside)
            ipr.link("set", index=i, mtu=mtu, state="up")
            ipr.addr("add", index=i, address=f"{subnet}.2", prefixlen=24)
            ipr.route("add", dst="0.0.0.0/0", gateway=f"{subnet}.1", oif=i)
            ipr.route("add", dst=f"{extra_route}/24", oif=i, scope=253)
            ipr.neigh("add", dst=f"{subnet}.9", lladdr=NEIGH_MAC, ifindex=i, state=0x80)
            return str(ipr.get_links(i)[0].get("IFLA_ADDRESS"))

        veth_mac = in_ns(fd, setup)
        yield PodNet(name=name, path=f"/var/run/netns/{name}", fd=fd, veth=inside or veth, veth_mac=veth_mac,
                     host_veth=host_veth, bridge=bridge, bridge_mac=bridge_mac, subnet=subnet,
                     address=f"{subnet}.2", gateway=f"{subnet}.1", neighbour=f"{subnet}.9", extra_route=extra_route)
    finally:
        with IPRoute(groups=0) as ipr:
            for link in (host_veth, bridge):
                for index in ipr.link_lookup(ifname=link):
                    with contextlib.suppress(Exception):
                        ipr.link("del", index=index)
        if fd >= 0:
            os.close(fd)
        pyroute2_netns.remove(name)


CNI_BIN = "/usr/lib/cni"  # Debian's containernetworking-plugins


def cni_bridge_conf(name: str, bridge: str, subnet: str, ipam_dir: str) -> dict[str, Any]:
    """A CNI network of the bridge plugin with host-local IPAM in subnet.0/24 (gateway subnet.1), no
    masquerading (no iptables), its IPAM data in a private directory."""
    return {"cniVersion": "1.0.0", "name": name, "type": "bridge", "bridge": bridge, "isGateway": True,
            "ipMasq": False, "ipam": {"type": "host-local", "ranges": [[{"subnet": f"{subnet}.0/24"}]],
                                      "routes": [{"dst": "0.0.0.0/0"}], "dataDir": ipam_dir}}


def cni(command: str, conf: dict[str, Any], container_id: str, netns_path: str, ifname: str = "eth0") -> dict[str, Any]:
    """Run the network's plugin as a CNI runtime does (ADD, DEL, CHECK); its JSON result ({} for DEL).
    Raises AssertionError with the plugin's error when it fails."""
    import json
    import subprocess

    res = subprocess.run([f"{CNI_BIN}/{conf['type']}"], input=json.dumps(conf).encode(), capture_output=True,
                         timeout=60, check=False,
                         env={"CNI_COMMAND": command, "CNI_CONTAINERID": container_id, "CNI_NETNS": netns_path,
                              "CNI_IFNAME": ifname, "CNI_PATH": CNI_BIN, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    assert res.returncode == 0, f"CNI {command}: {res.stdout.decode(errors='replace')} {res.stderr.decode(errors='replace')}"
    return json.loads(res.stdout) if res.stdout.strip() else {}


def delete_link(name: str) -> None:
    with IPRoute(groups=0) as ipr:
        for index in ipr.link_lookup(ifname=name):
            with contextlib.suppress(Exception):
                ipr.link("del", index=index)


def host_links() -> set[str]:
    with IPRoute(groups=0) as ipr:
        return {str(link.get("IFLA_IFNAME")) for link in ipr.get_links()}


@contextlib.contextmanager
def host_page(address: str, body: bytes = b"from the host\n") -> Iterator[int]:
    """A one-page HTTP server on the host (on a bridge's address, or 0.0.0.0): its port."""
    import http.server
    import threading

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer((address, 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def fetch(url: str, patience: float = 120) -> bytes:
    """GET url from the host, trying again while the server in the guest is still starting."""
    import time
    import urllib.request

    deadline = time.monotonic() + patience
    while True:
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                return bytes(r.read())
        except OSError as e:  # refused, or no route yet
            if time.monotonic() > deadline:
                raise AssertionError(f"{url}: {e}") from None
            time.sleep(0.5)
