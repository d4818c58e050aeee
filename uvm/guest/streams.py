"""Guest side of stdio streams with credit-based flow control (stdlib only).

An ``OutStream`` relays a process's stdout/stderr (a pipe, or a pty master) to the host as DATA
frames, never more than the host's credit: with no credit left the fd is taken out of the poller,
so the process blocks on its own pipe while every other stream and control call goes on. An
``InStream`` buffers what the host sends for stdin (at most the window it granted), writes it when
the fd is writable and gives the credit back; CLOSE from the host ends stdin once the buffer is
written.
"""

from __future__ import annotations

import errno
import os
import struct

from schemas import agent as proto
from schemas import framing

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from uvm.guest.services import AgentServices

CREDIT = struct.Struct(">I")
EV_READ = 0x001  # select.EPOLLIN
EV_WRITE = 0x004  # select.EPOLLOUT


class OutStream:
    """fd -> host. ``on_end`` is called once, when EOF was sent or the host stopped reading."""

    def __init__(self, agent: AgentServices, sid: int, fd: int, on_end: Callable[[], None], owns_fd: bool = True,
                 pipe: bool = False) -> None:
        self.agent = agent
        self.sid = sid
        self.fd = fd
        self.owns_fd = owns_fd
        self.pipe = pipe  # the read end of a pipe: its data can be spliced to the port
        self.credit = proto.OUTPUT_WINDOW
        self.registered = False
        self.ended = False
        self.on_end = on_end
        os.set_blocking(fd, False)
        self._update()

    def _update(self) -> None:
        want = not self.ended and self.credit > 0
        if want and not self.registered:
            self.agent.poller.register(self.fd, EV_READ, self.on_readable)
            self.registered = True
        elif not want and self.registered:
            self.agent.poller.unregister(self.fd)
            self.registered = False

    def on_readable(self, fd: int, mask: int) -> None:
        if self.pipe and self.agent.splice:
            try:
                n = self.agent.send_from_pipe(framing.DATA, self.sid, self.fd, min(self.credit, proto.OUTPUT_CHUNK))
            except BlockingIOError:
                return
            except OSError as e:
                if self.agent.splice:  # a read error ends the stream, as below ("cannot splice": the copy below)
                    self.agent.log(f"stream {self.sid}: splice: {e}")
                    self._sent(0)
                    return
            else:
                self._sent(n)
                return
        buf = self.agent.scratch[:min(self.credit, proto.OUTPUT_CHUNK)]
        try:
            n = os.readv(self.fd, [buf])
        except BlockingIOError:
            return
        except OSError as e:
            if e.errno != errno.EIO:  # EIO: a pty whose last slave closed, i.e. EOF
                self.agent.log(f"stream {self.sid}: read: {e}")
            n = 0
        if n:
            self.agent.send_frame(framing.DATA, self.sid, buf[:n])  # written (or copied) before the next read
        self._sent(n)

    def _sent(self, n: int) -> None:
        """n bytes went to the host; none: EOF, which the host gets as CLOSE."""
        if not n:
            self.agent.send_frame(framing.CLOSE, self.sid, b"")
            self.end()
            return
        self.credit -= n
        self._update()

    def add_credit(self, n: int) -> None:
        self.credit = min(self.credit + n, 1 << 30)
        self._update()

    def end(self) -> None:
        """Stop relaying (EOF sent, or the host closed its end); idempotent."""
        if self.ended:
            return
        self.ended = True
        self._update()
        if self.owns_fd:
            os.close(self.fd)
        self.agent.streams.pop(self.sid, None)
        self.on_end()


class InStream:
    """host -> fd (stdin). A pty's stdin shares the master fd with its OutStream (owns_fd False)."""

    def __init__(self, agent: AgentServices, sid: int, fd: int, owns_fd: bool = True, eof_byte: bytes = b"") -> None:
        self.agent = agent
        self.sid = sid
        self.fd = fd
        self.owns_fd = owns_fd
        self.eof_byte = eof_byte  # on a tty, EOF is ^D written to the master
        self.buf = bytearray()
        self.from_host = 0  # bytes of buf that the host sent: only those are credited (not the ^D)
        self.closing = False
        self.closed = False
        self.registered = False
        if owns_fd:
            os.set_blocking(fd, False)

    def on_data(self, data: bytes) -> str | None:
        """Queue host data; returns a protocol violation description, if any."""
        if self.closing or self.closed:
            return None  # a race with the process's end: drop quietly
        if len(self.buf) + len(data) > proto.INPUT_WINDOW:
            return f"stdin stream {self.sid}: host sent more than its credit"
        self.buf += data
        self.from_host += len(data)
        self._flush()
        return None

    def on_close(self) -> None:
        self.closing = True
        if self.eof_byte and not self.closed:
            self.buf += self.eof_byte
        self._flush()

    def on_writable(self, fd: int, mask: int) -> None:
        self._flush()

    def _flush(self) -> None:
        if self.closed:
            return
        written = 0
        while self.buf:
            try:
                n = os.write(self.fd, self.buf[:proto.INPUT_CHUNK])
            except BlockingIOError:
                break
            except OSError:  # EPIPE: the process closed its stdin; what is left is dropped
                written += len(self.buf)
                self.buf.clear()
                self.closing = True
                break
            del self.buf[:n]
            written += n
        credit = min(written, self.from_host)  # the host's bytes come first in buf, the ^D after them
        if credit:
            self.from_host -= credit
            self.agent.send_frame(framing.CREDIT, self.sid, CREDIT.pack(credit))
        if self.buf and not self.owns_fd:
            self.agent.stalled.add(self)  # a pty master is polled for reading already: retry on a timer
        elif self.buf and not self.registered:
            self.agent.poller.register(self.fd, EV_WRITE, self.on_writable)
            self.registered = True
        elif not self.buf and self.registered:
            self.agent.poller.unregister(self.fd)
            self.registered = False
        if self.closing and not self.buf:
            self.shut()

    def shut(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.registered:
            self.agent.poller.unregister(self.fd)
            self.registered = False
        if self.owns_fd:
            os.close(self.fd)
        self.agent.streams.pop(self.sid, None)
        self.agent.stalled.discard(self)
