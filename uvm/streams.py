"""Host side of stdio streams on the agent link, with credit-based flow control.

``InboundStream`` (guest -> host: stdout, stderr) holds what the guest sent until the consumer
reads it, and only then gives the guest credit for more: at most ``OUTPUT_WINDOW`` bytes per
stream are ever buffered on the host, and a consumer that never reads stalls only its own process.
``OutboundStream`` (host -> guest: stdin) sends no more than the guest's credit and waits for it.
Data is delivered in order, exactly once; EOF is the guest's CLOSE frame. A guest that sends more
than its credit, or credit it was never owed, breaks the protocol and the link is dropped.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from typing import TypeVar

from schemas import agent as proto
from schemas import framing
from uvm import errors

CREDIT = struct.Struct(">I")

SendFrame = Callable[[int, int, bytes], None]
K = TypeVar("K")
V = TypeVar("V")


def remember(memory: dict[K, V], key: K, value: V, cap: int) -> None:
    """Add key to a bounded memory of what the guest may still mention (ids closed or given up on,
    exits ahead of their answer): past cap entries, the oldest are forgotten."""
    memory[key] = value
    while len(memory) > cap:
        del memory[next(iter(memory))]


class InboundStream:
    def __init__(self, sid: int, name: str, send: SendFrame) -> None:
        self.sid = sid
        self.name = name
        self._send = send
        self._buf = bytearray()
        self._outstanding = proto.OUTPUT_WINDOW  # bytes the guest may still send
        self._eof = False
        self._closed_by_host = False
        self._error: errors.UvmError | None = None
        self._changed = asyncio.Event()
        self.received = 0

    def __repr__(self) -> str:
        return f"<InboundStream {self.name} sid={self.sid} buffered={len(self._buf)} eof={self._eof}>"

    @property
    def at_eof(self) -> bool:
        """The guest sent everything (EOF) and it was all read."""
        return self._eof and not self._buf

    @property
    def ended(self) -> bool:
        """No more data will arrive (EOF, host close, or link failure)."""
        return self._eof or self._closed_by_host or self._error is not None

    async def wait_ended(self) -> None:
        """Until no more data will arrive (EOF, host close or link failure)."""
        while not self.ended:
            self._changed.clear()
            await self._changed.wait()

    def feed(self, data: bytes) -> str | None:
        """Data frame from the guest; returns a protocol violation description, if any."""
        if self._eof:
            return f"{self.name}: data after the end of the stream"
        if len(data) > self._outstanding:
            return f"{self.name}: guest sent {len(data)} bytes with only {self._outstanding} of credit"
        self._outstanding -= len(data)
        self.received += len(data)
        if not self._closed_by_host:
            self._buf += data
            self._changed.set()
        return None

    def feed_eof(self) -> None:
        self._eof = True
        self._changed.set()

    def fail(self, error: errors.UvmError) -> None:
        """The link dropped: readers get what is buffered, then EOF."""
        if self._error is None:
            self._error = error
            self._eof = True
            self._changed.set()

    async def read(self, n: int = -1) -> bytes:
        """Up to n bytes (all buffered with n < 0) once some are available; b"" at EOF."""
        while not self._buf and not self._eof and not self._closed_by_host:
            self._changed.clear()
            await self._changed.wait()
        if not self._buf:
            return b""
        size = len(self._buf) if n < 0 else min(n, len(self._buf))
        data = bytes(self._buf[:size])
        del self._buf[:size]
        self._grant(size)
        return data

    async def read_all(self) -> bytes:
        """Everything until EOF."""
        chunks = []
        while chunk := await self.read():
            chunks.append(chunk)
        return b"".join(chunks)

    def _grant(self, n: int) -> None:
        if n and not self._eof and self._error is None and not self._closed_by_host:
            self._outstanding += n
            self._send(framing.CREDIT, self.sid, CREDIT.pack(n))

    def close(self) -> None:
        """Stop reading: the guest stops relaying and the process gets EPIPE on its next write."""
        if self._closed_by_host or self._eof:
            self._buf.clear()
            return
        self._closed_by_host = True
        self._buf.clear()
        self._changed.set()
        self._send(framing.CLOSE, self.sid, b"")


class OutboundStream:
    def __init__(self, sid: int, name: str, send: SendFrame) -> None:
        self.sid = sid
        self.name = name
        self._send = send
        self._credit = proto.INPUT_WINDOW
        self._sent_unacked = 0
        self._closed = False
        self._error: errors.UvmError | None = None
        self._changed = asyncio.Event()
        self.sent = 0

    def __repr__(self) -> str:
        return f"<OutboundStream {self.name} sid={self.sid} credit={self._credit} closed={self._closed}>"

    def add_credit(self, n: int) -> str | None:
        if n > self._sent_unacked:
            return f"{self.name}: guest granted {n} bytes of credit, more than was sent"
        self._sent_unacked -= n
        self._credit += n
        self._changed.set()
        return None

    def fail(self, error: errors.UvmError) -> None:
        if self._error is None:
            self._error = error
            self._changed.set()

    async def write(self, data: bytes) -> None:
        """Send data in order, waiting for credit. Raises StateError after close, LinkError if the link drops."""
        view = memoryview(data)
        while view:
            if self._closed:
                raise errors.StateError(f"{self.name}: closed")
            if self._error is not None:
                raise self._error
            if self._credit <= 0:
                self._changed.clear()
                await self._changed.wait()
                continue
            size = min(len(view), self._credit, proto.INPUT_CHUNK)
            self._credit -= size
            self._sent_unacked += size
            self.sent += size
            self._send(framing.DATA, self.sid, bytes(view[:size]))
            view = view[size:]

    def close(self) -> None:
        """EOF to the process once everything written has arrived. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._changed.set()
        if self._error is None:
            self._send(framing.CLOSE, self.sid, b"")
