"""schemas.validation: a user's mistakes told as they are, the guest's text escaped and cut short."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ConfigDict, ValidationError

from schemas.validation import GUEST_TEXT_LIMIT, first_problem, guest_problem, guest_text


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    seq: int


def problem_of(document: object) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        Strict.model_validate(document)
    return info.value


@pytest.mark.parametrize(("text", "shown"), [
    ("plain /mnt/a, caf\u00e9 'quoted' \"too\"", "plain /mnt/a, caf\u00e9 'quoted' \"too\""),
    ("two\nlines\r\tand\x00nul", r"two\nlines\r\tand\x00nul"),
    ("\x1b[31mred\u202eevil\u2028", r"\x1b[31mred\u202eevil\u2028"),  # terminal, bidi and line-separator controls
    ("a literal \\n", r"a literal \\n"),  # told apart from an escaped newline
    ("lone \ud800 surrogate", r"lone \ud800 surrogate"),
])
def test_guest_text_escapes_what_is_not_printable(text: str, shown: str) -> None:
    assert guest_text(text) == shown


def test_guest_text_is_cut_short_and_says_by_how_much() -> None:
    assert guest_text("k" * GUEST_TEXT_LIMIT) == "k" * GUEST_TEXT_LIMIT
    assert guest_text("k" * 768 * 1024) == "k" * GUEST_TEXT_LIMIT + f"...[{768 * 1024 - GUEST_TEXT_LIMIT} more characters]"
    assert guest_text("\n" * 1000, limit=9) == r"\n\n\n\n" + "...[996 more characters]"  # escapes count, never cut
    assert guest_text("abc", limit=0) == "...[3 more characters]"


def test_guest_problem_escapes_and_clips_the_guests_field_name() -> None:
    assert guest_problem(problem_of({"seq": 1, "x\nERROR forged": 2})) == r"x\nERROR forged: Extra inputs are not permitted"
    shown = guest_problem(problem_of({"seq": 1, "k" * 700_000: 2}))
    assert shown == "k" * GUEST_TEXT_LIMIT + "...[699800 more characters]: Extra inputs are not permitted"
    assert guest_problem(problem_of({"seq": "1"})) == "seq: Input should be a valid integer"
    assert guest_problem(problem_of([1])) == "payload: Input should be a valid dictionary or instance of Strict"


def test_first_problem_tells_a_users_mistake_as_it_is() -> None:
    """The host's own input (a spec, a CLI option) is not escaped: its user reads it back as written."""
    assert first_problem(problem_of({"seq": 1, "caf\u00e9 \\x": 2})) == "caf\u00e9 \\x: Extra inputs are not permitted"
    assert first_problem(problem_of({}), whole="document") == "seq: Field required"
    assert first_problem(problem_of([1]), whole="document") == (
        "document: Input should be a valid dictionary or instance of Strict")
