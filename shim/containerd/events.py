"""Task events published to containerd: ttrpc `containerd.services.events.ttrpc.v1.Events/Forward`.

containerd passes the address in $TTRPC_ADDRESS. Events go out in the order they were published,
from one background task that owns the connection (reconnecting once if containerd restarted);
`flush()` waits until everything published so far was sent, which is how TaskExit reaches containerd
before the task's teardown. An event that cannot be delivered is logged, never raised into the task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from google.protobuf import any_pb2, empty_pb2, timestamp_pb2
from google.protobuf.message import Message

from schemas.containerd import events_ttrpc_pb2
from shim.containerd.ttrpc import Client, TtrpcError

log = logging.getLogger("uvmshim.events")

SERVICE = "containerd.services.events.ttrpc.v1.Events"
SEND_TIMEOUT_S = 10.0
MAX_SENT = 1024


def timestamp(at: float | None = None) -> timestamp_pb2.Timestamp:
    """A protobuf Timestamp (containerd's are non-nullable: always send one)."""
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int((time.time() if at is None else at) * 1e9))
    return ts


def envelope(namespace: str, topic: str, event: Message) -> events_ttrpc_pb2.ForwardRequest:
    # The bare type name: `ctr events` drops events whose type_url has a type.googleapis.com/ prefix.
    payload = any_pb2.Any(type_url=event.DESCRIPTOR.full_name, value=event.SerializeToString())
    env = events_ttrpc_pb2.Envelope(timestamp=timestamp(), namespace=namespace, topic=topic, event=payload)
    return events_ttrpc_pb2.ForwardRequest(envelope=env)


class Publisher:
    def __init__(self, address: str, namespace: str) -> None:
        self.address = address.removeprefix("unix://")
        self.namespace = namespace
        self._queue: asyncio.Queue[events_ttrpc_pb2.ForwardRequest | None] = asyncio.Queue()
        self._client: Client | None = None
        self._sender: asyncio.Task[None] | None = None
        self.sent: list[str] = []  # the last MAX_SENT topics delivered, in order (for the logs and the tests)

    def publish(self, topic: str, event: Message) -> None:
        """Queue an event; it is sent after every event published before it. Without an address
        (runuvm's daemon: no containerd to tell) events are only logged."""
        if not self.address:
            log.debug("event %s (no containerd to publish to)", topic)
            return
        if self._sender is None:
            self._sender = asyncio.create_task(self._send_loop(), name="events")
        self._queue.put_nowait(envelope(self.namespace, topic, event))

    async def flush(self, timeout: float = SEND_TIMEOUT_S) -> None:
        """Wait until everything published so far was sent (or given up on), at most timeout seconds."""
        if self._sender is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout)

    async def _send_loop(self) -> None:
        while (req := await self._queue.get()) is not None:
            try:
                await self._send(req)
            finally:
                self._queue.task_done()
        self._queue.task_done()

    async def _send(self, req: events_ttrpc_pb2.ForwardRequest) -> None:
        topic = req.envelope.topic
        for attempt in (1, 2):
            try:
                if self._client is None:
                    self._client = await Client.connect_unix(self.address)
                await self._client.call(SERVICE, "Forward", req, empty_pb2.Empty, timeout=SEND_TIMEOUT_S)
                self.sent.append(topic)
                if len(self.sent) > 2 * MAX_SENT:
                    del self.sent[:-MAX_SENT]
                log.debug("published %s", topic)
                return
            except (OSError, TtrpcError) as e:
                if self._client is not None:
                    await self._client.close()
                    self._client = None
                if attempt == 2:
                    log.error("event %s not delivered to %s: %s", topic, self.address, e)

    async def close(self) -> None:
        """Send what is queued (bounded by flush's timeout), then stop. Idempotent."""
        if self._sender is not None:
            await self.flush()
            self._queue.put_nowait(None)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._sender), 1.0)
            self._sender.cancel()
            await asyncio.gather(self._sender, return_exceptions=True)
            self._sender = None
        if self._client is not None:
            await self._client.close()
            self._client = None
