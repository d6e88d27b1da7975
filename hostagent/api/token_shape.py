"""What a JWT must look like before PyJWT sees it: canonical base64url, numeric time claims.

PyJWT is lenient where a billing API should not be: it accepts `=` padding and non-canonical
trailing bits in base64url segments (so one token has many spellings), and converts `exp`,
`nbf` and `iat` given as strings. RFC 7515 §2 and RFC 7519 §2 (NumericDate) say otherwise.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from typing import Any

TIME_CLAIMS = ("exp", "nbf", "iat")
# A NumericDate past this many seconds (year ~33,000,000) is no date: refused before any
# arithmetic, so an integer too large for a float never reaches PyJWT or math.isfinite.
MAX_NUMERIC_DATE = 1e15
_B64URL = re.compile(r"[A-Za-z0-9_-]*")


def canonical_segment(seg: str) -> bytes | None:
    """The bytes of a canonical unpadded base64url segment, else None."""
    if not _B64URL.fullmatch(seg) or len(seg) % 4 == 1:
        return None
    try:
        raw = base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4))
    except (binascii.Error, ValueError):
        return None
    if base64.urlsafe_b64encode(raw).rstrip(b"=").decode() != seg:
        return None  # non-zero trailing bits: another spelling of the same bytes
    return raw


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def shape_error(token: str) -> str | None:
    """Why `token` is not a well-formed compact JWS with numeric time claims, or None."""
    parts = token.split(".")
    if len(parts) != 3:
        return "a JWT has three dot-separated segments"
    decoded = [canonical_segment(p) for p in parts]
    if any(d is None for d in decoded):
        return "token segments must be canonical base64url without padding"
    header, payload, signature = decoded
    if not signature:
        return "token has no signature"
    try:
        claims: Any = json.loads(payload or b"", parse_constant=_no_constant)
        head: Any = json.loads(header or b"", parse_constant=_no_constant)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than Python's stack
        return "token header and payload must be JSON"
    if not isinstance(claims, dict) or not isinstance(head, dict):
        return "token header and payload must be JSON objects"
    for name in TIME_CLAIMS:
        v = claims.get(name)
        if name in claims and (isinstance(v, bool) or not isinstance(v, int | float)
                               or not _plausible(v)):
            return (f"`{name}` must be a number (NumericDate) within ±{MAX_NUMERIC_DATE:g}, "
                    f"not {type(v).__name__}")
    return None


def _plausible(v: float) -> bool:
    """A finite NumericDate within ±MAX_NUMERIC_DATE (ints compared exactly: no float cast)."""
    if isinstance(v, int):
        return -MAX_NUMERIC_DATE <= v <= MAX_NUMERIC_DATE
    return math.isfinite(v) and abs(v) <= MAX_NUMERIC_DATE
