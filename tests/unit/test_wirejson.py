"""schemas.wirejson: the agent link's JSON, equal to the json package's for what the protocol carries."""

from __future__ import annotations

import json
from typing import Any

import pytest

from schemas import wirejson

DOCS: list[Any] = [
    {}, [], 0, -7, 1.5, "", "h\u00e9llo \u2603 \"q\" \\", None, True, False,
    {"method": "ping", "params": {"seq": 5}},
    {"a": [1, {"b": None}], "c": "x" * 1000, "d": 2 ** 63},
]


@pytest.mark.parametrize("doc", DOCS)
def test_dumps_is_compact_ascii_json(doc: Any) -> None:
    assert wirejson.dumps(doc) == json.dumps(doc, separators=(",", ":")).encode()


@pytest.mark.parametrize("doc", DOCS)
@pytest.mark.parametrize("space", ["", " ", "\n\t "])
def test_loads_round_trips_with_or_without_surrounding_whitespace(doc: Any, space: str) -> None:
    text = space + json.dumps(doc) + space
    assert wirejson.loads(text.encode()) == doc
    assert wirejson.loads(text) == doc


@pytest.mark.parametrize("bad", [b"", b" ", b"{", b'{"a":1} x', b"[1] [2]", b"NaN", b"-Infinity", b"{'a':1}",
                                 b"\xff"])
def test_loads_rejects_what_is_not_one_json_document(bad: bytes) -> None:
    with pytest.raises(ValueError):
        wirejson.loads(bad)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), {(1, 2): "tuple key"}, object()])
def test_dumps_refuses_what_json_cannot_carry(value: Any) -> None:
    with pytest.raises((ValueError, TypeError)):
        wirejson.dumps(value)
