"""Containers and processes in a real UVM: the guest runtime over crun, streamed stdio, the contracts."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio
from pydantic import ValidationError

from schemas import oci
from schemas.uvm_config import Share, UvmConfig
from uvm import errors
from uvm.container import Container, ContainerState, Rootfs, SharedSource
from uvm.vm import UtilityVM

# One UVM for the module (boots are slow under emulation): the tests share its event loop.
pytestmark = [pytest.mark.vm, pytest.mark.asyncio(loop_scope="module")]

ROOTFS = Rootfs(share="shares", path="busybox")
ENV = ["PATH=/bin", "HOME=/root"]


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["cold", "template"])
async def vm(request: pytest.FixtureRequest, make_config_module: Callable[..., UvmConfig],
             busybox_rootfs: Path) -> AsyncIterator[UtilityVM]:
    """The module's UVM, booted cold, then (second round) cloned from a template of the same shape."""
    v = UtilityVM(make_config_module(shares=[Share(tag="shares", host_path=busybox_rootfs.parent)], memory_mib=384,
                                     start=request.param))
    await v.start()
    assert v.started_from == request.param, v.start_note
    try:
        yield v
    finally:
        await v.close()


_seq = iter(range(1, 1_000_000))


async def make_container(vm: UtilityVM, *args: str, terminal: bool = False, stdin: bool = False,
                         start: bool = True, **spec_kw: object) -> Container:
    spec = oci.default_spec(list(args), terminal=terminal, env=ENV, **spec_kw)  # type: ignore[arg-type]
    c = await vm.create_container(f"c{next(_seq)}", spec, ROOTFS, stdin=stdin)
    if start:
        await c.start()
    return c


def proc(*args: str, terminal: bool = False) -> oci.Process:
    return oci.Process(args=list(args), env=ENV, terminal=terminal)


async def test_echo_and_exit_code(vm: UtilityVM) -> None:
    c = await make_container(vm, "sh", "-c", "echo hello from $(hostname); echo oops >&2; exit 7")
    assert c.init.stdout is not None and c.init.stderr is not None
    out, err = await asyncio.gather(c.init.stdout.read_all(), c.init.stderr.read_all())
    exit_info = await c.wait_timeout(60)
    assert (out, err) == (b"hello from container\n", b"oops\n")
    assert exit_info.exit_code == 7 and not exit_info.success and c.init.exit_code == 7
    assert c.state is ContainerState.STOPPED
    await c.close()
    assert c.id not in vm.containers


async def test_stdin_round_trip_1mib(vm: UtilityVM) -> None:
    data = os.urandom(1 << 20)
    c = await make_container(vm, "sh", "-c", "cat; echo done >&2", stdin=True)
    out, err, exit_info = await c.init.communicate(data)
    assert hashlib.sha256(out).hexdigest() == hashlib.sha256(data).hexdigest()
    assert err == b"done\n" and exit_info.exit_code == 0
    await c.close()


async def test_64mib_stdout_while_pings_stay_fast(vm: UtilityVM) -> None:
    # The guest hashes what it writes, the host what it receives (busybox's head and tee write in
    # small pieces and are slow under emulation: dd moves 64 KiB blocks).
    spec = oci.default_spec(["sh", "-c", "dd if=/dev/urandom of=/dev/shm/r bs=65536 count=1024 2>/dev/null && "
                             "sha256sum /dev/shm/r >&2 && dd if=/dev/shm/r bs=65536 2>/dev/null"], env=ENV)
    spec.mounts = [m if m.destination != "/dev/shm" else m.model_copy(update={"options": ["nosuid", "size=80m"]})
                   for m in spec.mounts]
    c = await vm.create_container(f"big{next(_seq)}", spec, ROOTFS)
    await c.start()
    assert c.init.stdout is not None and c.init.stderr is not None
    digest = hashlib.sha256()
    pings_answered = 0
    answered_before_last_chunk = 0  # pings answered while output was still to come

    async def pinger() -> None:
        nonlocal pings_answered
        while not c.init.exited:
            await vm.ping()
            pings_answered += 1
            await asyncio.sleep(0.05)

    ping_task = asyncio.create_task(pinger())
    total = 0
    while chunk := await c.init.stdout.read():
        answered_before_last_chunk = pings_answered
        digest.update(chunk)
        total += len(chunk)
    err = await c.init.stderr.read_all()
    await c.wait_timeout(300)
    await ping_task
    assert total == 64 << 20
    assert err.split()[0].decode() == digest.hexdigest()
    # Control calls interleave with the stream: a ping queued behind the data would be answered only after it.
    assert answered_before_last_chunk >= 3, f"{answered_before_last_chunk} pings answered during the transfer"
    await c.close()


async def test_unread_output_does_not_stall_others(vm: UtilityVM) -> None:
    hog = await make_container(vm, "sh", "-c", "while true; do echo spam spam spam spam; done")
    await asyncio.sleep(1.0)  # its stream window fills up: it blocks on its pipe
    other = await make_container(vm, "echo", "still fine")
    assert other.init.stdout is not None
    assert await other.init.stdout.read_all() == b"still fine\n"
    assert (await other.wait_timeout(60)).exit_code == 0
    await vm.ping()
    await hog.terminate()
    assert (await hog.wait_timeout(60)).signal == signal.SIGKILL
    await asyncio.gather(hog.close(), other.close())


async def test_tty_and_resize(vm: UtilityVM) -> None:
    c = await make_container(vm, "sh", "-c", "read line; stty size", terminal=True, stdin=True)
    assert c.init.terminal and c.init.stderr is None
    await c.init.resize_console(100, 42)
    await c.init.write_stdin(b"go\n")
    assert c.init.stdout is not None
    out = await c.init.stdout.read_all()
    assert b"42 100" in out
    assert (await c.wait_timeout(60)).exit_code == 0
    with pytest.raises(errors.NotRunningError):
        await c.init.resize_console(80, 24)
    await c.close()


async def test_pause_resume_statistics_processes(vm: UtilityVM, busybox_rootfs: Path) -> None:
    # The container's rootfs is the host directory shared over 9p: the host reads the counter directly.
    c = await make_container(vm, "sh", "-c", "i=0; while true; do i=$((i+1)); echo $i > /tmp/n.$$; "
                             "mv /tmp/n.$$ /tmp/counter-$(hostname); done", hostname="pausetest")
    counter_file = busybox_rootfs / "tmp" / "counter-pausetest"
    counter_file.unlink(missing_ok=True)  # the module runs twice (cold, then a clone) on one rootfs

    async def read_counter(patience: float = 5.0) -> int:
        deadline = time.monotonic() + patience
        while True:
            try:
                return int(counter_file.read_text())
            except (OSError, ValueError):
                assert time.monotonic() < deadline, "the counter never appeared"
                await asyncio.sleep(0.05)

    await read_counter(patience=120)  # the container's first iterations, on a 9p rootfs, on a loaded host
    await c.pause()
    assert c.state is ContainerState.PAUSED
    with pytest.raises(errors.StateError):
        await c.pause()
    with pytest.raises(errors.StateError):
        await c.create_process(proc("true"))
    a = await read_counter()
    await asyncio.sleep(0.5)
    b = await read_counter()
    assert a == b, "the counter moved while paused"
    await c.resume()
    for _ in range(300):  # up to ~30 s: a loaded emulated host may take a while to run the next iteration
        if (moved := await read_counter()) != b:
            break
        await asyncio.sleep(0.1)
    assert moved > b, "the counter did not move after resume"
    stats = await c.statistics()
    assert stats.container.cpu_usage_usec > 0 and stats.container.memory_usage > 0
    assert stats.container.pids_current >= 1 and stats.vm_rss_bytes > 0 and stats.vm_cpu_seconds > 0
    pids = await c.process_list()
    assert c.init.pid in pids
    await c.terminate()
    await c.wait_timeout(60)
    await c.close()


async def test_oom_notification(vm: UtilityVM) -> None:
    seen: list[tuple[str, int]] = []
    notified = asyncio.Event()

    def on_oom(c: Container, n: int) -> None:
        seen.append((c.id, n))
        notified.set()

    vm.oom_listeners.append(on_oom)
    spec = oci.default_spec(["sh", "-c", "x=a; while true; do x=$x$x; done"], env=ENV)
    assert spec.linux is not None
    spec.linux["resources"] = {"memory": {"limit": 16 << 20, "swap": 16 << 20}}
    c = await vm.create_container(f"oom{next(_seq)}", spec, ROOTFS)
    await c.start()
    exit_info = await c.wait_timeout(120)
    assert exit_info.signal == signal.SIGKILL
    await asyncio.wait_for(notified.wait(), 60)  # read from memory.events after the kill
    assert seen and seen[0][0] == c.id and c.oom_kills >= 1
    await c.close()


async def test_signals_exit_codes_and_wrong_states(vm: UtilityVM) -> None:
    c = await make_container(vm, "sh", "-c", "trap 'exit 42' TERM; echo trapped; while true; do sleep 0.1; done",
                             start=False)
    assert c.state is ContainerState.CREATED
    with pytest.raises(errors.NotExitedError):
        _ = c.init.exit_code
    with pytest.raises(errors.StateError):
        await c.pause()
    with pytest.raises(errors.StateError):
        await c.create_process(proc("true"))
    await c.start()
    with pytest.raises(errors.StateError):
        await c.start()
    assert c.init.stdout is not None
    said = b""
    while not said.endswith(b"trapped\n"):  # the trap is installed: a SIGTERM to PID 1 is no longer ignored
        said += await asyncio.wait_for(c.init.stdout.read(), 120)
    with pytest.raises(errors.InvalidArgumentError):
        await c.init.signal(65)
    with pytest.raises(errors.InvalidArgumentError, match="no terminal"):
        await c.init.resize_console(80, 24)
    ex = await c.create_process(proc("sh", "-c", "echo exec; exit 3"))
    assert ex.stdout is not None
    assert await ex.stdout.read_all() == b"exec\n"
    assert (await ex.wait_timeout(30)).exit_code == 3
    assert await ex.signal(signal.SIGTERM) is False  # exited: not delivered
    with pytest.raises(errors.WaitTimeoutError):
        await c.wait_timeout(0.3)
    await c.shutdown()  # SIGTERM to init: its trap exits 42
    assert (await c.wait_timeout(60)).exit_code == 42
    await c.shutdown()  # stopped: no error
    await c.terminate()
    with pytest.raises(errors.NotRunningError):
        await c.create_process(proc("true"))
    with pytest.raises(errors.NotRunningError):
        await c.kill(signal.SIGTERM)
    with pytest.raises(errors.NotFoundError):
        await c.open_process(99999)
    await c.close()
    await c.close()
    with pytest.raises(errors.ClosedError):
        await c.start()


async def test_uvm_process_streams(vm: UtilityVM) -> None:
    p = await vm.create_process(proc("sh", "-c", "cat; echo bye >&2; exit 5"), stdin=True)
    out, err, exit_info = await p.communicate(b"abc" * 1000)
    assert out == b"abc" * 1000 and err == b"bye\n" and exit_info.exit_code == 5
    p2 = await vm.create_process(proc("sleep", "30"))
    assert await p2.kill() is True
    assert (await p2.wait_timeout(30)).signal == signal.SIGKILL
    assert (await vm.open_process(p2.pid)) is p2


async def test_bad_input(vm: UtilityVM) -> None:
    with pytest.raises(ValidationError, match="args"):
        oci.Process(args=[], env=ENV)
    with pytest.raises(ValidationError, match="absolute"):
        oci.Process(args=["true"], cwd="tmp")
    with pytest.raises(ValidationError, match="extra"):
        oci.Spec.model_validate({"process": {"args": ["true"], "bogus": 1}})
    spec = oci.default_spec(["true"], env=ENV)
    c = await vm.create_container("dup", spec, ROOTFS)
    with pytest.raises(errors.AlreadyExistsError):
        await vm.create_container("dup", spec, ROOTFS)
    with pytest.raises(errors.InvalidIdError):
        await vm.create_container("../etc", spec, ROOTFS)
    with pytest.raises(errors.AgentInvalidArgumentError, match="rootfs"):
        await vm.create_container("norootfs", spec, Rootfs(share="shares", path="missing"))
    with pytest.raises(errors.AgentInvalidArgumentError):
        await vm.create_container("badcmd", oci.default_spec(["/no/such/binary"], env=ENV), ROOTFS)
    await c.close()
    states = [s.id for s in (await vm._client("list").request("list_containers", {}, __import__(
        "schemas.agent_models", fromlist=["ContainerList"]).ContainerList)).containers]
    assert "dup" not in states and "badcmd" not in states and "norootfs" not in states


async def test_bind_mount_sources_in_a_share(vm: UtilityVM, busybox_rootfs: Path) -> None:
    """A spec mount whose source the host names as a path in a share (what the shim does for a bind
    mount of a host path): the container sees it at its destination; a bad one is refused by name."""
    src = busybox_rootfs.parent / f"bindsrc-{vm.started_from}"
    src.mkdir(exist_ok=True)
    (src / "in").write_text("from the host\n")
    spec = oci.default_spec(["sh", "-c", "cat /mnt/b/in; echo from the container > /mnt/b/out"], env=ENV)
    spec.mounts.append(oci.Mount(destination="/mnt/b", type="bind", source="/ignored", options=["rbind", "rw"]))
    index = len(spec.mounts) - 1
    c = await vm.create_container(f"c{next(_seq)}", spec, ROOTFS, mount_sources={index: SharedSource("shares", src.name)})
    await c.start()
    assert c.init.stdout is not None
    assert await c.init.stdout.read_all() == b"from the host\n"
    assert (await c.wait_timeout(60)).exit_code == 0
    assert (src / "out").read_text() == "from the container\n"
    await c.close()
    for cid, sources, error, match in [
            ("badsrc1", {index: SharedSource("shares", "../etc")}, errors.AgentInvalidArgumentError, "relative"),
            ("badsrc2", {index: SharedSource("shares", "missing")}, errors.AgentInvalidArgumentError, "/mnt/b"),
            ("badsrc3", {index + 1: SharedSource("shares", src.name)}, errors.InvalidArgumentError, "no spec mount")]:
        with pytest.raises(error, match=match):
            await vm.create_container(cid, spec, ROOTFS, mount_sources=sources)
        assert cid not in vm.containers


async def test_vm_death_releases_every_waiter(make_config: Callable[..., UvmConfig], busybox_rootfs: Path) -> None:
    v = UtilityVM(make_config(shares=[Share(tag="shares", host_path=busybox_rootfs.parent)]))
    await v.start()
    try:
        c = await make_container(v, "sleep", "600")
        p = await c.create_process(proc("sleep", "600"))
        waiters = [asyncio.create_task(c.wait()), asyncio.create_task(p.wait())]
        assert v.backend is not None and v.backend.pid is not None
        os.kill(v.backend.pid, signal.SIGKILL)
        results = await asyncio.wait_for(asyncio.gather(*waiters), 30)
        assert all(r.vm_died and not r.success and r.exit_code != 0 for r in results)
        with pytest.raises(errors.VmDiedError):
            await v.wait()
        assert c.state is ContainerState.STOPPED
    finally:
        await v.close()


async def test_update_resources(vm: UtilityVM) -> None:
    c = await make_container(vm, "sleep", "600")
    before = await c.statistics()
    await c.update(oci.LinuxResources(memory=oci.LinuxMemory(limit=64 << 20), pids=oci.LinuxPids(limit=32)))
    after = await c.statistics()
    assert before.container.memory_limit is None  # "max"
    assert after.container.memory_limit == 64 << 20 and after.container.pids_limit == 32
    await c.terminate()
    await c.wait_timeout(60)
    with pytest.raises(errors.NotRunningError):
        await c.update(oci.LinuxResources(pids=oci.LinuxPids(limit=8)))
    await c.close()
