"""The agent's request error: a wire code (schemas.agent.E_*) and a message for the host."""

from __future__ import annotations

from schemas import agent as proto


class RequestError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def spawn_failed(errno: int, message: str) -> RequestError:
    """A program that could not be started: not found (ENOENT) or invalid (anything else)."""
    return RequestError(proto.E_NOT_FOUND if errno == 2 else proto.E_INVALID, message)
