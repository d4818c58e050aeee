"""shim.containerd.ttrpc: the containerd ttrpc wire protocol over real unix sockets, with raw-socket peers for
everything a well-behaved client or server would never send."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from schemas.containerd import status_pb2, ttrpc_pb2
from shim.containerd.ttrpc import (
    HEADER,
    MAX_MESSAGE_SIZE,
    TYPE_REQUEST,
    TYPE_RESPONSE,
    Client,
    Code,
    Server,
    TtrpcError,
)

SERVICE = "test.v1.Echo"
KeyValue = ttrpc_pb2.KeyValue


class Handlers:
    """The test service: each method shows one behaviour; ``gate`` and ``started`` pace the slow ones."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.started = asyncio.Event()
        self.cancelled = 0

    async def echo(self, request: ttrpc_pb2.KeyValue) -> ttrpc_pb2.KeyValue:
        return KeyValue(key=request.key, value=request.value.upper())

    async def gated(self, request: ttrpc_pb2.KeyValue) -> ttrpc_pb2.KeyValue:
        await self.gate.wait()
        return KeyValue(key=request.key, value="opened")

    async def hang(self, request: ttrpc_pb2.KeyValue) -> ttrpc_pb2.KeyValue:
        self.started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        raise AssertionError("not reached")

    async def not_found(self, request: ttrpc_pb2.KeyValue) -> ttrpc_pb2.KeyValue:
        raise TtrpcError(Code.NOT_FOUND, f"container {request.key} not found")

    async def crash(self, request: ttrpc_pb2.KeyValue) -> ttrpc_pb2.KeyValue:
        raise ValueError(f"boom {request.key}")

    async def big(self, request: ttrpc_pb2.KeyValue) -> ttrpc_pb2.KeyValue:
        return KeyValue(value="x" * (MAX_MESSAGE_SIZE + 1))

    async def status(self, request: status_pb2.Status) -> status_pb2.Status:
        return status_pb2.Status(code=request.code + 1, message=request.message)


@pytest.fixture
def handlers() -> Handlers:
    return Handlers()


@pytest.fixture
async def server(sock_dir: Path, handlers: Handlers) -> AsyncIterator[Server]:
    srv = Server()
    srv.register_service(SERVICE, {
        "Echo": (KeyValue, handlers.echo),
        "Gated": (KeyValue, handlers.gated),
        "Hang": (KeyValue, handlers.hang),
        "NotFound": (KeyValue, handlers.not_found),
        "Crash": (KeyValue, handlers.crash),
        "Big": (KeyValue, handlers.big),
    })
    srv.register("test.v1.Status", "Bump", status_pb2.Status, handlers.status)
    await srv.serve_unix(str(sock_dir / "s"))
    yield srv
    await srv.close()


@pytest.fixture
async def client(server: Server, sock_dir: Path) -> AsyncIterator[Client]:
    async with await Client.connect_unix(str(sock_dir / "s")) as c:
        yield c


async def echo(client: Client, key: str = "k", value: str = "v", method: str = "Echo",
               timeout: float | None = None) -> ttrpc_pb2.KeyValue:
    return await client.call(SERVICE, method, KeyValue(key=key, value=value), KeyValue, timeout=timeout)


# -- raw socket helpers ------------------------------------------------------------------------------


def frame(stream_id: int, payload: bytes, message_type: int = TYPE_REQUEST) -> bytes:
    return HEADER.pack(len(payload), stream_id, message_type, 0) + payload


def request(method: str = "Echo", payload: bytes | None = None, timeout_nano: int = 0) -> bytes:
    if payload is None:
        payload = KeyValue(key="k", value="v").SerializeToString()
    data: bytes = ttrpc_pb2.Request(service=SERVICE, method=method, payload=payload,
                                    timeout_nano=timeout_nano).SerializeToString()
    return data


async def read_reply(reader: asyncio.StreamReader) -> tuple[int, ttrpc_pb2.Response]:
    length, stream_id, message_type, flags = HEADER.unpack(await reader.readexactly(HEADER.size))
    assert (message_type, flags) == (TYPE_RESPONSE, 0)
    return stream_id, ttrpc_pb2.Response.FromString(await reader.readexactly(length))


async def assert_closed_by_server(reader: asyncio.StreamReader) -> None:
    async with asyncio.timeout(2):
        assert await reader.read() == b""


# -- calls -------------------------------------------------------------------------------------------


async def test_round_trip(client: Client) -> None:
    reply = await echo(client, "a", "hello")
    assert (reply.key, reply.value) == ("a", "HELLO")
    bumped = await client.call("test.v1.Status", "Bump", status_pb2.Status(code=4, message="m"), status_pb2.Status)
    assert (bumped.code, bumped.message) == (5, "m")


async def test_replies_go_out_of_order_on_one_connection(client: Client, server: Server, handlers: Handlers) -> None:
    finished: list[str] = []

    async def run(key: str, method: str) -> None:
        await echo(client, key, method=method)
        finished.append(key)

    slow = asyncio.create_task(run("slow", "Gated"))
    await asyncio.sleep(0.01)  # the slow request goes out first
    await run("fast", "Echo")
    assert not slow.done()
    handlers.gate.set()
    await slow
    assert finished == ["fast", "slow"]
    assert server.connections == 1


async def test_many_concurrent_calls(client: Client) -> None:
    replies = await asyncio.gather(*(echo(client, str(i), f"v{i}") for i in range(50)))
    assert [(r.key, r.value) for r in replies] == [(str(i), f"V{i}") for i in range(50)]


@pytest.mark.parametrize(("service", "method", "named"), [
    ("no.such.Service", "Echo", "service no.such.Service"),
    (SERVICE, "Nope", f"method {SERVICE}/Nope"),
])
async def test_unknown_service_or_method_is_unimplemented(client: Client, service: str, method: str, named: str) -> None:
    with pytest.raises(TtrpcError) as err:
        await client.call(service, method, KeyValue(), KeyValue)
    assert err.value.code == Code.UNIMPLEMENTED
    assert named in err.value.message


async def test_handler_status_reaches_the_client(client: Client) -> None:
    with pytest.raises(TtrpcError) as err:
        await echo(client, "x", method="NotFound")
    assert (err.value.code, err.value.message) == (Code.NOT_FOUND, "container x not found")
    assert str(err.value) == "NOT_FOUND: container x not found"


async def test_handler_crash_is_unknown_and_logged_and_the_server_goes_on(client: Client,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="uvmshim.ttrpc"), pytest.raises(TtrpcError) as err:
        await echo(client, "1", method="Crash")
    assert (err.value.code, err.value.message) == (Code.UNKNOWN, "boom 1")
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.exc_info is not None and "Crash" in record.getMessage()
    assert (await echo(client, "after")).key == "after"


async def test_request_payload_that_does_not_parse_is_invalid_argument(server: Server, sock_dir: Path) -> None:
    reader, writer = await asyncio.open_unix_connection(str(sock_dir / "s"))
    writer.write(frame(1, request(payload=b"\x0a\xff")))  # field 1, length 255, then nothing
    writer.write(frame(3, b"\xff\xff\xff"))  # not even a ttrpc Request
    [(sid1, r1), (sid3, r3)] = sorted([await read_reply(reader), await read_reply(reader)], key=lambda r: r[0])
    assert (sid1, r1.status.code) == (1, Code.INVALID_ARGUMENT) and "KeyValue" in r1.status.message
    assert (sid3, r3.status.code) == (3, Code.INVALID_ARGUMENT)
    writer.close()


# -- size cap and deadlines --------------------------------------------------------------------------


async def test_oversized_request_is_dropped_and_the_connection_still_works(server: Server, sock_dir: Path) -> None:
    reader, writer = await asyncio.open_unix_connection(str(sock_dir / "s"))
    writer.write(frame(1, b"\0" * (MAX_MESSAGE_SIZE + 1)))
    sid, reply = await read_reply(reader)
    assert (sid, reply.status.code) == (1, Code.RESOURCE_EXHAUSTED)
    writer.write(frame(3, request()))
    sid, reply = await read_reply(reader)
    assert (sid, reply.status.code, KeyValue.FromString(reply.payload).value) == (3, Code.OK, "V")
    writer.close()


async def test_oversized_response_is_resource_exhausted(client: Client) -> None:
    with pytest.raises(TtrpcError) as err:
        await echo(client, method="Big")
    assert err.value.code == Code.RESOURCE_EXHAUSTED
    assert (await echo(client)).value == "V"


async def test_client_refuses_an_oversized_request(client: Client) -> None:
    with pytest.raises(TtrpcError) as err:
        await echo(client, value="x" * MAX_MESSAGE_SIZE)
    assert err.value.code == Code.RESOURCE_EXHAUSTED
    assert (await echo(client)).value == "V"


async def test_timeout_nano_cancels_the_handler(server: Server, sock_dir: Path, handlers: Handlers) -> None:
    reader, writer = await asyncio.open_unix_connection(str(sock_dir / "s"))
    writer.write(frame(1, request("Hang", timeout_nano=20_000_000)))
    async with asyncio.timeout(2):
        sid, reply = await read_reply(reader)
    assert (sid, reply.status.code) == (1, Code.DEADLINE_EXCEEDED)
    assert handlers.cancelled == 1
    writer.close()


async def test_client_timeout_is_deadline_exceeded(client: Client) -> None:
    with pytest.raises(TtrpcError) as err:
        await echo(client, method="Hang", timeout=0.02)
    assert err.value.code == Code.DEADLINE_EXCEEDED
    assert (await echo(client)).value == "V"


# -- misbehaving peers -------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [
    pytest.param(b"hello world, this is not ttrpc", id="garbage"),
    pytest.param(frame(1, request(), message_type=3), id="unknown-type"),
    pytest.param(frame(1, request(), message_type=TYPE_RESPONSE), id="response-to-server"),
    pytest.param(frame(2, request()), id="even-stream-id"),
])
async def test_protocol_error_drops_only_that_connection(server: Server, client: Client, sock_dir: Path,
                                                         data: bytes) -> None:
    reader, writer = await asyncio.open_unix_connection(str(sock_dir / "s"))
    writer.write(data)
    await assert_closed_by_server(reader)
    writer.close()
    assert (await echo(client)).value == "V"
    async with await Client.connect_unix(str(sock_dir / "s")) as fresh:
        assert (await echo(fresh)).value == "V"


async def test_stream_id_reused_in_flight_drops_the_connection_and_its_calls(server: Server, sock_dir: Path,
                                                                             handlers: Handlers) -> None:
    reader, writer = await asyncio.open_unix_connection(str(sock_dir / "s"))
    writer.write(frame(1, request("Hang")))
    await handlers.started.wait()
    writer.write(frame(1, request()))
    await assert_closed_by_server(reader)
    writer.close()
    assert handlers.cancelled == 1


@pytest.mark.parametrize("data", [
    pytest.param(b"\0\0\0", id="half-header"),
    pytest.param(frame(1, request())[:-3], id="half-payload"),
    pytest.param(b"", id="nothing"),
])
async def test_peer_closing_mid_frame_is_harmless(server: Server, sock_dir: Path, data: bytes) -> None:
    server.disconnected.clear()
    _, writer = await asyncio.open_unix_connection(str(sock_dir / "s"))
    writer.write(data)
    writer.close()
    async with asyncio.timeout(2):
        await server.disconnected.wait()
    assert server.connections == 0
    async with await Client.connect_unix(str(sock_dir / "s")) as fresh:
        assert (await echo(fresh)).value == "V"


# -- lifecycle ---------------------------------------------------------------------------------------


async def test_server_close_fails_pending_calls_and_removes_the_socket(server: Server, client: Client,
                                                                       handlers: Handlers, sock_dir: Path) -> None:
    pending = asyncio.create_task(echo(client, method="Hang"))
    await handlers.started.wait()
    async with asyncio.timeout(2):
        await server.close()
        with pytest.raises(TtrpcError) as err:
            await pending
    assert err.value.code == Code.UNAVAILABLE
    assert handlers.cancelled == 1
    assert not (sock_dir / "s").exists()
    with pytest.raises(TtrpcError) as err:
        await echo(client)
    assert err.value.code == Code.UNAVAILABLE
    await server.close()  # idempotent


async def test_client_close_fails_pending_calls_and_cancels_the_handler(server: Server, client: Client,
                                                                        handlers: Handlers) -> None:
    server.disconnected.clear()
    pending = asyncio.create_task(echo(client, method="Hang"))
    await handlers.started.wait()
    await client.close()
    with pytest.raises(TtrpcError) as err:
        await pending
    assert err.value.code == Code.UNAVAILABLE
    async with asyncio.timeout(2):
        await server.disconnected.wait()
    assert handlers.cancelled == 1 and server.connections == 0
    await client.close()  # idempotent


async def test_serve_unix_refuses_an_existing_path(sock_dir: Path) -> None:
    path = sock_dir / "taken"
    path.write_text("not mine")
    srv = Server()
    with pytest.raises(FileExistsError, match="already exists"):
        await srv.serve_unix(str(path))
    await srv.close()
    assert path.read_text() == "not mine"


async def test_connect_to_nothing_is_unavailable(sock_dir: Path) -> None:
    with pytest.raises(TtrpcError) as err:
        await Client.connect_unix(str(sock_dir / "absent"))
    assert err.value.code == Code.UNAVAILABLE and "absent" in err.value.message


async def test_register_twice_is_refused(handlers: Handlers) -> None:
    srv = Server()
    srv.register(SERVICE, "Echo", KeyValue, handlers.echo)
    with pytest.raises(ValueError, match="already registered"):
        srv.register(SERVICE, "Echo", KeyValue, handlers.echo)


# -- the client against a raw server -----------------------------------------------------------------


async def test_client_stream_ids_are_odd_and_increasing(sock_dir: Path) -> None:
    seen: list[tuple[int, str, int]] = []

    async def raw_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while header := await reader.read(HEADER.size):
            length, stream_id, message_type, flags = HEADER.unpack(header)
            req = ttrpc_pb2.Request.FromString(await reader.readexactly(length))
            assert (message_type, flags) == (TYPE_REQUEST, 0)
            seen.append((stream_id, req.method, req.timeout_nano))
            reply = ttrpc_pb2.Response(status=status_pb2.Status(code=0), payload=req.payload).SerializeToString()
            writer.write(frame(stream_id, reply, TYPE_RESPONSE))
        writer.close()

    path = str(sock_dir / "raw")
    srv = await asyncio.start_unix_server(raw_server, path)
    try:
        async with await Client.connect_unix(path) as c:
            for method in ("A", "B"):
                assert (await c.call("s", method, KeyValue(key=method), KeyValue)).key == method
            await c.call("s", "C", KeyValue(), KeyValue, timeout=1.5)
    finally:
        srv.close()
        os.unlink(path)
    assert seen == [(1, "A", 0), (3, "B", 0), (5, "C", 1_500_000_000)]


async def test_server_that_breaks_the_protocol_fails_the_client(sock_dir: Path) -> None:
    async def raw_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(HEADER.size)
        writer.write(frame(1, b"", message_type=TYPE_REQUEST))  # a server never sends requests
        await writer.drain()
        writer.close()

    path = str(sock_dir / "raw")
    srv = await asyncio.start_unix_server(raw_server, path)
    try:
        async with await Client.connect_unix(path) as c:
            with pytest.raises(TtrpcError) as err:
                await c.call("s", "m", KeyValue(), KeyValue, timeout=2)
            assert err.value.code == Code.UNAVAILABLE
    finally:
        srv.close()
        os.unlink(path)
