"""Canonical JSON: the one byte encoding of every signed payload in the audit log.

Rules (a verifier in another language can reproduce them): UTF-8 JSON with object keys sorted, no
whitespace (separators "," and ":"), non-ASCII escaped as \\uXXXX, integers in decimal, floats written as
Python's `repr` (the shortest string that reads back to the same IEEE-754 double, e.g. 0.1, 1e-07), NaN and
infinities refused. Only these bytes are ever signed, and the log stores exactly the bytes that were
signed: a verifier checks the stored bytes and never re-serialises a parsed payload, since another
serialiser (or another float formatter) may produce different bytes for the same values.
"""

from __future__ import annotations

import json
from typing import Any


def canonical_json(value: Any) -> bytes:
    """Encode a JSON-able value canonically; raises ValueError for NaN/inf and TypeError for non-JSON types."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def parse_json_object(payload: bytes) -> dict[str, Any]:
    """Parse signed bytes into a dict; ValueError if they are not a JSON object (or hold NaN/inf)."""

    def refuse_constant(name: str) -> Any:
        raise ValueError(f"{name} is not allowed in a signed payload")

    value = json.loads(payload.decode("utf-8"), parse_constant=refuse_constant)
    if not isinstance(value, dict):
        raise ValueError("a signed payload must be a JSON object")
    return value
