"""How a pydantic ValidationError is told to a user: the first problem, named by where it is.

What the guest sent is untrusted text: ``guest_problem`` and ``guest_text`` show it escaped (no raw
newline can forge a line of the host's log) and cut short (a field name of 700 KiB cannot flood it).
"""

from __future__ import annotations

from pydantic import ValidationError
from pydantic_core import ErrorDetails

#: How much of one piece of guest text (a field name, a value) a message shows.
GUEST_TEXT_LIMIT = 200


def first_problem(e: ValidationError, whole: str = "payload") -> str:
    """`process.args: List should have at least 1 item` (`whole` names a problem with no location)."""
    first = e.errors()[0]
    return f"{_where(first, whole)}: {first['msg']}"


def guest_problem(e: ValidationError, whole: str = "payload") -> str:
    """first_problem of a guest payload: the location (the guest's own field names, for an unknown
    field) and the message (pydantic may quote the input in it) each shown by guest_text."""
    first = e.errors()[0]
    return f"{guest_text(_where(first, whole))}: {guest_text(first['msg'])}"


def guest_text(text: str, limit: int = GUEST_TEXT_LIMIT) -> str:
    """text, safe inside a message or a log line: backslashes, control characters and every other
    unprintable character escaped as repr() escapes them, and at most limit characters of that
    followed by `...[N more characters]`."""
    shown: list[str] = []
    size = 0
    for i, char in enumerate(text):
        piece = char if char.isprintable() and char != "\\" else repr(char)[1:-1]
        if size + len(piece) > limit:
            return "".join(shown) + f"...[{len(text) - i} more characters]"
        shown.append(piece)
        size += len(piece)
    return "".join(shown)


def _where(error: ErrorDetails, whole: str) -> str:
    return ".".join(str(p) for p in error["loc"]) or whole
