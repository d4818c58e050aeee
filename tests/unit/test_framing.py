"""schemas.framing: bytes <-> frames, and every way a byte stream can be wrong."""

from __future__ import annotations

import random

import pytest

from schemas import framing
from schemas.framing import FrameDecoder, FramingError, encode

ALL_TYPES = sorted(framing.TYPE_NAMES)


def header(magic: int = framing.MAGIC, ftype: int = framing.RESPONSE, flags: int = 0, fid: int = 1,
           length: int = 0) -> bytes:
    return framing.HEADER.pack(magic, ftype, flags, fid, length)


# -- encode / decode round trips -------------------------------------------------------------------


def test_header_layout_is_12_big_endian_bytes() -> None:
    data = encode(framing.REQUEST, 0x01020304, b"xyz", framing.FLAG_ERROR)
    assert framing.HEADER_SIZE == 12
    assert data == bytes([0x55, 0x56, 1, 1, 1, 2, 3, 4, 0, 0, 0, 3]) + b"xyz"


@pytest.mark.parametrize("ftype", ALL_TYPES)
@pytest.mark.parametrize("payload", [b"", b"{}", bytes(range(256)) * 4])
def test_round_trip_every_type(ftype: int, payload: bytes) -> None:
    fid = 0xFFFFFFFF if ftype == framing.DATA else 7
    frames = FrameDecoder().feed(encode(ftype, fid, payload))
    assert frames == [framing.Frame(ftype, fid, payload)]


def test_round_trip_error_flag_and_payload_at_the_cap() -> None:
    payload = b"e" * 100
    decoder = FrameDecoder(max_payload=100)
    [frame] = decoder.feed(encode(framing.RESPONSE, 9, payload, framing.FLAG_ERROR, max_payload=100))
    assert (frame.type, frame.id, frame.flags, frame.payload) == (framing.RESPONSE, 9, framing.FLAG_ERROR, payload)
    assert decoder.at_boundary()


def test_frame_repr_names_type_and_size() -> None:
    assert repr(framing.Frame(framing.NOTIFY, 0, b"abc")) == "Frame(notify, id=0, flags=0x0, 3 bytes)"
    assert framing.Frame(framing.DATA, 1, b"a") != framing.Frame(framing.DATA, 2, b"a")
    assert framing.Frame(framing.DATA, 1, b"a") != "not a frame"


def test_byte_by_byte_feeding_yields_each_frame_once_complete() -> None:
    frames_in = [framing.Frame(framing.REQUEST, i, f"payload {i}".encode() * i) for i in range(1, 6)]
    stream = b"".join(encode(f.type, f.id, f.payload) for f in frames_in)
    decoder = FrameDecoder()
    out: list[framing.Frame] = []
    ends = set()
    offset = 0
    for f in frames_in:
        offset += framing.HEADER_SIZE + len(f.payload)
        ends.add(offset)
    for i in range(len(stream)):
        got = decoder.feed(stream[i:i + 1])
        if i + 1 in ends:
            assert len(got) == 1, f"frame ending at byte {i + 1} not yielded"
            assert decoder.at_boundary()
        else:
            assert got == []
            assert not decoder.at_boundary()
        out += got
    assert out == frames_in


def test_several_frames_in_one_chunk_and_a_split_tail() -> None:
    a = encode(framing.RESPONSE, 1, b'{"a":1}')
    b = encode(framing.NOTIFY, 0, b'{"event":"log"}')
    c = encode(framing.DATA, 3, b"x" * 50)
    decoder = FrameDecoder()
    got = decoder.feed(a + b + c[:20])
    assert [(f.type, f.id) for f in got] == [(framing.RESPONSE, 1), (framing.NOTIFY, 0)]
    assert not decoder.at_boundary()
    assert decoder.buffered == 20  # the partial frame (header checked already) waits for its payload
    assert decoder.feed(c[20:]) == [framing.Frame(framing.DATA, 3, b"x" * 50)]
    assert decoder.at_boundary() and decoder.buffered == 0


def test_empty_feed_is_harmless() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(b"") == []
    assert decoder.at_boundary()


# -- truncated input: the decoder waits ----------------------------------------------------------


@pytest.mark.parametrize("cut", [1, framing.HEADER_SIZE - 1, framing.HEADER_SIZE, framing.HEADER_SIZE + 3])
def test_truncated_frame_waits_and_is_not_at_boundary(cut: int) -> None:
    data = encode(framing.RESPONSE, 5, b"0123456789")
    decoder = FrameDecoder()
    assert decoder.feed(data[:cut]) == []
    assert not decoder.at_boundary()
    assert decoder.feed(data[cut:]) == [framing.Frame(framing.RESPONSE, 5, b"0123456789")]
    assert decoder.at_boundary()


def test_header_announcing_an_empty_payload_completes_without_more_bytes() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(header(length=0)) == [framing.Frame(framing.RESPONSE, 1, b"")]
    assert decoder.at_boundary()


# -- rejected input --------------------------------------------------------------------------------


def test_oversized_length_rejected_at_the_header_before_any_payload() -> None:
    decoder = FrameDecoder(max_payload=1024)
    with pytest.raises(FramingError, match=r"response frame of 1025 bytes exceeds the cap of 1024"):
        decoder.feed(header(length=1025))
    # The default cap: a 4 GiB announcement is refused from its 12 header bytes alone.
    with pytest.raises(FramingError, match="exceeds the cap"):
        FrameDecoder().feed(header(length=0xFFFFFFFF))


def test_length_exactly_at_the_cap_is_accepted_and_waits() -> None:
    decoder = FrameDecoder(max_payload=1024)
    assert decoder.feed(header(length=1024)) == []
    assert not decoder.at_boundary()


@pytest.mark.parametrize("magic", [0, 0x5655, 0xFFFF, 0x5557])
def test_bad_magic_rejected(magic: int) -> None:
    with pytest.raises(FramingError, match="bad magic"):
        FrameDecoder().feed(header(magic=magic))


@pytest.mark.parametrize("ftype", [0, 7, 8, 0x80, 0xFF])
def test_unknown_type_rejected(ftype: int) -> None:
    with pytest.raises(FramingError, match=f"unknown frame type {ftype}"):
        FrameDecoder().feed(header(ftype=ftype))


@pytest.mark.parametrize("flags", [0x02, 0x80, 0xFF, 0x03])
def test_unknown_flags_rejected(flags: int) -> None:
    with pytest.raises(FramingError, match="unknown frame flags"):
        FrameDecoder().feed(header(flags=flags))


def test_bad_header_after_good_frames_in_the_same_chunk_is_rejected() -> None:
    with pytest.raises(FramingError, match="bad magic"):
        FrameDecoder().feed(encode(framing.RESPONSE, 1, b"{}") + b"GARBAGE GARBAGE")


def test_bad_header_is_rejected_as_soon_as_its_12_bytes_are_in() -> None:
    decoder = FrameDecoder()
    bad = header(ftype=42)
    assert decoder.feed(bad[:-1]) == []
    with pytest.raises(FramingError):
        decoder.feed(bad[-1:])


# -- encode rejects what it cannot frame -----------------------------------------------------------


def test_encode_rejects_oversize_payload() -> None:
    with pytest.raises(FramingError, match="exceeds the cap"):
        encode(framing.DATA, 1, b"x" * (framing.MAX_PAYLOAD + 1))
    with pytest.raises(FramingError, match="11 bytes exceeds the cap of 10"):
        encode(framing.DATA, 1, b"x" * 11, max_payload=10)
    assert len(encode(framing.DATA, 1, b"x" * 10, max_payload=10)) == framing.HEADER_SIZE + 10


@pytest.mark.parametrize("fid", [-1, 0x1_0000_0000, 2**64])
def test_encode_rejects_bad_ids(fid: int) -> None:
    with pytest.raises(FramingError, match="out of range"):
        encode(framing.REQUEST, fid)


@pytest.mark.parametrize("ftype", [0, 7, 255])
def test_encode_rejects_unknown_types(ftype: int) -> None:
    with pytest.raises(FramingError, match="unknown frame type"):
        encode(ftype, 1)


@pytest.mark.parametrize("flags", [0x02, 0x100])
def test_encode_rejects_flags_the_decoder_would_reject(flags: int) -> None:
    with pytest.raises(FramingError):
        encode(framing.RESPONSE, 1, b"", flags)


# -- fuzz ------------------------------------------------------------------------------------------


def _fuzz_input(rng: random.Random) -> bytes:
    """Random bytes, often starting with a plausible header so the deeper checks get exercised too."""
    kind = rng.randrange(4)
    body = rng.randbytes(rng.randrange(0, 200))
    if kind == 0:
        return body
    ftype = rng.choice([*ALL_TYPES, 0, 9, rng.randrange(256)])
    flags = rng.choice([0, framing.FLAG_ERROR, rng.randrange(256)])
    length = rng.choice([0, rng.randrange(64), rng.randrange(1 << 32)])
    magic = framing.MAGIC if kind != 3 else rng.randrange(1 << 16)
    return framing.HEADER.pack(magic, ftype, flags, rng.randrange(1 << 32), length) + body


def test_fuzz_random_bytes_yield_frames_or_framing_error_with_bounded_buffer() -> None:
    rng = random.Random(0x5556)
    cap = 64
    outcomes = {"frames": 0, "error": 0, "waiting": 0}
    for _ in range(2000):
        data = _fuzz_input(rng)
        decoder = FrameDecoder(max_payload=cap)
        pos = 0
        try:
            while pos < len(data):
                step = rng.randrange(1, 40)
                frames = decoder.feed(data[pos:pos + step])
                pos += step
                for f in frames:
                    assert f.type in framing.TYPE_NAMES
                    assert not f.flags & ~framing.KNOWN_FLAGS
                    assert len(f.payload) <= cap
                    outcomes["frames"] += 1
                assert decoder.buffered <= framing.HEADER_SIZE + cap
        except FramingError:
            outcomes["error"] += 1
        else:
            if not decoder.at_boundary():
                outcomes["waiting"] += 1
    # The inputs reached every branch: whole frames, rejections, and truncation.
    assert all(outcomes.values()), outcomes


def test_fuzz_mutated_valid_streams() -> None:
    """Flip bytes in a valid stream: every outcome is frames or FramingError, never another exception."""
    rng = random.Random(7)
    good = b"".join(encode(rng.choice(ALL_TYPES), i, rng.randbytes(rng.randrange(30))) for i in range(20))
    errors = 0
    for _ in range(2000):
        data = bytearray(good)
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        decoder = FrameDecoder(max_payload=256)
        try:
            frames = decoder.feed(bytes(data))
        except FramingError:
            errors += 1
            continue
        assert all(len(f.payload) <= 256 for f in frames)
        assert decoder.buffered <= framing.HEADER_SIZE + 256
    assert errors > 0


def test_frames_fed_from_a_reused_read_buffer_keep_their_own_bytes() -> None:
    """The guest agent feeds views of one read buffer it overwrites on the next read."""
    scratch = bytearray(64)
    view = memoryview(scratch)
    decoder = FrameDecoder()
    whole = encode(framing.REQUEST, 1, b"first")
    scratch[:len(whole)] = whole
    [first] = decoder.feed(view[:len(whole)])  # one whole frame: the fast path
    split = encode(framing.REQUEST, 2, b"second")
    scratch[:5] = split[:5]
    assert decoder.feed(view[:5]) == []  # a partial header is kept, copied
    scratch[:len(split) - 5] = split[5:]
    scratch[len(split) - 5:len(split) + 7] = whole[:12]
    [second] = decoder.feed(view[:len(split) + 7])
    scratch[:] = b"\0" * 64
    assert (first.payload, second.payload) == (b"first", b"second")
    assert decoder.buffered == 12
