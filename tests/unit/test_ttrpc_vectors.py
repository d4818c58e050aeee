"""shim.containerd.ttrpc against byte vectors written out by hand from ttrpc's wire format (containerd/ttrpc 1.1:
a 10-byte big-endian header {u32 payload length, u32 stream id, u8 type (1 request, 2 response), u8
flags}, then a protobuf Request {1 service, 2 method, 3 payload, 4 timeout_nano} or Response {1
google.rpc.Status, 2 payload}), not produced by this project's encoder: a mistake made the same way on
both sides of our own client and server would still fail here."""

from __future__ import annotations

import asyncio
from pathlib import Path

from schemas.containerd import shim_pb2
from shim.containerd.ttrpc import Client, Server

TASK = "containerd.task.v2.Task"
# StateRequest{id: "t1"}: field 1, length-delimited (0x0a), 2 bytes.
STATE_REQUEST = bytes([0x0A, 0x02]) + b"t1"
# StateResponse{pid: 7, status: STOPPED (3), exit_status: 3}: varints 3 (0x18), 4 (0x20), 9 (0x48).
STATE_RESPONSE = bytes([0x18, 0x07, 0x20, 0x03, 0x48, 0x03])
# Request{service: TASK (23 bytes), method: "State", payload: STATE_REQUEST}, no timeout, on stream 1.
REQUEST_BODY = (bytes([0x0A, 23]) + TASK.encode() + bytes([0x12, 5]) + b"State" + bytes([0x1A, 4]) + STATE_REQUEST)
REQUEST_FRAME = bytes([0, 0, 0, 38, 0, 0, 0, 1, 1, 0]) + REQUEST_BODY
# Response{status: Status{} (OK: an empty message, as Go's status.Proto() marshals), payload: STATE_RESPONSE}.
RESPONSE_BODY = bytes([0x0A, 0x00, 0x12, 6]) + STATE_RESPONSE
RESPONSE_FRAME = bytes([0, 0, 0, 10, 0, 0, 0, 1, 2, 0]) + RESPONSE_BODY


def test_the_vectors_are_what_they_claim() -> None:
    assert len(REQUEST_BODY) == 38 and len(RESPONSE_BODY) == 10
    assert shim_pb2.StateResponse.FromString(STATE_RESPONSE).exit_status == 3


async def test_the_server_answers_a_hand_made_request_with_the_expected_bytes(tmp_path: Path) -> None:
    async def state(req: shim_pb2.StateRequest) -> shim_pb2.StateResponse:
        assert req.id == "t1"
        return shim_pb2.StateResponse(pid=7, status="STOPPED", exit_status=3)

    server = Server()
    server.register(TASK, "State", shim_pb2.StateRequest, state)
    path = str(tmp_path / "s.sock")
    await server.serve_unix(path)
    try:
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(REQUEST_FRAME)
        await writer.drain()
        assert await asyncio.wait_for(reader.readexactly(len(RESPONSE_FRAME)), 10) == RESPONSE_FRAME
        # An unknown method: Unimplemented (12) on the same stream id: Status{1 code: 12, 2 message: ...}.
        unknown = bytes([0x0A, 23]) + TASK.encode() + bytes([0x12, 4]) + b"Nope"
        writer.write(bytes([0, 0, 0, len(unknown), 0, 0, 0, 3, 1, 0]) + unknown)
        await writer.drain()
        header = await asyncio.wait_for(reader.readexactly(10), 10)
        assert header[4:] == bytes([0, 0, 0, 3, 2, 0])
        body = await reader.readexactly(int.from_bytes(header[:4], "big"))
        assert body[0] == 0x0A and body[2:4] == bytes([0x08, 12]), body.hex()
        writer.close()
        await writer.wait_closed()
    finally:
        await server.close()


async def test_the_client_sends_the_expected_bytes_and_reads_a_hand_made_reply(tmp_path: Path) -> None:
    received: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.set_result(await reader.readexactly(len(REQUEST_FRAME)))
        writer.write(RESPONSE_FRAME)
        await writer.drain()

    path = str(tmp_path / "p.sock")
    server = await asyncio.start_unix_server(peer, path)
    try:
        async with await Client.connect_unix(path) as client:
            reply = await client.call(TASK, "State", shim_pb2.StateRequest(id="t1"), shim_pb2.StateResponse)
        assert await received == REQUEST_FRAME
        assert (reply.pid, reply.status, reply.exit_status) == (7, 3, 3)  # status 3: STOPPED
    finally:
        server.close()
        await server.wait_closed()
