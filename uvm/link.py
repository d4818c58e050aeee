"""Host side of the agent link: framing -> connection -> typed client.

``AgentConnection`` owns the byte stream (an asyncio protocol on the agent socket): it decodes
frames as they arrive, matches responses to pending requests by id, hands notifications to a
callback, and on EOF, a malformed frame or any out-of-protocol message fails every pending call
with the same ``LinkError`` and closes the transport. ``AgentClient`` is the thin typed layer: one
method per request, each result validated against ``schemas.agent_models`` (the guest is untrusted).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import socket
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from schemas import agent as proto
from schemas import agent_models as models
from schemas import framing, wirejson
from schemas.validation import guest_problem, guest_text
from uvm import errors
from uvm.streams import CREDIT, InboundStream, OutboundStream, remember

M = TypeVar("M", bound=BaseModel)

MAX_FORGOTTEN_STREAMS = 4096
MAX_ABANDONED_CALLS = 4096
RUN_HOST_GRACE_S = 15.0  # past a run's own timeout, for the guest to kill the command and answer

_ERROR_TYPES: dict[str, type[errors.AgentError]] = {
    proto.E_NOT_FOUND: errors.AgentNotFoundError,
    proto.E_INVALID: errors.AgentInvalidArgumentError,
    proto.E_UNSUPPORTED: errors.AgentUnsupportedError,
    proto.E_ALREADY_EXISTS: errors.AgentAlreadyExistsError,
    proto.E_STILL_RUNNING: errors.AgentStillRunningError,
    proto.E_NOT_RUNNING: errors.AgentNotRunningError,
    proto.E_NOT_STOPPED: errors.NotStoppedError,
    proto.E_INVALID_ID: errors.InvalidIdError,
}


class AgentConnection(asyncio.Protocol):
    """Request/response multiplexing over one agent byte stream.

    An asyncio protocol on the socket: frames are decoded and dispatched as the bytes arrive, so a
    response completes its call's future in the same event-loop step (no reader task in between:
    a request round trip is one loop wake-up on the host, not two).
    """

    def __init__(self, name: str, on_notify: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.name = name
        self.log = logging.getLogger(f"uvm.{name}.agent")
        self._on_notify = on_notify
        self._decoder = framing.FrameDecoder()
        self._pending: dict[int, asyncio.Future[tuple[int, bytes]]] = {}
        self._next_id = 1
        self._closed: errors.UvmError | None = None
        self._transport: asyncio.Transport | None = None
        self._writable: asyncio.Future[None] | None = None  # while the socket's send buffer is full
        self._lost: asyncio.Future[None] | None = None  # resolved by connection_lost
        self._streams: dict[int, InboundStream | OutboundStream] = {}
        self._forgotten: dict[int, None] = {}  # closed by the host: late guest frames are dropped quietly
        self._abandoned: dict[int, None] = {}  # calls the host stopped waiting for: their late answer is dropped
        self._next_sid = 1
        self.on_fail: Callable[[errors.UvmError], None] | None = None

    async def open(self, sock: socket.socket) -> None:
        """Serve the link on sock, a connected stream socket (the host end of the agent channel).

        The connection owns sock from here on, also when this raises."""
        loop = asyncio.get_running_loop()
        self._lost = loop.create_future()
        try:
            await loop.create_unix_connection(lambda: self, sock=sock)
        except BaseException:
            sock.close()
            self._lost = None
            raise

    @property
    def closed(self) -> errors.UvmError | None:
        """The error that closed the link, or None while it is up."""
        return self._closed

    async def call(self, method: str, params: Mapping[str, Any]) -> tuple[int, bytes]:
        """Send a request; return (flags, payload) of its response. Raises LinkError if the link drops."""
        if self._closed is not None:
            raise self._closed.with_traceback(None)  # the same error object is raised again and again
        transport = self._transport
        if transport is None:
            raise errors.LinkError(f"agent link {self.name}: {method}: the link is not open", vm_id=self.name)
        try:
            payload = wirejson.dumps({"method": method, "params": params})
        except (ValueError, TypeError) as e:
            raise errors.UvmError(f"{method} request cannot be encoded: {e}", method=method) from None
        if len(payload) > proto.MAX_CONTROL_PAYLOAD:
            raise errors.UvmError(f"{method} request of {len(payload)} bytes exceeds the cap", method=method)
        req_id = self._next_id
        self._next_id = self._next_id + 1 if self._next_id < 0xFFFFFFFF else 1
        fut: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        self._pending[req_id] = fut
        try:
            self.log.debug("--> %s #%d %s", method, req_id, payload[:200])
            transport.write(framing.encode(framing.REQUEST, req_id, payload))  # a failed send ends in fail()
            if self._writable is not None:  # back-pressure: QEMU is not reading the socket
                await asyncio.shield(self._writable)
            return await fut  # (the answer, or fail(), takes req_id out of _pending)
        except BaseException:
            if self._pending.pop(req_id, None) is not None:  # cancelled (a deadline, a gone client) unanswered
                remember(self._abandoned, req_id, None, MAX_ABANDONED_CALLS)
            raise

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        if self._closed is not None:  # failed before the socket was taken over
            transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._closed is not None:
            return
        try:
            frames = self._decoder.feed(data)
        except framing.FramingError as e:
            self.fail(errors.GuestProtocolError(f"agent link {self.name}: malformed frame from the guest: {e}",
                                                vm_id=self.name))
            return
        try:
            for frame in frames:
                problem = self._dispatch(frame)
                if problem:
                    self.fail(errors.GuestProtocolError(f"agent link {self.name}: {problem}", vm_id=self.name))
                    return
        except Exception as e:  # whatever went wrong, pending calls must not hang
            self.log.debug("agent link failed on guest data", exc_info=True)
            self.fail(errors.GuestProtocolError(f"agent link {self.name}: cannot process guest data: {e!r}",
                                                vm_id=self.name))

    def eof_received(self) -> bool:
        clean = self._decoder.at_boundary()
        self.fail(errors.LinkError(
            f"agent link {self.name}: closed by the guest" + ("" if clean else " in the middle of a frame"),
            vm_id=self.name))
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is None:
            self.fail(errors.LinkError(f"agent link {self.name}: closed by the guest", vm_id=self.name))
        else:
            self.fail(errors.LinkError(f"agent link {self.name}: connection lost: {exc}", vm_id=self.name))
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        self._wake_writers()

    def _wake_writers(self) -> None:
        waiter, self._writable = self._writable, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- streams ---------------------------------------------------------------------------------

    def send_frame(self, ftype: int, fid: int, payload: bytes) -> None:
        """Queue a frame (stream data, credit, close); a dead link drops it silently."""
        if self._closed is not None:
            return
        if self._transport is not None:
            self._transport.write(framing.encode(ftype, fid, payload))  # a failed send ends in fail()

    def open_inbound(self, name: str) -> InboundStream:
        stream = InboundStream(self._allocate_sid(), name, self.send_frame)
        self._streams[stream.sid] = stream
        return stream

    def open_outbound(self, name: str) -> OutboundStream:
        stream = OutboundStream(self._allocate_sid(), name, self.send_frame)
        self._streams[stream.sid] = stream
        return stream

    def forget_stream(self, sid: int) -> None:
        if self._streams.pop(sid, None) is not None:
            remember(self._forgotten, sid, None, MAX_FORGOTTEN_STREAMS)

    def _allocate_sid(self) -> int:
        while self._next_sid in self._streams or self._next_sid in self._forgotten or self._next_sid == 0:
            self._next_sid = (self._next_sid + 1) & 0xFFFFFFFF
        sid = self._next_sid
        self._next_sid = (self._next_sid + 1) & 0xFFFFFFFF
        return sid

    def _stream_frame(self, frame: framing.Frame) -> str | None:
        stream = self._streams.get(frame.id)
        if stream is None:
            if frame.id in self._forgotten:
                return None  # sent before the guest saw our CLOSE
            return f"{framing.TYPE_NAMES[frame.type]} frame for unknown stream {frame.id}"
        if isinstance(stream, InboundStream):
            if frame.type == framing.DATA:
                return stream.feed(frame.payload)
            if frame.type == framing.CLOSE and not frame.payload:
                stream.feed_eof()
                return None
            return f"unexpected {framing.TYPE_NAMES[frame.type]} frame on {stream.name}"
        if frame.type == framing.CREDIT and len(frame.payload) == CREDIT.size:
            return stream.add_credit(CREDIT.unpack(frame.payload)[0])
        return f"unexpected {framing.TYPE_NAMES[frame.type]} frame on {stream.name}"

    def _dispatch(self, frame: framing.Frame) -> str | None:
        """Route one frame; return a description of the protocol violation, if any."""
        if frame.type in (framing.DATA, framing.CREDIT, framing.CLOSE):
            return self._stream_frame(frame)
        if frame.type == framing.RESPONSE:
            if frame.id not in self._pending:
                if self._abandoned.pop(frame.id, "unknown") is None:
                    return None  # the late answer to a call the host gave up on: an honest, slow guest
                return f"response to unknown request id {frame.id}"
            if len(frame.payload) > proto.MAX_CONTROL_PAYLOAD:
                return f"response of {len(frame.payload)} bytes exceeds the control cap"
            fut = self._pending.pop(frame.id)
            self.log.debug("<-- #%d %s", frame.id, frame.payload[:200])
            if not fut.done():
                fut.set_result((frame.flags, frame.payload))
            return None
        if frame.type == framing.NOTIFY:
            if len(frame.payload) > proto.MAX_CONTROL_PAYLOAD:
                return f"notification of {len(frame.payload)} bytes exceeds the control cap"
            try:
                msg = wirejson.loads(frame.payload)
            except (ValueError, RecursionError):
                return "notification is not JSON (or nested too deeply)"
            if not isinstance(msg, dict) or not isinstance(msg.get("event"), str):
                return "notification without an event name"
            if self._on_notify is not None:
                try:
                    self._on_notify(msg)
                except errors.GuestProtocolError as e:
                    return e.message
                except Exception as e:
                    self.log.error("notification handler failed on %.200r: %r", msg, e)
                    return f"notification could not be handled: {e!r}"
            return None
        return f"unexpected {framing.TYPE_NAMES[frame.type]} frame from the guest"

    def fail(self, error: errors.UvmError) -> None:
        """Close the link: every pending and future call raises error. Idempotent (first error wins)."""
        if self._closed is not None:
            return
        self._closed = error
        if isinstance(error, errors.GuestProtocolError):
            self.log.error("%s", error)
        else:
            self.log.debug("%s", error)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(error)
        self._pending.clear()
        for stream in self._streams.values():
            stream.fail(error)
        self._wake_writers()  # a call waiting for the socket to drain finds its future failed
        if self.on_fail is not None:
            self.on_fail(error)
        if self._transport is not None:
            self._transport.close()  # sends what is queued, then closes

    async def aclose(self, error: errors.LinkError | None = None) -> None:
        """Fail the link (if it is up) and close the socket, dropping what the guest did not take."""
        self.fail(error or errors.LinkError(f"agent link {self.name}: closed", vm_id=self.name))
        if self._transport is not None:
            self._transport.abort()
        if self._lost is not None:
            await asyncio.shield(self._lost)


class AgentClient:
    """Typed requests over an AgentConnection; every guest answer is validated."""

    def __init__(self, conn: AgentConnection) -> None:
        self.conn = conn

    async def request(self, method: str, params: Mapping[str, Any], model: type[M]) -> M:
        flags, payload = await self.conn.call(method, params)
        try:
            if flags & framing.FLAG_ERROR:
                body = models.ErrorBody.model_validate_json(payload)
                cls = _ERROR_TYPES.get(body.code, errors.AgentError)
                raise cls(body.code, f"{method}: {guest_text(body.message, proto.MAX_ERROR_MESSAGE)}", method=method,
                          vm_id=self.conn.name)
            return model.model_validate_json(payload)
        except ValidationError as e:
            err = errors.GuestProtocolError(
                f"agent link {self.conn.name}: invalid {method} response from the guest: {guest_problem(e)}",
                vm_id=self.conn.name, method=method)
            self.conn.fail(err)
            raise err from None

    async def hello(self) -> models.HelloResult:
        return await self.request(proto.HELLO, {"version": proto.PROTOCOL_VERSION}, models.HelloResult)

    async def ping(self, seq: int = 0) -> models.PingResult:
        res = await self.request(proto.PING, {"seq": seq}, models.PingResult)
        if res.seq != seq:
            err = errors.GuestProtocolError(f"agent link {self.conn.name}: ping answered seq {res.seq}, sent {seq}")
            self.conn.fail(err)
            raise err
        return res

    async def shutdown(self) -> None:
        await self.request(proto.SHUTDOWN, {}, models.Empty)

    async def configure_network(self, config: Mapping[str, Any]) -> None:
        """Give the VM's NICs their veths' identities (uvm/network.py's guest_config). Raises
        AgentInvalidArgumentError for what the guest refused, AgentError otherwise."""
        await self.request(proto.CONFIGURE_NETWORK, config, models.Empty)

    async def prepare_template(self) -> None:
        await self.request(proto.PREPARE_TEMPLATE, {}, models.Empty)

    async def resume_clone(self, vm_id: str, time_ns: int, entropy: bytes) -> models.HelloResult:
        """A clone's hello: the agent first takes its own identity, clock and randomness."""
        return await self.request(proto.RESUME_CLONE, {"version": proto.PROTOCOL_VERSION, "vm_id": vm_id,
                                                       "time_ns": time_ns, "entropy": base64.b64encode(entropy).decode()},
                                  models.HelloResult)

    async def run(
        self,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes = b"",
        timeout: float | None = None,
    ) -> models.RunResult:
        params: dict[str, Any] = {"argv": list(argv)}
        if env is not None:
            params["env"] = dict(env)
        if cwd is not None:
            params["cwd"] = cwd
        if stdin:
            params["stdin"] = base64.b64encode(stdin).decode()
        if timeout is None:
            return await self.request(proto.RUN, params, models.RunResult)
        params["timeout"] = timeout
        # The guest enforces the timeout; the host bounds the answer too, so that a paused or stuck guest
        # cannot hold the caller for ever (its late answer is dropped).
        try:
            return await asyncio.wait_for(self.request(proto.RUN, params, models.RunResult), timeout + RUN_HOST_GRACE_S)
        except TimeoutError:
            raise errors.WaitTimeoutError(
                f"agent link {self.conn.name}: run {list(argv)[:1]!r}: no answer within "
                f"{timeout + RUN_HOST_GRACE_S:g}s (its own timeout was {timeout:g}s): the guest is stuck or paused",
                method=proto.RUN) from None
