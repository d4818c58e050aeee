"""The uvmshim guest agent: PID 1 of the UVM, serving the agent protocol on a virtio-serial port.

One thread, one epoll loop: the port, the pipes of processes and helpers, cgroup event files and
a SIGCHLD wakeup pipe are all non-blocking file descriptors in it; nothing blocks the loop for
long, so a process whose output nobody reads never stalls control calls or other processes.

Start-up is kept lean on purpose (under emulation every newly executed code page costs): no
``json``, ``signal``, ``selectors``, ``typing`` or ``subprocess`` (each drags in ``re``, ``enum``
or ``collections``); what only some requests need is imported when first used.
"""

from __future__ import annotations

import errno
import os
import select
import time

from schemas import agent as proto
from schemas import framing, wirejson
from uvm.guest import procs
from uvm.guest.errors import RequestError, spawn_failed
from uvm.guest.procs import DEFAULT_PATH, set_pipe_size

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs start-up time in the guest
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from uvm.guest.runtime import Runtime
    from uvm.guest.streams import InStream, OutStream

    Callback = Callable[[int, int], None]
    import signal
else:
    import _signal as signal  # the C module: `signal` imports enum

EV_READ = select.EPOLLIN
EV_WRITE = select.EPOLLOUT
EV_INPUT = EV_READ | select.EPOLLHUP | select.EPOLLERR
PORT_READ = 1 << 16
SMALL_FRAME = 4096  # payloads up to this size are sent joined to their header
HEADER_SIZE = framing.HEADER_SIZE
MAGIC = framing.MAGIC
REQUEST = framing.REQUEST
RESPONSE = framing.RESPONSE
MAX_CONTROL_PAYLOAD = proto.MAX_CONTROL_PAYLOAD
MAX_PAYLOAD = framing.MAX_PAYLOAD
pack_header = framing.HEADER.pack
loads = wirejson.loads
dumps = wirejson.dumps
SYSFS_PORTS = "/sys/class/virtio-ports"
PORT_WAIT_S = 10.0
RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2])
RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07)


def log(msg: str) -> None:
    """To the console (the host keeps its tail for error reports)."""
    try:
        os.write(2, f"uvm-agent: {msg}\n".encode())
    except OSError:
        pass


def find_port(name: str, timeout: float) -> str:
    """/dev path of the virtio-serial port called name (port names arrive asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            for entry in os.listdir(SYSFS_PORTS):
                try:
                    with open(f"{SYSFS_PORTS}/{entry}/name") as f:
                        if f.read().strip() == name:
                            return f"/dev/{entry}"
                except OSError:
                    continue
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise OSError(f"virtio-serial port {name!r} did not appear in {timeout:.0f}s")
        time.sleep(0.005)


class Poller:
    """epoll with a callback per fd (what selectors gives, without importing collections)."""

    def __init__(self) -> None:
        self.epoll = select.epoll()
        self.callbacks: dict[int, Callback] = {}

    def register(self, fd: int, events: int, callback: Callback) -> None:
        self.epoll.register(fd, events)
        self.callbacks[fd] = callback

    def modify(self, fd: int, events: int, callback: Callback) -> None:
        self.epoll.modify(fd, events)
        self.callbacks[fd] = callback

    def unregister(self, fd: int) -> None:
        self.epoll.unregister(fd)
        del self.callbacks[fd]

    def poll(self, timeout: float | None) -> list[tuple[int, int]]:
        return self.epoll.poll(-1 if timeout is None else timeout)


class CapturedCommand:
    """A process whose output the agent collects: a RUN request, or a helper such as crun."""

    def __init__(self, pid: int, done: Callable[[CapturedCommand], None], deadline: float | None,
                 limit: int) -> None:
        self.pid = pid
        self.done = done
        self.deadline = deadline
        self.limit = limit
        self.status: int | None = None
        self.out = {1: bytearray(), 2: bytearray()}
        self.open_fds: dict[int, int] = {}  # fd -> 1|2
        self.stdin_fd: int | None = None
        self.stdin_data = b""
        self.dropped = 0
        self.timed_out = False


class Agent:
    def __init__(self, port_path: str | None = None, port_fd: int | None = None) -> None:
        """Serve on the virtio-serial port at port_path, or on an open fd (tests: a socket pair)."""
        self.log = log
        if port_fd is not None:
            os.set_blocking(port_fd, False)
            os.set_inheritable(port_fd, False)  # children get their stdio and nothing else
            self.port = port_fd
        else:
            assert port_path is not None
            self.port = os.open(port_path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self.poller = Poller()
        self.decoder = framing.FrameDecoder()
        self.wbuf = bytearray()
        self.splice = True  # stream data goes from a process's pipe to the port by splice(2)
        self.relay: tuple[int, int] | None = None  # the pipe it goes through (see send_from_pipe)
        self.boot_uptimes: dict[str, float] | None = None  # reported in hello (see boot_uptimes)
        self.port_events = EV_READ
        self.poller.register(self.port, self.port_events, self.on_port)
        # One preallocated read buffer: reading into it avoids allocating (under emulation, mmap'ing)
        # a large bytes object for every read of the port or of a process's pipe.
        self.scratch = memoryview(bytearray(framing.MAX_PAYLOAD))
        self.timed_commands = 0  # captured commands with a deadline
        self.connected = True
        self.commands: dict[int, CapturedCommand] = {}  # pid -> captured command
        self.fd_owner: dict[int, CapturedCommand] = {}
        self.streams: dict[int, OutStream | InStream] = {}
        self.stalled: set[InStream] = set()  # stdin data waiting for a pty master to drain
        self._runtime: Runtime | None = None
        self.shutting_down = False
        self.profiler: Any = None
        sig_r, sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(sig_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        self.poller.register(sig_r, EV_READ, self.on_signal)
        self.handlers: dict[str, Callable[[int, dict[str, Any]], dict[str, Any] | None]] = {
            proto.HELLO: self.do_hello,
            proto.PING: self.do_ping,
            proto.SHUTDOWN: self.do_shutdown,
            proto.RUN: self.do_run,
            proto.EXEC: self.do_exec,
            proto.RESUME_CLONE: self.do_resume_clone,
        }
        for method, name in ((proto.SIGNAL, "signal_process"), (proto.RESIZE, "resize_console"),
                             (proto.CREATE, "create_container"), (proto.START, "start_container"),
                             (proto.KILL, "kill_container"), (proto.PAUSE, "pause_container"),
                             (proto.RESUME, "resume_container"), (proto.STATE, "container_state"),
                             (proto.LIST, "list_containers"), (proto.PROCESSES, "container_processes"),
                             (proto.UPDATE, "update_container"), (proto.STATS, "container_stats"),
                             (proto.DELETE, "delete_container"), (proto.SCSI_MOUNT, "scsi_mount"),
                             (proto.SCSI_UNMOUNT, "scsi_unmount"), (proto.SCSI_UNPLUG, "scsi_unplug"),
                             (proto.CONFIGURE_NETWORK, "configure_network"),
                             (proto.PREPARE_TEMPLATE, "prepare_template")):
            self.handlers[method] = self._runtime_handler(name)

    @property
    def runtime(self) -> Runtime:
        """The process/container runtime, imported on first use (not needed for hello)."""
        if self._runtime is None:
            from uvm.guest.runtime import Runtime

            self._runtime = Runtime(self)
        return self._runtime

    def _runtime_handler(self, name: str) -> Callable[[int, dict[str, Any]], dict[str, Any] | None]:
        def handler(req_id: int, params: dict[str, Any]) -> dict[str, Any] | None:
            result: dict[str, Any] | None = getattr(self.runtime, name)(req_id, params)
            return result

        return handler

    # -- port I/O ------------------------------------------------------------------------------

    def send_frame(self, ftype: int, fid: int, payload: bytes | memoryview, flags: int = 0) -> None:
        """Write a frame to the port now if it can take it (no copy), else queue it."""
        size = len(payload)
        if size <= SMALL_FRAME and not self.wbuf and self.connected:
            # A small frame (every response) is one buffer and one write: the fewest interpreted
            # steps, which is what a request's round trip costs under emulation.
            frame = pack_header(MAGIC, ftype, flags, fid, size) + payload
            try:
                n = os.write(self.port, frame)
            except OSError as e:  # EAGAIN, or the host side not connected: keep the bytes, retry later
                if e.errno != errno.EAGAIN:
                    log(f"write to port: {e}")
                n = 0
            if n != len(frame):
                self.wbuf += frame[n:]
                self.flush()
            return
        if size > MAX_PAYLOAD:
            raise ValueError(f"frame payload of {size} bytes exceeds the cap")
        header = pack_header(MAGIC, ftype, flags, fid, size)
        if self.wbuf or not self.connected:
            self.wbuf += header
            self.wbuf += payload
            self.flush()
            return
        try:
            n = os.writev(self.port, [header, payload])  # a large payload is not copied
        except BlockingIOError:
            n = 0
        except OSError as e:  # host side not connected: keep the bytes, retry later
            log(f"write to port: {e}")
            n = 0
        if n == HEADER_SIZE + size:
            return
        if n < len(header):
            self.wbuf += header[n:]
            self.wbuf += payload
            self.flush()
            return
        rest = memoryview(payload)[n - len(header):]
        # virtio-serial takes at most 32 KiB per write: go on writing from the caller's buffer while the
        # port takes it, and copy into the queue only what it does not take now.
        while rest:
            try:
                n = os.write(self.port, rest)
            except OSError:  # EAGAIN, or the host side gone: queue the rest
                break
            rest = rest[n:]
        if rest:
            self.wbuf += rest
            self.flush()

    def send_from_pipe(self, ftype: int, fid: int, src: int, limit: int) -> int:
        """Send up to limit bytes waiting in the pipe src as one frame; return how many (0: EOF).

        Raises BlockingIOError when nothing waits, OSError when splice(2) cannot serve (then
        self.splice is False and the caller copies). The kernel moves the bytes (no copy through the
        interpreter, and not virtio-serial's 32 KiB per write): from src into the agent's own pipe,
        then from there to the port. The own pipe is always emptied whole, because virtio-serial's
        splice makes a descriptor for every buffer the pipe holds, used or not (a pipe left part-full
        hands the device zero-sized buffers: QEMU resets the guest). What the port does not take now
        is read from the own pipe into the queue, behind the header, so frames never interleave.
        """
        if self.relay is None:
            self.relay = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            set_pipe_size(self.relay[0])
        relay_r, relay_w = self.relay
        try:
            n = os.splice(src, relay_w, limit, flags=os.SPLICE_F_NONBLOCK)
        except OSError as e:  # BlockingIOError (EAGAIN) included: re-raised as it is
            if e.errno == errno.EINVAL:
                self.splice = False
            raise
        if not n:
            return 0
        header = pack_header(MAGIC, ftype, 0, fid, n)
        sent = -1  # bytes of the payload written; -1: not all of the header
        written = 0  # of the header
        if not self.wbuf and self.connected:
            try:
                written = os.write(self.port, header)
            except OSError:
                pass
            if written == len(header):
                sent = 0
            while 0 <= sent < n:
                try:
                    moved = os.splice(relay_r, self.port, n - sent)
                except OSError as e:  # EAGAIN (the port is full), or no splice_write: copy the rest
                    if e.errno == errno.EINVAL:
                        self.splice = False
                    break
                if not moved:
                    break
                sent += moved
            if sent == n:
                return n
        if sent < 0:
            self.wbuf += header[written:]
            sent = 0
        while sent < n:
            try:
                got = os.readv(relay_r, [self.scratch[:n - sent]])
            except OSError:
                got = 0
            if not got:  # only if the kernel dropped what it took (it cannot tell us): keep the frames in step
                log(f"stream {fid}: {n - sent} bytes lost between the pipe and the port")
                self.wbuf += bytes(n - sent)
                break
            self.wbuf += self.scratch[:got]
            sent += got
        self.flush()
        return n

    def reply(self, req_id: int, obj: object) -> None:
        self.send_frame(RESPONSE, req_id, dumps(obj))

    def reply_error(self, req_id: int, code: str, message: str) -> None:
        body = {"code": code, "message": message[:proto.MAX_ERROR_MESSAGE]}
        self.send_frame(framing.RESPONSE, req_id, wirejson.dumps(body), framing.FLAG_ERROR)

    def notify(self, obj: object) -> None:
        self.send_frame(framing.NOTIFY, 0, wirejson.dumps(obj))

    def flush(self) -> None:
        while self.wbuf:
            try:
                n = os.write(self.port, self.wbuf)
            except BlockingIOError:
                break
            except OSError as e:  # host side not connected: keep the bytes, retry later
                log(f"write to port: {e}")
                break
            del self.wbuf[:n]
        want = EV_READ | (EV_WRITE if self.wbuf else 0)
        if want != self.port_events and self.connected:
            self.port_events = want
            self.poller.modify(self.port, want, self.on_port)

    def on_port(self, fd: int, mask: int) -> None:
        if mask & EV_WRITE:
            self.flush()
        if not mask & EV_INPUT:
            return
        try:
            # A virtio-serial read returns one guest buffer (a page) at most: a read of this size
            # costs less than a readv into the 1 MiB scratch buffer.
            data = os.read(self.port, PORT_READ)
        except BlockingIOError:
            return
        except OSError as e:
            data = b""
            log(f"read from port: {e}")
        if not data:
            # The host end is not connected (virtio-serial reports HUP until it is): stop polling
            # the port and look again on a timer; the host reconnects and repeats its hello.
            self.poller.unregister(self.port)
            self.connected = False
            self.decoder = framing.FrameDecoder()
            return
        try:
            frames = self.decoder.feed(data)  # a whole frame per read is its fast path
        except framing.FramingError as e:
            log(f"bad frame from host, discarding input: {e}")
            self.decoder = framing.FrameDecoder()
            return
        for frame in frames:
            if frame.type == REQUEST:
                self.on_request(frame.id, frame.payload)
            elif frame.type in (framing.DATA, framing.CREDIT, framing.CLOSE):
                self.on_stream_frame(frame)
            else:
                log(f"ignoring unexpected {framing.TYPE_NAMES[frame.type]} frame from host")

    def on_stream_frame(self, frame: framing.Frame) -> None:
        from uvm.guest.streams import CREDIT, InStream

        stream = self.streams.get(frame.id)
        if stream is None:
            return  # the stream ended meanwhile (a race, not an error)
        if isinstance(stream, InStream):
            if frame.type == framing.DATA:
                problem = stream.on_data(frame.payload)
                if problem:
                    log(problem)
            elif frame.type == framing.CLOSE:
                stream.on_close()
            return
        if frame.type == framing.CREDIT and len(frame.payload) == CREDIT.size:
            stream.add_credit(CREDIT.unpack(frame.payload)[0])
        elif frame.type == framing.CLOSE:
            stream.end()  # the host stopped reading: the process gets EPIPE from now on

    def check_reconnect(self) -> None:
        p = select.poll()
        p.register(self.port, select.POLLIN | select.POLLOUT)
        for _, ev in p.poll(0):
            if not ev & select.POLLHUP:
                self.connected = True
                self.port_events = EV_READ
                self.poller.register(self.port, self.port_events, self.on_port)
                self.flush()

    # -- requests ------------------------------------------------------------------------------

    def on_request(self, req_id: int, payload: bytes) -> None:
        try:
            if len(payload) > MAX_CONTROL_PAYLOAD:
                raise RequestError(proto.E_INVALID, "request too large")
            msg = loads(payload)
            method = msg.get("method") if type(msg) is dict else None
            if type(method) is not str:
                raise RequestError(proto.E_INVALID, "request is not {method, params}")
            params = msg.get("params")
            if params is None:
                params = {}
            elif type(params) is not dict:
                raise RequestError(proto.E_INVALID, "params must be an object")
            handler = self.handlers.get(method)
            if handler is None:
                raise RequestError(proto.E_UNSUPPORTED, f"unknown method {method!r}")
            result = handler(req_id, params)
            if result is not None:
                self.send_frame(RESPONSE, req_id, dumps(result))
        except RequestError as e:
            self.reply_error(req_id, e.code, e.message)
        except (ValueError, TypeError, RecursionError) as e:
            self.reply_error(req_id, proto.E_INVALID, f"bad request: {e}")
        except Exception as e:  # a bug in a handler must not take PID 1 down
            log(f"internal error: {e!r}")
            self.reply_error(req_id, proto.E_INTERNAL, repr(e)[:1000])

    def do_hello(self, req_id: int, params: dict[str, Any]) -> dict[str, Any]:
        host_version = params.get("version")
        if not isinstance(host_version, int) or host_version < 1:
            raise RequestError(proto.E_INVALID, "hello needs the host's protocol version")
        fd = os.open("/proc/uptime", os.O_RDONLY | os.O_CLOEXEC)  # not open(): fewer code paths (a clone's
        try:                                                      # first request runs them untranslated)
            uptime = float(os.read(fd, 64).split()[0])
        finally:
            os.close(fd)
        return {
            "version": min(host_version, proto.PROTOCOL_VERSION),
            "capabilities": list(proto.CAPABILITIES),
            "agent": "uvmshim-agent",
            "kernel": os.uname().release,
            "uptime": uptime,
            **({"boot": self.boot_uptimes} if self.boot_uptimes else {}),
        }

    def do_ping(self, req_id: int, params: dict[str, Any]) -> dict[str, Any]:
        seq = params.get("seq", 0)
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise RequestError(proto.E_INVALID, "seq must be a non-negative integer")
        return {"seq": seq}

    def do_resume_clone(self, req_id: int, params: dict[str, Any]) -> dict[str, Any]:
        """A clone's hello: make a VM restored from a template its own machine (fresh randomness, the
        host's wall clock, its own name; the kernel's random state was copied from the template with
        its RAM), then answer as hello does."""
        import binascii  # C modules, already loaded in a template (prepare_template)
        import fcntl
        import struct

        hello = self.do_hello(req_id, params)  # checks the version before anything changes
        vm_id, time_ns, entropy = params.get("vm_id"), params.get("time_ns"), params.get("entropy")
        if not isinstance(vm_id, str) or not 0 < len(vm_id) <= 64 or "/" in vm_id:
            raise RequestError(proto.E_INVALID, "vm_id must be a VM id")
        if not isinstance(time_ns, int) or isinstance(time_ns, bool) or time_ns <= 0:
            raise RequestError(proto.E_INVALID, "time_ns must be a positive integer")
        try:
            seed = binascii.a2b_base64(entropy) if isinstance(entropy, str) else b""
        except binascii.Error:
            seed = b""
        if not 32 <= len(seed) <= proto.MAX_ENTROPY:
            raise RequestError(proto.E_INVALID, f"entropy must be 32-{proto.MAX_ENTROPY} bytes of base64")
        try:
            fd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
            try:
                # RNDADDENTROPY credits the host's bytes, RNDRESEEDCRNG makes the generator use them
                # now (otherwise a clone keeps the template's stream until the next timed reseed).
                fcntl.ioctl(fd, RNDADDENTROPY, struct.pack("ii", len(seed) * 8, len(seed)) + seed)
                fcntl.ioctl(fd, RNDRESEEDCRNG)
            finally:
                os.close(fd)
            time.clock_settime_ns(time.CLOCK_REALTIME, time_ns)
            procs.write_file("/proc/sys/kernel/hostname", vm_id)  # sethostname without importing socket
        except OSError as e:
            raise RequestError(proto.E_INTERNAL, f"resume_clone: {e}") from None
        return hello

    def do_shutdown(self, req_id: int, params: dict[str, Any]) -> dict[str, Any]:
        if os.getpid() != 1:  # power_off kills every process and unmounts: only ever as the UVM's init
            raise RequestError(proto.E_UNSUPPORTED, "shutdown: the agent is not PID 1 (not running as a UVM's init)")
        self.shutting_down = True
        return {}

    def do_exec(self, req_id: int, params: dict[str, Any]) -> dict[str, Any] | None:
        if params.get("container") is None:
            return self.runtime.exec_in_uvm(req_id, params)
        self.runtime.exec_in_container(req_id, params)
        return None

    def do_run(self, req_id: int, params: dict[str, Any]) -> None:
        import base64

        argv = params.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise RequestError(proto.E_INVALID, "argv must be a non-empty list of strings")
        if len(argv) > proto.MAX_ARGV:
            raise RequestError(proto.E_INVALID, "argv too long")
        env = params.get("env") or {"PATH": DEFAULT_PATH, "HOME": "/root"}
        if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise RequestError(proto.E_INVALID, "env must map strings to strings")
        cwd = params.get("cwd") or "/"
        if not isinstance(cwd, str) or not cwd.startswith("/"):
            raise RequestError(proto.E_INVALID, "cwd must be an absolute path")
        timeout = params.get("timeout")
        if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
            raise RequestError(proto.E_INVALID, "timeout must be a positive number")
        stdin_b64 = params.get("stdin") or ""
        if not isinstance(stdin_b64, str):
            raise RequestError(proto.E_INVALID, "stdin must be base64 text")

        def finished(cmd: CapturedCommand) -> None:
            assert cmd.status is not None
            exit_status, sig = procs.decode_status(cmd.status)
            self.reply(req_id, {
                "exit_status": exit_status,
                "signal": sig,
                "stdout": base64.b64encode(cmd.out[1]).decode(),
                "stderr": base64.b64encode(cmd.out[2]).decode(),
                "truncated": cmd.dropped > 0,
                "timed_out": cmd.timed_out,
            })

        try:
            self.start_captured(argv, env, cwd, finished, stdin=base64.b64decode(stdin_b64),
                                timeout=timeout, limit=proto.MAX_RUN_OUTPUT)
        except procs.SpawnError as e:
            raise spawn_failed(e.errno, str(e)) from None

    # -- captured commands (RUN and helpers) ----------------------------------------------------

    def start_captured(self, argv: list[str], env: dict[str, str], cwd: str, done: Callable[[CapturedCommand], None],
                       stdin: bytes = b"", timeout: float | None = None, limit: int = 64 * 1024,
                       stdio: tuple[int, int, int] | None = None) -> CapturedCommand:
        """Spawn argv, collect its stdout/stderr (or give it stdio), call done once it exited and its
        output ended. Raises procs.SpawnError."""
        parent: list[tuple[int, int]] = []  # (fd, 1|2)
        in_w = None
        if stdio is None:
            in_r, in_w = os.pipe2(os.O_CLOEXEC)
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            child = (in_r, out_w, err_w)
            parent = [(out_r, 1), (err_r, 2)]
        else:
            child = stdio
        try:
            pid = procs.spawn(argv, env, cwd, *child)
        except procs.SpawnError:
            if stdio is None:
                for fd in (*child, in_w, *(fd for fd, _ in parent)):
                    os.close(fd)  # type: ignore[arg-type]
            raise
        if stdio is None:
            for fd in child:
                os.close(fd)
        cmd = CapturedCommand(pid, done, time.monotonic() + timeout if timeout else None, limit)
        self.commands[pid] = cmd
        if cmd.deadline is not None:
            self.timed_commands += 1
        for fd, which in parent:
            os.set_blocking(fd, False)
            cmd.open_fds[fd] = which
            self.fd_owner[fd] = cmd
            self.poller.register(fd, EV_READ, self.on_output)
        if in_w is not None:
            if stdin:
                os.set_blocking(in_w, False)
                cmd.stdin_fd, cmd.stdin_data = in_w, stdin
                self.fd_owner[in_w] = cmd
                self.poller.register(in_w, EV_WRITE, self.on_stdin)
            else:
                os.close(in_w)
        return cmd

    def run_helper(self, argv: list[str], done: Callable[[int, str], None],
                   stdio: tuple[int, int, int] | None = None) -> None:
        """Run a helper program (crun, mount, ...) without blocking the loop: done(status, output)."""
        def finished(cmd: CapturedCommand) -> None:
            assert cmd.status is not None
            code, sig = procs.decode_status(cmd.status)
            output = (cmd.out[2] + cmd.out[1]).decode(errors="replace")
            done(code if code is not None else 128 + (sig or 0), output)

        try:
            self.start_captured(argv, {"PATH": DEFAULT_PATH}, "/", finished, stdio=stdio)
        except procs.SpawnError as e:
            raise RequestError(proto.E_INTERNAL, f"cannot run {argv[0]}: {e}") from None

    def run_blocking(self, argv: list[str], timeout: float = 30.0) -> tuple[int, str]:
        """Run a short helper to completion, blocking the loop (one-time set-up steps only)."""
        r, w = os.pipe2(os.O_CLOEXEC)
        null = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        try:
            pid = procs.spawn(argv, {"PATH": DEFAULT_PATH}, "/", null, w, w)
        except procs.SpawnError as e:
            os.close(r)
            return 127, str(e)
        finally:
            os.close(w)
            os.close(null)
        out = bytearray()
        while True:
            chunk = os.read(r, 65536)
            if not chunk:
                break
            out += chunk[: max(0, 65536 - len(out))]
        os.close(r)
        _, status = os.waitpid(pid, 0)
        code, sig = procs.decode_status(status)
        return (code if code is not None else 128 + (sig or 0)), out.decode(errors="replace")

    def on_output(self, fd: int, mask: int) -> None:
        cmd = self.fd_owner[fd]
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        if data:
            buf = cmd.out[cmd.open_fds[fd]]
            room = max(0, cmd.limit - len(buf))
            buf += data[:room]
            cmd.dropped += max(0, len(data) - room)
            return
        self.poller.unregister(fd)
        os.close(fd)
        del cmd.open_fds[fd], self.fd_owner[fd]
        self.maybe_finish(cmd)

    def on_stdin(self, fd: int, mask: int) -> None:
        cmd = self.fd_owner[fd]
        try:
            n = os.write(fd, cmd.stdin_data[:65536])
            cmd.stdin_data = cmd.stdin_data[n:]
        except BlockingIOError:
            return
        except OSError:  # EPIPE: the process closed its stdin
            cmd.stdin_data = b""
        if not cmd.stdin_data:
            self.close_command_stdin(cmd)

    def close_command_stdin(self, cmd: CapturedCommand) -> None:
        if cmd.stdin_fd is not None:
            self.poller.unregister(cmd.stdin_fd)
            os.close(cmd.stdin_fd)
            del self.fd_owner[cmd.stdin_fd]
            cmd.stdin_fd = None

    def maybe_finish(self, cmd: CapturedCommand) -> None:
        if cmd.status is None or cmd.open_fds:
            return
        self.close_command_stdin(cmd)
        del self.commands[cmd.pid]
        if cmd.deadline is not None:
            self.timed_commands -= 1
        cmd.done(cmd)

    # -- children ------------------------------------------------------------------------------

    def on_signal(self, fd: int, mask: int) -> None:
        try:
            while os.read(fd, 512):
                pass
        except BlockingIOError:
            pass
        for pid, status in procs.reap():
            cmd = self.commands.get(pid)
            if cmd is not None:
                cmd.status = status
                self.maybe_finish(cmd)
            elif self._runtime is not None:
                self._runtime.on_reaped(pid, status)

    def has_timed_work(self) -> bool:
        return bool(not self.connected or self.stalled or self.timed_commands or (
            self._runtime is not None and (self._runtime.unreported or self._runtime.freezing)))

    def check_timers(self) -> None:
        now = time.monotonic()
        for cmd in list(self.commands.values()):
            if cmd.deadline is not None and now > cmd.deadline and cmd.status is None and not cmd.timed_out:
                cmd.timed_out = True
                try:
                    os.killpg(cmd.pid, signal.SIGKILL)
                except OSError:
                    pass
        for stream in list(self.stalled):
            self.stalled.discard(stream)
            stream.on_writable(stream.fd, 0)
        if self._runtime is not None:
            self._runtime.tick(now)

    def next_timeout(self) -> float:
        if self.stalled:
            return 0.01
        return 0.02 if not self.connected else 0.05

    # -- main loop -----------------------------------------------------------------------------

    def serve(self) -> None:
        poll = self.poller.epoll.poll
        callbacks = self.poller.callbacks
        while not self.shutting_down:
            timed = self.has_timed_work()
            for fd, mask in poll(self.next_timeout() if timed else -1):
                callback = callbacks.get(fd)
                if callback is not None:
                    callback(fd, mask)
            if timed:
                if not self.connected:
                    self.check_reconnect()
                self.check_timers()
        self.power_off()

    def power_off(self) -> None:
        """Graceful end: stop every process, sync, unmount, power off. Never returns."""
        log("shutdown requested: stopping processes, syncing, powering off")
        if self.profiler is not None:  # uvm.profile on the kernel command line: where the time went
            import io
            import pstats

            self.profiler.disable()
            buf = io.StringIO()
            stats = pstats.Stats(self.profiler, stream=buf)
            stats.sort_stats("tottime").print_stats(25)
            stats.sort_stats("cumulative").print_stats(40)
            log(buf.getvalue())
        os.set_blocking(self.port, True)
        try:
            self.flush()
        except OSError:
            pass
        stop_all_processes()
        os.sync()
        unmount_all()
        os.sync()
        os.execv("/usr/bin/busybox", ["poweroff", "-f"])


def stop_all_processes(grace: float = 1.0) -> None:
    try:
        os.kill(-1, signal.SIGTERM)
    except OSError:
        return  # no process left
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        procs.reap()
        try:
            os.kill(-1, 0)
        except OSError:
            return
        time.sleep(0.02)
    try:
        os.kill(-1, signal.SIGKILL)
    except OSError:
        pass
    procs.reap()


def unmount_all() -> None:
    """Unmount every non-essential mount, deepest first (disks written by containers get flushed)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    keep = {"/", "/proc", "/sys", "/dev"}
    with open("/proc/self/mounts") as f:
        points = [line.split()[1] for line in f]
    for mnt in reversed(points):
        if mnt in keep:
            continue
        if libc.umount2(mnt.encode(), 0) != 0:
            log(f"umount {mnt}: {os.strerror(ctypes.get_errno())}")


def boot_uptimes() -> dict[str, float] | None:
    """The guest's uptime when /init started and when it executed us (UVM_BOOT_UPTIMES, from /init), and
    now (Python started, the agent imported); None outside a UVM's /init."""
    try:
        init, exec_ = (float(x) for x in os.environ.pop("UVM_BOOT_UPTIMES", "").split())
        with open("/proc/uptime") as f:
            return {"init": init, "exec": exec_, "agent": float(f.read().split()[0])}
    except (ValueError, OSError):
        return None


def main() -> None:
    boot = boot_uptimes()
    if "uvm.trace" in open("/proc/cmdline").read().split():
        log(f"{boot['agent'] if boot else '?'} agent imported")
    if os.getpid() == 1:
        os.environ.setdefault("PATH", DEFAULT_PATH)
    try:
        port = find_port(proto.AGENT_PORT_NAME, PORT_WAIT_S)
        agent = Agent(port)
        agent.boot_uptimes = boot
    except Exception as e:
        log(f"FATAL: {e}")
        os.execv("/usr/bin/busybox", ["poweroff", "-f"])
    if "uvm.profile" in open("/proc/cmdline").read().split():
        import cProfile

        agent.profiler = cProfile.Profile()
        agent.profiler.enable()
    agent.serve()


if __name__ == "__main__":
    main()
