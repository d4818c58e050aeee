"""QEMU confined (uvm/jail.py), seen from the host as an operator would check it: /proc/<QEMU's pid>
(its uid, capabilities, no_new_privs, seccomp, its root and mounts), and from inside a container what a
9p share lets the guest do to host files."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from schemas import oci
from schemas.uvm_config import Share, UvmConfig
from tests.conftest import assert_no_leftovers
from uvm import errors, jail
from uvm.container import Rootfs
from uvm.vm import UtilityVM

pytestmark = [pytest.mark.vm, pytest.mark.skipif(os.geteuid() != 0, reason="confinement needs root")]

CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FOWNER, CAP_FSETID = 0, 1, 3, 4
SHARE_CAPS = 1 << CAP_CHOWN | 1 << CAP_DAC_OVERRIDE | 1 << CAP_FOWNER | 1 << CAP_FSETID  # 0x1b


def status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def qemu_pid(vm: UtilityVM) -> int:
    assert vm.backend is not None and vm.backend.pid is not None
    return vm.backend.pid


async def run_in_container(vm: UtilityVM, script: str, user: int = 0) -> tuple[int | None, str]:
    spec = oci.default_spec(["sh", "-c", script], env=["PATH=/bin"])
    spec.process.user = oci.User(uid=user, gid=user)
    c = await vm.create_container(f"jail{abs(hash(script)) % 100000}", spec, Rootfs(share="shares", path="busybox"))
    await c.start()
    assert c.init.stdout is not None and c.init.stderr is not None
    out, err = await asyncio.gather(c.init.stdout.read_all(), c.init.stderr.read_all())
    code = (await c.wait_timeout(120)).exit_code
    await c.close()
    return code, (out + err).decode(errors="replace")


async def test_qemu_runs_as_its_own_uid_with_only_what_its_shares_need(
        make_config: Callable[..., UvmConfig], busybox_rootfs: Path, suite_dir: Path, tmp_path: Path) -> None:
    secret = tmp_path / "planted-outside-every-share"
    secret.write_text("host secret\n")
    with_share = UtilityVM(make_config(shares=[Share(tag="shares", host_path=busybox_rootfs.parent)]))
    without = UtilityVM(make_config())
    try:
        await asyncio.gather(with_share.start(), without.start())
        a, b = status(qemu_pid(with_share)), status(qemu_pid(without))
        uid_a, uid_b = (int(s["Uid"].split()[0]) for s in (a, b))
        assert uid_a != 0 and uid_b != 0 and uid_a != uid_b
        assert all(int(x) == uid_a for x in a["Uid"].split() + a["Gid"].split())  # real, effective, saved, fs
        assert int(a["CapEff"], 16) == SHARE_CAPS and int(a["CapBnd"], 16) == SHARE_CAPS
        assert int(b["CapEff"], 16) == 0 and int(b["CapBnd"], 16) == 0
        assert a["NoNewPrivs"] == b["NoNewPrivs"] == "1" and a["Seccomp"] == b["Seccomp"] == "2"
        assert a["Groups"] in ("", str(uid_a))  # no supplementary group (without KVM)
        spec = with_share.spec
        assert spec is not None
        allowed = {"/", "/usr", "/etc/ld.so.cache", "/dev/null", "/dev/urandom", "/proc", str(spec.kernel),
                   str(spec.initrd), str(spec.rootfs), str(busybox_rootfs.parent)}
        root = Path(f"/proc/{qemu_pid(with_share)}/root")
        # Its root holds what it needs and nothing else of the host: no /root, /home, /var, /proc, /etc/shadow.
        assert set(os.listdir(root)) == {"bin", "lib", "lib64", "sbin", "proc"} | {Path(p).parts[1] for p in allowed - {"/"}}
        # its proc shows it only its own processes (hidepid: what its uid cannot ptrace is invisible to it)
        proc = [line for line in Path(f"/proc/{qemu_pid(with_share)}/mountinfo").read_text().splitlines()
                if line.split()[4] == "/proc"]
        assert len(proc) == 1 and re.search(r"hidepid=(invisible|2)", proc[0]), proc
        assert not (root / "etc" / "shadow").exists() and os.listdir(root / "etc") == ["ld.so.cache"]
        assert not (root / str(secret).lstrip("/")).exists()  # a host file outside every share
        assert (root / str(busybox_rootfs).lstrip("/") / "bin" / "busybox").exists()  # its share is there
        mounts = {line.split()[4] for line in Path(f"/proc/{qemu_pid(with_share)}/mountinfo").read_text().splitlines()}
        assert {m for m in mounts if not m.startswith(str(busybox_rootfs.parent) + "/")} <= allowed, mounts
    finally:
        await asyncio.gather(with_share.close(), without.close())
    assert_no_leftovers(suite_dir)


async def test_a_share_gives_the_guest_only_the_share(make_config: Callable[..., UvmConfig], busybox_rootfs: Path,
                                                      suite_dir: Path, tmp_path: Path) -> None:
    """passthrough ownership; no device nodes; symlinks resolved in the guest, never on the host."""
    secret = busybox_rootfs.parent.parent / f"secret-{os.getpid()}"
    secret.write_text("host secret\n")
    link = busybox_rootfs / "tmp" / "to-the-host-secret"
    link.unlink(missing_ok=True)
    link.symlink_to(secret)  # made on the host, inside the share
    vm = UtilityVM(make_config(shares=[Share(tag="shares", host_path=busybox_rootfs.parent)]))
    home = busybox_rootfs / "tmp" / "home-1234"
    made = home / "made-by-1234"
    try:
        await vm.start()
        code, out = await run_in_container(vm, "rm -rf /tmp/home-1234; mkdir /tmp/home-1234 && "
                                               "chown 1234:1234 /tmp/home-1234")
        assert code == 0, out
        assert (home.stat().st_uid, home.stat().st_gid) == (1234, 1234)  # root's chown in the guest, on the host
        code, out = await run_in_container(vm, "touch /tmp/home-1234/made-by-1234", user=1234)
        assert code == 0, out
        st = made.stat()
        assert (st.st_uid, st.st_gid) == (1234, 1234)  # passthrough: the guest's owner, on the host
        code, out = await run_in_container(vm, "mknod /tmp/a-disk b 8 0; echo mknod=$?")
        assert "mknod=1" in out and not (busybox_rootfs / "tmp" / "a-disk").exists(), out  # no CAP_MKNOD
        code, out = await run_in_container(vm, "cat /tmp/to-the-host-secret; cat ../../../secret-*; "
                                               "ln -sf / /tmp/root-link; ls /tmp/root-link/ | head -3")
        assert "host secret" not in out, out
        assert os.readlink(busybox_rootfs / "tmp" / "root-link") == "/"  # the guest's /, whatever the host does
    finally:
        await vm.close()
        for p in (made, link, busybox_rootfs / "tmp" / "root-link", secret):
            p.unlink(missing_ok=True)
        if home.exists():
            home.rmdir()
    assert_no_leftovers(suite_dir)


async def test_a_uid_range_that_overlaps_an_account_is_refused_by_name(make_config: Callable[..., UvmConfig],
                                                                        suite_dir: Path) -> None:
    with pytest.raises(errors.ConfigError, match="overlaps the account"):
        jail.check_range(1, 1000)  # Debian's system accounts live there
    with pytest.raises(errors.ConfigError, match=r"confine_uid_range 1-11: overlaps the account \w+ \(uid 1\)"):
        await UtilityVM(make_config(confine_uid_range=(1, 11))).start()
    assert_no_leftovers(suite_dir)


async def test_unconfined_is_still_possible_and_says_so(make_config: Callable[..., UvmConfig], suite_dir: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    vm = UtilityVM(make_config(confine=False))
    try:
        await vm.start()
        assert status(qemu_pid(vm))["Uid"].split()[0] == "0"
        assert "confine = false" in caplog.text
    finally:
        await vm.close()
    assert_no_leftovers(suite_dir)
