"""The uvmshim guest agent: PID 1 of the UVM, serving the agent protocol on a virtio-serial port.

One thread, one epoll loop: the port, the pipes of running commands and a SIGCHLD wakeup pipe
are all non-blocking file descriptors in it. Start-up is kept lean on purpose (under emulation
every newly executed code page costs): no ``json``, ``signal``, ``selectors`` or ``subprocess``
(each drags in ``re``/``enum``/``collections``); what only some requests need is imported lazily.
"""

from __future__ import annotations

import os
import select
import time

from schemas import agent as proto
from schemas import framing, wirejson
from uvm.guest import procs

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs start-up time in the guest
if TYPE_CHECKING:
    from collections.abc import Callable

    Callback = Callable[[int, int], None]
    import signal
else:
    import _signal as signal  # the C module: `signal` imports enum

EV_READ = select.EPOLLIN
EV_WRITE = select.EPOLLOUT

SYSFS_PORTS = "/sys/class/virtio-ports"
PORT_WAIT_S = 10.0


def log(msg: str) -> None:
    """To the console (the host keeps its tail for error reports)."""
    try:
        os.write(2, f"uvm-agent: {msg}\n".encode())
    except OSError:
        pass


class RequestError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


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
            raise RuntimeError(f"virtio-serial port {name!r} did not appear in {timeout:.0f}s")
        time.sleep(0.005)


class RunningCommand:
    """A RUN request in flight: its pid, captured output and the request id to answer."""

    def __init__(self, req_id: int, pid: int, deadline: float | None) -> None:
        self.req_id = req_id
        self.pid = pid
        self.deadline = deadline
        self.status: int | None = None
        self.out = {1: bytearray(), 2: bytearray()}
        self.open_fds: dict[int, int] = {}  # fd -> 1|2
        self.stdin_fd: int | None = None
        self.stdin_data = b""
        self.dropped = 0
        self.timed_out = False


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


class Agent:
    def __init__(self, port_path: str) -> None:
        self.port_path = port_path
        self.port = os.open(port_path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self.sel = Poller()
        self.decoder = framing.FrameDecoder()
        self.wbuf = bytearray()
        self.port_events = EV_READ
        self.sel.register(self.port, self.port_events, self.on_port)
        self.connected = True
        self.commands: dict[int, RunningCommand] = {}  # pid -> command
        self.fd_owner: dict[int, RunningCommand] = {}
        self.shutting_down = False
        sig_r, sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(sig_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.sel.register(sig_r, EV_READ, self.on_signal)
        self.handlers = {
            proto.HELLO: self.do_hello,
            proto.PING: self.do_ping,
            proto.SHUTDOWN: self.do_shutdown,
            proto.RUN: self.do_run,
        }

    # -- port I/O ------------------------------------------------------------------------------

    def send(self, ftype: int, fid: int, obj: object, flags: int = 0) -> None:
        payload = wirejson.dumps(obj)
        self.wbuf += framing.encode(ftype, fid, payload, flags)
        self.flush()

    def flush(self) -> None:
        while self.wbuf:
            try:
                n = os.write(self.port, self.wbuf[:65536])
            except BlockingIOError:
                break
            except OSError as e:  # host side not connected: keep the bytes, retry later
                log(f"write to port: {e}")
                break
            del self.wbuf[:n]
        want = EV_READ | (EV_WRITE if self.wbuf else 0)
        if want != self.port_events and self.connected:
            self.port_events = want
            self.sel.modify(self.port, want, self.on_port)

    def on_port(self, fd: int, mask: int) -> None:
        if mask & EV_WRITE:
            self.flush()
        if not mask & (EV_READ | select.EPOLLHUP | select.EPOLLERR):
            return
        try:
            data = os.read(self.port, 1 << 20)
        except BlockingIOError:
            return
        except OSError as e:
            data = b""
            log(f"read from port: {e}")
        if not data:
            # The host end is not connected (virtio-serial reports HUP until it is): stop polling
            # the port and look again on a timer; the host reconnects and repeats its hello.
            self.sel.unregister(self.port)
            self.connected = False
            self.decoder = framing.FrameDecoder()
            return
        try:
            frames = self.decoder.feed(data)
        except framing.FramingError as e:
            log(f"bad frame from host, discarding input: {e}")
            self.decoder = framing.FrameDecoder()
            return
        for frame in frames:
            if frame.type == framing.REQUEST:
                self.on_request(frame)
            else:
                log(f"ignoring unexpected {framing.TYPE_NAMES[frame.type]} frame from host")

    def check_reconnect(self) -> None:
        p = select.poll()
        p.register(self.port, select.POLLIN | select.POLLOUT)
        for _, ev in p.poll(0):
            if not ev & select.POLLHUP:
                self.connected = True
                self.port_events = EV_READ
                self.sel.register(self.port, self.port_events, self.on_port)
                self.flush()

    # -- requests ------------------------------------------------------------------------------

    def on_request(self, frame: framing.Frame) -> None:
        try:
            if len(frame.payload) > proto.MAX_CONTROL_PAYLOAD:
                raise RequestError(proto.E_INVALID, "request too large")
            msg = wirejson.loads(frame.payload)
            if not isinstance(msg, dict) or not isinstance(msg.get("method"), str):
                raise RequestError(proto.E_INVALID, "request is not {method, params}")
            params = msg.get("params") or {}
            if not isinstance(params, dict):
                raise RequestError(proto.E_INVALID, "params must be an object")
            handler = self.handlers.get(msg["method"])
            if handler is None:
                raise RequestError(proto.E_UNSUPPORTED, f"unknown method {msg['method']!r}")
            result = handler(frame.id, params)
            if result is not None:
                self.send(framing.RESPONSE, frame.id, result)
        except RequestError as e:
            self.send(framing.RESPONSE, frame.id, {"code": e.code, "message": e.message[:proto.MAX_ERROR_MESSAGE]},
                      framing.FLAG_ERROR)
        except ValueError as e:
            self.send(framing.RESPONSE, frame.id, {"code": proto.E_INVALID, "message": f"bad request: {e}"},
                      framing.FLAG_ERROR)
        except Exception as e:  # a bug in a handler must not take PID 1 down
            log(f"internal error: {e!r}")
            self.send(framing.RESPONSE, frame.id, {"code": proto.E_INTERNAL, "message": repr(e)[:1000]},
                      framing.FLAG_ERROR)

    def do_hello(self, req_id: int, params: dict[str, object]) -> dict[str, object]:
        host_version = params.get("version")
        if not isinstance(host_version, int) or host_version < 1:
            raise RequestError(proto.E_INVALID, "hello needs the host's protocol version")
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return {
            "version": min(host_version, proto.PROTOCOL_VERSION),
            "capabilities": list(proto.CAPABILITIES),
            "agent": "uvmshim-agent",
            "kernel": os.uname().release,
            "uptime": uptime,
        }

    def do_ping(self, req_id: int, params: dict[str, object]) -> dict[str, object]:
        seq = params.get("seq", 0)
        if not isinstance(seq, int) or seq < 0:
            raise RequestError(proto.E_INVALID, "seq must be a non-negative integer")
        return {"seq": seq}

    def do_shutdown(self, req_id: int, params: dict[str, object]) -> dict[str, object]:
        self.shutting_down = True
        return {}

    def do_run(self, req_id: int, params: dict[str, object]) -> None:
        import base64

        argv = params.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise RequestError(proto.E_INVALID, "argv must be a non-empty list of strings")
        if len(argv) > proto.MAX_ARGV:
            raise RequestError(proto.E_INVALID, "argv too long")
        env = params.get("env") or {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"}
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
        stdin_data = base64.b64decode(stdin_b64)
        in_r, in_w = os.pipe2(os.O_CLOEXEC)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        try:
            pid = procs.spawn(argv, env, cwd, in_r, out_w, err_w)
        except procs.SpawnError as e:
            for fd in (in_r, in_w, out_r, out_w, err_r, err_w):
                os.close(fd)
            code = proto.E_NOT_FOUND if e.errno == 2 else proto.E_INVALID
            raise RequestError(code, str(e)) from None
        for fd in (in_r, out_w, err_w):
            os.close(fd)
        cmd = RunningCommand(req_id, pid, time.monotonic() + timeout if timeout else None)
        self.commands[pid] = cmd
        for fd, which in ((out_r, 1), (err_r, 2)):
            os.set_blocking(fd, False)
            cmd.open_fds[fd] = which
            self.fd_owner[fd] = cmd
            self.sel.register(fd, EV_READ, self.on_output)
        if stdin_data:
            os.set_blocking(in_w, False)
            cmd.stdin_fd, cmd.stdin_data = in_w, stdin_data
            self.fd_owner[in_w] = cmd
            self.sel.register(in_w, EV_WRITE, self.on_stdin)
        else:
            os.close(in_w)
        return None

    def on_output(self, fd: int, mask: int) -> None:
        cmd = self.fd_owner[fd]
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        if data:
            buf = cmd.out[cmd.open_fds[fd]]
            room = proto.MAX_RUN_OUTPUT - len(buf)
            buf += data[:room]
            cmd.dropped += max(0, len(data) - room)
            return
        self.sel.unregister(fd)
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
            self.sel.unregister(fd)
            os.close(fd)
            del self.fd_owner[fd]
            cmd.stdin_fd = None

    def maybe_finish(self, cmd: RunningCommand) -> None:
        if cmd.status is None or cmd.open_fds:
            return
        import base64

        if cmd.stdin_fd is not None:
            self.sel.unregister(cmd.stdin_fd)
            os.close(cmd.stdin_fd)
            del self.fd_owner[cmd.stdin_fd]
        del self.commands[cmd.pid]
        exit_status, sig = procs.decode_status(cmd.status)
        self.send(framing.RESPONSE, cmd.req_id, {
            "exit_status": exit_status,
            "signal": sig,
            "stdout": base64.b64encode(cmd.out[1]).decode(),
            "stderr": base64.b64encode(cmd.out[2]).decode(),
            "truncated": cmd.dropped > 0,
            "timed_out": cmd.timed_out,
        })

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

    def check_timeouts(self) -> None:
        now = time.monotonic()
        for cmd in list(self.commands.values()):
            if cmd.deadline is not None and now > cmd.deadline and cmd.status is None and not cmd.timed_out:
                cmd.timed_out = True
                try:
                    os.killpg(cmd.pid, signal.SIGKILL)
                except OSError:
                    pass

    # -- main loop -----------------------------------------------------------------------------

    def serve(self) -> None:
        while not self.shutting_down:
            timeout = None if self.connected else 0.02
            if any(c.deadline for c in self.commands.values()):
                timeout = 0.05 if timeout is None else min(timeout, 0.05)
            for fd, mask in self.sel.poll(timeout):
                callback = self.sel.callbacks.get(fd)
                if callback is not None:
                    callback(fd, mask)
            if not self.connected:
                self.check_reconnect()
            self.check_timeouts()
        self.power_off()

    def power_off(self) -> None:
        """Graceful end: stop every process, sync, unmount, power off. Never returns."""
        log("shutdown requested: stopping processes, syncing, powering off")
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


def main() -> None:
    if "uvm.trace" in open("/proc/cmdline").read().split():
        with open("/proc/uptime") as f:
            log(f"{f.read().split()[0]} agent imported")
    if os.getpid() == 1:
        os.environ.setdefault("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    try:
        port = find_port(proto.AGENT_PORT_NAME, PORT_WAIT_S)
        agent = Agent(port)
    except Exception as e:
        log(f"FATAL: {e}")
        os.execv("/usr/bin/busybox", ["poweroff", "-f"])
    agent.serve()


if __name__ == "__main__":
    main()
