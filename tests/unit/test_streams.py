"""Host-side stdio streams (uvm.streams) through AgentConnection over a FakeGuest: in-order, exactly-once
delivery, credit flow control both ways, EOF and host close, and a dropped link for a guest that breaks
the stream protocol. Then exit notifications: validated strictly, routed by ProcessTable (also through
UtilityVM over the fake backend), and every waiter released when the UVM dies."""

from __future__ import annotations

import asyncio
import random
import signal
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from pydantic import ValidationError

from schemas import agent as proto
from schemas import agent_models as models
from schemas import framing, oci
from uvm import errors
from uvm.guest import procs
from uvm.link import AgentClient, AgentConnection
from uvm.process import Process, ProcessExit, ProcessTable
from uvm.streams import CREDIT, InboundStream, OutboundStream
from uvm.testing import FakeBackendFactory, FakeGuest, Request, fake_agent, make_test_config, run_result
from uvm.vm import UtilityVM

T = TypeVar("T")
DEADLINE = 5.0  # a hang is a failure, not a stuck test run
WINDOW = proto.OUTPUT_WINDOW  # guest -> host (stdout/stderr)
CHUNK = proto.OUTPUT_CHUNK
IN_WINDOW = proto.INPUT_WINDOW  # host -> guest (stdin)
IN_CHUNK = proto.INPUT_CHUNK

Agent = tuple[FakeGuest, AgentConnection, AgentClient]


@pytest.fixture
async def agent() -> AsyncIterator[Agent]:
    async with fake_agent(name="vm-s") as triple:
        yield triple


async def within(aw: Awaitable[T], timeout: float = DEADLINE) -> T:
    return await asyncio.wait_for(aw, timeout)


async def barrier(client: AgentClient) -> None:
    """A ping round trip: every frame either side sent before it has been processed by the other."""
    await within(client.ping(1))


async def link_error(client: AgentClient) -> errors.LinkError:
    """The error the link was dropped with (a call made now fails with it)."""
    with pytest.raises(errors.LinkError) as info:
        await within(client.ping(2))
    return info.value


def credits(guest: FakeGuest, sid: int) -> list[int]:
    """The CREDIT amounts the host sent on stream sid, in order."""
    return [CREDIT.unpack(f.payload)[0] for f in guest.stream_frames(sid) if f.type == framing.CREDIT]


def kinds(guest: FakeGuest, sid: int) -> list[str]:
    return [framing.TYPE_NAMES[f.type] for f in guest.stream_frames(sid)]


async def fill(guest: FakeGuest, sid: int, size: int, byte: bytes = b"w") -> bytes:
    """Send size bytes on sid in frames of at most OUTPUT_CHUNK (no credit check); return them."""
    data = byte * size
    for pos in range(0, size, CHUNK):
        await guest.send_data(sid, data[pos:pos + CHUNK])
    return data


class GuestSender:
    """Sends output on a stream the way the real agent does: never more than the host's credit."""

    def __init__(self, guest: FakeGuest, sid: int) -> None:
        self.guest = guest
        self.sid = sid
        self.sent = 0

    def room(self) -> int:
        return WINDOW - (self.sent - self.guest.credit_received(self.sid))

    async def send(self, data: bytes, chunk: int = CHUNK) -> None:
        view = memoryview(data)
        while view:
            await self.guest.wait_until(lambda: self.room() > 0)
            n = min(chunk, self.room(), len(view))
            await self.guest.send_data(self.sid, bytes(view[:n]))
            self.sent += n
            view = view[n:]


# -- inbound (stdout/stderr): delivery ----------------------------------------------------------------


async def test_inbound_data_is_delivered_in_order_exactly_once(agent: Agent) -> None:
    guest, conn, _ = agent
    out = conn.open_inbound("UVM stdout")
    rng = random.Random(1)
    chunks = [rng.randbytes(rng.randint(1, 8192)) for _ in range(60)]
    for chunk in chunks:
        await guest.send_data(out.sid, chunk)
    await guest.send_close(out.sid)
    assert await within(out.read_all()) == b"".join(chunks)
    assert await within(out.read()) == b""  # nothing is delivered twice
    assert out.at_eof and out.received == sum(map(len, chunks))
    assert conn.closed is None


async def test_partial_reads_return_at_most_n_bytes(agent: Agent) -> None:
    guest, conn, _ = agent
    out = conn.open_inbound("UVM stdout")
    await guest.send_data(out.sid, b"abcdefghij")
    assert await within(out.read(3)) == b"abc"
    assert await within(out.read(4)) == b"defg"
    assert await within(out.read(100)) == b"hij"
    await guest.send_data(out.sid, b"xyz")
    await guest.send_data(out.sid, b"123")
    await guest.send_close(out.sid)
    assert await within(out.read_all()) == b"xyz123"


async def test_read_waits_for_data(agent: Agent) -> None:
    guest, conn, client = agent
    out = conn.open_inbound("UVM stdout")
    reader = asyncio.create_task(out.read())
    await barrier(client)
    assert not reader.done()
    await guest.send_data(out.sid, b"late")
    assert await within(reader) == b"late"


async def test_credit_is_sent_back_exactly_as_bytes_are_consumed(agent: Agent) -> None:
    guest, conn, client = agent
    out = conn.open_inbound("UVM stdout")
    other = conn.open_inbound("UVM stderr")
    await guest.send_data(out.sid, b"x" * 1000)
    await guest.send_data(other.sid, b"y" * 10)
    await barrier(client)
    assert credits(guest, out.sid) == []  # buffered, not consumed: no credit yet
    assert await within(out.read(300)) == b"x" * 300
    await barrier(client)
    assert credits(guest, out.sid) == [300]
    assert await within(out.read()) == b"x" * 700
    await barrier(client)
    assert credits(guest, out.sid) == [300, 700]
    assert credits(guest, other.sid) == []  # each stream has its own window
    assert guest.stream_frames(out.sid) == [framing.Frame(framing.CREDIT, out.sid, CREDIT.pack(n)) for n in (300, 700)]


async def test_more_than_a_window_flows_while_the_host_reads(agent: Agent) -> None:
    guest, conn, _ = agent
    out = conn.open_inbound("UVM stdout")
    data = random.Random(2).randbytes(3 * WINDOW + 12345)
    sender = GuestSender(guest, out.sid)

    async def produce() -> None:
        await sender.send(data, chunk=100_000)
        await guest.send_close(out.sid)

    _, received = await within(asyncio.gather(produce(), out.read_all()), 20)
    assert received == data
    assert conn.closed is None
    assert out.received == len(data)
    assert guest.credit_received(out.sid) <= len(data)


async def test_a_stream_nobody_reads_buffers_one_window_and_stalls_only_itself(agent: Agent) -> None:
    guest, conn, client = agent
    stalled = conn.open_inbound("UVM stdout")
    other = conn.open_inbound("UVM stderr")
    sender = GuestSender(guest, stalled.sid)
    producer = asyncio.create_task(sender.send(b"s" * (2 * WINDOW)))
    try:
        await asyncio.sleep(0.05)
        await barrier(client)
        assert not producer.done()
        assert (sender.sent, stalled.received) == (WINDOW, WINDOW)
        # The other stream and control calls go on.
        await guest.send_data(other.sid, b"other output")
        await guest.send_close(other.sid)
        assert await within(other.read_all()) == b"other output"
        assert (await within(client.ping(7))).seq == 7
        # Reading the stalled stream lets the rest through.
        assert len(await within(stalled.read(WINDOW))) == WINDOW
        await within(producer)
        await guest.send_close(stalled.sid)
        assert await within(stalled.read_all()) == b"s" * WINDOW
    finally:
        producer.cancel()
    assert conn.closed is None


async def test_eof_comes_after_the_buffered_data(agent: Agent) -> None:
    guest, conn, client = agent
    out = conn.open_inbound("UVM stdout")
    await guest.send_data(out.sid, b"last words")
    await guest.send_close(out.sid)
    await within(out.wait_ended())
    assert out.ended and not out.at_eof  # no more will arrive, but some is still to be read
    assert await within(out.read(4)) == b"last"
    assert await within(out.read()) == b" words"
    assert await within(out.read()) == b""
    assert out.at_eof
    await barrier(client)
    assert credits(guest, out.sid) == []  # a finished stream is owed no credit


# -- inbound: protocol violations --------------------------------------------------------------------


@pytest.mark.parametrize(("first", "extra"), [(WINDOW, 1), (WINDOW - 10, 20), (WINDOW - CHUNK + 1, CHUNK)])
async def test_guest_sending_more_than_its_window_drops_the_link_naming_the_stream(
    agent: Agent, first: int, extra: int,
) -> None:
    guest, conn, client = agent
    out = conn.open_inbound("UVM stdout")
    sent = await fill(guest, out.sid, first)
    await guest.send_data(out.sid, b"!" * extra)
    err = await link_error(client)
    assert type(err) is errors.GuestProtocolError
    assert str(err) == f"agent link vm-s: UVM stdout: guest sent {extra} bytes with only {WINDOW - first} of credit"
    assert conn.closed is err
    # What arrived within the window is still delivered, then EOF.
    assert await within(out.read_all()) == sent


async def test_window_accounting_follows_the_credit_granted(agent: Agent) -> None:
    guest, conn, client = agent
    out = conn.open_inbound("UVM stdout")
    await fill(guest, out.sid, WINDOW)
    assert await within(out.read(100)) == b"w" * 100  # grants 100
    await guest.send_data(out.sid, b"z" * 100)  # exactly the credit granted: fine
    await barrier(client)
    assert conn.closed is None
    await guest.send_data(out.sid, b"z")
    err = await link_error(client)
    assert str(err) == "agent link vm-s: UVM stdout: guest sent 1 bytes with only 0 of credit"


async def test_data_after_eof_drops_the_link(agent: Agent) -> None:
    guest, conn, client = agent
    out = conn.open_inbound("UVM stderr")
    await guest.send_data(out.sid, b"ok")
    await guest.send_close(out.sid)
    await guest.send_data(out.sid, b"zombie output")
    err = await link_error(client)
    assert type(err) is errors.GuestProtocolError
    assert str(err) == "agent link vm-s: UVM stderr: data after the end of the stream"
    assert await within(out.read_all()) == b"ok"


@pytest.mark.parametrize(("ftype", "payload"), [
    (framing.DATA, b"x"), (framing.CREDIT, CREDIT.pack(1)), (framing.CLOSE, b""),
], ids=["data", "credit", "close"])
async def test_stream_frame_for_an_unknown_stream_drops_the_link(agent: Agent, ftype: int, payload: bytes) -> None:
    guest, conn, client = agent
    known = conn.open_inbound("UVM stdout")
    await guest.send_frame(ftype, known.sid + 4242, payload)
    err = await link_error(client)
    assert type(err) is errors.GuestProtocolError
    assert str(err) == f"agent link vm-s: {framing.TYPE_NAMES[ftype]} frame for unknown stream {known.sid + 4242}"


@pytest.mark.parametrize(("direction", "ftype", "payload", "message"), [
    ("in", framing.CREDIT, CREDIT.pack(1), "unexpected credit frame on UVM stdout"),
    ("in", framing.CLOSE, b"x", "unexpected close frame on UVM stdout"),
    ("out", framing.DATA, b"x", "unexpected data frame on UVM stdin"),
    ("out", framing.CLOSE, b"", "unexpected close frame on UVM stdin"),
    ("out", framing.CREDIT, b"\0\0\1", "unexpected credit frame on UVM stdin"),
    ("out", framing.CREDIT, b"\0\0\0\1\0", "unexpected credit frame on UVM stdin"),
], ids=["credit-on-output", "close-with-payload", "data-on-stdin", "close-on-stdin", "short-credit", "long-credit"])
async def test_wrong_frame_for_the_stream_direction_drops_the_link(
    agent: Agent, direction: str, ftype: int, payload: bytes, message: str,
) -> None:
    guest, conn, client = agent
    stream: InboundStream | OutboundStream = (
        conn.open_inbound("UVM stdout") if direction == "in" else conn.open_outbound("UVM stdin"))
    if isinstance(stream, OutboundStream):
        await within(stream.write(b"0123456789"))  # credit for these would be fine
    await guest.send_frame(ftype, stream.sid, payload)
    err = await link_error(client)
    assert type(err) is errors.GuestProtocolError
    assert str(err) == f"agent link vm-s: {message}"


# -- inbound: host close, ends ---------------------------------------------------------------------------


async def test_host_close_sends_close_once_and_discards_later_data_quietly(agent: Agent) -> None:
    guest, conn, client = agent
    out = conn.open_inbound("UVM stdout")
    await guest.send_data(out.sid, b"never read")
    await barrier(client)
    out.close()
    assert out.ended
    await within(out.wait_ended())
    assert await within(out.read()) == b""  # what was buffered is dropped
    await guest.send_data(out.sid, b"in flight")  # sent before the guest saw the CLOSE
    out.close()  # idempotent
    await barrier(client)
    assert conn.closed is None
    assert await within(out.read()) == b""
    assert kinds(guest, out.sid) == ["close"]  # one CLOSE, and no credit for discarded data
    assert out.received == len(b"never read") + len(b"in flight")


async def test_host_close_wakes_a_blocked_reader(agent: Agent) -> None:
    _, conn, client = agent
    out = conn.open_inbound("UVM stdout")
    reader = asyncio.create_task(out.read_all())
    await barrier(client)
    out.close()
    assert await within(reader) == b""


async def test_wait_ended_returns_on_eof_on_host_close_and_on_link_failure(agent: Agent) -> None:
    guest, conn, client = agent
    by_eof, by_close, by_link = (conn.open_inbound(n) for n in ("a", "b", "c"))
    waits = [asyncio.create_task(s.wait_ended()) for s in (by_eof, by_close, by_link)]
    await barrier(client)
    assert not any(w.done() for w in waits)
    await guest.send_close(by_eof.sid)
    await within(waits[0])
    assert not waits[1].done() and not waits[2].done()
    by_close.close()
    await within(waits[1])
    assert not waits[2].done()
    await guest.hangup()
    await within(waits[2])
    assert all(s.ended for s in (by_eof, by_close, by_link))


async def test_link_failure_ends_inbound_after_the_buffered_data(agent: Agent) -> None:
    guest, conn, _ = agent
    out = conn.open_inbound("UVM stdout")
    await guest.send_data(out.sid, b"partial")
    await guest.hangup()
    assert await within(out.read_all()) == b"partial"
    assert isinstance(conn.closed, errors.LinkError)


# -- outbound (stdin) ------------------------------------------------------------------------------------


async def test_write_sends_data_in_chunks_of_at_most_input_chunk(agent: Agent) -> None:
    guest, conn, client = agent
    inp = conn.open_outbound("UVM stdin")
    data = random.Random(3).randbytes(2 * IN_CHUNK + 1234)
    await within(inp.write(data))
    await barrier(client)
    assert [len(f.payload) for f in guest.stream_frames(inp.sid)] == [IN_CHUNK, IN_CHUNK, 1234]
    assert kinds(guest, inp.sid) == ["data"] * 3
    assert guest.data_received(inp.sid) == data
    assert inp.sent == len(data)


async def test_write_never_exceeds_the_credit_and_resumes_with_credit(agent: Agent) -> None:
    guest, conn, client = agent
    inp = conn.open_outbound("UVM stdin")
    data = random.Random(4).randbytes(IN_WINDOW + 100_000)
    writer = asyncio.create_task(inp.write(data))
    try:
        await within(guest.wait_until(lambda: len(guest.data_received(inp.sid)) >= IN_WINDOW))
        await asyncio.sleep(0.05)
        await barrier(client)
        assert len(guest.data_received(inp.sid)) == IN_WINDOW and not writer.done()  # blocked: no credit
        await guest.send_credit(inp.sid, 30_000)
        await within(guest.wait_until(lambda: len(guest.data_received(inp.sid)) >= IN_WINDOW + 30_000))
        await asyncio.sleep(0.05)
        await barrier(client)
        assert len(guest.data_received(inp.sid)) == IN_WINDOW + 30_000 and not writer.done()  # exactly the credit
        await guest.send_credit(inp.sid, IN_WINDOW)
        await within(writer)
    finally:
        writer.cancel()
    await barrier(client)
    assert guest.data_received(inp.sid) == data
    sizes = [len(f.payload) for f in guest.stream_frames(inp.sid)]
    assert sizes == [IN_CHUNK] * (IN_WINDOW // IN_CHUNK) + [30_000, 70_000]
    assert conn.closed is None


@pytest.mark.parametrize(("written", "grants"), [(0, [1]), (10, [11]), (10, [6, 5]), (10, [10, 1])])
async def test_credit_beyond_what_was_sent_drops_the_link(agent: Agent, written: int, grants: list[int]) -> None:
    guest, conn, client = agent
    inp = conn.open_outbound("UVM stdin")
    await within(inp.write(b"d" * written))
    for n in grants:
        await guest.send_credit(inp.sid, n)
    err = await link_error(client)
    assert type(err) is errors.GuestProtocolError
    assert str(err) == f"agent link vm-s: UVM stdin: guest granted {grants[-1]} bytes of credit, more than was sent"


async def test_close_sends_close_once_after_the_data(agent: Agent) -> None:
    guest, conn, client = agent
    inp = conn.open_outbound("UVM stdin")
    await within(inp.write(b"abc"))
    inp.close()
    inp.close()
    await barrier(client)
    assert guest.stream_frames(inp.sid) == [framing.Frame(framing.DATA, inp.sid, b"abc"),
                                            framing.Frame(framing.CLOSE, inp.sid, b"")]


async def test_write_after_close_is_a_state_error(agent: Agent) -> None:
    guest, conn, client = agent
    inp = conn.open_outbound("UVM stdin")
    inp.close()
    with pytest.raises(errors.StateError, match="^UVM stdin: closed$"):
        await within(inp.write(b"too late"))
    await barrier(client)
    assert kinds(guest, inp.sid) == ["close"]


async def test_close_wakes_a_blocked_writer_with_a_state_error(agent: Agent) -> None:
    guest, conn, client = agent
    inp = conn.open_outbound("UVM stdin")
    writer = asyncio.create_task(inp.write(b"q" * (IN_WINDOW + 1)))
    await within(guest.wait_until(lambda: len(guest.data_received(inp.sid)) >= IN_WINDOW))
    assert not writer.done()
    inp.close()
    with pytest.raises(errors.StateError):
        await within(writer)
    await barrier(client)
    assert kinds(guest, inp.sid)[-1] == "close" and len(guest.data_received(inp.sid)) == IN_WINDOW


async def test_link_failure_wakes_a_blocked_writer_with_the_link_error(agent: Agent) -> None:
    guest, conn, _ = agent
    inp = conn.open_outbound("UVM stdin")
    writer = asyncio.create_task(inp.write(b"q" * (IN_WINDOW + 1)))
    await within(guest.wait_until(lambda: len(guest.data_received(inp.sid)) >= IN_WINDOW))
    await guest.hangup()
    with pytest.raises(errors.LinkError, match="^agent link vm-s: closed by the guest$") as info:
        await within(writer)
    assert info.value is conn.closed
    with pytest.raises(errors.LinkError) as again:
        await within(inp.write(b"more"))
    assert again.value is conn.closed
    inp.close()  # nothing to send on a dead link, and no error either


async def test_protocol_violation_elsewhere_wakes_a_blocked_writer(agent: Agent) -> None:
    guest, conn, _ = agent
    inp = conn.open_outbound("UVM stdin")
    writer = asyncio.create_task(inp.write(b"q" * (IN_WINDOW + 1)))
    await within(guest.wait_until(lambda: len(guest.data_received(inp.sid)) >= IN_WINDOW))
    await guest.send_data(999, b"?")
    with pytest.raises(errors.GuestProtocolError, match="data frame for unknown stream 999"):
        await within(writer)


async def test_stream_ids_are_distinct_and_nonzero(agent: Agent) -> None:
    _, conn, _ = agent
    streams = [conn.open_inbound("o") if i % 2 else conn.open_outbound("i") for i in range(50)]
    sids = [s.sid for s in streams]
    assert len(set(sids)) == 50 and 0 not in sids


# -- exit notifications: validation ----------------------------------------------------------------------

VALID_EXIT: dict[str, Any] = {"event": "exit", "container": None, "pid": 42, "exit_status": 0, "signal": None,
                              "at": 1_700_000_000.5}

BAD_EXITS: list[tuple[str, dict[str, Any]]] = [
    ("pid-zero", {"pid": 0}),
    ("pid-negative", {"pid": -1}),
    ("pid-too-large", {"pid": 2**22 + 1}),
    ("pid-string", {"pid": "42"}),
    ("pid-bool", {"pid": True}),
    ("pid-float", {"pid": 42.0}),
    ("pid-null", {"pid": None}),
    ("exit-status-256", {"exit_status": 256}),
    ("exit-status-negative", {"exit_status": -1}),
    ("exit-status-string", {"exit_status": "0"}),
    ("exit-status-bool", {"exit_status": False}),
    ("signal-zero", {"signal": 0}),
    ("signal-65", {"signal": 65}),
    ("signal-name", {"signal": "KILL"}),
    ("at-negative", {"at": -1.0}),
    ("at-string", {"at": "now"}),
    ("at-far-future", {"at": 1e12}),
    ("container-path", {"container": "../etc"}),
    ("container-empty", {"container": ""}),
    ("container-too-long", {"container": "c" * 65}),
    ("container-number", {"container": 7}),
    ("wrong-event", {"event": "exited"}),
    ("extra-field", {"exit_code": 0}),
]


@pytest.mark.parametrize("change", [c for _, c in BAD_EXITS], ids=[i for i, _ in BAD_EXITS])
def test_malformed_exit_event_is_rejected(change: dict[str, Any]) -> None:
    with pytest.raises(ValidationError) as info:
        models.ExitEvent.model_validate({**VALID_EXIT, **change})
    assert info.value.errors()[0]["loc"][0] in change


@pytest.mark.parametrize("missing", sorted(VALID_EXIT))
def test_exit_event_missing_a_field_is_rejected(missing: str) -> None:
    event = {k: v for k, v in VALID_EXIT.items() if k != missing}
    with pytest.raises(ValidationError, match="Field required"):
        models.ExitEvent.model_validate(event)


@pytest.mark.parametrize("change", [{}, {"container": "c1"}, {"exit_status": None, "signal": 9}, {"pid": 2**22},
                                    {"exit_status": 255}, {"at": 0}])
def test_valid_exit_events_are_accepted(change: dict[str, Any]) -> None:
    event = models.ExitEvent.model_validate({**VALID_EXIT, **change})
    assert event.pid == change.get("pid", 42)
    assert event.container == change.get("container")


@pytest.mark.parametrize(("change", "problem"), [
    ({"exit_status": None}, "both null"), ({"signal": 9}, "both set"), ({"exit_status": 255, "signal": 64}, "both set"),
], ids=["neither", "status-and-signal", "status-and-signal-at-the-edges"])
def test_an_exit_has_a_status_or_a_signal_not_both_nor_neither(change: dict[str, Any], problem: str) -> None:
    """Neither would read as exit code 128 (128 + no signal), both as whichever the host looks at first."""
    with pytest.raises(ValidationError, match=f"exit_status and signal {problem}"):
        models.ExitEvent.model_validate({**VALID_EXIT, **change})
    with pytest.raises(ValidationError, match=f"exit_status and signal {problem}"):
        models.RunResult.model_validate({**run_result(), **change})


def test_a_container_state_has_at_most_one_of_a_status_and_a_signal() -> None:
    state = {"id": "c1", "status": "running", "pid": 7, "bundle": "/run/c1", "created": 1.0}
    for outcome in ({"exit_status": None, "signal": None}, {"exit_status": 0, "signal": None},
                    {"exit_status": None, "signal": 9}):  # not exited (or never started), exited, killed
        models.ContainerState.model_validate({**state, **outcome})
    with pytest.raises(ValidationError, match="exit_status and signal both set"):
        models.ContainerState.model_validate({**state, "exit_status": 0, "signal": 9})


def test_every_status_an_honest_guest_reports_is_accepted() -> None:
    """The guest reads exit_status and signal from a waitpid status (procs.decode_status): every exit status,
    and every signal, with a core dump or without (SIGKILL: a kill, a timed-out run, the OOM killer)."""
    statuses = [code << 8 for code in range(256)] + [sig | core for sig in range(1, 65) for core in (0, 0x80)]
    for status in statuses:
        exit_status, sig = procs.decode_status(status)
        event = models.ExitEvent.model_validate({**VALID_EXIT, "exit_status": exit_status, "signal": sig})
        models.RunResult.model_validate(run_result(exit_status=exit_status, signal=sig, timed_out=sig == 9))
        exit_code = ProcessExit(event.exit_status, event.signal, event.at).exit_code
        assert exit_code == (status >> 8 if status & 0x7F == 0 else 128 + (status & 0x7F))


VALID_OOM: dict[str, Any] = {"event": "oom", "container": "c1", "oom_kills": 2, "at": 1_700_000_000.0}


@pytest.mark.parametrize("change", [
    {"container": None}, {"container": "/c1"}, {"oom_kills": -1}, {"oom_kills": "2"}, {"oom_kills": 2.0},
    {"event": "exit"}, {"extra": True}, {"at": "soon"},
], ids=["container-null", "container-path", "kills-negative", "kills-string", "kills-float", "wrong-event", "extra",
        "at-string"])
def test_malformed_oom_event_is_rejected(change: dict[str, Any]) -> None:
    assert models.OomEvent.model_validate(VALID_OOM).oom_kills == 2
    with pytest.raises(ValidationError):
        models.OomEvent.model_validate({**VALID_OOM, **change})


# -- exit notifications: ProcessTable --------------------------------------------------------------------


def exit_event(pid: int, container: str | None = None, exit_status: int | None = 0,
               sig: int | None = None) -> models.ExitEvent:
    return models.ExitEvent.model_validate({**VALID_EXIT, "pid": pid, "container": container,
                                            "exit_status": exit_status, "signal": sig})


def new_process(conn: AgentConnection, client: AgentClient, pid: int, container: str | None = None,
                streams: bool = False) -> Process:
    name = f"{container or 'UVM'} {pid}"
    return Process(client, container, pid, False,
                   conn.open_outbound(f"{name} stdin") if streams else None,
                   conn.open_inbound(f"{name} stdout") if streams else None,
                   conn.open_inbound(f"{name} stderr") if streams else None)


async def test_exit_is_routed_to_its_process_by_container_and_pid(agent: Agent) -> None:
    _, conn, client = agent
    table = ProcessTable()
    in_uvm, in_c1 = new_process(conn, client, 42), new_process(conn, client, 42, "c1")
    table.add(in_uvm)
    table.add(in_c1)
    assert table.on_exit(exit_event(42, "c1", exit_status=3)) is in_c1
    assert in_c1.exited and not in_uvm.exited
    assert (await within(in_c1.wait())).exit_status == 3
    assert in_c1.exit_code == 3 and not in_c1.exit_info.success
    with pytest.raises(errors.NotExitedError):
        _ = in_uvm.exit_code
    assert table.on_exit(exit_event(42, sig=signal.SIGKILL, exit_status=None)) is in_uvm
    assert in_uvm.exit_code == 128 + signal.SIGKILL
    assert repr(in_uvm) == "<Process 42 in UVM exited>"


async def test_a_second_exit_for_the_same_process_changes_nothing(agent: Agent) -> None:
    _, conn, client = agent
    table = ProcessTable()
    proc = new_process(conn, client, 7)
    table.add(proc)
    table.on_exit(exit_event(7, exit_status=0))
    table.on_exit(exit_event(7, exit_status=9))
    assert proc.exit_code == 0 and proc.exit_info.success


async def test_exit_of_an_unknown_pid_is_applied_when_the_process_is_added(agent: Agent) -> None:
    _, conn, client = agent
    table = ProcessTable()
    assert table.on_exit(exit_event(99, exit_status=4)) is None  # the exec answer is still on its way
    proc = new_process(conn, client, 99)
    table.add(proc)
    assert proc.exited and proc.exit_code == 4
    assert (await within(proc.wait())).exit_status == 4
    other = new_process(conn, client, 99, "c1")  # same pid in a container: not that exit
    table.add(other)
    assert not other.exited


async def test_early_exits_are_bounded_oldest_dropped_first(agent: Agent) -> None:
    _, conn, client = agent
    table = ProcessTable()
    extra = 10
    for pid in range(1, ProcessTable.MAX_EARLY + extra + 1):
        table.on_exit(exit_event(pid, exit_status=pid % 256))
    oldest, kept_first, newest = (new_process(conn, client, pid) for pid in (extra, extra + 1,
                                                                              ProcessTable.MAX_EARLY + extra))
    for proc in (oldest, kept_first, newest):
        table.add(proc)
    assert not oldest.exited
    assert kept_first.exit_code == extra + 1
    assert newest.exit_code == (ProcessTable.MAX_EARLY + extra) % 256


async def test_vm_died_releases_every_waiter_with_a_failure(agent: Agent) -> None:
    guest, conn, client = agent
    table = ProcessTable()
    procs = [new_process(conn, client, pid, streams=True) for pid in (10, 11, 12)]
    done_before = new_process(conn, client, 13)
    for proc in (*procs, done_before):
        table.add(proc)
    table.on_exit(exit_event(13, exit_status=0))
    stdout = procs[0].stdout
    assert stdout is not None
    await guest.send_data(stdout.sid, b"last output")
    await barrier(client)
    waiters = [asyncio.create_task(p.wait()) for p in procs]
    await asyncio.sleep(0.01)
    assert not any(w.done() for w in waiters)
    table.vm_died()
    for exit_info in await within(asyncio.gather(*waiters)):
        assert exit_info.vm_died and not exit_info.success
        assert exit_info.exit_code == 255
    assert [p.state.value for p in procs] == ["exited"] * 3
    assert done_before.exit_code == 0 and not done_before.exit_info.vm_died  # a real exit stays
    # The streams end: buffered output is still read, a writer fails.
    assert await within(stdout.read_all()) == b"last output"
    with pytest.raises(errors.LinkError, match="process 11 in the UVM: the UVM died"):
        await within(procs[1].write_stdin(b"x"))


def test_exit_code_conventions() -> None:
    assert ProcessExit(0, None, 1.0).exit_code == 0
    assert ProcessExit(None, 15, 1.0).exit_code == 143
    assert ProcessExit(None, 9, 1.0, vm_died=True).exit_code == 255
    assert not ProcessExit(0, None, 1.0, vm_died=True).success


# -- exit notifications through UtilityVM._on_notify (fake backend) ---------------------------------------


@pytest.fixture
async def vm_guest(tmp_path: Path) -> AsyncIterator[tuple[UtilityVM, FakeGuest, FakeBackendFactory]]:
    guest = FakeGuest()
    pids = iter(range(500, 600))
    guest.handlers[proto.EXEC] = lambda req: {"pid": next(pids)}
    factory = FakeBackendFactory(guest=guest)
    vm = UtilityVM(make_test_config(tmp_path), backend_factory=factory)
    await within(vm.start())
    try:
        yield vm, guest, factory
    finally:
        await within(vm.close())


def exec_sids(guest: FakeGuest) -> tuple[int, int]:
    """(stdout, stderr) stream ids of the last exec request."""
    req = [r for r in guest.requests if r.method == proto.EXEC][-1]
    return req.params["stdout"], req.params["stderr"]


async def test_vm_routes_a_valid_exit_after_the_output(vm_guest: tuple[UtilityVM, FakeGuest, Any]) -> None:
    vm, guest, _ = vm_guest
    proc = await within(vm.create_process(oci.Process(args=["prog"])))
    out_sid, err_sid = exec_sids(guest)
    await guest.send_data(out_sid, b"hello\n")
    await guest.send_close(out_sid)
    await guest.send_close(err_sid)
    await guest.notify({**VALID_EXIT, "pid": proc.pid, "exit_status": 3})
    exit_info = await within(proc.wait())
    assert (exit_info.exit_status, exit_info.signal, exit_info.vm_died) == (3, None, False)
    assert proc.stdout is not None and await within(proc.stdout.read_all()) == b"hello\n"
    assert vm.processes.get(None, proc.pid) is proc


async def test_vm_keeps_an_exit_notified_before_the_exec_answer(vm_guest: tuple[UtilityVM, FakeGuest, Any]) -> None:
    vm, guest, _ = vm_guest

    async def exec_then_exit_first(req: Request) -> dict[str, Any]:
        await guest.notify({**VALID_EXIT, "pid": 777, "exit_status": None, "signal": 9})
        return {"pid": 777}

    guest.handlers[proto.EXEC] = exec_then_exit_first
    proc = await within(vm.create_process(oci.Process(args=["prog"]), stdout=False, stderr=False))
    assert proc.exited
    assert (await within(proc.wait())).exit_code == 137


@pytest.mark.parametrize(("change", "where"), [
    ({"pid": 0}, "pid"), ({"exit_status": "0"}, "exit_status"), ({"rogue": 1}, "rogue"), ({"at": None}, "at"),
    ({"exit_status": None}, "payload"), ({"signal": 9}, "payload"),
])
async def test_vm_drops_the_link_on_a_malformed_exit_and_exits_nothing(
    vm_guest: tuple[UtilityVM, FakeGuest, Any], change: dict[str, Any], where: str,
) -> None:
    vm, guest, _ = vm_guest
    proc = await within(vm.create_process(oci.Process(args=["prog"]), stdout=False, stderr=False))
    await guest.notify({**VALID_EXIT, "pid": proc.pid, **change})
    with pytest.raises(errors.GuestProtocolError, match=f"invalid exit notification: {where}: "):
        await within(vm.ping())
    assert not proc.exited


async def test_vm_drops_the_link_on_an_unknown_or_malformed_notification(
    vm_guest: tuple[UtilityVM, FakeGuest, Any],
) -> None:
    vm, guest, _ = vm_guest
    await guest.notify({**VALID_OOM, "container": "not-here"})  # valid, for no container we know: ignored
    await within(vm.ping())
    await guest.notify({**VALID_OOM, "oom_kills": -3})
    with pytest.raises(errors.GuestProtocolError, match="invalid oom notification: oom_kills: "):
        await within(vm.ping())


async def test_vm_crash_reports_every_process_as_died(vm_guest: tuple[UtilityVM, FakeGuest, FakeBackendFactory]) -> None:
    vm, _, factory = vm_guest
    procs = [await within(vm.create_process(oci.Process(args=["prog"]))) for _ in range(3)]
    waiters = [asyncio.create_task(p.wait()) for p in procs]
    factory.last.crash()
    for exit_info in await within(asyncio.gather(*waiters)):
        assert exit_info.vm_died and exit_info.exit_code == 255 and not exit_info.success
    for proc in procs:
        assert proc.stdout is not None and await within(proc.stdout.read_all()) == b""


# -- bugs ------------------------------------------------------------------------------------------------


async def test_malformed_notification_error_names_the_link_once(vm_guest: tuple[UtilityVM, FakeGuest, Any]) -> None:
    vm, guest, _ = vm_guest
    await guest.notify({**VALID_EXIT, "pid": 0})
    with pytest.raises(errors.GuestProtocolError) as info:
        await within(vm.ping())
    assert str(info.value) == "agent link vm1: invalid exit notification: pid: Input should be greater than or equal to 1"


async def test_process_wait_does_not_hang_after_the_link_drops(vm_guest: tuple[UtilityVM, FakeGuest, Any]) -> None:
    vm, guest, _ = vm_guest
    proc = await within(vm.create_process(oci.Process(args=["prog"]), stdout=False, stderr=False))
    await guest.notify({**VALID_EXIT, "pid": proc.pid, "exit_status": 300})  # out of range: the link drops
    with pytest.raises(errors.GuestProtocolError):
        await within(vm.ping())
    # The exit can never arrive any more: wait() must end (an error or a failed exit), not hang.
    try:
        exit_info = await asyncio.wait_for(proc.wait(), 1.0)
    except errors.UvmError:
        return
    assert not exit_info.success


@pytest.mark.parametrize("in_flight", ["stdout-data", "stdin-credit"])
async def test_frames_in_flight_after_process_close_do_not_drop_the_link(agent: Agent, in_flight: str) -> None:
    guest, conn, client = agent
    proc = new_process(conn, client, 42, streams=True)
    assert proc.stdin is not None and proc.stdout is not None
    await within(proc.write_stdin(b"input"))
    await barrier(client)
    proc.close()
    # Sent by the guest before it received the CLOSE frames: the host must tolerate them.
    if in_flight == "stdout-data":
        await guest.send_data(proc.stdout.sid, b"output in flight")
    else:
        await guest.send_credit(proc.stdin.sid, len(b"input"))
    await barrier(client)
    assert conn.closed is None


async def test_stdin_write_after_the_process_exited_does_not_hang(agent: Agent) -> None:
    _, conn, client = agent
    table = ProcessTable()
    proc = new_process(conn, client, 42, streams=True)
    table.add(proc)
    table.on_exit(exit_event(42, exit_status=0))
    try:  # the guest consumes nothing any more: one window goes out, then no credit ever comes back
        await asyncio.wait_for(proc.write_stdin(b"x" * (IN_WINDOW + 1)), 1.0)
    except errors.UvmError:
        pass  # an error is fine (the process has exited); a hang is not
