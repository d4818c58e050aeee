"""containerd's ttrpc protocol (ttrpc 1.1.1 as spoken by containerd 1.6): framing, an asyncio server, a client.

Framing: every message is a 10-byte big-endian header, then the payload::

    u32 payload length (header excluded)  u32 stream id  u8 type (1 request, 2 response)  u8 flags (0)

A request payload is a serialized ``ttrpc.Request`` (service, method, payload, timeout_nano, metadata), a
response payload a ``ttrpc.Response`` (google.rpc.Status, payload). Messages are capped at 4 MiB: an
oversized one is read and dropped (the stream stays in sync) and answered with RESOURCE_EXHAUSTED.

Calls: the client numbers its calls with odd stream ids (1, 3, 5, ...) and the server replies on the same
id. containerd keeps several calls open on one connection (Wait blocks while State or Start run), so the
server runs each request in its own task and writes replies as they finish. A reply is one
``writer.write()`` of a whole frame, so replies never interleave. A broken byte stream (unknown frame
type, even or in-flight stream id, EOF mid-frame) cannot be resynchronised: the connection is dropped.

Handlers take and return protobuf messages; a handler raising ``TtrpcError`` answers with that status.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import itertools
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, TypeVar

from schemas.containerd import status_pb2, ttrpc_pb2

_LOG = logging.getLogger("uvmshim.ttrpc")

HEADER = struct.Struct(">IIBB")  # length, stream id, type, flags
HEADER_SIZE = HEADER.size
MAX_MESSAGE_SIZE = 4 << 20
TYPE_REQUEST = 1
TYPE_RESPONSE = 2
_DISCARD_CHUNK = 64 << 10


class Code(enum.IntEnum):
    """google.rpc status codes (the subset ttrpc uses)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14

    @classmethod
    def of(cls, value: int) -> Code:
        """The code for a wire value; UNKNOWN for a value outside the enum."""
        try:
            return cls(value)
        except ValueError:
            return cls.UNKNOWN


class TtrpcError(Exception):
    """A call ended with a non-OK status (raised by the client, or by a handler to answer with it)."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class ProtocolError(Exception):
    """The byte stream is not valid ttrpc: the connection must be dropped."""


class Message(Protocol):
    """What this module needs of a generated protobuf message."""

    def SerializeToString(self, *, deterministic: bool = ...) -> bytes: ...
    def ParseFromString(self, serialized: bytes, /) -> int: ...


MessageT = TypeVar("MessageT", bound=Message)
Handler = Callable[[Any], Awaitable[Message]]


# -- framing -----------------------------------------------------------------------------------------


def encode_frame(stream_id: int, message_type: int, payload: bytes) -> bytes:
    return HEADER.pack(len(payload), stream_id, message_type, 0) + payload


async def read_header(reader: asyncio.StreamReader) -> tuple[int, int, int] | None:
    """(length, stream id, type) of the next message; None at a clean EOF. Raises ProtocolError mid-header."""
    try:
        length, stream_id, message_type, _flags = HEADER.unpack(await reader.readexactly(HEADER_SIZE))
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise ProtocolError(f"connection closed after {len(exc.partial)} bytes of a header")
    return length, stream_id, message_type


async def read_payload(reader: asyncio.StreamReader, length: int) -> bytes | None:
    """The payload, or None for an oversized one (read and dropped). Raises ProtocolError at EOF."""
    if length <= MAX_MESSAGE_SIZE:
        try:
            return await reader.readexactly(length)
        except asyncio.IncompleteReadError as exc:
            raise ProtocolError(f"connection closed after {len(exc.partial)} of {length} payload bytes")
    remaining = length
    while remaining:
        chunk = await reader.read(min(remaining, _DISCARD_CHUNK))
        if not chunk:
            raise ProtocolError(f"connection closed inside an oversized message of {length} bytes")
        remaining -= len(chunk)
    return None


def encode_response(code: Code, message: str = "", payload: bytes = b"") -> bytes:
    """A serialized ttrpc Response."""
    data: bytes = ttrpc_pb2.Response(status=status_pb2.Status(code=code, message=message), payload=payload).SerializeToString()
    return data


# -- server ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Method:
    request_type: type[Message]
    handler: Handler


class Server:
    """Serves registered methods on unix sockets; every request runs in its own task."""

    def __init__(self) -> None:
        self._methods: dict[tuple[str, str], _Method] = {}
        self._servers: list[asyncio.Server] = []
        self._connections: set[asyncio.Task[Any]] = set()
        self._socket_paths: list[str] = []
        self._connection_ids = itertools.count(1)
        self._closing = False
        #: Set whenever a connection closes (clear it to wait for the next one); see ``connections``.
        self.disconnected = asyncio.Event()

    @property
    def connections(self) -> int:
        return len(self._connections)

    def register(self, service: str, method: str, request_type: type[MessageT],
                 handler: Callable[[MessageT], Awaitable[Message]]) -> None:
        """Route service/method to handler. Raises ValueError if it is already registered."""
        if (service, method) in self._methods:
            raise ValueError(f"ttrpc method {service}/{method} is already registered")
        self._methods[service, method] = _Method(request_type, handler)

    def register_service(self, service: str, methods: Mapping[str, tuple[type[Message], Handler]]) -> None:
        for method, (request_type, handler) in methods.items():
            self.register(service, method, request_type, handler)

    async def serve_unix(self, path: str) -> None:
        """Listen on a new unix socket at path (removed by close()). Raises FileExistsError if path exists."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise FileExistsError(f"ttrpc socket {path}: already exists (another shim? remove it if stale)")
            raise OSError(exc.errno, f"ttrpc socket {path}: cannot bind: {exc.strerror}")
        if not path.startswith("\0"):
            self._socket_paths.append(path)
        sock.listen(128)
        await self.serve_socket(sock)

    async def serve_socket(self, sock: socket.socket) -> None:
        """Accept connections on an already bound and listening unix socket (closed by close())."""
        self._servers.append(await asyncio.start_unix_server(self._serve_connection, sock=sock))

    async def close(self) -> None:
        """Stop accepting, drop every connection (cancelling its handlers), remove the socket files. Idempotent."""
        self._closing = True
        servers, self._servers = self._servers, []
        for server in servers:
            server.close()
        for path in self._socket_paths:  # before any await: released even if close() is cancelled
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self._socket_paths.clear()
        for task in self._connections:
            task.cancel()
        if self._connections:
            await asyncio.wait(self._connections)
        for server in servers:
            await server.wait_closed()

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closing:
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        log = _LOG.getChild(f"conn{next(self._connection_ids)}")
        log.debug("connected")
        in_flight: dict[int, asyncio.Task[None]] = {}
        try:
            await self._read_requests(reader, writer, in_flight, log)
            log.debug("peer closed the connection")
        except ProtocolError as exc:
            log.warning("dropping connection: %s", exc)
        except OSError as exc:
            log.debug("connection lost: %s", exc)
        finally:
            for handler_task in in_flight.values():
                handler_task.cancel()
            if in_flight:
                await asyncio.wait(in_flight.values())
            writer.close()
            self._connections.discard(task)
            self.disconnected.set()

    async def _read_requests(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                             in_flight: dict[int, asyncio.Task[None]], log: logging.Logger) -> None:
        while (header := await read_header(reader)) is not None:
            length, stream_id, message_type = header
            if message_type != TYPE_REQUEST:
                raise ProtocolError(f"stream {stream_id}: unexpected message type {message_type} (want a request)")
            if stream_id % 2 == 0:
                raise ProtocolError(f"stream {stream_id}: client stream ids must be odd")
            if stream_id in in_flight:
                raise ProtocolError(f"stream {stream_id}: reused while its call is in flight")
            payload = await read_payload(reader, length)
            if payload is None:
                log.warning("stream %d: request of %d bytes over the %d byte cap, dropped", stream_id, length,
                            MAX_MESSAGE_SIZE)
                message = f"request of {length} bytes exceeds the maximum message size {MAX_MESSAGE_SIZE}"
                writer.write(encode_frame(stream_id, TYPE_RESPONSE, encode_response(Code.RESOURCE_EXHAUSTED, message)))
                await writer.drain()
                continue
            in_flight[stream_id] = asyncio.create_task(self._answer(stream_id, payload, writer, in_flight, log))

    async def _answer(self, stream_id: int, payload: bytes, writer: asyncio.StreamWriter,
                      in_flight: dict[int, asyncio.Task[None]], log: logging.Logger) -> None:
        try:
            reply = await self._dispatch(stream_id, payload, log)
            if len(reply) > MAX_MESSAGE_SIZE:
                log.warning("stream %d: response of %d bytes over the cap, replaced by an error", stream_id, len(reply))
                message = f"response of {len(reply)} bytes exceeds the maximum message size {MAX_MESSAGE_SIZE}"
                reply = encode_response(Code.RESOURCE_EXHAUSTED, message)
            writer.write(encode_frame(stream_id, TYPE_RESPONSE, reply))
            await writer.drain()
        except OSError as exc:
            log.debug("stream %d: cannot send the reply: %s", stream_id, exc)
        finally:
            in_flight.pop(stream_id, None)

    async def _dispatch(self, stream_id: int, payload: bytes, log: logging.Logger) -> bytes:
        """The serialized Response to one serialized Request."""
        request = ttrpc_pb2.Request()
        try:
            request.ParseFromString(payload)
        except Exception as exc:
            return encode_response(Code.INVALID_ARGUMENT, f"payload is not a valid ttrpc Request: {exc}")
        name = f"{request.service}/{request.method}"
        log.debug("--> %d %s (%d bytes)", stream_id, name, len(request.payload))
        method = self._methods.get((request.service, request.method))
        if method is None:
            known = any(service == request.service for service, _ in self._methods)
            what = f"method {name}" if known else f"service {request.service}"
            return encode_response(Code.UNIMPLEMENTED, f"{what} is not implemented")
        argument = method.request_type()
        try:
            argument.ParseFromString(request.payload)
        except Exception as exc:
            return encode_response(Code.INVALID_ARGUMENT, f"{name}: payload is not a valid "
                                                          f"{method.request_type.__name__}: {exc}")
        deadline = asyncio.timeout(request.timeout_nano / 1e9 if request.timeout_nano > 0 else None)
        try:
            async with deadline:
                result = (await method.handler(argument)).SerializeToString()
        except TtrpcError as exc:
            log.debug("<-- %d %s: %s", stream_id, name, exc)
            return encode_response(exc.code, exc.message)
        except TimeoutError as exc:
            if not deadline.expired():
                return self._unexpected(stream_id, name, exc, log)
            log.debug("<-- %d %s: deadline of %dns exceeded", stream_id, name, request.timeout_nano)
            return encode_response(Code.DEADLINE_EXCEEDED, f"{name}: deadline of {request.timeout_nano}ns exceeded")
        except Exception as exc:
            return self._unexpected(stream_id, name, exc, log)
        log.debug("<-- %d %s OK (%d bytes)", stream_id, name, len(result))
        return encode_response(Code.OK, payload=result)

    @staticmethod
    def _unexpected(stream_id: int, name: str, exc: Exception, log: logging.Logger) -> bytes:
        log.error("stream %d: %s failed: %r", stream_id, name, exc, exc_info=exc)
        return encode_response(Code.UNKNOWN, str(exc) or type(exc).__name__)


# -- client ------------------------------------------------------------------------------------------


class Client:
    """One connection to a ttrpc server; calls run concurrently on it. Use ``connect_unix()``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str) -> None:
        self._reader = reader
        self._writer = writer
        self._peer = peer
        self._log = _LOG.getChild("client")
        self._next_stream_id = 1
        self._pending: dict[int, asyncio.Future[ttrpc_pb2.Response]] = {}
        self._lost: str | None = None  # why the connection is unusable, once it is
        self._reader_task = asyncio.create_task(self._read_responses())

    @classmethod
    async def connect_unix(cls, path: str, timeout: float = 5.0) -> Client:
        """Connect to the server at path. Raises TtrpcError(UNAVAILABLE) if that fails within timeout."""
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_unix_connection(path)
        except TimeoutError:
            raise TtrpcError(Code.UNAVAILABLE, f"ttrpc {path}: no connection within {timeout}s")
        except OSError as exc:
            raise TtrpcError(Code.UNAVAILABLE, f"ttrpc {path}: cannot connect: {exc.strerror or exc}")
        return cls(reader, writer, path)

    async def call(self, service: str, method: str, request: Message, response_type: type[MessageT],
                   timeout: float | None = None) -> MessageT:
        """Call service/method and wait for its reply. timeout is sent to the server and bounds the wait.

        Raises TtrpcError: the server's non-OK status, UNAVAILABLE once the connection is lost,
        DEADLINE_EXCEEDED past timeout, RESOURCE_EXHAUSTED for a request over the size cap.
        """
        name = f"{service}/{method}"
        frame = ttrpc_pb2.Request(service=service, method=method, payload=request.SerializeToString())
        if timeout is not None:
            frame.timeout_nano = max(1, int(timeout * 1e9))
        data = frame.SerializeToString()
        if len(data) > MAX_MESSAGE_SIZE:
            raise TtrpcError(Code.RESOURCE_EXHAUSTED, f"{name}: request of {len(data)} bytes exceeds "
                                                      f"the maximum message size {MAX_MESSAGE_SIZE}")
        if self._lost is not None:
            raise TtrpcError(Code.UNAVAILABLE, f"{name}: {self._lost}")
        stream_id = self._next_stream_id
        self._next_stream_id += 2
        reply: asyncio.Future[ttrpc_pb2.Response] = asyncio.get_running_loop().create_future()
        self._pending[stream_id] = reply
        try:
            self._log.debug("--> %d %s (%d bytes)", stream_id, name, len(data))
            self._writer.write(encode_frame(stream_id, TYPE_REQUEST, data))
            async with asyncio.timeout(timeout):
                await self._writer.drain()
                response = await reply
        except TimeoutError:
            raise TtrpcError(Code.DEADLINE_EXCEEDED, f"{name}: no reply within {timeout}s")
        except OSError as exc:
            raise TtrpcError(Code.UNAVAILABLE, f"{name}: {self._peer}: {exc}")
        finally:
            self._pending.pop(stream_id, None)
        if response.status.code != Code.OK:
            raise TtrpcError(Code.of(response.status.code), response.status.message)
        result = response_type()
        try:
            result.ParseFromString(response.payload)
        except Exception as exc:
            raise TtrpcError(Code.INTERNAL, f"{name}: reply is not a valid {response_type.__name__}: {exc}")
        return result

    async def close(self) -> None:
        """Close the connection; pending calls raise UNAVAILABLE. Idempotent."""
        self._writer.close()
        self._reader_task.cancel()
        self._fail_pending("client closed")
        await asyncio.wait([self._reader_task])

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def _read_responses(self) -> None:
        reason = "server closed the connection"
        try:
            while (header := await read_header(self._reader)) is not None:
                length, stream_id, message_type = header
                if message_type != TYPE_RESPONSE:
                    raise ProtocolError(f"stream {stream_id}: unexpected message type {message_type} (want a response)")
                payload = await read_payload(self._reader, length)
                reply = self._pending.get(stream_id)
                if reply is None or reply.done():
                    self._log.debug("<-- %d: reply to no pending call, dropped", stream_id)
                elif payload is None:
                    reply.set_exception(TtrpcError(Code.RESOURCE_EXHAUSTED, f"reply of {length} bytes exceeds "
                                                                            f"the maximum message size {MAX_MESSAGE_SIZE}"))
                else:
                    response = ttrpc_pb2.Response()
                    try:
                        response.ParseFromString(payload)
                    except Exception as exc:
                        reply.set_exception(TtrpcError(Code.INTERNAL, f"reply is not a valid ttrpc Response: {exc}"))
                        continue
                    self._log.debug("<-- %d status %d (%d bytes)", stream_id, response.status.code, len(payload))
                    reply.set_result(response)
        except (ProtocolError, OSError) as exc:
            reason = f"connection lost: {exc}"
            self._log.warning("%s: %s", self._peer, reason)
        finally:
            self._writer.close()
            self._fail_pending(reason)

    def _fail_pending(self, reason: str) -> None:
        if self._lost is None:
            self._lost = f"ttrpc {self._peer}: {reason}"
        for reply in self._pending.values():
            if not reply.done():
                reply.set_exception(TtrpcError(Code.UNAVAILABLE, self._lost))
