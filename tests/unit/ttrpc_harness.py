"""A TaskService served over ttrpc on a unix socket in a test's directory, with a connected client: the
shape every service-level unit test needs."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from shim.containerd.service import TaskService
from shim.containerd.ttrpc import Client, Server


@contextlib.asynccontextmanager
async def served(service: TaskService, sock_dir: Path) -> AsyncIterator[Client]:
    """The service on <sock_dir>/shim.sock and a client of it; both closed afterwards (not the service)."""
    server = Server()
    service.register(server)
    path = str(sock_dir / "shim.sock")
    await server.serve_unix(path)
    client = await Client.connect_unix(path)
    try:
        yield client
    finally:
        await client.close()
        await server.close()
