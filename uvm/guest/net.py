"""The guest side of a UVM's network: give the VM's NIC the configuration of the veth it stands in for.

The host (uvm/network.py) put a tap beside each veth of the container's network namespace and told
QEMU to give the guest a NIC on it. This module, on the host's `configure_network` request, finds each
NIC by the MAC QEMU gave it, names it as the veth is named (eth0), gives it the veth's MAC (the bridge
and its neighbours know that one), MTU and addresses, brings it up, then adds the routes (those
without a gateway first, as the host orders them) and the permanent neighbours. The container runs in
the UVM's network namespace, so that is its network.

Everything in the request is validated here, as any message from the host: names, MACs, MTUs,
addresses, prefixes, route scopes and metrics. The changes are made by busybox's `ip` (and `arp -s`
for IPv4 neighbours) in one shell script run off the agent's loop; only validated values reach it.
Stdlib only.
"""

from __future__ import annotations

import os

from schemas import agent as proto
from uvm.guest.errors import RequestError

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs start-up time in the guest
if TYPE_CHECKING:
    from typing import Any

MAX_INTERFACES = 8
MAX_ROUTES = 256
MAX_NEIGHBOURS = 256
MAX_ADDRESSES = 64
NIC_WAIT_S = 10.0
HEX = "0123456789abcdef"
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
SCOPES = {0: "global", 200: "site", 253: "link", 254: "host"}


def _invalid(what: str) -> RequestError:
    return RequestError(proto.E_INVALID, f"configure_network: {what}")


def _field(obj: Any, key: str, where: str) -> Any:
    if type(obj) is not dict or key not in obj:
        raise _invalid(f"{where}: missing {key}")
    return obj[key]


def _int(value: Any, low: int, high: int, what: str) -> int:
    if type(value) is not int or not low <= value <= high:
        raise _invalid(f"{what} must be an integer from {low} to {high}, not {value!r}")
    return value


def name(value: Any, what: str) -> str:
    """An interface name: 1-15 characters of [A-Za-z0-9_.-], not '.' or '..'."""
    if type(value) is not str or not 0 < len(value) < 16 or not set(value) <= NAME_CHARS or value in (".", ".."):
        raise _invalid(f"{what} {value!r} is not an interface name")
    return value


def mac(value: Any, what: str) -> str:
    """A unicast Ethernet MAC, lower case, colon-separated."""
    if type(value) is not str or len(value) != 17:
        raise _invalid(f"{what} {value!r} is not a MAC address")
    low = value.lower()
    parts = low.split(":")
    if len(parts) != 6 or any(len(p) != 2 or p[0] not in HEX or p[1] not in HEX for p in parts):
        raise _invalid(f"{what} {value!r} is not a MAC address")
    if int(parts[0], 16) & 1 or low == "00:00:00:00:00:00":
        raise _invalid(f"{what} {value!r} is not a unicast MAC address")
    return low


def address(value: Any, family: int, what: str) -> str:
    """An IPv4 or IPv6 address of that family, in its canonical text form (ipaddress: loaded only here)."""
    import ipaddress

    if type(value) is not str or len(value) > 45:
        raise _invalid(f"{what} {value!r} is not an address")
    try:
        parsed = ipaddress.ip_address(value)
    except ValueError:
        raise _invalid(f"{what} {value!r} is not an address") from None
    if parsed.version != family:
        raise _invalid(f"{what} {value!r} is not an IPv{family} address")
    return str(parsed)


def _family(value: Any, what: str) -> int:
    if value not in (4, 6) or type(value) is not int:
        raise _invalid(f"{what}: family must be 4 or 6, not {value!r}")
    return int(value)


def _list(obj: Any, key: str, limit: int) -> list[Any]:
    value = obj.get(key, [])
    if type(value) is not list or len(value) > limit:
        raise _invalid(f"{key} must be a list of at most {limit}")
    return value


def parse(params: dict[str, Any]) -> list[list[str]]:
    """The commands (argv lists) that make the request's configuration, after validating all of it.
    Raises RequestError (invalid_argument) naming the first bad field."""
    interfaces = _list(params, "interfaces", MAX_INTERFACES)
    if not interfaces:
        raise _invalid("no interfaces")
    names: set[str] = set()
    link_steps: list[list[str]] = []
    renames: list[tuple[str, str]] = []  # (the NIC's MAC, its name to be)
    up_steps: list[list[str]] = []
    for n, itf in enumerate(interfaces):
        where = f"interfaces[{n}]"
        nic = mac(_field(itf, "nic_mac", where), f"{where}.nic_mac")
        new_name = name(_field(itf, "name", where), f"{where}.name")
        if new_name in names or new_name == "lo":
            raise _invalid(f"{where}.name {new_name!r} is used twice (or is lo)")
        names.add(new_name)
        new_mac = mac(_field(itf, "mac", where), f"{where}.mac")
        mtu = _int(_field(itf, "mtu", where), 68, 65535, f"{where}.mtu")
        renames.append((nic, new_name))
        link_steps.append(["ip", "link", "set", "dev", new_name, "address", new_mac, "mtu", str(mtu)])
        addresses = _list(itf, "addresses", MAX_ADDRESSES)
        for k, a in enumerate(addresses):
            awhere = f"{where}.addresses[{k}]"
            family = _family(_field(a, "family", awhere), awhere)
            ip = address(_field(a, "address", awhere), family, f"{awhere}.address")
            plen = _int(_field(a, "prefixlen", awhere), 0, 32 if family == 4 else 128, f"{awhere}.prefixlen")
            if family == 6:  # duplicate address detection would hold the address back for a second or more
                link_steps.append(["write", f"/proc/sys/net/ipv6/conf/{new_name}/accept_dad", "0"])
            link_steps.append(["ip", f"-{family}", "addr", "add", f"{ip}/{plen}", "dev", new_name])
        up_steps.append(["ip", "link", "set", "dev", new_name, "up"])
    route_steps = []
    for n, r in enumerate(_list(params, "routes", MAX_ROUTES)):
        where = f"routes[{n}]"
        family = _family(_field(r, "family", where), where)
        device = name(_field(r, "device", where), f"{where}.device")
        if device not in names:
            raise _invalid(f"{where}.device {device!r} is none of the interfaces")
        dest = r.get("dest")
        plen = _int(r.get("dest_prefixlen", 0), 0, 32 if family == 4 else 128, f"{where}.dest_prefixlen")
        target = "default" if dest is None else f"{address(dest, family, f'{where}.dest')}/{plen}"
        if dest is None and plen:
            raise _invalid(f"{where}: a default route has prefix length 0")
        argv = ["ip", f"-{family}", "route", "add", target]
        if r.get("gateway") is not None:
            argv += ["via", address(r["gateway"], family, f"{where}.gateway")]
        argv += ["dev", device]
        if r.get("source") is not None:
            argv += ["src", address(r["source"], family, f"{where}.source")]
        if r.get("metric") is not None:
            argv += ["metric", str(_int(r["metric"], 0, 0xFFFFFFFF, f"{where}.metric"))]
        scope = _int(r.get("scope", 0), 0, 255, f"{where}.scope")
        if scope not in SCOPES:
            raise _invalid(f"{where}.scope {scope} is not one of {sorted(SCOPES)}")
        if scope:
            argv += ["scope", SCOPES[scope]]
        onlink = r.get("onlink", False)
        if type(onlink) is not bool:
            raise _invalid(f"{where}.onlink must be true or false")
        if onlink:
            argv.append("onlink")
        route_steps.append(argv)
    neighbour_steps = []
    for n, nb in enumerate(_list(params, "neighbours", MAX_NEIGHBOURS)):
        where = f"neighbours[{n}]"
        family = _family(_field(nb, "family", where), where)
        device = name(_field(nb, "device", where), f"{where}.device")
        if device not in names:
            raise _invalid(f"{where}.device {device!r} is none of the interfaces")
        ip = address(_field(nb, "address", where), family, f"{where}.address")
        lladdr = mac(_field(nb, "mac", where), f"{where}.mac")
        if family == 6:
            raise RequestError(proto.E_UNSUPPORTED, f"configure_network: {where}: a permanent IPv6 neighbour "
                                                    "(the guest's busybox adds IPv4 ones only)")
        neighbour_steps.append(["arp", "-i", device, "-s", ip, lladdr])
    return [["rename", nic, new] for nic, new in renames] + link_steps + up_steps + route_steps + neighbour_steps


def nics_by_mac() -> dict[str, str]:
    """MAC -> interface name of the NICs the kernel has (not lo)."""
    found = {}
    for iface in os.listdir("/sys/class/net"):
        try:
            with open(f"/sys/class/net/{iface}/address") as f:
                found[f.read().strip().lower()] = iface
        except OSError:
            continue
    return found


def script(steps: list[list[str]], nics: dict[str, str]) -> str:
    """One shell script for the steps (every value in them was validated: no quoting is needed beyond
    plain words). Renames go through temporary names, so two NICs may swap names."""
    lines = ["set -e"]
    renames = [(nics[s[1]], s[2]) for s in steps if s[0] == "rename"]
    for n, (current, _) in enumerate(renames):
        lines.append(f"ip link set dev {current} down")
        lines.append(f"ip link set dev {current} name uvmnic{n}")
    for n, (_, final) in enumerate(renames):
        lines.append(f"ip link set dev uvmnic{n} name {final}")
    for step in steps:
        if step[0] == "rename":
            continue
        if step[0] == "write":
            lines.append(f"echo {step[2]} > {step[1]}")
        else:
            lines.append(" ".join(step))
    return "\n".join(lines) + "\n"


NET_MODULES = ["modprobe", "-a", "virtio_net"]


class NetworkMixin:
    """configure_network for the Runtime (the module loading and the NIC wait block briefly, once)."""

    agent: Any
    net_modules_loaded = False

    def ensure_net_modules(self) -> None:
        if self.net_modules_loaded:
            return
        status, out = self.agent.run_blocking(NET_MODULES)
        if status != 0:
            raise RequestError(proto.E_INTERNAL, f"loading virtio_net: {out.strip()}")
        self.net_modules_loaded = True

    def configure_network(self, req_id: int, params: dict[str, Any]) -> None:
        import time

        steps = parse(params)
        self.ensure_net_modules()
        wanted = [s[1] for s in steps if s[0] == "rename"]
        deadline = time.monotonic() + NIC_WAIT_S
        while not set(wanted) <= set(nics := nics_by_mac()):
            if time.monotonic() > deadline:
                missing = sorted(set(wanted) - set(nics))
                raise RequestError(proto.E_NOT_FOUND, f"configure_network: no NIC with MAC {', '.join(missing)} "
                                                      f"(the UVM has {sorted(nics) or 'none'})")
            time.sleep(0.01)

        def done(status: int, output: str) -> None:
            if status == 0:
                self.agent.reply(req_id, {})
            else:
                self.agent.reply_error(req_id, proto.E_INVALID, f"configure_network: {output.strip()[-2000:]}")

        self.agent.run_helper(["sh", "-c", script(steps, nics)], done)
