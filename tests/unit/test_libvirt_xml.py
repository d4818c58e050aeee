"""The libvirt backend's domain XML: what libvirt is given decides which devices the guest probes."""

from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET
from pathlib import Path

from schemas.uvm_config import Share
from uvm import builder
from uvm.backends.libvirt import DOMAIN_PREFIX, domain_xml
from uvm.testing import make_test_config


def pci_slots(dom: ET.Element) -> list[tuple[str, str | None]]:
    """(device tag, slot on the root bus or None when libvirt is left to place it) per PCI device."""
    out = []
    for dev in dom.find("devices") or []:
        if dev.tag in ("disk", "filesystem") or (dev.tag == "controller" and dev.get("type") != "usb"):
            addr = dev.find("address")
            if addr is not None:
                assert addr.get("type") == "pci" and addr.get("bus") == "0x00", ET.tostring(dev)
            out.append((dev.tag, None if addr is None else addr.get("slot")))
    return out


def test_devices_are_root_bus_endpoints_without_usb(tmp_path: Path) -> None:
    spec = builder.build(make_test_config(tmp_path, scsi_controllers=2))
    spec = dataclasses.replace(spec, shares=(Share(tag="rootfs", host_path=tmp_path, readonly=True),))
    dom = ET.fromstring(domain_xml(spec, tmp_path / "console.log"))
    assert dom.findtext("name") == f"{DOMAIN_PREFIX}{spec.vm_id}"
    slots = pci_slots(dom)
    # rootfs disk, two virtio-scsi controllers, virtio-serial, one 9p share: each on its own slot
    assert sorted(tag for tag, _ in slots) == ["controller", "controller", "controller", "disk", "filesystem"]
    assert None not in [slot for _, slot in slots]
    assert len({slot for _, slot in slots}) == len(slots)
    usb = [c for c in dom.iter("controller") if c.get("type") == "usb"]
    assert [c.get("model") for c in usb] == ["none"]
    assert dom.find("devices/memballoon").get("model") == "none"  # type: ignore[union-attr]


def test_devices_past_the_last_free_slot_are_left_to_libvirt(tmp_path: Path) -> None:
    spec = builder.build(make_test_config(tmp_path))
    shares = tuple(Share(tag=f"s{i}", host_path=tmp_path) for i in range(40))
    dom = ET.fromstring(domain_xml(dataclasses.replace(spec, shares=shares), tmp_path / "console.log"))
    slots = [slot for _, slot in pci_slots(dom)]
    placed = [s for s in slots if s is not None]
    assert len(placed) == 0x1F - 2 and len(set(placed)) == len(placed)
    assert slots.count(None) == len(slots) - len(placed) > 0
