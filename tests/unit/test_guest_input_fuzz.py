"""Property-based fuzzing (hypothesis) of everything the host parses from the guest, which is untrusted.

Hypothesis plays a hostile guest against each host-side entry point, and the host may only ever answer
with the project's own errors:

* schemas.framing.FrameDecoder: any bytes, cut anywhere, give whole frames or FramingError, and the
  decoder never buffers more than one header and one capped payload;
* schemas.wirejson.loads (the notifications' JSON): any bytes give a value, ValueError or RecursionError
  (the two the link catches), and the value json.loads gives;
* responses, through AgentClient.request over a real AgentConnection: any payload gives the validated
  model, the typed AgentError of an error answer, or a GuestProtocolError that closed the link; a valid
  answer with one field broken (wrong type, out of range, missing, unknown) is refused naming the field;
* notifications (exit, OOM, log), through the link's NOTIFY path into UtilityVM's handler: handled, or
  the link closed with a GuestProtocolError naming the field;
* stdio stream frames (DATA, CREDIT, CLOSE) against a model of both credit windows: in-order delivery
  while the guest keeps to the protocol, the link dropped at its first violation;
* a link fed a storm of fuzzed frames cut anywhere: data_received never raises, and once the socket ends
  no pending call, stream reader or writer is left hanging.

The link runs over an in-memory transport (AgentConnection is an asyncio protocol: the test plays the
socket), one event loop per example. Every test is derandomized and keeps no example database, so a run
is reproducible and leaves no .hypothesis directory behind.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import math
import os
import re
import tempfile
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from pydantic import BaseModel, ValidationError

from schemas import agent as proto
from schemas import agent_models as models
from schemas import framing, wirejson
from schemas.framing import FrameDecoder, FramingError
from schemas.uvm_config import UvmConfig
from schemas.validation import guest_text
from shim.containerd.events import timestamp
from shim.containerd.service import metrics
from uvm import errors
from uvm.container import ContainerStatistics
from uvm.link import AgentClient, AgentConnection
from uvm.process import ProcessExit
from uvm.streams import CREDIT
from uvm.testing import make_test_config
from uvm.vm import UtilityVM

CALL_TIMEOUT = 5.0  # a hang is a failure, not a stuck test run
LINK = "fuzz"

# Hypothesis caches the constants it finds in the project's source under its home directory even without
# a database, ./.hypothesis by default: elsewhere, set on import, before its plugin's collection hook runs.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / f"uvmshim-hypothesis-{os.getuid()}")
# Reproducible (derandomized, no example database) and patient: the machine is slow and shared.
FUZZ = settings(derandomize=True, database=None, deadline=None, max_examples=60, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example, HealthCheck.filter_too_much])


@pytest.fixture(autouse=True, scope="module")
def quiet_links() -> Iterator[None]:
    """Each refused guest is one ERROR line of the link's log: thousands of them only measure log capture."""
    logger = logging.getLogger("uvm")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(level)


@pytest.fixture(scope="module")
def vm_config(tmp_path_factory: pytest.TempPathFactory) -> UvmConfig:
    return make_test_config(tmp_path_factory.mktemp("fuzz-vm"))


# -- the guest's side of the wire --------------------------------------------------------------------


def guest_frame(ftype: int, fid: int, payload: bytes = b"", flags: int = 0, magic: int = framing.MAGIC,
                length: int | None = None) -> bytes:
    """A frame as a hostile guest may write it: any header field, a length that may lie, no cap."""
    return framing.HEADER.pack(magic, ftype, flags, fid, len(payload) if length is None else length) + payload


def to_json(value: Any) -> bytes:
    """JSON as a careless or hostile guest may write it: NaN and Infinity included."""
    return json.dumps(value, allow_nan=True).encode()


def cut(data: bytes, points: Sequence[int]) -> list[bytes]:
    """data in pieces, as reads from the socket may return it."""
    bounds = [0, *sorted({p % (len(data) + 1) for p in points}), len(data)]
    return [data[a:b] for a, b in pairwise(bounds) if b > a]


def nested(depth: int, kind: str) -> bytes:
    opening, closing = (b"[", b"]") if kind == "list" else (b'{"a":', b"}")
    return opening * depth + b"0" + closing * depth


BIG_INTS = [2**22, 2**22 + 1, 2**63 - 1, 2**63, 2**63 + 1, 2**64, -(2**63) - 1, 10**300, -(10**300)]
SCALARS = st.one_of(
    st.none(), st.booleans(),
    st.integers(), st.sampled_from(BIG_INTS), st.integers(-(2**70), 2**70),
    st.floats(),  # NaN and both infinities included
    st.text(max_size=16),
    st.sampled_from([63, 64, 65, 4096, 4097, 20_000]).map(lambda n: "s" * n),  # at and past the caps
)
FIELD_NAMES = sorted({name for m in models.GuestModel.__subclasses__() for name in m.model_fields} | {"event"})
KEYS = st.sampled_from(FIELD_NAMES) | st.text(max_size=10)
JSON_VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=6), max_leaves=24)
RAW_DOCUMENTS = st.one_of(
    st.binary(max_size=80),
    st.sampled_from([b"", b" ", b"null", b"{", b"}", b"{}x", b'{"a":1} {"a":1}', b"\xef\xbb\xbf{}", b"NaN",
                     b"-Infinity", b'"\\ud800"', b'{"seq":1,"seq":2}', b"\xff\xfe{\x00}\x00", b"1" * 5000,
                     b'{"seq":' + b"9" * 5000 + b"}", b"[" * 100_000, b"{" * 50_000]),
    st.builds(nested, st.integers(1, 3000), st.sampled_from(["list", "dict"])),
)


def documents(base: st.SearchStrategy[dict[str, Any]] | None = None) -> st.SearchStrategy[bytes]:
    """Payloads a guest may send: any JSON-ish value, raw bytes, deep nests; and, given the valid
    messages of a kind, those with a key added or replaced by anything."""
    values = JSON_VALUES | st.dictionaries(KEYS, JSON_VALUES, max_size=8)
    docs = values.map(to_json) | RAW_DOCUMENTS
    if base is not None:
        edited = st.tuples(base, st.dictionaries(KEYS, JSON_VALUES, max_size=3)).map(lambda t: {**t[0], **t[1]})
        docs = docs | edited.map(to_json) | base.map(to_json)
    return docs


# -- what each guest message may hold ----------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """One field of a guest message: values the host must take, and values it must refuse."""

    valid: st.SearchStrategy[Any]
    invalid: st.SearchStrategy[Any]


WRONG_CONTAINERS = st.lists(st.integers(0, 9), max_size=2) | st.dictionaries(st.text(max_size=3), st.integers(0, 9),
                                                                           max_size=2)
NOT_A_STRING = st.integers() | st.floats() | st.booleans() | WRONG_CONTAINERS


def integer(lo: int, hi: int, *, optional: bool = False) -> Shape:
    """A strict int in lo..hi: bools, floats (even 3.0), strings and the neighbours of the range are refused."""
    invalid = st.one_of(st.integers(max_value=lo - 1), st.integers(min_value=hi + 1),
                        st.sampled_from([lo - 1, hi + 1, -(2**63), 2**64, 10**300]),
                        st.floats(), st.text(max_size=6), st.booleans(), WRONG_CONTAINERS)
    valid = st.integers(lo, hi)
    return Shape(valid | st.none(), invalid) if optional else Shape(valid, invalid | st.none())


def number(lo: float, hi: float) -> Shape:
    """A float (or int) in lo..hi: NaN, the infinities and everything outside are refused."""
    valid = st.floats(lo, hi) | st.integers(math.ceil(lo), math.floor(hi))
    invalid = st.one_of(st.floats().filter(lambda x: not lo <= x <= hi),
                        st.sampled_from([math.nan, math.inf, -math.inf, 10**400, -(10**400)]),
                        st.integers(min_value=math.floor(hi) + 1), st.integers(max_value=math.ceil(lo) - 1),
                        st.text(max_size=6), st.booleans(), st.none(), WRONG_CONTAINERS)
    return Shape(valid, invalid)


def text(max_length: int, *, optional: bool = False) -> Shape:
    valid = st.text(max_size=24) | st.integers(0, max_length).map(lambda n: "t" * n)
    invalid = st.one_of(st.integers(max_length + 1, max_length + 3000).map(lambda n: "t" * n),
                        st.just("lone \ud800 surrogate"), NOT_A_STRING)
    return Shape(valid | st.none(), invalid) if optional else Shape(valid, invalid | st.none())


def matching(pattern: str, *, edges: Sequence[str] = (), optional: bool = False) -> Shape:
    """A string the whole of which matches pattern (a trailing newline included: Python's `$` would let
    it through)."""
    valid = st.from_regex(pattern, fullmatch=True)
    misses = st.text(max_size=70) | st.sampled_from(["", " ", "\n", "x" * 65, *edges]) | st.from_regex(
        pattern, fullmatch=True).flatmap(lambda s: st.sampled_from([s + "\n", "\n" + s, s + " ", s + "\x00"]))
    invalid = misses.filter(lambda s: re.fullmatch(pattern, s) is None) | NOT_A_STRING
    return Shape(valid | st.none(), invalid) if optional else Shape(valid, invalid | st.none())


def boolean() -> Shape:
    return Shape(st.booleans(), st.integers() | st.floats() | st.text(max_size=5) | st.none() | WRONG_CONTAINERS)


def _not_base64(s: str) -> bool:
    try:
        base64.b64decode(s, validate=True)
    except (ValueError, binascii.Error):
        return True
    return False


def base64_bytes(limit: int) -> Shape:
    """Bytes as base64 text, at most limit of them once decoded."""
    valid = (st.binary(max_size=48) | st.sampled_from([limit - 2, limit - 1, limit]).map(bytes)).map(
        lambda b: base64.b64encode(b).decode())
    invalid = st.one_of(
        st.sampled_from([limit + 1, limit + 2, limit + 3, limit + 4, limit * 2]).map(
            lambda n: base64.b64encode(bytes(n)).decode()),
        st.text(max_size=12).filter(_not_base64), st.just("lone \ud800 surrogate"), NOT_A_STRING, st.none())
    return Shape(valid, invalid)


def listing(item: Shape, max_length: int, filler: Any) -> Shape:
    """A list of at most max_length items: one bad item, one item too many, or no list at all is refused."""
    valid = st.lists(item.valid, max_size=4) | st.just([filler] * max_length)
    one_bad = st.tuples(st.lists(item.valid, max_size=3), item.invalid, st.integers(0, 3)).map(
        lambda t: [*t[0][:t[2]], t[1], *t[0][t[2]:]])
    invalid = one_bad | st.just([filler] * (max_length + 1)) | st.text(max_size=6) | st.integers() | st.none()
    return Shape(valid, invalid)


def exit_outcome(ended: bool) -> st.SearchStrategy[dict[str, int | None]]:
    """exit_status and signal as the guest reads them from one waitpid status: one of the two, or neither
    for a container whose init has not ended."""
    one = st.integers(0, 255).map(lambda n: {"exit_status": n, "signal": None}) | st.integers(1, 64).map(
        lambda n: {"exit_status": None, "signal": n})
    return one if ended else one | st.just({"exit_status": None, "signal": None})


#: The models holding a process's end, and whether it has ended (an exit status or a signal, then).
EXIT_OUTCOMES: dict[type[BaseModel], bool] = {models.ExitEvent: True, models.RunResult: True,
                                              models.ContainerState: False}


def message(fields: dict[str, Shape], model: type[BaseModel]) -> st.SearchStrategy[dict[str, Any]]:
    required = {k: v.valid for k, v in fields.items() if model.model_fields[k].is_required()}
    defaulted = {k: v.valid for k, v in fields.items() if not model.model_fields[k].is_required()}
    msg = st.fixed_dictionaries(required, optional=defaulted)
    if model in EXIT_OUTCOMES:
        msg = st.tuples(msg, exit_outcome(EXIT_OUTCOMES[model])).map(lambda t: {**t[0], **t[1]})
    return msg


def nested_model(fields: dict[str, Shape], model: type[BaseModel], optional: bool = False) -> Shape:
    """A message inside a message: one bad field, one missing, one too many, or not an object at all."""
    valid = message(fields, model)

    @st.composite
    def one_wrong(draw: st.DrawFn) -> Any:
        msg = draw(valid)
        name = draw(st.sampled_from(sorted(fields)))
        how = draw(st.sampled_from(["value", "missing", "unknown"]))
        if how == "value":
            return {**msg, name: draw(fields[name].invalid)}
        if how == "missing":
            return {k: v for k, v in msg.items() if k != name}
        return {**msg, "unknown_field": 1}

    invalid = one_wrong() | st.text(max_size=6) | st.integers() | st.lists(st.integers(), max_size=2)
    return Shape(valid | st.none(), invalid) if optional else Shape(valid, invalid | st.none())


PID = integer(1, 2**22)
EXIT_STATUS = integer(0, 255, optional=True)
SIGNAL = integer(1, 64, optional=True)
COUNTER = integer(0, 2**63)
TIMESTAMP = number(0, 1e11)
UPTIME = number(0, 1e9)
TEXT = text(4096)
ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
ID_EDGES = ["-a", ".a", "_a", "a/b", "../etc", "a b", "caf\u00e9", "a" * 65]

BOOT_FIELDS = {"init": UPTIME, "exec": UPTIME, "agent": UPTIME}
STATE_FIELDS = {
    "id": matching(ID_PATTERN, edges=ID_EDGES),
    "status": matching("created|running|paused|stopped|starting", edges=["RUNNING", "exited"]),
    "pid": integer(0, 2**22),
    "bundle": TEXT,
    "created": TIMESTAMP,
    "exit_status": EXIT_STATUS,
    "signal": SIGNAL,
}
MINIMAL_STATE = {"id": "c", "status": "running", "pid": 1, "bundle": "/b", "created": 0, "exit_status": None,
                 "signal": None}

#: Every guest message, field by field (test_every_guest_model_and_field_has_a_shape keeps it complete).
SHAPES: dict[type[BaseModel], dict[str, Shape]] = {
    models.ErrorBody: {"code": text(64), "message": text(proto.MAX_ERROR_MESSAGE)},
    models.BootUptimes: BOOT_FIELDS,
    models.HelloResult: {
        "version": integer(1, 1000),
        "capabilities": listing(text(64), 64, "cap"),
        "agent": TEXT,
        "kernel": TEXT,
        "uptime": UPTIME,
        "boot": nested_model(BOOT_FIELDS, models.BootUptimes, optional=True),
    },
    models.PingResult: {"seq": integer(0, 2**63)},
    models.Empty: {},
    models.RunResult: {
        "exit_status": EXIT_STATUS,
        "signal": SIGNAL,
        "stdout": base64_bytes(proto.MAX_RUN_OUTPUT),
        "stderr": base64_bytes(proto.MAX_RUN_OUTPUT),
        "truncated": boolean(),
        "timed_out": boolean(),
    },
    models.LogEvent: {
        "event": matching(proto.EVENT_LOG, edges=["LOG", "exit"]),
        "level": matching("debug|info|warning|error", edges=["critical", "INFO", "warn"]),
        "message": TEXT,
    },
    models.ScsiMountResult: {
        "device": matching(r"/dev/sd[a-z]{1,3}", edges=["/dev/sda1", "/dev/sdA", "/dev/../sda", "/dev/sdaaaa"]),
        "path": text(4096, optional=True),
    },
    models.PidResult: {"pid": PID},
    models.SignalResult: {"delivered": boolean()},
    models.ContainerState: STATE_FIELDS,
    models.ContainerList: {"containers": listing(nested_model(STATE_FIELDS, models.ContainerState), 4096,
                                                 MINIMAL_STATE)},
    models.PidList: {"pids": listing(PID, 65536, 1)},
    models.ContainerStats: {
        **{name: COUNTER for name in (
            "cpu_usage_usec", "cpu_user_usec", "cpu_system_usec", "memory_usage", "memory_anon", "memory_file",
            "oom_events", "oom_kills", "pids_current", "io_rbytes", "io_wbytes", "io_rios", "io_wios")},
        "memory_limit": integer(0, 2**63, optional=True),
        "pids_limit": integer(0, 2**63, optional=True),
    },
    models.ExitEvent: {
        "event": matching(proto.EVENT_EXIT, edges=["EXIT", "exited", "oom"]),
        "container": matching(ID_PATTERN, edges=ID_EDGES, optional=True),
        "pid": PID,
        "exit_status": EXIT_STATUS,
        "signal": SIGNAL,
        "at": TIMESTAMP,
    },
    models.OomEvent: {
        "event": matching(proto.EVENT_OOM, edges=["OOM", "exit"]),
        "container": matching(ID_PATTERN, edges=ID_EDGES),
        "oom_kills": COUNTER,
        "at": TIMESTAMP,
    },
}


def valid(model: type[BaseModel]) -> st.SearchStrategy[dict[str, Any]]:
    return message(SHAPES[model], model)


@st.composite
def broken(draw: st.DrawFn, model: type[BaseModel], keep: Sequence[str] = ()) -> tuple[str, dict[str, Any]]:
    """A valid message of model with exactly one thing wrong, and the field that names it: a field's
    value of the wrong type or out of range, a required field left out, or a field the model does not know.
    Fields in keep are left alone."""
    msg = draw(valid(model))
    fields = SHAPES[model]
    names = sorted(set(fields) - set(keep))
    required = [n for n in names if model.model_fields[n].is_required()]
    how = draw(st.sampled_from([h for h, ok in (("value", names), ("missing", required), ("unknown", True)) if ok]))
    if how == "value":
        name = draw(st.sampled_from(names))
        return name, {**msg, name: draw(fields[name].invalid)}
    if how == "missing":
        name = draw(st.sampled_from(required))
        return name, {k: v for k, v in msg.items() if k != name}
    name = draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in fields))
    return name, {**msg, name: draw(JSON_VALUES)}


def test_every_guest_model_and_field_has_a_shape() -> None:
    """A field added to a guest message is fuzzed too: this table is kept in step with the models."""
    assert set(models.GuestModel.__subclasses__()) == set(SHAPES)
    for model, fields in SHAPES.items():
        assert set(fields) == set(model.model_fields), model.__name__


# -- the host's end of the socket --------------------------------------------------------------------


class MemoryTransport(asyncio.Transport):
    """The agent socket, in memory: what the host sent, and whether it closed its end."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = bytearray()
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.sent += data

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def frames(self) -> list[framing.Frame]:
        return FrameDecoder().feed(bytes(self.sent))


def connect(on_notify: Callable[[dict[str, Any]], None] | None = None) -> tuple[AgentConnection, MemoryTransport]:
    conn = AgentConnection(LINK, on_notify=on_notify)
    transport = MemoryTransport()
    conn.connection_made(transport)
    return conn, transport


def names(problem: str, where: str, field: str) -> bool:
    """problem names field, escaped as the guest's text is (or the field's value is not even JSON the parser
    takes: a lone surrogate, a number of 400 digits, NaN for the notifications' stricter JSON, refused before
    any field is looked at)."""
    return (f"{where}: {guest_text(field)}" in problem or f"{where}: payload: Invalid JSON" in problem
            or "not JSON" in problem)


def assert_dropped(conn: AgentConnection, transport: MemoryTransport, error: BaseException | None = None) -> None:
    """The link is closed with a protocol error (the one the caller got, if given), its socket with it."""
    assert isinstance(conn.closed, errors.GuestProtocolError), conn.closed
    assert conn.closed.message.startswith(f"agent link {LINK}")
    assert transport.closing
    if error is not None:
        assert error is conn.closed


async def answer(method: str, model: type[BaseModel], payload: bytes, flags: int = 0,
                 ) -> tuple[BaseModel | errors.UvmError, AgentConnection, MemoryTransport]:
    """One request through AgentClient, answered with payload: the result, or the project's error it raised
    (any other exception, or a hang, fails the test)."""
    conn, transport = connect()
    call = asyncio.ensure_future(AgentClient(conn).request(method, {}, model))
    await asyncio.sleep(0)  # the request is on the wire
    [request] = transport.frames()
    assert request.type == framing.REQUEST
    conn.data_received(guest_frame(framing.RESPONSE, request.id, payload, flags))
    try:
        async with asyncio.timeout(CALL_TIMEOUT):
            return await call, conn, transport
    except errors.UvmError as e:
        return e, conn, transport


#: The guest's answers the host validates, one method per model.
RESPONSES: list[tuple[str, type[BaseModel]]] = [
    (proto.HELLO, models.HelloResult), (proto.PING, models.PingResult), (proto.SHUTDOWN, models.Empty),
    (proto.RUN, models.RunResult), (proto.EXEC, models.PidResult), (proto.SIGNAL, models.SignalResult),
    (proto.STATE, models.ContainerState), (proto.LIST, models.ContainerList), (proto.PROCESSES, models.PidList),
    (proto.STATS, models.ContainerStats), (proto.SCSI_MOUNT, models.ScsiMountResult),
]
RESPONSE_IDS = [method for method, _ in RESPONSES]
NOTIFICATIONS: list[tuple[str, type[BaseModel]]] = [(proto.EVENT_EXIT, models.ExitEvent), (proto.EVENT_OOM, models.OomEvent),
                 (proto.EVENT_LOG, models.LogEvent)]
NOTIFICATION_IDS = [event for event, _ in NOTIFICATIONS]
ERROR_TYPES: dict[str, type[errors.AgentError]] = {
    proto.E_NOT_FOUND: errors.AgentNotFoundError, proto.E_INVALID: errors.AgentInvalidArgumentError,
    proto.E_UNSUPPORTED: errors.AgentUnsupportedError, proto.E_ALREADY_EXISTS: errors.AgentAlreadyExistsError,
    proto.E_STILL_RUNNING: errors.AgentStillRunningError, proto.E_NOT_RUNNING: errors.AgentNotRunningError,
    proto.E_NOT_STOPPED: errors.NotStoppedError, proto.E_INVALID_ID: errors.InvalidIdError,
}


# -- framing -------------------------------------------------------------------------------------------

FRAME_TYPES = st.sampled_from(sorted(framing.TYPE_NAMES))
FLAGS = st.sampled_from([0, framing.FLAG_ERROR])
FRAMES = st.builds(framing.Frame, FRAME_TYPES, st.integers(0, 2**32 - 1), st.binary(max_size=100), FLAGS)


@st.composite
def byte_streams(draw: st.DrawFn, max_payload: int) -> bytes:
    """Valid frames, headers with any field (a valid magic mostly, a length that may lie) and raw bytes."""
    pieces = draw(st.lists(st.one_of(
        FRAMES.map(lambda f: framing.encode(f.type, f.id, f.payload, f.flags, max_payload=1 << 30)),
        st.builds(guest_frame, st.integers(0, 255) | FRAME_TYPES, st.integers(0, 2**32 - 1), st.binary(max_size=40),
                  st.integers(0, 255) | FLAGS, st.just(framing.MAGIC) | st.integers(0, 0xFFFF),
                  st.none() | st.integers(0, 2**32 - 1) | st.integers(0, max_payload + 1)),
        st.binary(min_size=1, max_size=40),
    ), max_size=8))
    return b"".join(pieces)


@FUZZ
@given(max_payload=st.sampled_from([0, 16, 100, framing.MAX_PAYLOAD]), data=st.data())
def test_any_byte_stream_gives_frames_or_a_framing_error_and_a_bounded_buffer(max_payload: int,
                                                                               data: st.DataObject) -> None:
    stream = data.draw(byte_streams(max_payload))
    pieces = cut(stream, data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    decoder = FrameDecoder(max_payload=max_payload)
    taken = 0
    for piece in pieces:
        try:
            frames = decoder.feed(piece)
        except FramingError as e:
            assert str(e)
            return  # the link is dropped: nothing more is read
        taken += sum(framing.HEADER_SIZE + len(f.payload) for f in frames)
        for f in frames:
            assert f.type in framing.TYPE_NAMES and not f.flags & ~framing.KNOWN_FLAGS
            assert 0 <= f.id <= 0xFFFFFFFF and len(f.payload) <= max_payload
        # At most one header and one capped payload are ever held back.
        assert decoder.buffered < framing.HEADER_SIZE + max_payload
        assert decoder.at_boundary() == (decoder.buffered == 0)
    assert taken + decoder.buffered == len(stream)


@FUZZ
@given(frames=st.lists(FRAMES, max_size=8), data=st.data())
def test_valid_frames_come_back_whole_however_the_bytes_are_cut(frames: list[framing.Frame],
                                                                data: st.DataObject) -> None:
    stream = b"".join(framing.encode(f.type, f.id, f.payload, f.flags) for f in frames)
    pieces = cut(stream, data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    decoder = FrameDecoder()
    got: list[framing.Frame] = []
    for piece in pieces:
        # The decoder keeps nothing of what it is fed: the reader may reuse its buffer at once.
        kind = data.draw(st.sampled_from(["bytes", "bytearray", "memoryview"]))
        buffer = bytearray(piece)
        got += decoder.feed(bytes(buffer) if kind == "bytes" else buffer if kind == "bytearray" else memoryview(buffer))
        buffer[:] = b"\xaa" * len(buffer)
    assert got == frames
    assert decoder.at_boundary() and decoder.buffered == 0


@st.composite
def bad_headers(draw: st.DrawFn, max_payload: int) -> bytes:
    wrong = draw(st.sampled_from(["magic", "type", "flags", "length"]))
    magic = draw(st.integers(0, 0xFFFF).filter(lambda m: m != framing.MAGIC)) if wrong == "magic" else framing.MAGIC
    ftype = draw(st.integers(0, 255).filter(lambda t: t not in framing.TYPE_NAMES) if wrong == "type" else FRAME_TYPES)
    flags = draw(st.integers(0, 255).filter(lambda f: f & ~framing.KNOWN_FLAGS) if wrong == "flags" else FLAGS)
    length = draw(st.integers(max_payload + 1, 2**32 - 1) if wrong == "length" else st.integers(0, max_payload))
    return framing.HEADER.pack(magic, ftype, flags, draw(st.integers(0, 2**32 - 1)), length)


@FUZZ
@given(before=st.lists(FRAMES, max_size=3), header=bad_headers(1024), split=st.integers(0, framing.HEADER_SIZE - 1))
def test_a_bad_header_is_refused_as_soon_as_it_is_complete(before: list[framing.Frame], header: bytes,
                                                           split: int) -> None:
    """Before its payload arrives: a guest cannot make the host wait for (or buffer) 4 GiB first."""
    decoder = FrameDecoder(max_payload=1024)
    assert decoder.feed(b"".join(framing.encode(f.type, f.id, f.payload, f.flags) for f in before)) == before
    assert decoder.feed(header[:split]) == []
    with pytest.raises(FramingError):
        decoder.feed(header[split:])


# -- JSON of notifications -----------------------------------------------------------------------------


@FUZZ
@given(document=documents())
def test_wirejson_loads_gives_a_value_or_a_value_error(document: bytes) -> None:
    """The two the link catches (and turns into a protocol error): nothing else escapes."""
    try:
        wirejson.loads(document)
    except (ValueError, RecursionError):
        pass


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"JSON constant {name}")


def _parsed(parse: Callable[[str], Any], document: str) -> tuple[str, Any]:
    try:
        return "value", parse(document)
    except (ValueError, RecursionError):
        return "error", None


JSON_TOKENS = st.text(alphabet=st.sampled_from(list('{}[]":,0123456789.eE+-truefalsn \t\n\r\\/ux\u00e9')), max_size=30)
SPACE = st.text(alphabet=" \t\n\r\x0b\x0c", max_size=3)


@FUZZ
@given(document=st.one_of(
    st.builds(lambda a, v, b, indent: a + json.dumps(v, indent=indent, ensure_ascii=indent is None) + b,
              SPACE, JSON_VALUES, SPACE,
              st.none() | st.integers(0, 2)),
    JSON_TOKENS, st.text(max_size=20)))
def test_wirejson_loads_agrees_with_json_loads(document: str) -> None:
    """The same document, or an error for both (the constants NaN and Infinity are refused by both here)."""
    assert _parsed(wirejson.loads, document) == _parsed(lambda s: json.loads(s, parse_constant=_refuse_constant),
                                                        document)


# -- responses -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "model"), RESPONSES, ids=RESPONSE_IDS)
@settings(FUZZ, max_examples=40)
@given(data=st.data())
def test_any_response_gives_the_model_or_a_typed_error(method: str, model: type[BaseModel],
                                                       data: st.DataObject) -> None:
    payload = data.draw(documents(valid(model)) | documents(valid(models.ErrorBody)), label="payload")
    flags = data.draw(FLAGS | st.integers(0, 255), label="flags")
    outcome, conn, transport = asyncio.run(answer(method, model, payload, flags))
    if isinstance(outcome, errors.GuestProtocolError):
        assert_dropped(conn, transport, outcome)
    elif isinstance(outcome, errors.AgentError):  # an error answer is part of the protocol: the link stays up
        assert flags & framing.FLAG_ERROR and conn.closed is None
    elif isinstance(outcome, errors.UvmError):
        raise AssertionError(f"unexpected error {outcome!r}")
    else:
        assert isinstance(outcome, model) and not flags & framing.FLAG_ERROR and conn.closed is None


@pytest.mark.parametrize(("method", "model"), RESPONSES, ids=RESPONSE_IDS)
@settings(FUZZ, max_examples=20)
@given(data=st.data())
def test_valid_responses_are_taken_as_sent(method: str, model: type[BaseModel], data: st.DataObject) -> None:
    msg = data.draw(valid(model), label="message")
    outcome, conn, _ = asyncio.run(answer(method, model, wirejson.dumps(msg)))
    assert conn.closed is None, conn.closed
    # JSON mode (responses) and Python mode (notifications, after wirejson) agree.
    assert outcome == model.model_validate(msg)


@pytest.mark.parametrize(("method", "model"), RESPONSES, ids=RESPONSE_IDS)
@settings(FUZZ, max_examples=30)
@given(data=st.data())
def test_a_response_with_one_bad_field_drops_the_link_naming_the_field(method: str, model: type[BaseModel],
                                                                       data: st.DataObject) -> None:
    field, msg = data.draw(broken(model), label="broken message")
    with pytest.raises(ValidationError):
        model.model_validate_json(to_json(msg))
    outcome, conn, transport = asyncio.run(answer(method, model, to_json(msg)))
    assert isinstance(outcome, errors.GuestProtocolError), outcome
    assert_dropped(conn, transport, outcome)
    assert names(outcome.message, f"invalid {method} response from the guest", field), outcome.message


@settings(FUZZ, max_examples=80)
@given(body=valid(models.ErrorBody), code=st.sampled_from(proto.ERROR_CODES) | st.text(max_size=64))
def test_error_answers_become_typed_agent_errors(body: dict[str, Any], code: str) -> None:
    body = {**body, "code": code}
    outcome, conn, _ = asyncio.run(answer(proto.RUN, models.RunResult, wirejson.dumps(body), framing.FLAG_ERROR))
    assert type(outcome) is ERROR_TYPES.get(code, errors.AgentError)
    assert isinstance(outcome, errors.AgentError)
    assert (outcome.code, str(outcome)) == (code, f"{proto.RUN}: {guest_text(body['message'], proto.MAX_ERROR_MESSAGE)}")
    assert conn.closed is None


@settings(FUZZ, max_examples=80)
@given(data=st.data())
def test_a_bad_error_answer_drops_the_link(data: st.DataObject) -> None:
    field, body = data.draw(broken(models.ErrorBody), label="broken body")
    outcome, conn, transport = asyncio.run(answer(proto.RUN, models.RunResult, to_json(body), framing.FLAG_ERROR))
    assert isinstance(outcome, errors.GuestProtocolError)
    assert_dropped(conn, transport, outcome)
    assert names(outcome.message, "invalid run response from the guest", field), outcome.message


@settings(FUZZ, max_examples=40)
@given(sent=st.integers(0, 2**63), answered=integer(0, 2**63).valid)
def test_a_ping_answered_with_another_seq_drops_the_link(sent: int, answered: int) -> None:
    async def ping() -> tuple[BaseModel | errors.UvmError, AgentConnection, MemoryTransport]:
        conn, transport = connect()
        call = asyncio.ensure_future(AgentClient(conn).ping(sent))
        await asyncio.sleep(0)
        [request] = transport.frames()
        conn.data_received(guest_frame(framing.RESPONSE, request.id, wirejson.dumps({"seq": answered})))
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                return await call, conn, transport
        except errors.UvmError as e:
            return e, conn, transport

    outcome, conn, transport = asyncio.run(ping())
    if sent == answered:
        assert isinstance(outcome, models.PingResult) and conn.closed is None
    else:
        assert isinstance(outcome, errors.GuestProtocolError)
        assert_dropped(conn, transport)


# -- notifications -------------------------------------------------------------------------------------


def notify(vm: UtilityVM, document: bytes) -> tuple[AgentConnection, MemoryTransport]:
    """One NOTIFY frame from the guest into the UVM's handler, the way the running VM wires it."""
    conn, transport = connect(on_notify=vm._on_notify)
    conn.data_received(guest_frame(framing.NOTIFY, 0, document))
    return conn, transport


def notifications() -> st.SearchStrategy[bytes]:
    kinds = [valid(model) for _, model in NOTIFICATIONS]
    any_event = st.tuples(st.sampled_from(NOTIFICATION_IDS) | st.text(max_size=8),
                          st.dictionaries(KEYS, JSON_VALUES, max_size=8)).map(lambda t: {**t[1], "event": t[0]})
    return st.one_of(*(documents(k) for k in kinds), any_event.map(to_json))


@settings(FUZZ, max_examples=200)
@given(document=notifications())
def test_any_notification_is_handled_or_drops_the_link(vm_config: UvmConfig, document: bytes) -> None:
    vm = UtilityVM(vm_config)
    conn, transport = notify(vm, document)  # raises nothing
    if conn.closed is not None:
        assert_dropped(conn, transport)


@pytest.mark.parametrize(("event", "model"), NOTIFICATIONS, ids=NOTIFICATION_IDS)
@settings(FUZZ, max_examples=40)
@given(data=st.data())
def test_valid_notifications_are_handled(vm_config: UvmConfig, event: str, model: type[BaseModel],
                                         data: st.DataObject) -> None:
    msg = data.draw(valid(model), label="notification")
    vm = UtilityVM(vm_config)
    heard: list[int] = []
    vm.containers["c"] = types.SimpleNamespace(id="c", oom_kills=0)  # type: ignore[assignment]
    vm.oom_listeners.append(lambda container, kills: heard.append(kills))
    conn, _ = notify(vm, wirejson.dumps(msg))
    assert conn.closed is None, conn.closed
    if event == proto.EVENT_OOM:
        assert heard == ([msg["oom_kills"]] if msg["container"] == "c" and msg["oom_kills"] > 0 else [])


@pytest.mark.parametrize(("event", "model"), NOTIFICATIONS, ids=NOTIFICATION_IDS)
@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_a_notification_with_one_bad_field_drops_the_link_naming_the_field(
        vm_config: UvmConfig, event: str, model: type[BaseModel], data: st.DataObject) -> None:
    field, msg = data.draw(broken(model, keep=["event"]), label="broken notification")
    vm = UtilityVM(vm_config)
    conn, transport = notify(vm, to_json(msg))
    assert_dropped(conn, transport)
    assert conn.closed is not None and names(conn.closed.message, f"invalid {event} notification", field), conn.closed


@settings(FUZZ, max_examples=60)
@given(kills=st.lists(st.integers(0, 5) | COUNTER.valid, max_size=12))
def test_oom_listeners_hear_each_increase_once_and_a_decrease_drops_the_link(vm_config: UvmConfig,
                                                                             kills: list[int]) -> None:
    vm = UtilityVM(vm_config)
    vm.containers["c"] = types.SimpleNamespace(id="c", oom_kills=0)  # type: ignore[assignment]
    heard: list[int] = []
    vm.oom_listeners.append(lambda container, n: heard.append(n))
    conn, transport = connect(on_notify=vm._on_notify)
    expected: list[int] = []
    highest = 0
    for n in kills:
        conn.data_received(guest_frame(framing.NOTIFY, 0, wirejson.dumps(
            {"event": proto.EVENT_OOM, "container": "c", "oom_kills": n, "at": 1.0})))
        if n < highest:
            assert_dropped(conn, transport)
            assert conn.closed is not None and "oom_kills went down" in conn.closed.message
            break
        if n > highest:
            expected.append(n)
            highest = n
        assert conn.closed is None
    assert heard == expected


# -- stdio streams -------------------------------------------------------------------------------------

IN_0, IN_1, OUT, GONE, UNKNOWN = range(5)  # stdout, stderr, stdin, a stream the host forgot, never opened
SIZES = st.sampled_from([0, 1, 4096, proto.OUTPUT_CHUNK, framing.MAX_PAYLOAD, framing.MAX_PAYLOAD + 1]) | st.integers(
    0, 70_000)
CREDITS = st.integers(0, 70_000) | st.sampled_from([proto.INPUT_CHUNK, proto.INPUT_WINDOW, 2**32 - 1])
EDGE = st.sampled_from([-1, 0, 1])
StreamOp = tuple[str, int, int]
STREAM_OPS = st.lists(st.one_of(
    st.tuples(st.just("data"), st.sampled_from([IN_0, IN_0, IN_1, OUT, GONE, UNKNOWN]), SIZES),
    st.tuples(st.just("close"), st.sampled_from([IN_0, IN_1, OUT, GONE, UNKNOWN]), st.sampled_from([0, 0, 0, 1, 4])),
    st.tuples(st.just("credit"), st.sampled_from([OUT, OUT, IN_0, GONE, UNKNOWN]), CREDITS),
    st.tuples(st.just("bad credit"), st.sampled_from([OUT, GONE]), st.sampled_from([0, 1, 3, 5, 8])),
    st.tuples(st.just("read"), st.sampled_from([IN_0, IN_1]), st.integers(1, 2 * proto.OUTPUT_CHUNK)),
    st.tuples(st.just("write"), st.just(OUT), st.integers(1, proto.INPUT_WINDOW)),
    # At the edges of the windows: all the credit the guest has (or is owed), one byte less, or one more.
    st.tuples(st.just("fill"), st.sampled_from([IN_0, IN_1]), EDGE),
    st.tuples(st.just("settle"), st.just(OUT), EDGE),
), max_size=25)


class StreamSession:
    """The host's streams on one link, driven by guest frames and host reads and writes, each step checked
    against what the protocol says: the credit windows, in-order delivery, the link dropped at the first
    violation (with the reason)."""

    def __init__(self) -> None:
        self.conn, self.transport = connect()
        self.inbound = [self.conn.open_inbound("stdout"), self.conn.open_inbound("stderr")]
        self.stdin = self.conn.open_outbound("stdin")
        gone = self.conn.open_inbound("gone")
        self.conn.forget_stream(gone.sid)
        self.sids = {IN_0: self.inbound[0].sid, IN_1: self.inbound[1].sid, OUT: self.stdin.sid, GONE: gone.sid,
                     UNKNOWN: 0xFFFF_0000}
        # The model: what each output stream may still send, has buffered, and whether it ended;
        # what stdin may still send and how much of what it sent the guest still owes credit for.
        self.outstanding = [proto.OUTPUT_WINDOW] * 2
        self.buffered = [bytearray(), bytearray()]
        self.eof = [False, False]
        self.credit, self.unacked = proto.INPUT_WINDOW, 0
        self.written = bytearray()
        self.fill_byte = 0

    def guest_sends(self, ftype: int, target: int, payload: bytes, violation: str | None) -> bool:
        """One frame from the guest; True while the link is up."""
        if target == UNKNOWN and violation is None and len(payload) <= framing.MAX_PAYLOAD:
            violation = "frame for unknown stream"
        self.conn.data_received(guest_frame(ftype, self.sids[target], payload))
        if violation is not None:
            assert_dropped(self.conn, self.transport)
            assert self.conn.closed is not None and violation in self.conn.closed.message, (violation, self.conn.closed)
            return False
        assert self.conn.closed is None, self.conn.closed
        assert self.credit + self.unacked == proto.INPUT_WINDOW
        return True

    def data(self, target: int, n: int) -> bool:
        self.fill_byte = (self.fill_byte + 1) % 256  # each frame its own byte: misordered data shows
        payload = bytes([self.fill_byte]) * n
        violation = None
        if n > framing.MAX_PAYLOAD:
            violation = "malformed frame"
        elif target in (IN_0, IN_1):
            if self.eof[target]:
                violation = "data after the end of the stream"
            elif n > self.outstanding[target]:
                violation = f"guest sent {n} bytes with only {self.outstanding[target]} of credit"
            else:
                self.outstanding[target] -= n
                self.buffered[target] += payload
        elif target == OUT:
            violation = "unexpected data frame on stdin"
        return self.guest_sends(framing.DATA, target, payload, violation)

    def fill(self, target: int, edge: int) -> bool:
        """The guest sends all its credit (+ edge bytes), in frames as large as framing allows."""
        left = max(0, self.outstanding[target] + edge)
        while True:
            chunk = min(left, framing.MAX_PAYLOAD)
            if not self.data(target, chunk):
                return False
            left -= chunk
            if not left:
                return True

    def close(self, target: int, n: int) -> bool:
        violation = None
        if target in (IN_0, IN_1):
            if n:
                violation = "unexpected close frame"
            else:
                self.eof[target] = True
        elif target == OUT:
            violation = "unexpected close frame on stdin"
        return self.guest_sends(framing.CLOSE, target, b"x" * n, violation)

    def grant(self, target: int, n: int, well_formed: bool = True) -> bool:
        violation = None
        if target in (IN_0, IN_1):
            violation = "unexpected credit frame"
        elif target == OUT:
            if not well_formed:
                violation = "unexpected credit frame on stdin"
            elif n > self.unacked:
                violation = f"granted {n} bytes of credit, more than was sent"
            else:
                self.credit, self.unacked = self.credit + n, self.unacked - n
        return self.guest_sends(framing.CREDIT, target, CREDIT.pack(n) if well_formed else b"\x00" * n, violation)

    async def read(self, target: int, n: int) -> None:
        if not self.buffered[target] and not self.eof[target]:
            return  # would wait for data that is not coming
        sent_before = len(self.transport.sent)
        async with asyncio.timeout(CALL_TIMEOUT):
            got = await self.inbound[target].read(n)
        assert got == bytes(self.buffered[target][:n])
        del self.buffered[target][:n]
        if got and not self.eof[target]:  # the guest gets credit for what was read, and only then
            self.outstanding[target] += len(got)
            [grant] = FrameDecoder().feed(bytes(self.transport.sent[sent_before:]))
            assert (grant.type, grant.id, grant.payload) == (framing.CREDIT, self.sids[target], CREDIT.pack(len(got)))

    async def write(self, n: int) -> None:
        n = min(n, self.credit)  # more would wait for credit the guest may never give
        if n:
            data = bytes([len(self.written) % 251]) * n
            async with asyncio.timeout(CALL_TIMEOUT):
                await self.stdin.write(data)
            self.credit, self.unacked = self.credit - n, self.unacked + n
            self.written += data

    async def run(self, ops: list[StreamOp]) -> None:
        for op, target, n in ops:
            if op == "read":
                await self.read(target, n)
            elif op == "write":
                await self.write(n)
            elif not (self.data(target, n) if op == "data" else self.fill(target, n) if op == "fill"
                      else self.close(target, n) if op == "close"
                      else self.grant(target, max(0, self.unacked + n)) if op == "settle"
                      else self.grant(target, n, well_formed=op == "credit")):
                break
        # Whatever happened, nothing is left waiting once the socket ends: buffered output, then EOF.
        self.conn.eof_received()
        self.conn.connection_lost(None)
        async with asyncio.timeout(CALL_TIMEOUT):
            for i in (IN_0, IN_1):
                assert await self.inbound[i].read_all() == bytes(self.buffered[i])
            with pytest.raises(errors.LinkError):
                await self.stdin.write(b"x")
        # stdin went out in order, in chunks no larger than the guest takes.
        chunks = [f.payload for f in self.transport.frames() if f.type == framing.DATA and f.id == self.stdin.sid]
        assert b"".join(chunks) == self.written and all(len(c) <= proto.INPUT_CHUNK for c in chunks)


@settings(FUZZ, max_examples=100)
@given(ops=STREAM_OPS)
def test_stream_frames_follow_the_credit_windows_or_drop_the_link(ops: list[StreamOp]) -> None:
    asyncio.run(StreamSession().run(ops))


# -- a storm of frames -----------------------------------------------------------------------------------

PING_SEQ = 7


def storm_frames() -> st.SearchStrategy[bytes]:
    """Mostly frames an honest guest might send (answers, notifications, stdout, credit), some not."""
    answers = st.one_of(valid(models.PingResult), st.just({"seq": PING_SEQ}), valid(models.ContainerStats),
                        valid(models.HelloResult), valid(models.ErrorBody))
    notes = st.one_of(*(valid(model) for _, model in NOTIFICATIONS))
    return st.one_of(
        st.builds(guest_frame, st.just(framing.RESPONSE), st.integers(0, 6), answers.map(wirejson.dumps) | documents(),
                  FLAGS),
        st.builds(guest_frame, st.just(framing.NOTIFY), st.integers(0, 1), notes.map(wirejson.dumps) | documents()),
        st.builds(guest_frame, st.just(framing.DATA), st.integers(0, 5), st.binary(max_size=64)),
        st.builds(guest_frame, st.just(framing.CREDIT), st.integers(0, 5), st.integers(0, 64).map(CREDIT.pack)),
        st.builds(guest_frame, st.just(framing.CLOSE), st.integers(0, 5), st.just(b"") | st.binary(max_size=4)),
        st.builds(guest_frame, st.integers(0, 255) | FRAME_TYPES, st.integers(0, 2**32 - 1), st.binary(max_size=32),
                  st.integers(0, 255) | FLAGS, st.just(framing.MAGIC) | st.integers(0, 0xFFFF),
                  st.none() | st.integers(0, 2**32 - 1)),
        st.binary(min_size=1, max_size=24),
    )


async def storm_session(vm: UtilityVM, stream: bytes, points: list[int]) -> None:
    conn, transport = connect(on_notify=vm._on_notify)
    client = AgentClient(conn)
    stdout = conn.open_inbound("stdout")
    stdin = conn.open_outbound("stdin")
    calls = [asyncio.ensure_future(client.ping(PING_SEQ)),
             asyncio.ensure_future(client.request(proto.STATS, {"id": "c"}, models.ContainerStats)),
             asyncio.ensure_future(client.hello())]
    given_up = asyncio.ensure_future(client.ping(1))  # a call the host stopped waiting for: its answer may come late
    await asyncio.sleep(0)
    given_up.cancel()
    await asyncio.sleep(0)
    async with asyncio.timeout(CALL_TIMEOUT):
        await stdin.write(b"i" * 64)  # so that the guest may owe some credit
    for piece in cut(stream, points):
        conn.data_received(piece)  # never raises: whatever the guest sent, the link copes or drops
        await asyncio.sleep(0)
        if conn.closed is not None:
            assert isinstance(conn.closed, errors.GuestProtocolError)
            assert transport.closing
    conn.eof_received()  # the socket ends (or the host closes it after dropping the link)
    conn.connection_lost(None)
    assert isinstance(conn.closed, errors.LinkError)
    async with asyncio.timeout(CALL_TIMEOUT):
        done, _ = await asyncio.wait(calls)
        for call in done:
            failure = call.exception()
            assert failure is None or isinstance(failure, errors.UvmError), repr(failure)
        assert len(await stdout.read_all()) <= proto.OUTPUT_WINDOW
        with pytest.raises(errors.LinkError):
            await stdin.write(b"x")
        with pytest.raises(errors.LinkError):
            await client.ping(1)


@settings(FUZZ, max_examples=150)
@given(frames=st.lists(storm_frames(), min_size=1, max_size=10), points=st.lists(st.integers(0, 2**20), max_size=8))
def test_a_storm_of_fuzzed_frames_never_escapes_the_link_or_hangs_a_call(vm_config: UvmConfig, frames: list[bytes],
                                                                        points: list[int]) -> None:
    asyncio.run(storm_session(UtilityVM(vm_config), b"".join(frames), points))


# -- what the shim makes of validated figures -----------------------------------------------------------


@settings(FUZZ, max_examples=60)
@given(stats=valid(models.ContainerStats), exit_event=valid(models.ExitEvent), rss=st.integers(0, 2**63),
       cpu=st.floats(0, 1e12))
def test_validated_stats_and_exits_fit_containerds_messages(stats: dict[str, Any], exit_event: dict[str, Any],
                                                            rss: int, cpu: float) -> None:
    """Every figure the models let through fits the protobuf field it is copied into."""
    metrics(ContainerStatistics(models.ContainerStats.model_validate(stats), rss, cpu))
    event = models.ExitEvent.model_validate(exit_event)
    timestamp(event.at)
    exit_code = ProcessExit(event.exit_status, event.signal, event.at).exit_code
    assert 0 <= exit_code <= 255
