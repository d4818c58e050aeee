"""Fakes at the boundaries, shipped for every layer's tests: a guest agent and a hypervisor backend.

* ``FakeGuest`` is the guest end of an agent link: it sits on one end of a socket pair and speaks
  ``schemas.framing`` frames, answering hello/ping/shutdown/run with canned results. A test can
  replace any method's handler (``guest.handlers["run"] = ...``), hold requests and answer them later
  in any order, or make the guest send whatever bytes it likes: garbage, oversized headers, answers
  to requests nobody made, payloads that are not JSON or that break the ``schemas.agent_models``.
  ``FakeGuest.connect()`` builds the host's ``AgentConnection`` and ``AgentClient`` on the other end.
  For stdio streams it plays the guest's processes: ``send_data``/``send_credit``/``send_close`` emit
  stream frames, and ``stream_frames``/``data_received``/``credit_received`` show what the host sent,
  with ``wait_until`` to wait for it.
* ``FakeBackend`` implements ``uvm.backends.base.Backend`` in memory, records every call, and ends
  the way QEMU does: a guest shutdown (through the agent or ACPI) exits with status 0 and shutdown
  reason ``guest-shutdown``; ``terminate()`` with ``host-qmp-quit``; ``crash()`` by a signal, with
  no shutdown reason. ``FakeBackendFactory`` plugs it into ``UtilityVM(config, backend_factory=...)``.
* ``make_test_config()`` writes tiny dummy image files so ``uvm.builder.build()`` accepts the config
  without a real guest image or a KVM probe.

Nothing here boots a VM or starts a process.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import grp
import itertools
import json
import os
import socket
import struct
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from schemas import agent as proto
from schemas import framing
from schemas.uvm_config import UvmConfig
from uvm.backends.base import HypervisorExit
from uvm.builder import LaunchSpec
from uvm.errors import StartError, UvmError
from uvm.link import AgentClient, AgentConnection

# -- what the guest answers ----------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One request the fake guest received."""

    id: int
    method: str
    params: dict[str, Any]


@dataclass(frozen=True)
class ErrorReply:
    """Answer with an error response (FLAG_ERROR) carrying code and message."""

    code: str
    message: str


@dataclass(frozen=True)
class PayloadReply:
    """Answer with a response frame whose payload is these bytes verbatim (need not be JSON)."""

    payload: bytes
    flags: int = 0


@dataclass(frozen=True)
class RawReply:
    """Instead of answering, write these bytes verbatim (need not be a frame)."""

    data: bytes


@dataclass(frozen=True)
class Hangup:
    """Instead of answering, write ``partial`` (e.g. half a frame), then close the guest's end."""

    partial: bytes = b""


#: A handler's answer: a result object, one of the reply types above, or None (no answer: the
#: request waits in ``FakeGuest.unanswered`` until the test calls ``respond()``).
Reply = Mapping[str, Any] | ErrorReply | PayloadReply | RawReply | Hangup | None
Handler = Callable[[Request], Reply | Awaitable[Reply]]


def hello_result(**overrides: Any) -> dict[str, Any]:
    """A valid hello result, with fields replaced by overrides."""
    result: dict[str, Any] = {
        "version": proto.PROTOCOL_VERSION,
        "capabilities": list(proto.CAPABILITIES),
        "agent": "fake-agent",
        "kernel": "6.1.0-fake",
        "uptime": 0.25,
    }
    result.update(overrides)
    return result


def run_result(
    exit_status: int | None = 0,
    stdout: bytes = b"",
    stderr: bytes = b"",
    signal: int | None = None,
    truncated: bool = False,
    timed_out: bool = False,
) -> dict[str, Any]:
    """A valid run result as the guest sends it (output base64-encoded)."""
    return {
        "exit_status": exit_status,
        "signal": signal,
        "stdout": base64.b64encode(stdout).decode(),
        "stderr": base64.b64encode(stderr).decode(),
        "truncated": truncated,
        "timed_out": timed_out,
    }


def oversized_header(ftype: int = framing.RESPONSE, fid: int = 1, length: int = framing.MAX_PAYLOAD + 1) -> bytes:
    """A frame header announcing more payload than the cap (encode() refuses to build one)."""
    return framing.HEADER.pack(framing.MAGIC, ftype, 0, fid, length)


def _default_run(request: Request) -> Reply:
    """A few commands, enough for lifecycle tests: echo, true, false, cat (stdin); others: not found."""
    argv = request.params.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        return ErrorReply(proto.E_INVALID, "argv must be a non-empty list of strings")
    program = argv[0].rsplit("/", 1)[-1]
    if program == "echo":
        return run_result(stdout=(" ".join(argv[1:]) + "\n").encode())
    if program == "true":
        return run_result()
    if program == "false":
        return run_result(exit_status=1)
    if program == "cat":
        return run_result(stdout=base64.b64decode(request.params.get("stdin", "")))
    return ErrorReply(proto.E_NOT_FOUND, f"{argv[0]}: No such file or directory")


async def open_guest_end() -> tuple[socket.socket, tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A unix socket pair: the host's end as a socket (for AgentConnection.open), the guest's as streams."""
    host_sock, guest_sock = socket.socketpair()
    try:
        guest = await asyncio.open_connection(sock=guest_sock)
    except BaseException:
        host_sock.close()
        guest_sock.close()
        raise
    return host_sock, guest


# -- the fake guest agent ------------------------------------------------------------------------

_CREDIT = struct.Struct(">I")  # a CREDIT frame's payload: u32 bytes (as uvm.streams.CREDIT)


class FakeGuest:
    """The guest end of an agent link, answering from canned results.

    ``handlers`` maps a method to a function of the ``Request`` returning a ``Reply`` (or an
    awaitable of one, answered from its own task so other requests keep flowing). Every request is
    recorded in ``requests``. After acknowledging a shutdown the guest calls each ``on_shutdown``
    hook (``FakeBackend`` powers the VM off there).
    """

    def __init__(
        self,
        hello: Mapping[str, Any] | None = None,
        run: Handler | None = None,
    ) -> None:
        self.hello = dict(hello) if hello is not None else hello_result()
        self.handlers: dict[str, Handler] = {
            proto.HELLO: lambda req: self.hello,
            proto.PING: lambda req: {"seq": req.params.get("seq", 0)},
            proto.SHUTDOWN: lambda req: {},
            proto.RUN: run or _default_run,
            # Disks: the fake guest "sees" every device at once and mounts anything.
            proto.SCSI_MOUNT: lambda req: {"device": f"/dev/sd{chr(ord('a') + int(req.params.get('lun', 0)) % 26)}",
                                           "path": req.params.get("path")},
            proto.SCSI_UNMOUNT: lambda req: {},
            proto.SCSI_UNPLUG: lambda req: {},
        }
        self.requests: list[Request] = []
        self.unanswered: dict[int, Request] = {}
        self.unexpected_frames: list[framing.Frame] = []
        self.host_error: str | None = None  # why the guest stopped reading (bad frame from the host)
        self.on_shutdown: list[Callable[[], None]] = []
        self.shutdown_acknowledged = False
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._serve_task: asyncio.Task[None] | None = None
        self._reply_tasks: set[asyncio.Task[None]] = set()
        self._arrived = asyncio.Event()
        self._frame_arrived = asyncio.Event()  # any frame from the host, or the end of the link
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else "connected" if self._writer is not None else "idle"
        return f"<FakeGuest {state} requests={len(self.requests)} unanswered={sorted(self.unanswered)}>"

    # -- connection ----------------------------------------------------------------------------

    async def start(self) -> socket.socket:
        """Open the socket pair, start answering, and return the host's end of it."""
        if self._writer is not None or self._closed:
            raise ConnectionRefusedError("fake guest: the agent port is already connected or closed")
        host, (self._reader, self._writer) = await open_guest_end()
        self._serve_task = asyncio.get_running_loop().create_task(self._serve(), name="fake-guest")
        return host

    async def connect(
        self, name: str = "fake", on_notify: Callable[[dict[str, Any]], None] | None = None
    ) -> tuple[AgentConnection, AgentClient]:
        """start() and wrap the host end in a started AgentConnection and its AgentClient."""
        conn = AgentConnection(name, on_notify=on_notify)
        await conn.open(await self.start())
        return conn, AgentClient(conn)

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._closed

    async def aclose(self) -> None:
        """Stop answering and close the guest's end (the host reads EOF). Idempotent."""
        self._closed = True
        tasks = [t for t in (self._serve_task, *self._reply_tasks) if t is not None and t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._serve_task = None
        self._reply_tasks.clear()
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()

    # -- serving -------------------------------------------------------------------------------

    async def _serve(self) -> None:
        assert self._reader is not None
        decoder = framing.FrameDecoder()
        try:
            while True:
                data = await self._reader.read(1 << 16)
                if not data:
                    return
                try:
                    frames = decoder.feed(data)
                except framing.FramingError as e:
                    self.host_error = str(e)
                    return
                for frame in frames:
                    await self._on_frame(frame)
                    self._frame_arrived.set()
        except OSError:
            return
        finally:
            self._frame_arrived.set()  # wait_until() callers re-check (and see the host went away)

    async def _on_frame(self, frame: framing.Frame) -> None:
        if frame.type != framing.REQUEST:
            self.unexpected_frames.append(frame)
            return
        try:
            msg = json.loads(frame.payload)
        except ValueError as e:
            await self.send_error(frame.id, proto.E_INVALID, f"bad request: {e}")
            return
        if not isinstance(msg, dict) or not isinstance(msg.get("method"), str):
            await self.send_error(frame.id, proto.E_INVALID, "request is not {method, params}")
            return
        params = msg.get("params") or {}
        request = Request(frame.id, msg["method"], params if isinstance(params, dict) else {})
        self.requests.append(request)
        self.unanswered[request.id] = request
        self._arrived.set()
        handler = self.handlers.get(request.method)
        if handler is None:
            await self._deliver(request, ErrorReply(proto.E_UNSUPPORTED, f"unknown method {request.method!r}"))
            return
        reply = handler(request)
        if isinstance(reply, Awaitable):
            task = asyncio.get_running_loop().create_task(self._deliver_later(request, reply))
            self._reply_tasks.add(task)
            task.add_done_callback(self._reply_tasks.discard)
            return
        await self._deliver(request, reply)

    async def _deliver_later(self, request: Request, reply: Awaitable[Reply]) -> None:
        await self._deliver(request, await reply)

    async def _deliver(self, request: Request, reply: Reply) -> None:
        if reply is None:
            return  # held: the test answers with respond()
        await self._send_reply(request.id, reply)
        if request.method == proto.SHUTDOWN and isinstance(reply, Mapping):
            self.shutdown_acknowledged = True
            for hook in list(self.on_shutdown):
                hook()

    async def _send_reply(self, req_id: int, reply: Reply) -> None:
        self.unanswered.pop(req_id, None)
        if isinstance(reply, ErrorReply):
            await self.send_error(req_id, reply.code, reply.message)
        elif isinstance(reply, PayloadReply):
            await self.send_frame(framing.RESPONSE, req_id, reply.payload, reply.flags)
        elif isinstance(reply, RawReply):
            await self.send_raw(reply.data)
        elif isinstance(reply, Hangup):
            await self.hangup(reply.partial)
        elif reply is not None:
            await self.send_frame(framing.RESPONSE, req_id, json.dumps(dict(reply)).encode())

    async def wait_for_requests(self, count: int) -> list[Request]:
        """Wait until at least count requests arrived; return them all (bound it with asyncio.timeout)."""
        while len(self.requests) < count:
            self._arrived.clear()
            await self._arrived.wait()
        return list(self.requests)

    # -- sending (what a test makes the guest do) -----------------------------------------------

    async def respond(self, req_id: int, reply: Reply) -> None:
        """Answer a held request (or any id at all) with reply."""
        await self._send_reply(req_id, reply)

    async def send_raw(self, data: bytes) -> None:
        """Write bytes verbatim. Writes to a host that has gone away are ignored."""
        if self._writer is None:
            raise RuntimeError("fake guest: not connected (call start() or connect() first)")
        with contextlib.suppress(OSError, RuntimeError):
            self._writer.write(data)
            await self._writer.drain()

    async def send_frame(self, ftype: int, fid: int, payload: bytes = b"", flags: int = 0) -> None:
        await self.send_raw(framing.HEADER.pack(framing.MAGIC, ftype, flags, fid, len(payload)) + payload)

    async def send_error(self, req_id: int, code: str, message: str) -> None:
        body = json.dumps({"code": code, "message": message}).encode()
        await self.send_frame(framing.RESPONSE, req_id, body, framing.FLAG_ERROR)

    async def notify(self, message: Mapping[str, Any] | bytes) -> None:
        """A NOTIFY frame (id 0) with message as JSON, or bytes verbatim."""
        payload = message if isinstance(message, bytes) else json.dumps(dict(message)).encode()
        await self.send_frame(framing.NOTIFY, 0, payload)

    async def hangup(self, partial: bytes = b"") -> None:
        """Write partial (e.g. half a frame), then close the guest's end: the host reads EOF."""
        if partial:
            await self.send_raw(partial)
        self.close_link()

    # -- streams (what the guest's processes do) -------------------------------------------------

    async def send_data(self, sid: int, data: bytes) -> None:
        """A DATA frame on stream sid: output of a process, as the agent relays it (no credit check)."""
        await self.send_frame(framing.DATA, sid, data)

    async def send_credit(self, sid: int, n: int) -> None:
        """A CREDIT frame on stream sid: the guest consumed n more bytes of the host's stdin data."""
        await self.send_frame(framing.CREDIT, sid, _CREDIT.pack(n))

    async def send_close(self, sid: int) -> None:
        """A CLOSE frame on stream sid: EOF of a process's output."""
        await self.send_frame(framing.CLOSE, sid)

    def stream_frames(self, sid: int | None = None) -> list[framing.Frame]:
        """The DATA, CREDIT and CLOSE frames the host sent (on stream sid), in order."""
        kinds = (framing.DATA, framing.CREDIT, framing.CLOSE)
        return [f for f in self.unexpected_frames if f.type in kinds and (sid is None or f.id == sid)]

    def data_received(self, sid: int) -> bytes:
        """Everything the host sent as DATA on stream sid (stdin of a process)."""
        return b"".join(f.payload for f in self.stream_frames(sid) if f.type == framing.DATA)

    def credit_received(self, sid: int) -> int:
        """The total credit the host granted on stream sid (bytes of output it consumed)."""
        return sum(_CREDIT.unpack(f.payload)[0] for f in self.stream_frames(sid)
                   if f.type == framing.CREDIT and len(f.payload) == _CREDIT.size)

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Wait until condition() holds, checking it after every frame from the host. Returns at
        once if it holds already; bound it with asyncio.timeout (a host that went away never
        makes it hold)."""
        while not condition():
            self._frame_arrived.clear()
            await self._frame_arrived.wait()

    def close_link(self) -> None:
        """Close the guest's end at once (the host reads EOF); the guest stops answering."""
        if self._writer is not None:
            with contextlib.suppress(OSError, RuntimeError):
                self._writer.close()


# -- the fake backend ----------------------------------------------------------------------------

_fake_pids = itertools.count(40000)


class FakeBackend:
    """An in-memory ``Backend``: no process; a FakeGuest behind the agent channel; recorded calls.

    ``calls`` lists every Backend method called, in order. The VM ends through ``exit()`` (or the
    shorthands ``crash()``, ``guest_poweroff()``), through the guest acknowledging a shutdown,
    through ``request_powerdown()`` (unless ``acpi_works`` is False) or through ``terminate()``.
    """

    name = "fake"

    def __init__(
        self,
        spec: LaunchSpec,
        guest: FakeGuest | None = None,
        *,
        launch_error: BaseException | None = None,
        launch_delay: float = 0.0,
        launch_gate: asyncio.Event | None = None,
        acpi_works: bool = True,
        shutdown_delay: float = 0.02,
        console: str = "",
    ) -> None:
        self.spec = spec
        self.guest = guest if guest is not None else FakeGuest()
        self.launch_error = launch_error
        self.launch_delay = launch_delay
        self.launch_gate = launch_gate  # launch returns only once it is set (a hypervisor slow to come up)
        self.acpi_works = acpi_works
        self.shutdown_delay = shutdown_delay
        self.console_lines: list[str] = console.splitlines()
        self.calls: list[str] = []
        self.scsi: dict[tuple[int, int], tuple[str, bool]] = {}  # (controller, lun) -> (path, read-only)
        self.launched_spec: LaunchSpec | None = None
        self.closed = False
        self._pid: int | None = None
        self._exit: asyncio.Future[HypervisorExit] | None = None
        self._pending_exit: asyncio.TimerHandle | None = None
        self.guest.on_shutdown.append(self._on_guest_shutdown)

    def __repr__(self) -> str:
        return f"<FakeBackend {self.spec.vm_id} {self.state} pid={self._pid}>"

    @property
    def state(self) -> str:
        """created | running | exited, and closed once aclose() ran."""
        if self.closed:
            return "closed"
        if self._exit is None:
            return "created"
        return "exited" if self._exit.done() else "running"

    @property
    def running(self) -> bool:
        return self._exit is not None and not self._exit.done()

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def exit_info(self) -> HypervisorExit | None:
        return self._exit.result() if self._exit is not None and self._exit.done() else None

    # -- Backend -------------------------------------------------------------------------------

    async def launch(self, spec: LaunchSpec) -> None:
        self.calls.append("launch")
        if self._exit is not None or self.closed:
            raise StartError(f"VM {spec.vm_id}: fake backend launched twice", vm_id=spec.vm_id)
        if self.launch_delay:
            await asyncio.sleep(self.launch_delay)
        if self.launch_gate is not None:
            await self.launch_gate.wait()
        if self.launch_error is not None:
            raise self.launch_error
        self.launched_spec = spec
        self._pid = next(_fake_pids)
        self._exit = asyncio.get_running_loop().create_future()
        self.console_lines.append(f"fake: booting {spec.vm_id}")

    async def connect_agent(self) -> socket.socket:
        self.calls.append("connect_agent")
        if not self.running:
            raise ConnectionRefusedError(f"fake backend {self.spec.vm_id}: hypervisor not running")
        return await self.guest.start()

    async def attach_scsi(self, controller: int, lun: int, path: str, readonly: bool, fmt: str) -> None:
        self.calls.append(f"attach_scsi {controller}:{lun} {path} {'ro' if readonly else 'rw'}")
        if not self.running:
            raise UvmError(f"fake backend {self.spec.vm_id}: hypervisor not running")
        self.scsi[(controller, lun)] = (path, readonly)

    async def detach_scsi(self, controller: int, lun: int) -> None:
        self.calls.append(f"detach_scsi {controller}:{lun}")
        if self.scsi.pop((controller, lun), None) is None:
            raise UvmError(f"fake backend {self.spec.vm_id}: nothing at {controller}:{lun}")

    async def scsi_inventory(self) -> dict[str, list[str]]:
        return {"nodes": [f"scsi{c}-lun{lun}" for c, lun in self.scsi],
                "devices": [f"sd{c}-lun{lun}" for c, lun in self.scsi]}

    async def request_powerdown(self) -> None:
        self.calls.append("request_powerdown")
        if self.running and self.acpi_works:
            self._schedule_exit(HypervisorExit(0, None, "guest-shutdown"), self.shutdown_delay)

    async def terminate(self) -> None:
        self.calls.append("terminate")
        self.exit(HypervisorExit(0, None, "host-qmp-quit"))

    async def wait_exit(self) -> HypervisorExit:
        self.calls.append("wait_exit")
        if self._exit is None:
            raise StartError(f"VM {self.spec.vm_id}: fake hypervisor was never started", vm_id=self.spec.vm_id)
        return await asyncio.shield(self._exit)

    def console_tail(self, lines: int = 30) -> str:
        return "\n".join(self.console_lines[-lines:]) if lines > 0 else ""

    async def aclose(self) -> None:
        self.calls.append("aclose")
        if self.closed:
            return
        self.closed = True
        if self.running:
            self.exit(HypervisorExit(0, None, "host-qmp-quit"))
        if self._pending_exit is not None:
            self._pending_exit.cancel()
        await self.guest.aclose()

    # -- what a test makes the hypervisor do ----------------------------------------------------

    def exit(self, hv: HypervisorExit) -> None:
        """The hypervisor ends now, as hv says. Ignored if it is not running."""
        if not self.running:
            return
        assert self._exit is not None
        if self._pending_exit is not None:
            self._pending_exit.cancel()
            self._pending_exit = None
        self.console_lines.append(f"fake: hypervisor {hv.describe()}")
        self._exit.set_result(hv)
        # The agent channel belongs to the hypervisor: it closes with it.
        self.guest.close_link()

    def crash(self, signal: int = 9, detail: str = "") -> None:
        """The hypervisor is killed by signal (no shutdown reason)."""
        self.exit(HypervisorExit(None, signal, None, detail))

    def guest_poweroff(self) -> None:
        """The guest powers off on its own (nobody on the host asked)."""
        self.exit(HypervisorExit(0, None, "guest-shutdown"))

    def _schedule_exit(self, hv: HypervisorExit, delay: float) -> None:
        if self._pending_exit is None:
            self._pending_exit = asyncio.get_running_loop().call_later(delay, self.exit, hv)

    def _on_guest_shutdown(self) -> None:
        if self.running:
            self._schedule_exit(HypervisorExit(0, None, "guest-shutdown"), self.shutdown_delay)


class FakeBackendFactory:
    """A backend_factory for UtilityVM making FakeBackends; keeps every one in ``backends``.

    ``guest`` (a FakeGuest or a function making one) and ``options`` (FakeBackend's keywords) are
    used for each backend made.
    """

    def __init__(self, guest: FakeGuest | Callable[[], FakeGuest] | None = None, **options: Any) -> None:
        self.guest = guest
        self.options = options
        self.backends: list[FakeBackend] = []

    def __call__(self, spec: LaunchSpec) -> FakeBackend:
        guest = self.guest() if callable(self.guest) else self.guest
        backend = FakeBackend(spec, guest, **self.options)
        self.backends.append(backend)
        return backend

    @property
    def last(self) -> FakeBackend:
        if not self.backends:
            raise UvmError("no fake backend was made yet")
        return self.backends[-1]


# -- configs -------------------------------------------------------------------------------------


def make_test_config(directory: Path, **overrides: Any) -> UvmConfig:
    """A UvmConfig that builder.build() accepts without a real image: dummy kernel, initrd and
    rootfs files in directory, accel "tcg" (no KVM probe), run and state dirs under directory."""
    image = directory / "image"
    image.mkdir(parents=True, exist_ok=True)
    files: dict[str, Any] = {}
    for name in ("kernel", "initrd", "rootfs"):
        path = image / name
        if not path.exists():
            path.write_bytes(b"\0" * 16)
        files[name] = path
    values: dict[str, Any] = {
        "id": "vm1",
        "image": image,
        **files,
        "accel": "tcg",
        "memory_mib": 64,
        "boot_timeout": 5.0,
        "run_dir": directory / "run",
        "state_dir": directory / "state",
        "libvirt_image_dir": directory / "libvirt-images",
    }
    values.update(overrides)
    return UvmConfig(**values)


@contextlib.asynccontextmanager
async def fake_agent(
    guest: FakeGuest | None = None, name: str = "fake", on_notify: Callable[[dict[str, Any]], None] | None = None
) -> AsyncIterator[tuple[FakeGuest, AgentConnection, AgentClient]]:
    """A FakeGuest connected to an AgentConnection and AgentClient; both closed on exit."""
    guest = guest if guest is not None else FakeGuest()
    conn, client = await guest.connect(name, on_notify=on_notify)
    try:
        yield guest, conn, client
    finally:
        await conn.aclose()
        await guest.aclose()


__all__ = [
    "ErrorReply",
    "FakeBackend",
    "FakeBackendFactory",
    "FakeGuest",
    "Handler",
    "Hangup",
    "PayloadReply",
    "RawReply",
    "Reply",
    "Request",
    "fake_agent",
    "hello_result",
    "make_test_config",
    "open_guest_end",
    "oversized_header",
    "run_result",
]

if TYPE_CHECKING:  # FakeBackend satisfies the Backend Protocol, so the factory plugs into UtilityVM
    from uvm.backends.base import Backend

    _factory_type_check: Callable[[LaunchSpec], Backend] = FakeBackendFactory()


def _daemon_running(name: str) -> bool:
    return subprocess.run(["pgrep", "-x", name], capture_output=True, check=False).returncode == 0


def wait_for_libvirtd(uri: str = "qemu:///system", timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while subprocess.run(["virsh", "-c", uri, "version"], capture_output=True, check=False).returncode != 0:
        if time.monotonic() > deadline:
            raise UvmError(f"libvirtd did not answer on {uri} within {timeout:g}s")
        time.sleep(0.2)


def stop_daemon(name: str) -> None:
    subprocess.run(["pkill", "-x", name], check=False)
    for _ in range(100):
        if not _daemon_running(name):
            break
        time.sleep(0.1)


@contextlib.contextmanager
def libvirt_daemons(uri: str = "qemu:///system", timeout: float = 60.0) -> Iterator[list[str]]:
    """libvirtd and virtlogd running for the block: started here when they are not, and then
    stopped here (only those, whose names the block gets). The product itself expects a running libvirtd.

    /dev/kvm gets udev's usual group kvm, mode 0660 meanwhile (restored afterwards): hosts without
    udev leave it root-only, and libvirt then re-probes QEMU's capabilities on every domain start
    (~85 s here), because KVM looks usable to its probe (as root) and unusable for the qemu user.
    """
    kvm = Path("/dev/kvm")
    kvm_stat = kvm.stat() if kvm.exists() else None
    if kvm_stat is not None:
        os.chown(kvm, -1, grp.getgrnam("kvm").gr_gid)
        kvm.chmod(0o660)
    started = []
    try:
        for daemon in ("virtlogd", "libvirtd"):
            if not _daemon_running(daemon):
                subprocess.run([daemon, "-d"], check=True)
                started.append(daemon)
        wait_for_libvirtd(uri, timeout)
        yield started
    finally:
        if kvm_stat is not None:
            os.chown(kvm, -1, kvm_stat.st_gid)
            kvm.chmod(kvm_stat.st_mode & 0o777)
        for daemon in reversed(started):
            stop_daemon(daemon)
