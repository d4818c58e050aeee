"""The REAL guest agent (uvm.guest.agent), run on the host in a child process on one end of a socket
pair, driven by the real host link (AgentConnection, AgentClient, streams) on the other: no VM.

The agent is not PID 1 here: it reaps only its own children, and its processes run on the host.
Requests that only make sense as PID 1 of a UVM are never sent: ``shutdown`` (``power_off`` kills
every process it may signal, then execs poweroff), containers (crun, cgroups) and SCSI disks (mount).
Every test's agent is killed at teardown together with every process it started, and the teardown
fails if any of them survived.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from schemas import agent as proto
from schemas import agent_models as models
from schemas import framing
from uvm import errors
from uvm.guest.agent import DEFAULT_PATH
from uvm.link import AgentClient, AgentConnection
from uvm.process import Process, ProcessTable
from uvm.streams import InboundStream, OutboundStream

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]
DEADLINE = 10.0  # a hang is a failure, not a stuck test run
WINDOW = proto.OUTPUT_WINDOW  # guest -> host (stdout/stderr)
IN_WINDOW = proto.INPUT_WINDOW  # host -> guest (stdin)
AGENT_MAIN = "import sys; from uvm.guest.agent import Agent; Agent(port_fd=int(sys.argv[1])).serve()"


async def within(aw: Awaitable[T], timeout: float = DEADLINE) -> T:
    return await asyncio.wait_for(aw, timeout)


async def eventually(condition: Callable[[], bool], timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


# -- the agent in a child process ------------------------------------------------------------------------


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process we can see."""
    out: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        out[int(entry)] = int(stat.rpartition(")")[2].split()[1])
    return out


def _descendants(root: int) -> set[int]:
    parents = _parents()
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier and pid not in found}
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its new parent to reap it counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


class AgentProcess:
    """The agent in a child process (its own session), on one end of a socket pair."""

    def __init__(self, log: Path) -> None:
        host_sock, agent_sock = socket.socketpair()
        self.log = log
        try:
            with log.open("wb") as out:
                self.popen = subprocess.Popen(
                    [sys.executable, "-c", AGENT_MAIN, str(agent_sock.fileno())],
                    pass_fds=[agent_sock.fileno()], start_new_session=True, cwd="/",  # as in the UVM
                    env={**os.environ, "PYTHONPATH": str(REPO)}, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        except BaseException:
            host_sock.close()
            raise
        finally:
            agent_sock.close()
        self.sock = host_sock
        self.started: set[int] = set()  # every process of the agent's seen while it ran

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> list[int]:
        """Kill the agent and every process it started; return the pids that survived."""
        self.started |= _descendants(self.popen.pid)
        me = {0, 1, os.getpid(), os.getpgrp()}
        for pgid in (self.popen.pid, *self.started):  # each process the agent spawns leads its own session
            if pgid not in me:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)
        self.popen.wait(DEADLINE)
        self.sock.close()
        deadline = time.monotonic() + DEADLINE
        while (survivors := [p for p in self.started if _alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.01)
        return survivors


@pytest.fixture
def start_agent(tmp_path: Path) -> Iterator[Callable[[], AgentProcess]]:
    """Start agents (the host's end of each link is proc.sock); all killed, with their processes, at the end."""
    started: list[AgentProcess] = []

    def start() -> AgentProcess:
        started.append(AgentProcess(tmp_path / f"agent-{len(started)}.log"))
        return started[-1]

    yield start
    survivors: list[int] = []
    for proc in started:
        survivors += proc.kill()
    assert not survivors, f"processes left behind: {survivors}"


@dataclass
class Exec:
    pid: int
    stdin: OutboundStream | None
    stdout: InboundStream | None
    stderr: InboundStream | None


class Host:
    """The host's side of one local agent: connection, client, notifications and a process table."""

    def __init__(self, agent: AgentProcess) -> None:
        self.agent = agent
        self.notes: list[dict[str, Any]] = []
        self.watchers: list[Callable[[dict[str, Any]], None]] = []
        self.table = ProcessTable()
        self._noted = asyncio.Event()
        self.conn = AgentConnection("local", on_notify=self._on_notify)
        self.client = AgentClient(self.conn)

    def _on_notify(self, msg: dict[str, Any]) -> None:
        for watch in self.watchers:
            watch(msg)
        if msg.get("event") == proto.EVENT_EXIT:
            self.table.on_exit(models.ExitEvent.model_validate(msg))  # what UtilityVM does
        self.notes.append(msg)
        self._noted.set()

    def exits(self, pid: int) -> list[models.ExitEvent]:
        return [models.ExitEvent.model_validate(m) for m in self.notes
                if m.get("event") == proto.EVENT_EXIT and m.get("pid") == pid]

    async def exit_of(self, pid: int) -> models.ExitEvent:
        while not (found := self.exits(pid)):
            self._noted.clear()
            await self._noted.wait()
        return found[0]

    async def exec(self, args: list[str], *, stdin: bool = False, stdout: bool = True, stderr: bool = True,
                   terminal: bool = False, **process: Any) -> Exec:
        """exec_process in the "UVM" (here: the host), with streams as asked."""
        streams = (self.conn.open_outbound(f"{args[0]} stdin") if stdin else None,
                   self.conn.open_inbound(f"{args[0]} stdout") if stdout else None,
                   self.conn.open_inbound(f"{args[0]} stderr") if stderr else None)
        params = {"container": None, "process": {"args": args, **process}, "terminal": terminal,
                  **{name: s.sid if s is not None else None for name, s in zip(("stdin", "stdout", "stderr"), streams,
                                                                              strict=True)}}
        try:
            res = await within(self.client.request(proto.EXEC, params, models.PidResult))
        except BaseException:
            for s in streams:
                if s is not None:
                    self.conn.forget_stream(s.sid)
            raise
        self.agent.started.add(res.pid)
        return Exec(res.pid, *streams)

    async def create_process(self, args: list[str], *, stdin: bool = False, stdout: bool = True,
                             stderr: bool = True) -> Process:
        """What UtilityVM.create_process does: a Process in the table, its exit routed to it."""
        e = await self.exec(args, stdin=stdin, stdout=stdout, stderr=stderr)
        proc = Process(self.client, None, e.pid, False, e.stdin, e.stdout, e.stderr)
        self.table.add(proc)
        return proc

    async def signal(self, pid: int, sig: Any) -> bool:
        res = await within(self.client.request(proto.SIGNAL, {"container": None, "pid": pid, "signal": sig},
                                               models.SignalResult))
        return res.delivered


@pytest.fixture
async def host(start_agent: Callable[[], AgentProcess]) -> AsyncIterator[Host]:
    h = Host(start_agent())
    await h.conn.open(h.agent.sock)
    try:
        yield h
    finally:
        await h.conn.aclose()


@dataclass
class RawPeer:
    """Frames to and from the agent without AgentConnection (to send what the host never would)."""

    agent: AgentProcess
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def __post_init__(self) -> None:
        self.decoder = framing.FrameDecoder()
        self.frames: list[framing.Frame] = []

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def next_frame(self) -> framing.Frame:
        while not self.frames:
            data = await within(self.reader.read(1 << 20))
            if not data:
                raise AssertionError("the agent closed the link")
            self.frames += self.decoder.feed(data)
        return self.frames.pop(0)

    async def request(self, req_id: int, payload: bytes) -> tuple[int, Any]:
        """Send a REQUEST frame with payload verbatim; (flags, decoded body) of its response."""
        await self.send(framing.encode(framing.REQUEST, req_id, payload))
        frame = await self.next_frame()
        assert (frame.type, frame.id) == (framing.RESPONSE, req_id), frame
        return frame.flags, json.loads(frame.payload)

    async def assert_serving(self, req_id: int = 999) -> None:
        flags, body = await self.request(req_id, b'{"method":"ping","params":{"seq":31}}')
        assert (flags, body) == (0, {"seq": 31})


@pytest.fixture
async def raw(start_agent: Callable[[], AgentProcess]) -> AsyncIterator[RawPeer]:
    proc = start_agent()
    peer = RawPeer(proc, *await asyncio.open_connection(sock=proc.sock))
    yield peer
    peer.writer.close()
    with contextlib.suppress(Exception):
        await peer.writer.wait_closed()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- hello, ping, run --------------------------------------------------------------------------------------


async def test_hello_reports_the_agent_and_its_capabilities(host: Host) -> None:
    hello = await within(host.client.hello())
    assert (hello.version, hello.agent) == (proto.PROTOCOL_VERSION, "uvmshim-agent")
    assert hello.capabilities == list(proto.CAPABILITIES)
    assert hello.kernel == os.uname().release
    assert hello.uptime > 0


@pytest.mark.parametrize(("params", "message"), [
    ({"vm_id": "c1", "time_ns": 1, "entropy": "QUJD" * 11}, "protocol version"),
    ({"version": 1, "vm_id": "a/b", "time_ns": 1, "entropy": "QUJD" * 11}, "vm_id"),
    ({"version": 1, "vm_id": "c1", "time_ns": True, "entropy": "QUJD" * 11}, "time_ns"),
    ({"version": 1, "vm_id": "c1", "time_ns": 1, "entropy": "QUJD"}, "entropy"),
])
async def test_resume_clone_checks_everything_before_it_changes_the_machine(
        host: Host, params: dict[str, Any], message: str) -> None:
    """(Run as a plain process here: a valid request would set this host's clock and name.)"""
    before = os.uname().nodename
    with pytest.raises(errors.AgentInvalidArgumentError, match=message):
        await within(host.client.request(proto.RESUME_CLONE, params, models.HelloResult))
    assert os.uname().nodename == before


async def test_ping_echoes_every_seq(host: Host) -> None:
    for seq in (0, 1, 2**40, 2**63):
        assert (await within(host.client.ping(seq))).seq == seq
    results = await within(asyncio.gather(*(host.client.ping(s) for s in range(50))))  # pipelined
    assert [r.seq for r in results] == list(range(50))


async def test_run_returns_output_and_exit_status(host: Host) -> None:
    res = await within(host.client.run(["sh", "-c", "echo out; echo err >&2; exit 7"]))
    assert (res.exit_status, res.signal, res.stdout, res.stderr) == (7, None, b"out\n", b"err\n")
    assert not res.truncated and not res.timed_out


async def test_run_passes_stdin_env_and_cwd(host: Host, tmp_path: Path) -> None:
    data = bytes(range(256)) * 40
    res = await within(host.client.run(["sh", "-c", "cat; echo; pwd; echo \"$GREETING\""], stdin=data,
                                       env={"PATH": DEFAULT_PATH, "GREETING": "hi there"}, cwd=str(tmp_path)))
    assert res.exit_status == 0
    assert res.stdout == data + f"\n{os.path.realpath(tmp_path)}\nhi there\n".encode()


@pytest.mark.parametrize("cwd", [None, "TMP"], ids=["agent-cwd", "other-cwd"])
async def test_a_child_gets_only_its_stdio_its_own_session_and_default_signals(host: Host, tmp_path: Path,
                                                                                 cwd: str | None) -> None:
    """The agent ignores SIGPIPE and has many fds open: none of it reaches a child, whichever way it is
    started (posix_spawn in the agent's cwd, fork+exec elsewhere)."""
    res = await within(host.client.run(["sh", "-c", "ls /proc/self/fd | tr '\\n' ' '; echo; "
                                                    "exec cat /proc/self/stat /proc/self/status"],
                                       cwd=str(tmp_path) if cwd else None))
    assert res.exit_status == 0, res.stderr
    fds, stat, *status = res.stdout.decode().splitlines()
    assert fds.split() == ["0", "1", "2", "3"]  # 3: ls's own, on /proc/self/fd
    fields = stat.rpartition(")")[2].split()
    assert fields[3] == stat.split()[0]  # session id == pid: a session of its own
    masks = {k: int(v, 16) for k, v in (line.split(":\t", 1) for line in status) if k in ("SigIgn", "SigBlk")}
    assert masks["SigBlk"] == 0
    for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD):  # what Python and the agent ignore or catch
        assert not masks["SigIgn"] & 1 << (sig - 1), sig


async def test_a_program_is_found_on_the_requests_path_not_the_agents(host: Host, tmp_path: Path) -> None:
    prog = tmp_path / "uvm-only-here"
    prog.write_text("#!/bin/sh\necho found \"$@\"\n")
    prog.chmod(0o755)
    (tmp_path / "notexec").mkdir()
    res = await within(host.client.run(["uvm-only-here", "x"], env={"PATH": f"{tmp_path}/notexec:{tmp_path}:/bin"}))
    assert (res.exit_status, res.stdout) == (0, b"found x\n")
    with pytest.raises(errors.AgentNotFoundError, match="exec uvm-only-here"):
        await within(host.client.run(["uvm-only-here"]))
    with pytest.raises(errors.AgentNotFoundError, match=f"exec {tmp_path}/missing"):
        await within(host.client.run([f"{tmp_path}/missing"]))


async def test_run_reports_a_signal(host: Host) -> None:
    res = await within(host.client.run(["sh", "-c", "kill -TERM $$"]))
    assert (res.exit_status, res.signal) == (None, signal.SIGTERM)


async def test_run_timeout_kills_the_whole_command(host: Host) -> None:
    # The background sleep holds the output pipes: only killing the process group ends the run (within()
    # fails the test long before the sleeps would end).
    res = await within(host.client.run(["sh", "-c", "sleep 30 & exec sleep 30"], timeout=0.3))
    assert (res.timed_out, res.exit_status, res.signal) == (True, None, signal.SIGKILL)
    assert (await within(host.client.ping(1))).seq == 1


async def test_run_of_an_unknown_program_is_not_found(host: Host) -> None:
    with pytest.raises(errors.AgentNotFoundError, match="run: exec no-such-program-xyz: No such file") as info:
        await within(host.client.run(["no-such-program-xyz"]))
    assert info.value.code == proto.E_NOT_FOUND
    assert host.conn.closed is None
    assert (await within(host.client.ping(2))).seq == 2


async def test_run_output_beyond_the_cap_is_truncated(host: Host) -> None:
    res = await within(host.client.run(["sh", "-c", f"head -c {proto.MAX_RUN_OUTPUT + 5000} /dev/zero; echo e >&2"]))
    assert res.truncated and res.exit_status == 0
    assert res.stdout == b"\0" * proto.MAX_RUN_OUTPUT
    assert res.stderr == b"e\n"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"argv": []}, "argv must be a non-empty list of strings"),
    ({"argv": ["true"], "cwd": "relative/dir"}, "cwd must be an absolute path"),
    ({"argv": ["true"], "timeout": -1}, "timeout must be a positive number"),
    ({"argv": ["true"], "env": {"A": "1"}, "cwd": "/nonexistent-dir-xyz"}, "chdir /nonexistent-dir-xyz"),
], ids=["empty-argv", "relative-cwd", "negative-timeout", "missing-cwd"])
async def test_run_rejects_bad_arguments(host: Host, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(errors.AgentError, match=message):
        await within(host.client.run(**kwargs))
    assert host.conn.closed is None


# -- exec_process with streams ------------------------------------------------------------------------------


async def test_exec_streams_output_and_reports_the_exit_after_eof(host: Host) -> None:
    seen: list[tuple[int, bool, bool]] = []
    # It waits for a line on stdin, so that the exit cannot arrive before the watcher is in place.
    e = await host.exec(["sh", "-c", "read go; head -c 300000 /dev/zero; echo err >&2; exit 5"], stdin=True)
    assert e.stdin is not None and e.stdout is not None and e.stderr is not None
    out_s, err_s = e.stdout, e.stderr
    host.watchers.append(lambda m: seen.append((m["pid"], out_s.ended, err_s.ended)))
    await within(e.stdin.write(b"go\n"))
    e.stdin.close()
    out, err, exit_event = await within(asyncio.gather(out_s.read_all(), err_s.read_all(), host.exit_of(e.pid)))
    assert out == b"\0" * 300000 and err == b"err\n"
    assert (exit_event.container, exit_event.exit_status, exit_event.signal) == (None, 5, None)
    assert seen == [(e.pid, True, True)]  # both outputs had ended when the exit arrived
    assert len(host.exits(e.pid)) == 1


async def test_exec_stdin_reaches_the_process_and_close_is_its_eof(host: Host) -> None:
    data = os.urandom(3 * IN_WINDOW + 1234)  # more than a window: stdin flows on the guest's credit
    e = await host.exec(["cat"], stdin=True)
    assert e.stdin is not None and e.stdout is not None and e.stderr is not None
    stdin = e.stdin

    async def feed() -> None:
        await stdin.write(data)
        stdin.close()

    _, out, err = await within(asyncio.gather(feed(), e.stdout.read_all(), e.stderr.read_all()), 30)
    assert sha(out) == sha(data) and err == b""
    assert stdin.sent == len(data)
    assert (await within(host.exit_of(e.pid))).exit_status == 0


async def test_closing_a_terminals_stdin_is_its_eof_key_and_no_credit_for_it(host: Host) -> None:
    """On a terminal, end of file is the ^D the agent types after the host's data: the credit it returns
    covers the host's bytes only (a credit for the ^D made the host drop the link and kill the VM)."""
    e = await host.exec(["sh", "-c", "cat; echo after eof"], stdin=True, stderr=False, terminal=True)
    assert e.stdin is not None and e.stdout is not None
    await within(e.stdin.write(b"abc\n"))
    e.stdin.close()
    out = await within(e.stdout.read_all(), 30)
    assert b"abc" in out and out.endswith(b"after eof\r\n"), out
    assert (await within(host.exit_of(e.pid))).exit_status == 0
    await within(host.client.ping())
    assert host.conn.closed is None


async def test_closing_stdin_without_data_is_eof(host: Host) -> None:
    e = await host.exec(["sh", "-c", "cat >/dev/null; echo got eof"], stdin=True, stderr=False)
    assert e.stdin is not None and e.stdout is not None
    e.stdin.close()
    assert await within(e.stdout.read_all()) == b"got eof\n"
    assert (await within(host.exit_of(e.pid))).exit_status == 0


async def test_exec_transfers_4_mib_of_output_intact(host: Host, tmp_path: Path) -> None:
    data = os.urandom(4 * 1024 * 1024)
    path = tmp_path / "blob"
    path.write_bytes(data)
    e = await host.exec(["cat", str(path)], stderr=False)
    assert e.stdout is not None
    out = await within(e.stdout.read_all(), 30)
    assert len(out) == len(data) and sha(out) == sha(data)
    assert e.stdout.received == len(data)
    assert (await within(host.exit_of(e.pid))).exit_status == 0
    assert host.conn.closed is None


async def test_unread_stdout_blocks_only_its_own_process(host: Host) -> None:
    stuck = await host.exec(["yes", "stuck"], stderr=False)
    assert stuck.stdout is not None
    stalled = stuck.stdout
    await within(eventually(lambda: stalled.received >= WINDOW))
    # The other process and control calls are served meanwhile.
    assert (await within(host.client.ping(5))).seq == 5
    other = await host.exec(["echo", "hi"], stderr=False)
    assert other.stdout is not None
    assert await within(other.stdout.read_all()) == b"hi\n"
    assert (await within(host.exit_of(other.pid))).exit_status == 0
    assert (await within(host.client.run(["true"]))).exit_status == 0
    await asyncio.sleep(0.1)
    assert stalled.received == WINDOW  # the guest never sent more than the window
    assert host.exits(stuck.pid) == []  # still running, blocked on its full pipe
    # Stop reading: the process gets EPIPE (SIGPIPE) on its next write.
    stalled.close()
    exit_event = await within(host.exit_of(stuck.pid))
    assert (exit_event.exit_status, exit_event.signal) == (None, signal.SIGPIPE)
    assert host.conn.closed is None


async def test_exit_is_not_held_back_by_a_stream_nobody_reads(host: Host) -> None:
    e = await host.exec(["sh", "-c", f"head -c {WINDOW + 1000} /dev/zero; exit 3"], stderr=False)
    assert e.stdout is not None
    exit_event = await within(host.exit_of(e.pid))  # the window is full, the exit comes anyway
    assert exit_event.exit_status == 3
    assert len(await within(e.stdout.read_all())) == WINDOW + 1000  # and the rest follows when read


async def test_signal_is_delivered_while_running_and_not_after_exit(host: Host) -> None:
    e = await host.exec(["sleep", "30"], stdout=False, stderr=False)
    assert await host.signal(e.pid, signal.SIGTERM) is True
    exit_event = await within(host.exit_of(e.pid))
    assert (exit_event.exit_status, exit_event.signal) == (None, signal.SIGTERM)
    assert await host.signal(e.pid, signal.SIGTERM) is False
    assert await host.signal(4_000_000, signal.SIGTERM) is False  # never ours


@pytest.mark.parametrize("sig", [0, 65, -1, True, "15", None, 9.0])
async def test_signal_out_of_range_is_an_invalid_argument(host: Host, sig: Any) -> None:
    e = await host.exec(["sleep", "30"], stdout=False, stderr=False)
    with pytest.raises(errors.AgentInvalidArgumentError, match=r"out of range 1\.\.64"):
        await host.signal(e.pid, sig)
    await asyncio.sleep(0.05)
    assert host.exits(e.pid) == []  # nothing was sent to it
    assert await host.signal(e.pid, signal.SIGKILL) is True
    assert (await within(host.exit_of(e.pid))).signal == signal.SIGKILL


@pytest.mark.parametrize("pid", [0, -5, "12", True])
async def test_signal_to_an_invalid_pid_is_an_invalid_argument(host: Host, pid: Any) -> None:
    with pytest.raises(errors.AgentInvalidArgumentError, match="pid must be a positive integer"):
        await host.signal(pid, signal.SIGTERM)


async def test_exec_of_an_unknown_program_is_not_found_and_frees_its_stream_ids(host: Host) -> None:
    out = host.conn.open_inbound("stdout")
    params = {"container": None, "process": {"args": ["no-such-program-xyz"]}, "stdin": None, "stdout": out.sid,
              "stderr": None}
    with pytest.raises(errors.AgentNotFoundError, match="exec no-such-program-xyz"):
        await within(host.client.request(proto.EXEC, params, models.PidResult))
    # The stream id is free again in the agent.
    params["process"] = {"args": ["echo", "second try"]}
    res = await within(host.client.request(proto.EXEC, params, models.PidResult))
    assert await within(out.read_all()) == b"second try\n"
    assert (await within(host.exit_of(res.pid))).exit_status == 0


async def test_exec_with_stream_ids_in_use_or_invalid_is_refused(host: Host) -> None:
    busy = await host.exec(["sleep", "30"], stderr=False)
    assert busy.stdout is not None
    fresh = host.conn.open_inbound("fresh")
    base = {"container": None, "process": {"args": ["true"]}, "stdin": None, "stdout": None, "stderr": None}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"stdout": busy.stdout.sid}, "stream ids must be distinct and not in use"),
        ({"stdout": fresh.sid, "stderr": fresh.sid}, "stream ids must be distinct and not in use"),
        ({"stdout": 0}, r"stdout must be a stream id \(1\.\.2\^32-1\) or null"),
        ({"stderr": 2**32}, "stderr must be a stream id"),
        ({"stdin": "1"}, "stdin must be a stream id"),
        ({"terminal": "yes"}, "terminal must be a boolean"),
    ]
    for streams, message in cases:
        with pytest.raises(errors.AgentInvalidArgumentError, match=message):
            await within(host.client.request(proto.EXEC, {**base, **streams}, models.PidResult))
    assert await host.signal(busy.pid, signal.SIGKILL) is True
    assert (await within(host.exit_of(busy.pid))).signal == signal.SIGKILL


@pytest.mark.parametrize(("process", "message"), [
    (None, "process must be an object"),
    ({}, "process.args must be a non-empty list of strings"),
    ({"args": []}, "process.args must be a non-empty list of strings"),
    ({"args": ["true", 5]}, "process.args must be a non-empty list of strings"),
    ({"args": ["true"], "env": ["NOEQUALS"]}, "process.env must be a list of NAME=value strings"),
    ({"args": ["true"], "cwd": "tmp"}, "process.cwd must be an absolute path"),
])
async def test_exec_with_a_bad_process_is_an_invalid_argument(host: Host, process: Any, message: str) -> None:
    params = {"container": None, "process": process, "stdin": None, "stdout": None, "stderr": None}
    with pytest.raises(errors.AgentInvalidArgumentError, match=message):
        await within(host.client.request(proto.EXEC, params, models.PidResult))


async def test_exec_env_and_cwd_reach_the_process(host: Host, tmp_path: Path) -> None:
    e = await host.exec(["sh", "-c", "pwd; echo $COLOR"], stderr=False, env=["COLOR=teal"], cwd=str(tmp_path))
    assert e.stdout is not None
    assert await within(e.stdout.read_all()) == f"{os.path.realpath(tmp_path)}\nteal\n".encode()


async def test_process_communicate_over_the_real_agent(host: Host) -> None:
    proc = await host.create_process(["sh", "-c", "tr a-z A-Z; echo done >&2; exit 2"], stdin=True)
    out, err, exit_info = await within(proc.communicate(b"hello agent"))
    assert (out, err) == (b"HELLO AGENT", b"done\n")
    assert (exit_info.exit_status, exit_info.exit_code, exit_info.vm_died) == (2, 2, False)
    assert await within(proc.signal(signal.SIGTERM)) is False  # exited: nothing to deliver


async def test_process_kill_and_wait_over_the_real_agent(host: Host) -> None:
    proc = await host.create_process(["sleep", "30"], stdout=False, stderr=False)
    assert await within(proc.kill()) is True
    exit_info = await within(proc.wait())
    assert (exit_info.signal, exit_info.exit_code) == (signal.SIGKILL, 128 + signal.SIGKILL)


async def test_many_concurrent_processes(host: Host) -> None:
    execs = await within(asyncio.gather(*(host.exec(["sh", "-c", f"echo {i}; exit {i}"], stderr=False)
                                          for i in range(20))))
    outs = await within(asyncio.gather(*(e.stdout.read_all() for e in execs if e.stdout is not None)))
    assert outs == [f"{i}\n".encode() for i in range(20)]
    exits = await within(asyncio.gather(*(host.exit_of(e.pid) for e in execs)))
    assert [x.exit_status for x in exits] == list(range(20))


# -- malformed requests ------------------------------------------------------------------------------------

MALFORMED: list[tuple[str, bytes, str, str]] = [
    ("not-json", b"this is not json", proto.E_INVALID, "bad request: "),
    ("invalid-utf8", b"\xff\xfe{}", proto.E_INVALID, "bad request: "),
    ("trailing-data", b'{"method":"ping"} {}', proto.E_INVALID, "bad request: extra data"),
    ("nan", b'{"method":"ping","params":{"seq":NaN}}', proto.E_INVALID, "bad request: JSON constant NaN"),
    ("json-array", b'["ping"]', proto.E_INVALID, "request is not {method, params}"),
    ("no-method", b'{"params":{}}', proto.E_INVALID, "request is not {method, params}"),
    ("method-not-string", b'{"method":5,"params":{}}', proto.E_INVALID, "request is not {method, params}"),
    ("params-array", b'{"method":"ping","params":[1]}', proto.E_INVALID, "params must be an object"),
    ("params-string", b'{"method":"ping","params":"seq"}', proto.E_INVALID, "params must be an object"),
    ("params-number", b'{"method":"ping","params":5}', proto.E_INVALID, "params must be an object"),
    ("unknown-method", b'{"method":"frobnicate","params":{}}', proto.E_UNSUPPORTED, "unknown method 'frobnicate'"),
    ("ping-bad-seq", b'{"method":"ping","params":{"seq":-1}}', proto.E_INVALID, "seq must be a non-negative integer"),
    ("hello-without-version", b'{"method":"hello","params":{}}', proto.E_INVALID, "hello needs the host's protocol"),
    ("too-large", b'{"method":"ping","params":{"pad":"' + b"x" * proto.MAX_CONTROL_PAYLOAD + b'"}}', proto.E_INVALID,
     "request too large"),
]


@pytest.mark.parametrize(("payload", "code", "message"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
async def test_malformed_request_gets_an_error_answer_and_the_agent_keeps_serving(
    raw: RawPeer, payload: bytes, code: str, message: str,
) -> None:
    flags, body = await raw.request(7, payload)
    assert flags == framing.FLAG_ERROR
    assert body["code"] == code and body["message"].startswith(message), body
    models.ErrorBody.model_validate(body)  # what the host accepts
    await raw.assert_serving()


async def test_garbage_from_the_host_is_discarded_and_the_agent_keeps_serving(raw: RawPeer) -> None:
    await raw.send(b"GET / HTTP/1.1\r\n\r\n")
    await within(eventually(lambda: "bad frame from host" in raw.agent.log_text()))
    await raw.assert_serving()


async def test_unexpected_frames_from_the_host_are_ignored(raw: RawPeer) -> None:
    await raw.send(framing.encode(framing.RESPONSE, 3, b"{}") + framing.encode(framing.NOTIFY, 0, b"{}")
                   + framing.encode(framing.DATA, 77, b"stdin for nobody") + framing.encode(framing.CREDIT, 78, b"\0\0\0\1")
                   + framing.encode(framing.CLOSE, 79))
    await raw.assert_serving()
    assert "ignoring unexpected response frame from host" in raw.agent.log_text()
    assert raw.frames == []  # nothing answered them


async def test_requests_split_across_writes_and_batched_in_one_write(raw: RawPeer) -> None:
    frame = framing.encode(framing.REQUEST, 11, b'{"method":"ping","params":{"seq":11}}')
    for i in range(len(frame)):  # one byte at a time
        raw.writer.write(frame[i:i + 1])
        await raw.writer.drain()
        await asyncio.sleep(0)
    batch = b"".join(framing.encode(framing.REQUEST, n, b'{"method":"ping","params":{"seq":%d}}' % n)
                     for n in range(20, 40))
    await raw.send(batch)
    frames = [await raw.next_frame() for _ in range(21)]
    assert [(f.id, json.loads(f.payload)["seq"]) for f in frames] == [(11, 11)] + [(n, n) for n in range(20, 40)]


# -- bugs --------------------------------------------------------------------------------------------------


async def test_stdin_write_to_an_exited_process_does_not_hang(host: Host) -> None:
    proc = await host.create_process(["true"], stdin=True, stdout=False, stderr=False)
    await within(proc.wait())
    try:
        await asyncio.wait_for(proc.write_stdin(b"x" * (IN_WINDOW + 1)), 2.0)
    except errors.UvmError:
        pass  # an error is fine (the process has exited); a hang is not


@pytest.mark.parametrize("payload", [
    b'{"method":"ping","params":[]}',
    b'{"method":"ping","params":0}',
    b'{"method":"ping","params":false}',
    b'{"method":"ping","params":{"seq":true}}',
    b"[" * 100_000,
], ids=["params-empty-array", "params-zero", "params-false", "seq-bool", "deeply-nested"])
async def test_agent_refuses_lax_requests_as_invalid(raw: RawPeer, payload: bytes) -> None:
    flags, body = await raw.request(8, payload)
    await raw.assert_serving()
    assert flags == framing.FLAG_ERROR and body["code"] == proto.E_INVALID, body
