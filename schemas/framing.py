"""Framing of the agent link: bytes <-> frames. Stdlib only (the guest imports it).

Every frame is a fixed 12-byte big-endian header followed by a payload::

    u16 magic (0x5556, "UV")  u8 type  u8 flags  u32 id  u32 payload length

``id`` is the request id for requests/responses and the stream id for stream frames. A frame
whose magic, type, flags or length is wrong is rejected: the decoder raises ``FramingError`` and
the link must be dropped (there is no way to resynchronise a byte stream safely).
"""

from __future__ import annotations

import struct

MAGIC = 0x5556
HEADER = struct.Struct(">HBBII")
HEADER_SIZE = HEADER.size
#: Hard cap on one frame's payload. Control messages are small; stream data is chunked below it.
MAX_PAYLOAD = 1 << 20

# Frame types.
REQUEST = 1
RESPONSE = 2
NOTIFY = 3
DATA = 4
CREDIT = 5
CLOSE = 6
TYPE_NAMES = {REQUEST: "request", RESPONSE: "response", NOTIFY: "notify", DATA: "data",
              CREDIT: "credit", CLOSE: "close"}

# Flags.
FLAG_ERROR = 0x01  # on RESPONSE: the payload is an error body
KNOWN_FLAGS = FLAG_ERROR


class FramingError(Exception):
    """The byte stream is not a valid sequence of frames (garbage, truncated or oversized)."""


class Frame:
    __slots__ = ("flags", "id", "payload", "type")

    def __init__(self, type: int, id: int, payload: bytes = b"", flags: int = 0) -> None:
        self.type = type
        self.flags = flags
        self.id = id
        self.payload = payload

    def __repr__(self) -> str:
        name = TYPE_NAMES.get(self.type, str(self.type))
        return f"Frame({name}, id={self.id}, flags={self.flags:#x}, {len(self.payload)} bytes)"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Frame) and (self.type, self.flags, self.id, self.payload) == (
            other.type, other.flags, other.id, other.payload)


def encode(type: int, id: int, payload: bytes = b"", flags: int = 0, max_payload: int = MAX_PAYLOAD) -> bytes:
    """One frame as bytes. Raises FramingError for an invalid type, id or an oversized payload."""
    if type not in TYPE_NAMES:
        raise FramingError(f"unknown frame type {type}")
    if not 0 <= id <= 0xFFFFFFFF:
        raise FramingError(f"frame id {id} out of range")
    if flags & ~KNOWN_FLAGS:
        raise FramingError(f"unknown frame flags {flags:#x}")
    if len(payload) > max_payload:
        raise FramingError(f"payload of {len(payload)} bytes exceeds the cap of {max_payload}")
    return HEADER.pack(MAGIC, type, flags, id, len(payload)) + payload


class FrameDecoder:
    """Incremental decoder: feed() bytes as they arrive, get whole frames back.

    Memory is bounded: at most one header plus one capped payload is buffered.
    """

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self.max_payload = max_payload
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def _reject(self, magic: int, ftype: int, flags: int, length: int) -> FramingError:
        if magic != MAGIC:
            return FramingError(f"bad magic {magic:#06x} (not an agent frame)")
        if ftype not in TYPE_NAMES:
            return FramingError(f"unknown frame type {ftype}")
        if flags & ~KNOWN_FLAGS:
            return FramingError(f"unknown frame flags {flags:#x}")
        return FramingError(f"{TYPE_NAMES[ftype]} frame of {length} bytes exceeds the cap of {self.max_payload}")

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Frames completed by data. Raises FramingError on the first invalid header.

        A header is checked as soon as it is complete, before its payload arrives. data is not
        kept: a caller may pass a view of its read buffer and reuse the buffer afterwards.
        """
        if not self._buf and len(data) >= HEADER_SIZE:
            # The common case, one whole frame per read: checked and cut without the loop below
            # (under emulation every interpreted step of the agent's request path costs ~1 us).
            magic, ftype, flags, fid, length = HEADER.unpack_from(data)
            if len(data) == HEADER_SIZE + length:
                if magic != MAGIC or ftype not in TYPE_NAMES or flags & ~KNOWN_FLAGS or length > self.max_payload:
                    raise self._reject(magic, ftype, flags, length)
                return [Frame(ftype, fid, bytes(data[HEADER_SIZE:]), flags)]
        buf: bytes | bytearray | memoryview
        if self._buf:
            self._buf += data
            buf = self._buf
        else:
            buf = data  # the common case (whole frames): no copy into the buffer
        frames: list[Frame] = []
        pos = 0
        end = len(buf)
        unpack = HEADER.unpack_from
        while end - pos >= HEADER_SIZE:
            magic, ftype, flags, fid, length = unpack(buf, pos)
            if magic != MAGIC or ftype not in TYPE_NAMES or flags & ~KNOWN_FLAGS or length > self.max_payload:
                raise self._reject(magic, ftype, flags, length)
            start = pos + HEADER_SIZE
            if end - start < length:
                break
            pos = start + length
            frames.append(Frame(ftype, fid, bytes(buf[start:pos]), flags))
        if buf is self._buf:
            del self._buf[:pos]
        elif pos < end:
            self._buf = bytearray(buf[pos:])
        return frames

    def at_boundary(self) -> bool:
        """True when no partial frame is buffered (an EOF here is clean; elsewhere it truncates)."""
        return not self._buf
