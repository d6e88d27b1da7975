"""A JSON object whose one large array is handed over an item at a time, never built whole.

The account service's `account/list` answer is one object holding every account of the cloud
(`{"success": true, "accounts": [...], "total": N}`). Parsed whole (orjson), 16 MiB of minimal
accounts took a 277 MB peak of Python objects (tracemalloc; +130 MB of RSS in a fresh
process), most of it the document, which the owner index then throws away: it keeps ~62 MB of
parsed accounts.
`walk_object` reads the top-level object with the standard library's C scanner
(`json.JSONDecoder.raw_decode`), one member at a time, and the named array one item at a time:
each item goes to `on_item` and is dropped, so the peak is the body, its text and what
`on_item` keeps. The rules are orjson's, which the whole-body parse used: strict UTF-8, no
`NaN`/`Infinity` or a number beyond a float, nothing after the object, a duplicate key's
last value wins (tests/owners/test_json_stream.py holds the two to the same answers).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

_SPACE = re.compile(r"[ \t\n\r]*")


class MalformedJson(ValueError):
    """The text is not one JSON value (the message says where)."""


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e400: orjson refuses it too
        raise ValueError(f"number out of range: {text[:40]}")
    return value


_DECODER = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite)


class Streamed:
    """`walk_object`'s answer: the object's other members (small values), and whether the
    streamed key was an array (its items went to `on_item`) or not (its value is in
    `members`, for the caller's error message)."""

    __slots__ = ("array_seen", "members")

    def __init__(self) -> None:
        self.members: dict[str, Any] = {}
        self.array_seen = False


def loads(body: bytes) -> Any:
    """The whole value (for an answer that is not an object: the caller's error names it)."""
    return _value(_text(body), 0, whole=True)[0]


def walk_object(body: bytes, key: str, on_item: Callable[[int, Any], None],
                on_restart: Callable[[], None]) -> Streamed | None:
    """The top-level object of `body`, its `key` array's items given to `on_item(index, item)`
    in order (`on_restart()`: `key` came again, forget what its items gave); None when the
    body is a JSON value but not an object. MalformedJson when it is not JSON (after
    `on_item` may have seen some items: the caller keeps nothing then)."""
    text = _text(body)
    i = _skip(text, 0)
    if not text.startswith("{", i):
        _value(text, 0, whole=True)  # malformed, or a value of another type
        return None
    out = Streamed()
    seen = False
    i = _skip(text, i + 1)
    if text.startswith("}", i):
        return _end(text, i + 1, out)
    while True:
        name, i = _value(text, i)
        if not isinstance(name, str):
            raise MalformedJson(f"a member name expected at character {i}")
        i = _skip(text, i)
        if not text.startswith(":", i):
            raise MalformedJson(f"':' expected at character {i}")
        i = _skip(text, i + 1)
        if name == key:  # given twice: the last value wins, as everywhere in JSON here
            out.members.pop(key, None)
            out.array_seen = False
            if seen:
                on_restart()  # forget the items of the first
            seen = True
        if name == key and text.startswith("[", i):
            out.array_seen = True
            i = _items(text, i + 1, on_item)
        else:
            out.members[name], i = _value(text, i)
        i = _skip(text, i)
        if text.startswith(",", i):
            i = _skip(text, i + 1)
            continue
        if text.startswith("}", i):
            return _end(text, i + 1, out)
        raise MalformedJson(f"',' or '}}' expected at character {i}")


def _items(text: str, i: int, on_item: Callable[[int, Any], None]) -> int:
    """The array's items from `i` (after its `[`); where the array ends."""
    i = _skip(text, i)
    if text.startswith("]", i):
        return i + 1
    n = 0
    while True:
        item, i = _value(text, i)
        on_item(n, item)
        n += 1
        i = _skip(text, i)
        if text.startswith(",", i):
            i = _skip(text, i + 1)
            continue
        if text.startswith("]", i):
            return i + 1
        raise MalformedJson(f"',' or ']' expected at character {i}")


def _end(text: str, i: int, out: Streamed) -> Streamed:
    if _skip(text, i) != len(text):
        raise MalformedJson(f"trailing characters at character {_skip(text, i)}")
    return out


def _text(body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise MalformedJson(f"not UTF-8: {err}") from err


def _skip(text: str, i: int) -> int:
    m = _SPACE.match(text, i)
    return m.end() if m is not None else i


def _value(text: str, i: int, *, whole: bool = False) -> tuple[Any, int]:
    """One value at `i` (after white space); `whole`: it must be all of `text`."""
    i = _skip(text, i)
    try:
        value, end = _DECODER.raw_decode(text, i)
    except RecursionError as err:  # nested deeper than the interpreter's stack
        raise MalformedJson(f"depth limit exceeded at character {i}") from err
    except ValueError as err:  # json.JSONDecodeError, a constant refused
        raise MalformedJson(str(err)) from err
    if whole and _skip(text, end) != len(text):
        raise MalformedJson(f"trailing characters at character {_skip(text, end)}")
    return value, end
