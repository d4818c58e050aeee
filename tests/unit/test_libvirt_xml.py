"""The libvirt backend's domain XML: what libvirt is given decides which devices the guest probes."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest

from schemas.uvm_config import Share
from uvm import builder, errors
from uvm.backends import libvirt as libvirt_backend
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


class SlowDomain:
    def __init__(self, running: set[str], name: str) -> None:
        self.running, self.name = running, name

    def isActive(self) -> int:
        return int(self.name in self.running)

    def destroy(self) -> int:
        self.running.discard(self.name)
        return 0


def libvirt_error(code: int, message: str) -> libvirt.libvirtError:
    """A libvirtError as libvirt raises it: with its error code (err's layout: code, domain, message, ...)."""
    e = libvirt.libvirtError(message)
    e.err = (code, libvirt.VIR_FROM_QEMU, message, libvirt.VIR_ERR_ERROR, "", "", "", 0, 0)
    return e


class SlowConnection:
    """A libvirtd slow to create the domain (it re-probes QEMU, say): createXML returns after the start gave up."""

    def __init__(self, running: set[str]) -> None:
        self.running = running
        self.closed = False

    def lookupByName(self, name: str) -> None:
        raise libvirt_error(libvirt.VIR_ERR_NO_DOMAIN, "Domain not found")

    def getCapabilities(self) -> str:
        return "<capabilities><host/></capabilities>"  # QEMU as root (no DAC label)

    def createXML(self, xml: str, flags: int) -> SlowDomain:
        time.sleep(0.5)
        name = ET.fromstring(xml).findtext("name") or ""
        self.running.add(name)
        return SlowDomain(self.running, name)

    def close(self) -> int:
        self.closed = True
        return 0


async def test_a_domain_created_after_its_start_was_abandoned_is_destroyed_by_close(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    running: set[str] = set()
    conn = SlowConnection(running)
    monkeypatch.setattr(libvirt, "open", lambda uri: conn)
    monkeypatch.setattr(libvirt_backend, "_ensure_event_loop", lambda: None)
    monkeypatch.setattr(libvirt_backend, "check_kvm_node", lambda log: None)
    spec = builder.build(make_test_config(tmp_path, backend="libvirt"))
    backend = libvirt_backend.LibvirtBackend(spec)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.1):  # the boot timeout (or close) while createXML runs
            await backend.launch(spec)
    await asyncio.wait_for(backend.aclose(), 10)
    await asyncio.sleep(0.6)  # createXML has returned by now, whatever aclose did
    assert not running, "the late domain is still running"
    assert conn.closed and not backend.run_dir.exists()


async def test_a_failed_domain_lookup_is_not_taken_for_a_free_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    running: set[str] = set()
    conn = SlowConnection(running)

    def refused(name: str) -> None:
        raise libvirt_error(libvirt.VIR_ERR_OPERATION_DENIED, "access denied: lookup")

    conn.lookupByName = refused  # type: ignore[method-assign]
    monkeypatch.setattr(libvirt, "open", lambda uri: conn)
    monkeypatch.setattr(libvirt_backend, "_ensure_event_loop", lambda: None)
    monkeypatch.setattr(libvirt_backend, "check_kvm_node", lambda log: None)
    spec = builder.build(make_test_config(tmp_path, backend="libvirt"))
    backend = libvirt_backend.LibvirtBackend(spec)
    with pytest.raises(errors.StartError, match=f"cannot tell whether domain uvmshim-{spec.vm_id} exists: access denied"):
        await backend.launch(spec)
    await backend.aclose()
    assert not running and conn.closed and not backend.run_dir.exists()


# -- what libvirt's QEMU user can reach ------------------------------------------------------------------

CAPABILITIES = """<capabilities><host>
  <secmodel><model>none</model><doi>0</doi></secmodel>
  <secmodel><model>dac</model><doi>0</doi><baselabel type='kvm'>+4242:+4343</baselabel>
    <baselabel type='qemu'>+4242:+4343</baselabel></secmodel>
</host></capabilities>"""


def test_the_hypervisor_user_comes_from_the_dac_label() -> None:
    user = libvirt_backend.hypervisor_user(CAPABILITIES)
    assert user is not None and (user.uid, user.gid) == (4242, 4343) and 4343 in user.groups
    assert user.describe() == "uid 4242"  # no passwd entry
    root = CAPABILITIES.replace("+4242:+4343", "+0:+0")
    assert libvirt_backend.hypervisor_user(root) is None  # QEMU as root: nothing is out of its reach
    assert libvirt_backend.hypervisor_user("<capabilities><host/></capabilities>") is None


def test_unreachable_names_the_directory_that_denies_search() -> None:
    user = libvirt_backend.HypervisorUser(4242, 4343, frozenset({4343}))
    base = Path(tempfile.mkdtemp(prefix="uvmt-reach-", dir="/tmp"))  # (pytest's own tmp_path is under a 0700 dir)
    try:
        check_reachability(base, user)
    finally:
        shutil.rmtree(base)


def check_reachability(base: Path, user: libvirt_backend.HypervisorUser) -> None:
    base.chmod(0o755)
    outer = base / "outer"
    inner = outer / "inner"
    inner.mkdir(parents=True)
    (inner / "f").write_text("x")
    outer.chmod(0o750)  # group root: not the user's
    why = libvirt_backend.unreachable(inner / "f", user)
    assert why is not None and why.startswith(f"{outer} (mode 0750") and "does not let uid 4242 through" in why
    outer.chmod(0o711)
    assert libvirt_backend.unreachable(inner / "f", user) is None
    inner.chmod(0o700)  # a share directory itself must let the user in, a file's directory is the parent's
    assert libvirt_backend.unreachable(inner / "f", user) is not None
    assert libvirt_backend.unreachable(inner, user) is None
    assert libvirt_backend.unreachable(inner, user, directory=True) is not None


def test_publish_copies_once_keeps_the_newest_and_leaves_the_sources_alone(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    dest = tmp_path / "pub" / "images"
    files = {}
    for name in ("kernel", "initrd", "rootfs"):
        (src / name).write_bytes(name.encode() * 100)
        files[name] = src / name
    first = libvirt_backend.publish(files, dest)
    assert {k: v.read_bytes() for k, v in first.items()} == {k: v.read_bytes() for k, v in files.items()}
    assert all(v.parent == dest and v.stat().st_ino != files[k].stat().st_ino for k, v in first.items())
    assert (dest.stat().st_mode & 0o777, (tmp_path / "pub").stat().st_mode & 0o777) == (0o755, 0o755)
    inode = first["kernel"].stat().st_ino
    assert libvirt_backend.publish(files, dest)["kernel"].stat().st_ino == inode  # unchanged: reused
    time.sleep(0.01)
    (src / "kernel").write_bytes(b"new kernel")
    second = libvirt_backend.publish(files, dest)
    assert second["kernel"] != first["kernel"] and second["kernel"].read_bytes() == b"new kernel"
    for n in range(libvirt_backend.PUBLISHED_KEEP + 3):  # many other images: only the newest stay
        (src / "kernel").write_bytes(b"k%d" % n)
        libvirt_backend.publish(files, dest)
    left = [p for p in dest.iterdir()]
    assert len(left) == libvirt_backend.PUBLISHED_KEEP and not any(p.name.startswith(".") for p in left)
