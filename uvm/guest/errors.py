"""The agent's request error: a wire code (schemas.agent.E_*) and a message for the host."""

from __future__ import annotations


class RequestError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
