"""How a pydantic ValidationError is told to a user: the first problem, named by where it is."""

from __future__ import annotations

from pydantic import ValidationError


def first_problem(e: ValidationError, whole: str = "payload") -> str:
    """`process.args: List should have at least 1 item` (`whole` names a problem with no location)."""
    first = e.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or whole
    return f"{where}: {first['msg']}"
