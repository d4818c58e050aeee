"""JSON for the agent link without importing the ``json`` package. Stdlib only (the guest imports it).

``import json`` pulls in ``re`` and ``enum`` (~0.45 s of a cold guest start under emulation),
although its C accelerator ``_json`` needs neither. This module drives ``_json`` directly, with
the exact semantics of ``json.dumps(obj, separators=(",", ":"))`` and ``json.loads`` for the
objects the protocol carries; without ``_json`` it falls back to the ``json`` package.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing itself costs ~0.3 s of a cold guest start: only for mypy
if TYPE_CHECKING:
    from typing import Any

try:
    import _json
except ImportError:  # pragma: no cover - CPython always has it
    _json = None  # type: ignore[assignment]


class _ScanContext:
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int

    @staticmethod
    def parse_constant(name: str) -> float:
        raise ValueError(f"JSON constant {name} is not allowed")


def _default(obj: object) -> Any:
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


if _json is not None:
    _scanner = _json.make_scanner(_ScanContext())  # type: ignore[arg-type]
    _encoder = _json.make_encoder(None, _default, _json.encode_basestring_ascii, None, ":", ",", False, False, False)

    def dumps(obj: Any) -> bytes:
        """obj as compact ASCII JSON bytes (NaN and infinities refused)."""
        return "".join(_encoder(obj, 0)).encode()

    def loads(data: bytes | str) -> Any:
        """Parse one JSON document; raises ValueError on anything else (trailing data included)."""
        text = data.decode() if isinstance(data, (bytes, bytearray)) else data
        try:  # the common case, compact JSON (what both ends send): one scan, no whitespace walk
            obj, end = _scanner(text, 0)
            if end == len(text):
                return obj
        except StopIteration:
            pass
        n = len(text)
        i = 0
        while i < n and text[i] in " \t\n\r":
            i += 1
        try:
            obj, end = _scanner(text, i)
        except StopIteration as e:
            raise ValueError(f"invalid JSON at offset {e.value}") from None
        while end < n and text[end] in " \t\n\r":
            end += 1
        if end != n:
            raise ValueError(f"extra data after JSON at offset {end}")
        return obj

else:  # pragma: no cover
    import json as _stdjson

    def dumps(obj: Any) -> bytes:
        return _stdjson.dumps(obj, separators=(",", ":"), allow_nan=False).encode()

    def loads(data: bytes | str) -> Any:
        return _stdjson.loads(data)
