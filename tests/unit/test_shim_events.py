"""shim.containerd.events: task events forwarded to a real ttrpc Events server, in order, in containerd's envelope."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from google.protobuf import empty_pb2

from schemas.containerd import events_task_pb2 as ev
from schemas.containerd import events_ttrpc_pb2
from shim.containerd.events import SERVICE, Publisher, envelope, timestamp
from shim.containerd.ttrpc import Server

pytestmark = pytest.mark.timeout(10)


class EventsServer:
    """containerd's side: records every forwarded envelope."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.received: list[events_ttrpc_pb2.Envelope] = []
        self.server = Server()
        self.server.register(SERVICE, "Forward", events_ttrpc_pb2.ForwardRequest, self.forward)

    async def forward(self, req: events_ttrpc_pb2.ForwardRequest) -> empty_pb2.Empty:
        self.received.append(req.envelope)
        return empty_pb2.Empty()

    async def start(self) -> EventsServer:
        await self.server.serve_unix(self.path)
        return self

    @property
    def topics(self) -> list[str]:
        return [e.topic for e in self.received]


@pytest.fixture
async def events_server(sock_dir: Path) -> AsyncIterator[EventsServer]:
    server = await EventsServer(str(sock_dir / "events.sock")).start()
    yield server
    await server.server.close()


def task_events() -> list[tuple[str, ev.TaskCreate | ev.TaskStart | ev.TaskExit]]:
    return [
        ("/tasks/create", ev.TaskCreate(container_id="t1", bundle="/b", pid=42,
                                        io=ev.TaskIO(stdout="/fifo/out"))),
        ("/tasks/start", ev.TaskStart(container_id="t1", pid=42)),
        ("/tasks/exit", ev.TaskExit(container_id="t1", id="t1", pid=42, exit_status=3, exited_at=timestamp())),
    ]


async def test_events_arrive_in_order_in_containerds_envelope(events_server: EventsServer) -> None:
    publisher = Publisher(f"unix://{events_server.path}", "ns1")
    try:
        for topic, event in task_events():
            publisher.publish(topic, event)
        await asyncio.wait_for(publisher.flush(), 5.0)
        assert events_server.topics == ["/tasks/create", "/tasks/start", "/tasks/exit"]
        assert publisher.sent == events_server.topics
        for env, (topic, event) in zip(events_server.received, task_events(), strict=True):
            assert env.namespace == "ns1"
            assert env.topic == topic
            assert env.timestamp.seconds > 0
            assert env.event.type_url == event.DESCRIPTOR.full_name  # bare: no type.googleapis.com/ prefix
        exit_env = events_server.received[2]
        assert exit_env.event.type_url == "containerd.events.TaskExit"
        decoded = ev.TaskExit.FromString(exit_env.event.value)
        assert (decoded.container_id, decoded.id, decoded.pid, decoded.exit_status) == ("t1", "t1", 42, 3)
        assert decoded.exited_at.seconds > 0
        assert ev.TaskCreate.FromString(events_server.received[0].event.value).io.stdout == "/fifo/out"
    finally:
        await publisher.close()


async def test_address_without_unix_prefix(events_server: EventsServer) -> None:
    publisher = Publisher(events_server.path, "ns")
    try:
        publisher.publish("/tasks/start", ev.TaskStart(container_id="t", pid=1))
        await asyncio.wait_for(publisher.flush(), 5.0)
        assert events_server.topics == ["/tasks/start"]
    finally:
        await publisher.close()


async def test_close_sends_what_is_queued(events_server: EventsServer) -> None:
    publisher = Publisher(events_server.path, "ns")
    for topic, event in task_events():
        publisher.publish(topic, event)
    await asyncio.wait_for(publisher.close(), 5.0)
    assert events_server.topics == ["/tasks/create", "/tasks/start", "/tasks/exit"]


async def test_reconnects_after_containerd_restarts(events_server: EventsServer) -> None:
    publisher = Publisher(events_server.path, "ns")
    try:
        publisher.publish("/tasks/create", ev.TaskCreate(container_id="t"))
        await asyncio.wait_for(publisher.flush(), 5.0)
        await events_server.server.close()
        restarted = await EventsServer(events_server.path).start()
        try:
            publisher.publish("/tasks/exit", ev.TaskExit(container_id="t"))
            await asyncio.wait_for(publisher.flush(), 5.0)
            assert restarted.topics == ["/tasks/exit"]
            assert publisher.sent == ["/tasks/create", "/tasks/exit"]
        finally:
            await restarted.server.close()
    finally:
        await publisher.close()


async def test_no_server_logs_an_error_and_never_raises(sock_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="uvmshim.events")
    publisher = Publisher(f"unix://{sock_dir / 'nobody.sock'}", "ns")
    publisher.publish("/tasks/exit", ev.TaskExit(container_id="t"))
    await publisher.flush()
    # Given up on, not still trying: flush returned because the send ended, with the error logged.
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    await publisher.close()
    await publisher.close()
    assert publisher.sent == []
    assert len(errors) == 1
    assert "/tasks/exit" in errors[0].getMessage()
    assert str(sock_dir / "nobody.sock") in errors[0].getMessage()


async def test_flush_and_close_without_events_return_at_once(sock_dir: Path) -> None:
    publisher = Publisher(str(sock_dir / "nobody.sock"), "ns")
    await asyncio.wait_for(publisher.flush(), 0.5)
    await asyncio.wait_for(publisher.close(), 0.5)
    await asyncio.wait_for(publisher.close(), 0.5)


async def test_close_is_idempotent_after_sending(events_server: EventsServer) -> None:
    publisher = Publisher(events_server.path, "ns")
    publisher.publish("/tasks/start", ev.TaskStart(container_id="t", pid=1))
    await publisher.close()
    await publisher.close()
    assert events_server.topics == ["/tasks/start"]


def test_envelope_and_timestamp() -> None:
    req = envelope("ns", "/tasks/oom", ev.TaskOOM(container_id="t"))
    assert req.envelope.event.type_url == "containerd.events.TaskOOM"
    assert req.envelope.timestamp.seconds > 0
    ts = timestamp(1700000000.5)
    assert (ts.seconds, ts.nanos) == (1700000000, 500000000)
