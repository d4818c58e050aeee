"""uvm.link over a FakeGuest: typed results, typed errors, and a link that fails cleanly on anything
outside the protocol (the guest is untrusted)."""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import logging
import os
import random
import socket
import tracemalloc
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from schemas import agent as proto
from schemas import agent_models as models
from schemas import framing
from uvm import errors, link
from uvm.link import AgentClient, AgentConnection
from uvm.testing import (
    ErrorReply,
    FakeGuest,
    Hangup,
    PayloadReply,
    RawReply,
    Reply,
    Request,
    fake_agent,
    hello_result,
    oversized_header,
    run_result,
)

CALL_TIMEOUT = 5.0  # a hang is a failure, not a stuck test run

Agent = tuple[FakeGuest, AgentConnection, AgentClient]


@pytest.fixture
async def agent() -> AsyncIterator[Agent]:
    async with fake_agent(name="vm-t") as triple:
        yield triple


# -- well-formed answers ---------------------------------------------------------------------------


async def test_hello_result_is_parsed_into_the_model(agent: Agent) -> None:
    guest, _, client = agent
    guest.hello = hello_result(kernel="6.1.0-test", uptime=1.5)
    res = await client.hello()
    assert isinstance(res, models.HelloResult)
    assert (res.version, res.kernel, res.uptime, res.agent) == (1, "6.1.0-test", 1.5, "fake-agent")
    assert res.capabilities == list(proto.CAPABILITIES)
    [req] = guest.requests
    assert (req.method, req.params) == ("hello", {"version": proto.PROTOCOL_VERSION})


async def test_ping_echoes_seq(agent: Agent) -> None:
    guest, _, client = agent
    assert (await client.ping(42)).seq == 42
    assert (await client.ping()).seq == 0
    assert [r.params for r in guest.requests] == [{"seq": 42}, {"seq": 0}]


async def test_run_result_is_parsed_and_params_are_sent(agent: Agent) -> None:
    guest, _, client = agent
    guest.handlers["run"] = lambda req: run_result(exit_status=3, stdout=b"\x00out\xff", stderr=b"err\n",
                                                   truncated=True)
    res = await client.run(["/bin/prog", "a b"], env={"K": "V"}, cwd="/tmp", stdin=b"in\x00put", timeout=2.5)
    assert isinstance(res, models.RunResult)
    assert (res.exit_status, res.signal, res.stdout, res.stderr) == (3, None, b"\x00out\xff", b"err\n")
    assert res.truncated and not res.timed_out
    [req] = guest.requests
    assert req.method == "run"
    assert req.params == {"argv": ["/bin/prog", "a b"], "env": {"K": "V"}, "cwd": "/tmp",
                          "stdin": base64.b64encode(b"in\x00put").decode(), "timeout": 2.5}


async def test_run_sends_only_the_given_params_and_reports_a_signal(agent: Agent) -> None:
    guest, _, client = agent
    guest.handlers["run"] = lambda req: run_result(exit_status=None, signal=9, timed_out=True)
    res = await client.run(["sleep", "100"])
    assert (res.exit_status, res.signal, res.timed_out) == (None, 9, True)
    assert guest.requests[0].params == {"argv": ["sleep", "100"]}


async def test_shutdown_gets_an_empty_result(agent: Agent) -> None:
    guest, conn, client = agent
    await client.shutdown()
    assert guest.shutdown_acknowledged
    assert conn.closed is None


async def test_notifications_reach_the_callback_between_responses() -> None:
    seen: list[dict[str, Any]] = []
    async with fake_agent(on_notify=seen.append) as (guest, conn, client):
        await guest.notify({"event": "log", "level": "info", "message": "hi"})
        assert (await client.ping(1)).seq == 1  # the notification was read before this answer
        assert seen == [{"event": "log", "level": "info", "message": "hi"}]
        assert conn.closed is None


# -- error responses map to typed errors -----------------------------------------------------------


@pytest.mark.parametrize(("code", "error_type"), [
    (proto.E_NOT_FOUND, errors.AgentNotFoundError),
    (proto.E_INVALID, errors.AgentInvalidArgumentError),
    (proto.E_UNSUPPORTED, errors.AgentUnsupportedError),
    (proto.E_INTERNAL, errors.AgentError),
    (proto.E_ALREADY_EXISTS, errors.AgentAlreadyExistsError),
    ("some_future_code", errors.AgentError),
])
async def test_error_response_maps_to_typed_error(agent: Agent, code: str, error_type: type[errors.AgentError]) -> None:
    guest, conn, client = agent
    guest.handlers["run"] = lambda req: ErrorReply(code, "nope: No such file or directory")
    with pytest.raises(errors.AgentError) as info:
        await client.run(["nope"])
    assert type(info.value) is error_type
    assert info.value.code == code
    assert str(info.value) == "run: nope: No such file or directory"
    assert info.value.context["method"] == "run"
    assert info.value.context["vm_id"] == "vm-t"
    # An error answer is part of the protocol: the link stays up.
    assert conn.closed is None
    assert (await client.ping(5)).seq == 5


async def test_an_error_message_from_the_guest_is_shown_escaped(agent: Agent) -> None:
    """The guest's words end up in the shim's log and containerd's errors: no line of their own in either."""
    guest, conn, client = agent
    guest.handlers["run"] = lambda req: ErrorReply(proto.E_INVALID, "mount failed\nERROR forged line\x1b[2J")
    with pytest.raises(errors.AgentInvalidArgumentError) as info:
        await client.run(["mount"])
    assert str(info.value) == r"run: mount failed\nERROR forged line\x1b[2J"
    assert conn.closed is None


async def test_not_found_is_also_a_not_found_error(agent: Agent) -> None:
    _, _, client = agent
    with pytest.raises(errors.NotFoundError):
        await client.run(["/no/such/program"])  # the fake guest's default: not_found


async def test_unknown_method_is_unsupported(agent: Agent) -> None:
    _, conn, client = agent
    with pytest.raises(errors.AgentUnsupportedError, match="frobnicate: unknown method 'frobnicate'"):
        await client.request("frobnicate", {}, models.Empty)
    assert conn.closed is None


async def test_oversized_request_is_refused_before_sending(agent: Agent) -> None:
    guest, conn, client = agent
    with pytest.raises(errors.UvmError, match="run request of .* bytes exceeds the cap"):
        await client.run(["x" * proto.MAX_CONTROL_PAYLOAD])
    assert guest.requests == []
    assert conn.closed is None
    assert (await client.ping(1)).seq == 1


# -- protocol violations drop the link -------------------------------------------------------------


def _frame(ftype: int, fid: int, obj: Any, flags: int = 0) -> bytes:
    return framing.encode(ftype, fid, json.dumps(obj).encode(), flags)


# (case id, method called, guest's reply to it, error type, message pattern)
VIOLATIONS: list[tuple[str, str, Callable[[Request], Reply], type[errors.LinkError], str]] = [
    ("garbage-bytes", "ping", lambda r: RawReply(b"HTTP/1.1 400 Bad Request\r\n\r\n"),
     errors.GuestProtocolError, r"malformed frame from the guest: bad magic 0x4854"),
    ("oversized-header", "ping", lambda r: RawReply(oversized_header(fid=r.id)),
     errors.GuestProtocolError,
     rf"malformed frame from the guest: response frame of {framing.MAX_PAYLOAD + 1} bytes exceeds the cap"),
    ("unknown-type", "ping", lambda r: RawReply(framing.HEADER.pack(framing.MAGIC, 77, 0, r.id, 0)),
     errors.GuestProtocolError, r"malformed frame from the guest: unknown frame type 77"),
    ("unknown-flags", "ping", lambda r: PayloadReply(b"{}", flags=0x40),
     errors.GuestProtocolError, r"malformed frame from the guest: unknown frame flags 0x40"),
    ("unknown-id", "ping", lambda r: RawReply(_frame(framing.RESPONSE, r.id + 1000, {"seq": 7})),
     errors.GuestProtocolError, r"response to unknown request id \d+"),
    ("unexpected-frame-type", "ping", lambda r: RawReply(_frame(framing.REQUEST, r.id, {"method": "ping"})),
     errors.GuestProtocolError, r"unexpected request frame from the guest"),
    ("over-control-cap", "ping", lambda r: PayloadReply(b" " * (proto.MAX_CONTROL_PAYLOAD + 1)),
     errors.GuestProtocolError, rf"response of {proto.MAX_CONTROL_PAYLOAD + 1} bytes exceeds the control cap"),
    ("not-json", "ping", lambda r: PayloadReply(b"this is not json"),
     errors.GuestProtocolError, r"invalid ping response from the guest: payload: Invalid JSON"),
    ("json-not-object", "ping", lambda r: PayloadReply(b"[7]"),
     errors.GuestProtocolError, r"invalid ping response from the guest: payload: Input should be an object"),
    ("extra-field", "ping", lambda r: {"seq": r.params["seq"], "admin": True},
     errors.GuestProtocolError, r"invalid ping response from the guest: admin: Extra inputs are not permitted"),
    ("wrong-type", "ping", lambda r: {"seq": str(r.params["seq"])},
     errors.GuestProtocolError, r"invalid ping response from the guest: seq: Input should be a valid integer"),
    ("wrong-seq", "ping", lambda r: {"seq": r.params["seq"] + 1},
     errors.GuestProtocolError, r"ping answered seq 8, sent 7"),
    ("hello-missing-field", "hello", lambda r: {"version": 1},
     errors.GuestProtocolError, r"invalid hello response from the guest: capabilities: Field required"),
    ("hello-out-of-range", "hello", lambda r: hello_result(version=0),
     errors.GuestProtocolError, r"invalid hello response from the guest: version: Input should be greater"),
    ("hello-huge-string", "hello", lambda r: hello_result(kernel="k" * 5000),
     errors.GuestProtocolError, r"invalid hello response from the guest: kernel: String should have at most 4096"),
    ("run-bad-base64", "run", lambda r: {**run_result(), "stdout": "!!!not base64!!!"},
     errors.GuestProtocolError, r"invalid run response from the guest: stdout: Value error, invalid base64"),
    ("run-exit-out-of-range", "run", lambda r: run_result(exit_status=256),
     errors.GuestProtocolError, r"invalid run response from the guest: exit_status"),
    ("run-bool-for-int", "run", lambda r: {**run_result(), "exit_status": True},
     errors.GuestProtocolError, r"invalid run response from the guest: exit_status"),
    ("run-neither-status-nor-signal", "run", lambda r: run_result(exit_status=None),
     errors.GuestProtocolError, r"invalid run response from the guest: payload: Value error, exit_status and signal "
                                r"both null"),
    ("run-status-and-signal", "run", lambda r: run_result(exit_status=0, signal=9),
     errors.GuestProtocolError, r"invalid run response from the guest: payload: Value error, exit_status and signal "
                                r"both set"),
    ("error-body-invalid", "ping", lambda r: PayloadReply(b'{"code": 5, "message": "x"}', flags=framing.FLAG_ERROR),
     errors.GuestProtocolError, r"invalid ping response from the guest: code: Input should be a valid string"),
    ("error-body-not-json", "ping", lambda r: PayloadReply(b"\xff\xfe", flags=framing.FLAG_ERROR),
     errors.GuestProtocolError, r"invalid ping response from the guest: payload: Invalid JSON"),
    ("notify-not-json", "ping", lambda r: RawReply(framing.encode(framing.NOTIFY, 0, b"{nope")),
     errors.GuestProtocolError, r"notification is not JSON"),
    ("notify-without-event", "ping", lambda r: RawReply(_frame(framing.NOTIFY, 0, {"level": "info"})),
     errors.GuestProtocolError, r"notification without an event name"),
    ("notify-over-cap", "ping",
     lambda r: RawReply(framing.encode(framing.NOTIFY, 0, b" " * (proto.MAX_CONTROL_PAYLOAD + 1))),
     errors.GuestProtocolError, rf"notification of {proto.MAX_CONTROL_PAYLOAD + 1} bytes exceeds the control cap"),
    ("close-mid-frame", "ping", lambda r: Hangup(_frame(framing.RESPONSE, r.id, {"seq": 7})[:15]),
     errors.LinkError, r"closed by the guest in the middle of a frame"),
    ("close-mid-header", "ping", lambda r: Hangup(b"\x55\x56\x02"),
     errors.LinkError, r"closed by the guest in the middle of a frame"),
    ("close-clean", "ping", lambda r: Hangup(),
     errors.LinkError, r"agent link vm-t: closed by the guest$"),
]


async def _call(client: AgentClient, method: str) -> object:
    async with asyncio.timeout(CALL_TIMEOUT):
        if method == "ping":
            return await client.ping(7)
        if method == "hello":
            return await client.hello()
        return await client.run(["true"])


@pytest.mark.parametrize(("method", "reply", "error_type", "pattern"),
                         [v[1:] for v in VIOLATIONS], ids=[v[0] for v in VIOLATIONS])
async def test_protocol_violation_fails_the_call_and_every_later_call(
    agent: Agent, method: str, reply: Callable[[Request], Reply], error_type: type[errors.LinkError], pattern: str,
) -> None:
    guest, conn, client = agent
    guest.handlers[method] = reply
    with pytest.raises(errors.LinkError, match=pattern) as info:
        await _call(client, method)
    first = info.value
    assert type(first) is error_type
    assert first.message.startswith("agent link vm-t: ")
    assert conn.closed is not None and str(conn.closed) == str(first)
    # Every later call, whatever the method, fails at once with the same error.
    for later in ("ping", "hello", "run"):
        with pytest.raises(errors.LinkError) as again:
            await _call(client, later)
        assert type(again.value) is error_type and str(again.value) == str(first)


@pytest.mark.parametrize(("field", "shown"), [
    ("x\n2024-01-01 ERROR uvm: forged line", r"x\n2024-01-01 ERROR uvm: forged line"),
    ("\x1b[2J\u202eevil\\", r"\x1b[2J\u202eevil\\"),
    ("k" * 700_000, "k" * 200 + "...[699800 more characters]"),
], ids=["newline", "terminal-and-bidi-controls", "700KiB"])
async def test_a_field_name_from_the_guest_is_escaped_and_clipped_in_the_error_and_the_log(
        agent: Agent, caplog: pytest.LogCaptureFixture, field: str, shown: str) -> None:
    guest, _, client = agent
    guest.handlers["ping"] = lambda r: {"seq": r.params["seq"], field: 1}
    with caplog.at_level(logging.ERROR, logger="uvm"), pytest.raises(errors.GuestProtocolError) as info:
        await _call(client, "ping")
    assert info.value.message == (f"agent link vm-t: invalid ping response from the guest: {shown}: "
                                  "Extra inputs are not permitted")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [info.value.message]


async def test_garbage_sent_unprompted_fails_a_pending_call(agent: Agent) -> None:
    guest, conn, client = agent
    guest.handlers["ping"] = lambda req: None  # held: never answered
    call = asyncio.create_task(client.ping(1))
    await guest.wait_for_requests(1)
    await guest.send_raw(b"\x00" * 64)
    with pytest.raises(errors.GuestProtocolError, match="bad magic 0x0000"):
        await asyncio.wait_for(call, CALL_TIMEOUT)
    assert isinstance(conn.closed, errors.GuestProtocolError)


async def test_late_duplicate_answer_drops_the_link(agent: Agent) -> None:
    guest, conn, client = agent
    assert (await client.ping(3)).seq == 3
    [req] = guest.requests
    await guest.respond(req.id, {"seq": 3})  # the same answer again, after the call returned
    with pytest.raises(errors.GuestProtocolError, match=f"response to unknown request id {req.id}"):
        await _call(client, "ping")
    assert isinstance(conn.closed, errors.GuestProtocolError)


async def test_duplicate_answer_in_one_read_drops_the_link(agent: Agent) -> None:
    guest, conn, client = agent
    guest.handlers["ping"] = lambda r: RawReply(_frame(framing.RESPONSE, r.id, {"seq": 3}) * 2)
    assert (await client.ping(3)).seq == 3  # the first answer is delivered
    await asyncio.sleep(0.01)
    assert isinstance(conn.closed, errors.GuestProtocolError)


async def test_link_drop_fails_every_pending_call_with_the_same_error(agent: Agent) -> None:
    guest, conn, client = agent
    guest.handlers["ping"] = lambda req: None
    calls = [asyncio.create_task(client.ping(i)) for i in range(5)]
    await guest.wait_for_requests(5)
    await guest.hangup()
    results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), CALL_TIMEOUT)
    assert all(isinstance(r, errors.LinkError) and not isinstance(r, errors.GuestProtocolError) for r in results)
    assert {str(r) for r in results} == {"agent link vm-t: closed by the guest"}
    assert conn.closed is not None


async def test_closed_connection_refuses_calls_and_close_is_idempotent(agent: Agent) -> None:
    guest, conn, client = agent
    await conn.aclose()
    await conn.aclose()
    with pytest.raises(errors.LinkError, match="agent link vm-t: closed$"):
        await client.ping()
    assert guest.requests == []


async def test_aclose_fails_pending_calls(agent: Agent) -> None:
    guest, conn, client = agent
    guest.handlers["hello"] = lambda req: None
    call = asyncio.create_task(client.hello())
    await guest.wait_for_requests(1)
    await conn.aclose(errors.LinkError("VM vm-t: stopped (terminated)"))
    with pytest.raises(errors.LinkError, match=r"stopped \(terminated\)"):
        await asyncio.wait_for(call, CALL_TIMEOUT)


# -- concurrency -----------------------------------------------------------------------------------


async def test_concurrent_calls_answered_out_of_order_each_get_their_own_answer(agent: Agent) -> None:
    guest, conn, client = agent
    guest.handlers["ping"] = lambda req: None
    guest.handlers["run"] = lambda req: None
    pings = {seq: asyncio.create_task(client.ping(seq)) for seq in range(10, 30)}
    run_ok = asyncio.create_task(client.run(["echo", "ok"]))
    run_missing = asyncio.create_task(client.run(["missing"]))
    requests = await asyncio.wait_for(guest.wait_for_requests(22), CALL_TIMEOUT)
    assert len({r.id for r in requests}) == 22  # distinct request ids
    order = list(requests)
    random.Random(3).shuffle(order)
    for req in order:
        if req.method == "ping":
            await guest.respond(req.id, {"seq": req.params["seq"]})
        elif req.params["argv"][0] == "echo":
            await guest.respond(req.id, run_result(stdout=b"ok\n"))
        else:
            await guest.respond(req.id, ErrorReply(proto.E_NOT_FOUND, "missing: not found"))
    for seq, task in pings.items():
        assert (await asyncio.wait_for(task, CALL_TIMEOUT)).seq == seq
    assert (await run_ok).stdout == b"ok\n"
    with pytest.raises(errors.AgentNotFoundError, match="missing: not found"):
        await run_missing
    assert conn.closed is None and guest.unanswered == {}


async def test_slow_answers_from_their_own_tasks_arrive_out_of_order(agent: Agent) -> None:
    guest, _, client = agent

    async def slow_ping(req: Request) -> Reply:
        seq = req.params["seq"]
        await asyncio.sleep(0.001 * (5 - seq))  # later requests answer first
        return {"seq": seq}

    guest.handlers["ping"] = slow_ping
    results = await asyncio.wait_for(asyncio.gather(*(client.ping(s) for s in range(5))), CALL_TIMEOUT)
    assert [r.seq for r in results] == list(range(5))


async def test_a_run_whose_guest_never_answers_ends_past_its_timeout(agent: Agent,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The guest enforces a run's timeout; a paused or stuck guest that never answers must not hold the host
    for ever: the call ends (WaitTimeoutError) and the late answer is dropped quietly."""
    guest, conn, client = agent
    monkeypatch.setattr(link, "RUN_HOST_GRACE_S", 0.2)
    guest.handlers["run"] = lambda req: None
    with pytest.raises(errors.WaitTimeoutError, match=r"run \['sleep'\]: no answer within 0.3s"):
        await asyncio.wait_for(client.run(["sleep", "100"], timeout=0.1), CALL_TIMEOUT)
    [req] = await guest.wait_for_requests(1)
    await guest.respond(req.id, run_result())
    guest.handlers["ping"] = lambda r: {"seq": r.params["seq"]}
    assert (await client.ping(1)).seq == 1 and conn.closed is None


async def test_cancelled_call_does_not_disturb_the_link(agent: Agent) -> None:
    guest, conn, client = agent
    guest.handlers["ping"] = lambda req: None
    call = asyncio.create_task(client.ping(1))
    [req] = await guest.wait_for_requests(1)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    # The late answer to the cancelled call (a ttrpc deadline, a client gone) is dropped quietly, once.
    guest.handlers["ping"] = lambda r: {"seq": r.params["seq"]}
    assert (await client.ping(2)).seq == 2
    await guest.respond(req.id, {"seq": 1})
    assert (await client.ping(3)).seq == 3
    assert conn.closed is None
    await guest.respond(req.id, {"seq": 1})  # but a second one is out of protocol
    with pytest.raises(errors.GuestProtocolError, match=f"response to unknown request id {req.id}"):
        await _call(client, "ping")


# -- many hostile guests ---------------------------------------------------------------------------

HOSTILE: list[Callable[[Request], Reply]] = [v[2] for v in VIOLATIONS if v[1] == "hello"] + [
    lambda r: RawReply(random.Random(r.id).randbytes(64)),
    lambda r: RawReply(oversized_header(fid=r.id, length=0xFFFFFFFF)),
    lambda r: RawReply(framing.HEADER.pack(framing.MAGIC, framing.RESPONSE, 0, r.id, framing.MAX_PAYLOAD + 1)
                       + b"x" * 1000),
    lambda r: RawReply(_frame(framing.RESPONSE, r.id ^ 0xFFFF, hello_result())),
    lambda r: PayloadReply(b"\x00\x01\x02"),
    lambda r: {**hello_result(), "extra": 1},
    lambda r: hello_result(capabilities="ping"),
    lambda r: hello_result(version="1"),
    lambda r: RawReply(_frame(framing.DATA, r.id, {})),
    lambda r: Hangup(framing.HEADER.pack(framing.MAGIC, framing.RESPONSE, 0, r.id, 100) + b"x" * 10),
    lambda r: Hangup(),
]


def _open_fds() -> int:
    gc.collect()  # garbage of earlier connections is closed now, not between two readings
    return len(os.listdir("/proc/self/fd"))


async def _one_hostile_connection(index: int) -> errors.UvmError:
    guest = FakeGuest()
    guest.handlers["hello"] = HOSTILE[index % len(HOSTILE)]
    # One name for all: each distinct name would add a logger that logging keeps forever (not the link's memory).
    conn, client = await guest.connect("hostile")
    try:
        async with asyncio.timeout(CALL_TIMEOUT):
            await client.hello()
    except errors.LinkError as e:
        assert conn.closed is not None
        return e
    finally:
        await conn.aclose()
        await guest.aclose()
    raise AssertionError(f"hostile reply #{index % len(HOSTILE)} was accepted")


async def test_a_thousand_hostile_guests_are_each_reported_and_memory_stays_bounded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.CRITICAL, logger="uvm")  # 1000 ERROR lines would only measure the log capture
    for i in range(50):  # warm up: caches, interned strings, the loop's internals
        await _one_hostile_connection(i)
    gc.collect()
    fds_before = _open_fds()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        reported: dict[str, int] = {}
        count = 1000
        for i in range(count):
            err = await _one_hostile_connection(i)
            reported[type(err).__name__] = reported.get(type(err).__name__, 0) + 1
        gc.collect()
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sum(reported.values()) == count, reported
    assert set(reported) == {"GuestProtocolError", "LinkError"}
    assert after - before < 2 * 1024 * 1024, f"memory grew by {(after - before) / 1e6:.1f} MB"
    assert _open_fds() <= fds_before + 2  # every socket pair was closed


# -- bugs ------------------------------------------------------------------------------------------


async def test_deeply_nested_notification_fails_the_link_instead_of_hanging(agent: Agent) -> None:
    guest, conn, client = agent
    guest.handlers["ping"] = lambda req: None
    call = asyncio.create_task(client.ping(1))
    await guest.wait_for_requests(1)
    await guest.notify(b"[" * 100_000)  # well under the control cap
    try:
        with pytest.raises(errors.GuestProtocolError):
            await asyncio.wait_for(call, 1.0)
    finally:
        call.cancel()
    assert conn.closed is not None


async def test_failing_notification_callback_does_not_hang_pending_calls() -> None:
    def callback(msg: dict[str, Any]) -> None:
        models.LogEvent.model_validate(msg)  # e.g. validating the event: raises on a bad level

    async with fake_agent(on_notify=callback) as (guest, _, client):
        guest.handlers["ping"] = lambda req: None
        call = asyncio.create_task(client.ping(1))
        await guest.wait_for_requests(1)
        await guest.notify({"event": "log", "level": "loud", "message": "x"})
        try:
            with pytest.raises(errors.LinkError):
                await asyncio.wait_for(call, 1.0)
        finally:
            call.cancel()


def _traceback_length(exc: BaseException) -> int:
    n, tb = 0, exc.__traceback__
    while tb is not None:
        n, tb = n + 1, tb.tb_next
    return n


async def test_calls_on_a_dead_link_do_not_grow_the_error_traceback(agent: Agent) -> None:
    guest, conn, client = agent
    await guest.hangup()
    with pytest.raises(errors.LinkError):
        await _call(client, "ping")
    for _ in range(100):
        with pytest.raises(errors.LinkError):
            await client.ping()
    assert conn.closed is not None
    assert _traceback_length(conn.closed) < 20


async def _stalled_guest() -> tuple[AgentConnection, AgentClient, asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection whose guest end reads nothing yet (a QEMU not draining the socket)."""
    host_sock, guest_sock = socket.socketpair()
    conn = AgentConnection("stall")
    await conn.open(host_sock)
    reader, writer = await asyncio.open_connection(sock=guest_sock, limit=1 << 22)
    return conn, AgentClient(conn), reader, writer


async def _flood(client: AgentClient, conn: AgentConnection) -> list[asyncio.Task[models.PingResult]]:
    """Calls of ~512 KiB each until the connection sees back-pressure from the socket."""
    blob = "x" * (512 << 10)
    calls: list[asyncio.Task[models.PingResult]] = []
    while conn._writable is None:  # set by pause_writing
        seq = len(calls)
        calls.append(asyncio.create_task(client.request("ping", {"seq": seq, "pad": blob}, models.PingResult)))
        await asyncio.sleep(0)
        assert len(calls) < 100, "the transport never paused"
    return calls


async def test_calls_wait_for_a_stalled_socket_and_complete_when_the_guest_reads() -> None:
    conn, client, reader, writer = await _stalled_guest()
    try:
        calls = await _flood(client, conn)
        await asyncio.sleep(0.05)
        assert not any(c.done() for c in calls)
        decoder = framing.FrameDecoder()
        answered = 0
        while answered < len(calls):  # now the guest reads everything and answers each request in order
            for frame in decoder.feed(await asyncio.wait_for(reader.read(1 << 20), CALL_TIMEOUT)):
                seq = json.loads(frame.payload)["params"]["seq"]
                writer.write(framing.encode(framing.RESPONSE, frame.id, json.dumps({"seq": seq}).encode()))
                answered += 1
        results = await asyncio.wait_for(asyncio.gather(*calls), CALL_TIMEOUT)
        assert [r.seq for r in results] == list(range(len(calls)))
        assert conn._writable is None and conn.closed is None
    finally:
        await conn.aclose()
        writer.close()


async def test_calls_waiting_for_a_stalled_socket_are_released_when_the_link_drops() -> None:
    conn, client, _, writer = await _stalled_guest()
    try:
        calls = await _flood(client, conn)
        writer.transport.abort()  # the guest end goes away with the host's requests unread
        for outcome in await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), CALL_TIMEOUT):
            assert isinstance(outcome, errors.LinkError), outcome
        with pytest.raises(errors.LinkError):
            await client.ping()
    finally:
        await conn.aclose()
