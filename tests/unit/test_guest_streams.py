"""The agent's spliced stream frames (Agent.send_from_pipe), run on the host: a socket pair stands for
the virtio-serial port, a pipe for a process's stdout. Whatever the port takes or refuses, the bytes
that reach it followed by what is queued form exactly one frame with the pipe's bytes, in order, and
the agent's relay pipe is left empty (virtio-serial's splice needs that, see send_from_pipe)."""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterator

import pytest

from schemas import framing
from uvm.guest.agent import Agent
from uvm.guest.procs import F_SETPIPE_SZ


class PortOnly:
    """The part of the agent send_from_pipe uses: the port, the write queue, the read buffer, the relay pipe."""

    send_from_pipe = Agent.send_from_pipe

    def __init__(self, port: int) -> None:
        self.port = port
        self.wbuf = bytearray()
        self.splice = True
        self.connected = True
        self.scratch = memoryview(bytearray(framing.MAX_PAYLOAD))
        self.relay: tuple[int, int] | None = None

    def relay_is_empty(self) -> bool:
        assert self.relay is not None
        try:
            os.read(self.relay[0], 1)
        except BlockingIOError:
            return True
        return False

    def close(self) -> None:
        for fd in self.relay or ():
            os.close(fd)

    def flush(self) -> None:  # the real one writes when the port is writable; here the test looks at wbuf
        pass


@pytest.fixture
def port() -> Iterator[tuple[PortOnly, socket.socket]]:
    agent_end, host_end = socket.socketpair()
    agent_end.setblocking(False)
    agent = PortOnly(agent_end.fileno())
    try:
        yield agent, host_end
    finally:
        agent.close()
        agent_end.close()
        host_end.close()


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    os.set_blocking(r, False)
    try:
        yield r, w
    finally:
        os.close(r)
        os.close(w)


def fill(r: int, w: int, n: int) -> bytes:
    """n random bytes written into the pipe (r, w)."""
    data = os.urandom(n)
    assert os.write(w, data) == n  # within the pipe's 64 KiB
    return data


def received(host: socket.socket) -> bytes:
    host.setblocking(False)
    out = bytearray()
    while True:
        try:
            chunk = host.recv(1 << 20)
        except BlockingIOError:
            return bytes(out)
        out += chunk


def one_frame(stream: bytes) -> framing.Frame:
    frames = framing.FrameDecoder().feed(stream)
    assert len(frames) == 1, frames
    return frames[0]


def clog(agent_end: int) -> None:
    """Fill the port until it takes nothing more."""
    junk = b"j" * 65536
    while True:
        try:
            os.write(agent_end, junk)
        except BlockingIOError:
            return


def test_a_port_with_room_gets_header_and_payload_with_nothing_queued(port: tuple[PortOnly, socket.socket],
                                                                      pipe: tuple[int, int]) -> None:
    agent, host = port
    data = fill(*pipe, 50_000)
    assert agent.send_from_pipe(framing.DATA, 7, pipe[0], 1 << 20) == len(data)
    assert not agent.wbuf and agent.relay_is_empty()
    frame = one_frame(received(host))
    assert (frame.type, frame.id, frame.payload) == (framing.DATA, 7, data)
    with pytest.raises(BlockingIOError):
        os.read(pipe[0], 1)  # the pipe was emptied


def test_a_full_port_gets_the_frame_queued_whole(port: tuple[PortOnly, socket.socket], pipe: tuple[int, int]) -> None:
    agent, host = port
    clog(agent.port)
    data = fill(*pipe, 40_000)
    assert agent.send_from_pipe(framing.DATA, 3, pipe[0], 1 << 20) == len(data)
    assert agent.relay_is_empty()
    assert len(agent.wbuf) == framing.HEADER_SIZE + len(data)  # nothing went out: all of it is queued
    stream = received(host) + bytes(agent.wbuf)
    frame = one_frame(stream[stream.index(framing.HEADER.pack(framing.MAGIC, framing.DATA, 0, 3, len(data))):])
    assert frame.payload == data


def test_a_port_with_room_for_part_of_the_payload_gets_the_rest_queued(port: tuple[PortOnly, socket.socket],
                                                                       pipe: tuple[int, int]) -> None:
    agent, host = port
    fcntl.fcntl(pipe[0], F_SETPIPE_SZ, 1 << 20)  # as the agent's stdout pipes
    data = os.urandom(300_000)
    assert os.write(pipe[1], data) == len(data)
    clog(agent.port)
    host.setblocking(True)
    head = bytearray()
    while len(head) < 65536:  # room for one 64 KiB socket buffer: the header and part of the payload
        head += host.recv(65536 - len(head))
    assert agent.send_from_pipe(framing.DATA, 9, pipe[0], len(data)) == len(data)
    assert agent.relay_is_empty()
    taken = received(host)
    assert 0 < len(agent.wbuf) < len(data)  # part went to the port, the rest was queued
    stream = bytes(head) + taken + bytes(agent.wbuf)
    frame = one_frame(stream[stream.index(framing.HEADER.pack(framing.MAGIC, framing.DATA, 0, 9, len(data))):])
    assert frame.payload == data


def test_queued_frames_keep_their_order(port: tuple[PortOnly, socket.socket], pipe: tuple[int, int]) -> None:
    """With something queued already, the new frame goes behind it, copied (never spliced past it)."""
    agent, host = port
    agent.wbuf += framing.encode(framing.DATA, 1, b"first")
    data = fill(*pipe, 1000)
    assert agent.send_from_pipe(framing.DATA, 1, pipe[0], 1 << 20) == len(data)
    assert received(host) == b""
    frames = framing.FrameDecoder().feed(bytes(agent.wbuf))
    assert [f.payload for f in frames] == [b"first", data]


def test_no_more_than_the_limit_is_taken(port: tuple[PortOnly, socket.socket], pipe: tuple[int, int]) -> None:
    agent, host = port
    data = fill(*pipe, 50_000)
    assert agent.send_from_pipe(framing.DATA, 2, pipe[0], 30_000) == 30_000
    assert one_frame(received(host)).payload == data[:30_000]
    assert os.read(pipe[0], 1 << 20) == data[30_000:]  # the rest waits in the process's pipe


def test_an_empty_pipe_is_not_a_frame_and_its_end_is_eof(port: tuple[PortOnly, socket.socket]) -> None:
    agent, host = port
    r, w = os.pipe()
    os.set_blocking(r, False)
    try:
        with pytest.raises(BlockingIOError):
            agent.send_from_pipe(framing.DATA, 2, r, 1 << 20)
        os.close(w)  # the writer goes away
        assert agent.send_from_pipe(framing.DATA, 2, r, 1 << 20) == 0
    finally:
        os.close(r)
    assert received(host) == b"" and not agent.wbuf
