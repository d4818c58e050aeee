"""The pure parts of `runuvm boot --ssh/--console` and `resize-tty --pid`: config and QEMU arguments,
keys and the guest's host key answer, the published SSH record, the console's escape and end of input,
and the ProcessDetails a Pids reply carries."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import socket
import stat
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import ValidationError

from schemas.containerd import runc_options_pb2
from schemas.uvm_config import Share, UvmConfig
from shim.containerd.service import process_details
from shim.runuvm import debugvm
from shim.runuvm.commands import RunuvmError
from uvm import builder
from uvm.backends.qemu import QemuFds, qemu_argv
from uvm.errors import ConfigError
from uvm.ssh import ClientKey, SshError, known_hosts_line, parse_host_key
from uvm.testing import make_test_config

ED25519_BLOB = struct.pack(">I", 11) + b"ssh-ed25519" + struct.pack(">I", 32) + bytes(range(32))
HOST_KEY = "ssh-ed25519 " + base64.b64encode(ED25519_BLOB).decode()


# -- config, builder, QEMU arguments ---------------------------------------------------------------

@pytest.mark.parametrize("port", [-1, 65536])
def test_ssh_port_out_of_range_is_rejected(port: int) -> None:
    with pytest.raises(ValidationError, match="ssh_port"):
        UvmConfig(ssh_port=port)


FDS = QemuFds(qmp=10, agent=11, console_log=12)


def test_no_nic_and_a_file_console_by_default(tmp_path: Path) -> None:
    spec = builder.build(make_test_config(tmp_path))
    assert spec.ssh_port is None and not spec.console_socket
    argv = " ".join(qemu_argv(spec, FDS))
    assert "-netdev" not in argv and "virtio-net" not in argv
    assert "-add-fd fd=12,set=1 -chardev file,id=console,path=/dev/fdset/1" in argv  # the shim opened the log


def test_ssh_port_zero_becomes_a_free_loopback_port_forwarded_to_22(tmp_path: Path) -> None:
    spec = builder.build(make_test_config(tmp_path, ssh_port=0))
    assert spec.ssh_port is not None and 1024 <= spec.ssh_port <= 65535
    argv = qemu_argv(spec, FDS)
    netdev = argv[argv.index("-netdev") + 1]
    assert netdev == f"user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:{spec.ssh_port}-:22"
    assert "virtio-net-device,netdev=net0" in argv


def test_ssh_port_in_use_is_a_config_error(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ConfigError, match=f"ssh_port {port}: cannot listen on 127.0.0.1:{port}: in use"):
            builder.build(make_test_config(tmp_path, ssh_port=port))


def test_console_socket_keeps_the_console_log(tmp_path: Path) -> None:
    spec = builder.build(make_test_config(tmp_path, console_socket=True))
    argv = qemu_argv(spec, dataclasses.replace(FDS, console=13))
    chardev = argv[argv.index("-serial") - 1]
    assert chardev == "socket,id=console,fd=13,server=on,wait=off,logfile=/dev/fdset/1"  # (the log: fd 12)


@pytest.mark.parametrize("field,value,message", [
    ("ssh_port", 0, "ssh_port (user-network port forwarding): only the qemu backend supports it, not libvirt"),
    ("console_socket", True, "console_socket: only the qemu backend supports it, not libvirt"),
])
def test_libvirt_refuses_ssh_and_console(tmp_path: Path, field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        builder.build(make_test_config(tmp_path, backend="libvirt", **{field: value}))
    assert str(e.value) == message


# -- keys ------------------------------------------------------------------------------------------

def test_client_key_pair_loads_in_paramiko_and_is_written_0600(tmp_path: Path) -> None:
    import paramiko

    key = ClientKey.generate("runuvm@vm1")
    kind, b64, comment = key.public_line.split(" ")
    assert (kind, comment) == ("ssh-ed25519", "runuvm@vm1")
    path = tmp_path / "id"
    key.write_private(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = paramiko.Ed25519Key.from_private_key_file(str(path))
    assert loaded.get_base64() == b64
    with pytest.raises(SshError, match="cannot create"):
        key.write_private(path)  # never overwrites


def test_host_key_answer_is_checked() -> None:
    assert parse_host_key(f"{HOST_KEY} root@uvm-1\n".encode()) == HOST_KEY
    assert parse_host_key(HOST_KEY.encode()) == HOST_KEY
    rsa_blob = base64.b64encode(struct.pack(">I", 11) + b"ssh-ed25519" + struct.pack(">I", 31) + bytes(33)).decode()
    for bad in (b"", b"hello", f"{HOST_KEY}\n{HOST_KEY}".encode(), f"ssh-rsa {HOST_KEY[12:]}".encode(),
                f"ssh-ed25519 {rsa_blob}".encode(), HOST_KEY.encode() + b" " + b"x" * 200):
        with pytest.raises(SshError):
            parse_host_key(bad)


def test_known_hosts_line_is_what_openssh_expects() -> None:
    assert known_hosts_line(2222, HOST_KEY) == f"[127.0.0.1]:2222 {HOST_KEY}"


# -- the boot's claim and the published record ------------------------------------------------------

def fake_vm(root: Path, vm_id: str, backend: str = "qemu") -> Any:
    """What claim_boot reads of a UtilityVM: its id and config (run directory, backend)."""
    return SimpleNamespace(id=vm_id, config=make_test_config(root / "cfg", id=vm_id, run_dir=root / "run", backend=backend))


def claim_and_publish(root: Path, vm_id: str) -> debugvm.SshAccess:
    return debugvm.publish_ssh(debugvm.claim_boot(root, fake_vm(root, vm_id)), vm_id, 4022, ClientKey.generate("c"), HOST_KEY)


def kill_owner(claim_dir: Path, **change: int) -> None:
    """Make the claim's owner a process that is gone (or, with pid_start, a reused pid)."""
    owner = debugvm.read_owner(claim_dir)
    if not change:
        dead = subprocess.Popen(["true"])
        dead.wait()
        change = {"pid": dead.pid}
    (claim_dir / "owner.json").write_text(owner.model_copy(update=change).model_dump_json())


def test_claim_publish_find_remove(tmp_path: Path) -> None:
    root = tmp_path / "root"
    claim = debugvm.claim_boot(root, fake_vm(root, "uvm-1"))
    d = root / ".boot" / "uvm-1"
    assert claim.directory == d and sorted(p.name for p in d.iterdir()) == ["owner.json", "uvmshim.json"]
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert debugvm.read_owner(d).pid == os.getpid()
    assert json.loads((d / "uvmshim.json").read_text())["run_dir"] == str(root / "run" / "uvm-1")
    with pytest.raises(RunuvmError, match=r"ssh uvm-1: that VM was booted without --ssh"):
        debugvm.find_ssh(root, "uvm-1")
    access = debugvm.publish_ssh(claim, "uvm-1", 4022, ClientKey.generate("c"), HOST_KEY)
    assert sorted(p.name for p in d.iterdir()) == ["id_ed25519", "known_hosts", "owner.json", "ssh.json", "uvmshim.json"]
    assert stat.S_IMODE(access.key.stat().st_mode) == 0o600
    record = debugvm.find_ssh(root, "uvm-1")
    assert (record.vm, record.port, record.key, record.host_key) == ("uvm-1", 4022, str(d / "id_ed25519"), HOST_KEY)
    assert "runuvm ssh uvm-1" in access.instructions() and f"UserKnownHostsFile={d / 'known_hosts'}" in access.instructions()
    access.remove()
    assert sorted(p.name for p in d.iterdir()) == ["owner.json", "uvmshim.json"]
    claim.remove()
    with pytest.raises(RunuvmError, match=r"ssh uvm-1: no VM with that id .* \(none is running\)$"):
        debugvm.find_ssh(root, "uvm-1")
    assert list((root / ".boot").iterdir()) == []


def test_find_names_the_running_vms(tmp_path: Path) -> None:
    claim_and_publish(tmp_path, "uvm-a")
    debugvm.claim_boot(tmp_path, fake_vm(tmp_path, "uvm-c"))  # without --ssh: not listed
    with pytest.raises(RunuvmError, match=r"ssh uvm-b: no VM with that id .* \(running: uvm-a\)$"):
        debugvm.find_ssh(tmp_path, "uvm-b")


@pytest.mark.parametrize("vm_id", ["../x", "a/b", "", ".boot", "-x"])
def test_find_refuses_what_is_not_a_vm_id(tmp_path: Path, vm_id: str) -> None:
    with pytest.raises(RunuvmError, match="is not a VM id"):
        debugvm.find_ssh(tmp_path, vm_id)


def test_a_killed_boot_is_swept(tmp_path: Path) -> None:
    access = claim_and_publish(tmp_path, "uvm-k")
    kill_owner(access.directory)
    with pytest.raises(RunuvmError, match=r"ssh uvm-k: that VM is gone \(its `runuvm boot` process was killed\)"):
        debugvm.find_ssh(tmp_path, "uvm-k")
    assert not access.directory.exists()


def test_what_a_killed_boot_left_is_removed_with_its_claim(tmp_path: Path) -> None:
    run_dir = tmp_path / "run" / "uvm-q"
    run_dir.mkdir(parents=True)
    # stands for the VM's QEMU: a process naming a path in the run directory on its command line
    qemu = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", f"{run_dir}/qmp.sock"])
    try:
        claim = debugvm.claim_boot(tmp_path, fake_vm(tmp_path, "uvm-q"))  # killed mid-start: no SSH yet
        kill_owner(claim.directory)
        assert debugvm.sweep_stale(tmp_path) == ["uvm-q"]
        assert qemu.wait(timeout=10) == -9
        assert not run_dir.exists() and not claim.directory.exists()
    finally:
        qemu.kill()
        qemu.wait()


def test_a_new_boot_sweeps_what_a_killed_one_left(tmp_path: Path) -> None:
    run_dir = tmp_path / "run" / "uvm-old"
    run_dir.mkdir(parents=True)
    kill_owner(debugvm.claim_boot(tmp_path, fake_vm(tmp_path, "uvm-old")).directory)
    debugvm.claim_boot(tmp_path, fake_vm(tmp_path, "uvm-new"))
    assert sorted(p.name for p in (tmp_path / ".boot").iterdir()) == ["uvm-new"] and not run_dir.exists()


def test_a_live_boot_is_left_alone(tmp_path: Path) -> None:
    run_dir = tmp_path / "run" / "uvm-l"
    run_dir.mkdir(parents=True)
    access = claim_and_publish(tmp_path, "uvm-l")
    assert debugvm.sweep_stale(tmp_path) == [] and access.directory.exists() and run_dir.exists()


def test_a_reused_pid_is_not_the_owner(tmp_path: Path) -> None:
    claim = debugvm.claim_boot(tmp_path, fake_vm(tmp_path, "uvm-r"))
    kill_owner(claim.directory, pid_start=debugvm.read_owner(claim.directory).pid_start + 1)
    assert debugvm.sweep_stale(tmp_path) == ["uvm-r"]


def test_sweep_keeps_fresh_partial_directories_and_removes_old_ones(tmp_path: Path) -> None:
    partial = tmp_path / ".boot" / ".uvm-p-1234"
    partial.mkdir(parents=True)
    assert debugvm.sweep_stale(tmp_path) == [] and partial.exists()
    old = debugvm.STALE_PARTIAL_S + 10
    os.utime(partial, (os.stat(partial).st_atime - old, os.stat(partial).st_mtime - old))
    debugvm.sweep_stale(tmp_path)
    assert not partial.exists()


def test_an_unreadable_claim_is_swept(tmp_path: Path) -> None:
    d = tmp_path / ".boot" / "uvm-x"
    d.mkdir(parents=True)
    (d / "owner.json").write_text(json.dumps({"vm": "uvm-x", "pid": "1", "pid_start": 0}))
    assert debugvm.sweep_stale(tmp_path) == ["uvm-x"]


def test_records_are_strict() -> None:
    good = {"vm": "uvm-1", "port": 22, "key": "/k", "host_key": HOST_KEY}
    debugvm.SshRecord.model_validate(good)
    for change in ({"port": 0}, {"vm": "../x"}, {"host_key": "ssh-rsa AAAA"}, {"extra": 1}, {"port": "22"}):
        with pytest.raises(ValidationError):
            debugvm.SshRecord.model_validate({**good, **change})
    owner = {"vm": "uvm-1", "pid": 1, "pid_start": 0}
    debugvm.BootOwner.model_validate(owner)
    for change in ({"pid": 0}, {"vm": "a/b"}, {"pid": "1"}, {"extra": 1}):
        with pytest.raises(ValidationError):
            debugvm.BootOwner.model_validate({**owner, **change})


# -- the console ------------------------------------------------------------------------------------

def test_escape_splits_the_input() -> None:
    assert debugvm.split_at_escape(b"ls\n") == (b"ls\n", False)
    assert debugvm.split_at_escape(b"ls\n\x1dexit\n") == (b"ls\n", True)
    assert debugvm.split_at_escape(b"\x1d") == (b"", True)


def test_end_of_input_finishes_the_last_line() -> None:
    assert debugvm.end_of_input(b"echo hi\n") == b"\x04"
    assert debugvm.end_of_input(b"echo hi") == b"\n\x04"
    assert debugvm.end_of_input(b"") == b"\x04"


def test_console_shell_prompt_names_the_vm() -> None:
    proc = debugvm.console_shell("uvm-7")
    assert proc.args == ["cttyhack", "sh"] and "PS1=uvm-7:\\w# " in proc.env
    assert debugvm.prompt_of("uvm-7") == b"uvm-7:~# "


# -- resize-tty --pid: Pids reply info ----------------------------------------------------------------

def test_process_details_as_runc_shim_sends_them() -> None:
    info = process_details("exec-1")
    assert info.type_url == "containerd.runc.v1.ProcessDetails"
    assert info.value == b"\x0a\x06exec-1"
    assert runc_options_pb2.ProcessDetails.FromString(info.value).exec_id == "exec-1"


# -- templates --------------------------------------------------------------------------------------

def test_a_nic_is_part_of_a_template_key_but_not_its_port(tmp_path: Path) -> None:
    from uvm import template

    plain = template.key_inputs(builder.build(make_test_config(tmp_path)))
    with_nic = template.key_inputs(builder.build(make_test_config(tmp_path, ssh_port=0)))
    other_port = template.key_inputs(builder.build(make_test_config(tmp_path, ssh_port=0)))
    assert "nic" not in plain and with_nic["nic"] is True  # templates without a NIC keep their keys
    assert template.template_key(with_nic) == template.template_key(other_port) != template.template_key(plain)
    console = template.key_inputs(builder.build(make_test_config(tmp_path, console_socket=True)))
    assert template.template_key(console) == template.template_key(plain)  # only the chardev's host side


def test_commas_in_paths_are_doubled_in_qemu_options(tmp_path: Path) -> None:
    base = tmp_path / "a,b"
    base.mkdir()
    spec = builder.build(make_test_config(base, shares=[Share(tag="s", host_path=base)]))
    spec = dataclasses.replace(spec, memory_file=base / "m,em")
    argv = qemu_argv(spec, FDS)
    doubled = str(base).replace(",", ",,")
    assert f"local,id=fs0,path={doubled},security_model=passthrough,multidevs=remap" in argv
    assert any(a.startswith(f"memory-backend-file,id=ram,size=64M,mem-path={doubled}/m,,em,") for a in argv)
