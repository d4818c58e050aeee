"""The guest's configure_network: every field from the host validated, and the commands it makes from them
(uvm/guest/net.py; the real thing runs in the UVM's integration tests)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from uvm.guest import net
from uvm.guest.errors import RequestError

GOOD: dict[str, Any] = {
    "interfaces": [{"nic_mac": "02:75:76:6d:00:00", "name": "eth0", "mac": "0A:58:0A:F4:00:05", "mtu": 1450,
                    "addresses": [{"family": 4, "address": "10.244.0.5", "prefixlen": 24},
                                  {"family": 6, "address": "fd00::5", "prefixlen": 64}]}],
    "routes": [{"family": 4, "dest": "10.244.0.1", "dest_prefixlen": 32, "gateway": None, "source": None,
                "device": "eth0", "scope": 253, "metric": None},
               {"family": 4, "dest": None, "dest_prefixlen": 0, "gateway": "10.244.0.1", "source": None,
                "device": "eth0", "scope": 0, "metric": 100}],
    "neighbours": [{"family": 4, "address": "10.244.0.1", "mac": "0a:58:0a:f4:00:01", "device": "eth0"}],
}


def test_a_good_request_becomes_these_commands_in_this_order() -> None:
    steps = net.parse(copy.deepcopy(GOOD))
    assert steps == [
        ["rename", "02:75:76:6d:00:00", "eth0"],
        ["ip", "link", "set", "dev", "eth0", "address", "0a:58:0a:f4:00:05", "mtu", "1450"],
        ["ip", "-4", "addr", "add", "10.244.0.5/24", "dev", "eth0"],
        ["write", "/proc/sys/net/ipv6/conf/eth0/accept_dad", "0"],
        ["ip", "-6", "addr", "add", "fd00::5/64", "dev", "eth0"],
        ["ip", "link", "set", "dev", "eth0", "up"],
        ["ip", "-4", "route", "add", "10.244.0.1/32", "dev", "eth0", "scope", "link"],
        ["ip", "-4", "route", "add", "default", "via", "10.244.0.1", "dev", "eth0", "metric", "100"],
        ["arp", "-i", "eth0", "-s", "10.244.0.1", "0a:58:0a:f4:00:01"],
    ]
    script = net.script(steps, {"02:75:76:6d:00:00": "eth1"})
    assert script.splitlines()[:4] == ["set -e", "ip link set dev eth1 down", "ip link set dev eth1 name uvmnic0",
                                       "ip link set dev uvmnic0 name eth0"]
    assert "echo 0 > /proc/sys/net/ipv6/conf/eth0/accept_dad" in script


def bad(path: list[Any], value: Any) -> dict[str, Any]:
    req = copy.deepcopy(GOOD)
    obj = req
    for key in path[:-1]:
        obj = obj[key]
    if value is KeyError:
        del obj[path[-1]]
    else:
        obj[path[-1]] = value
    return req


@pytest.mark.parametrize("path, value, problem", [
    (["interfaces"], [], "no interfaces"),
    (["interfaces"], "eth0", "interfaces must be a list"),
    (["interfaces"], [GOOD["interfaces"][0]] * 9, "at most 8"),
    (["interfaces", 0, "name"], "eth0; reboot", "not an interface name"),
    (["interfaces", 0, "name"], "a-very-long-name0", "not an interface name"),
    (["interfaces", 0, "name"], "lo", "lo"),
    (["interfaces", 0, "nic_mac"], "02:75:76:6d:00", "not a MAC address"),
    (["interfaces", 0, "mac"], "01:00:5e:00:00:01", "not a unicast MAC"),
    (["interfaces", 0, "mac"], "zz:00:00:00:00:01", "not a MAC address"),
    (["interfaces", 0, "mtu"], 67, "mtu must be an integer from 68"),
    (["interfaces", 0, "mtu"], True, "mtu must be an integer"),
    (["interfaces", 0, "mtu"], KeyError, "missing mtu"),
    (["interfaces", 0, "addresses", 0, "address"], "10.244.0.256", "not an address"),
    (["interfaces", 0, "addresses", 0, "address"], "fd00::1", "not an IPv4 address"),
    (["interfaces", 0, "addresses", 0, "prefixlen"], 33, "prefixlen must be an integer from 0 to 32"),
    (["interfaces", 0, "addresses", 0, "family"], 5, "family must be 4 or 6"),
    (["routes", 0, "device"], "eth1", "none of the interfaces"),
    (["routes", 0, "scope"], 100, "scope 100 is not one of"),
    (["routes", 1, "gateway"], "10.244.0.1 dev lo", "not an address"),
    (["routes", 1, "dest_prefixlen"], 8, "a default route has prefix length 0"),
    (["routes", 1, "metric"], -1, "metric must be an integer"),
    (["routes", 1, "onlink"], "yes", "onlink must be true or false"),
    (["neighbours", 0, "mac"], "0a:58:0a:f4:00", "not a MAC address"),
    (["neighbours", 0, "device"], "eth9", "none of the interfaces"),
])
def test_every_bad_field_is_refused_by_name(path: list[Any], value: Any, problem: str) -> None:
    with pytest.raises(RequestError) as info:
        net.parse(bad(path, value))
    assert info.value.code == "invalid_argument" and problem in info.value.message, info.value.message


def test_a_permanent_ipv6_neighbour_is_refused_as_unsupported() -> None:
    req = bad(["neighbours", 0], {"family": 6, "address": "fd00::1", "mac": "0a:58:0a:f4:00:01", "device": "eth0"})
    with pytest.raises(RequestError) as info:
        net.parse(req)
    assert info.value.code == "unsupported"


def test_an_onlink_route_keeps_its_flag() -> None:
    steps = net.parse(bad(["routes", 1, "onlink"], True))
    assert steps[-2] == ["ip", "-4", "route", "add", "default", "via", "10.244.0.1", "dev", "eth0", "metric", "100",
                         "onlink"]
