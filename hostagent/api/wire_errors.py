"""Problem+json bodies for the requests hypercorn refuses before the app sees them.

h11 (inside hypercorn) refuses some requests itself: a malformed request line or header,
conflicting Content-Length, a malformed chunked body (400), a Transfer-Encoding other than
chunked (501), a request head past `h11_max_incomplete_size` (431). Hypercorn's WebSocket
stream refuses upgrades the app did not accept (403) or that are no valid handshake (400).
Hypercorn answers all of these from one method per stream kind, `_send_error_response`, with
a bare status and an empty body, and has no setting or hook for it. `install()` swaps those
two methods, once per process, for ones that send the same status (a 500 from h11's hint
becomes 400: h11 refused the client's bytes) with an RFC 9457 body in the app's shape
(`hostagent.api.problems`), `Content-Type: application/problem+json`, a matching
Content-Length and `Connection: close`. Hypercorn closes the connection after the h11
answers, as before. HTTP/2's own refusals are untouched: h2 answers bad frames by resetting
the stream or the connection, not with a response.

The swapped methods are hypercorn internals, checked against hypercorn 0.17 and 0.18.
`mismatches()` compares what the hook relies on with the installed hypercorn; on any mismatch
`install()` logs a warning and leaves hypercorn alone (the API serves, with the empty bodies),
and tests/api/test_wire_errors.py fails, as it does for an unverified hypercorn version.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
from collections.abc import Callable, Coroutine
from http import HTTPStatus
from time import time
from typing import Any

import h11
import orjson
from hypercorn.events import RawData
from hypercorn.protocol.events import Body, EndBody, Response
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.ws_stream import WSStream

from hostagent.api.problems import PROBLEM_TYPE_BASE, TITLES

log = logging.getLogger(__name__)

VERIFIED_HYPERCORN = ("0.17", "0.18")  # major.minor whose internals this module was read against

H11_DETAILS = {
    400: "malformed HTTP request (request line, a header or the body's framing); "
         "the connection is closed",
    431: "request line and headers longer than the server reads ({limit} bytes); "
         "the connection is closed",
    501: "unsupported Transfer-Encoding: only chunked is implemented; the connection is closed",
}
WS_DETAILS = {
    400: "not a valid WebSocket handshake; this API serves plain HTTP only",
    403: "WebSocket upgrade refused: this API serves plain HTTP only",
    404: "unknown server name",
}

ErrorResponse = Callable[[Any, int], Coroutine[Any, Any, None]]

# What each original `_send_error_response` uses (its duties), and which caller must still
# route refusals through it: a change in either means the swap needs reading again.
EXPECTED: dict[type, tuple[frozenset[str], Callable[..., object]]] = {
    H11Protocol: (frozenset({"EndOfMessage", "Response", "_send_h11_event", "chain", "config",
                             "h11", "list", "response_headers"}), H11Protocol._handle_events),
    WSStream: (frozenset({"EndBody", "Response", "access", "config", "log", "scope", "send",
                          "start_time", "stream_id", "time"}), WSStream.handle),
}
_originals: dict[type, ErrorResponse] = {}


def problem_body(status: int, detail: str, instance: str) -> bytes:
    """The body `problems.problem_response` gives, also for statuses the app never answers."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    title = TITLES.get(status, phrase)
    return orjson.dumps({"type": PROBLEM_TYPE_BASE + title.lower().replace(" ", "-"),
                         "title": title, "status": status, "detail": detail,
                         "instance": instance})


def _headers(body: bytes) -> list[tuple[bytes, bytes]]:
    return [(b"content-type", b"application/problem+json"),
            (b"content-length", str(len(body)).encode()), (b"connection", b"close")]


async def _h11_error_response(self: H11Protocol, status_code: int) -> None:
    """Stands in for H11Protocol._send_error_response: h11 refused the request's bytes."""
    status = status_code if 400 <= status_code < 600 and status_code != 500 else 400
    detail = H11_DETAILS.get(status, "request refused by the HTTP layer; the connection is "
                                     "closed").format(limit=self.config.h11_max_incomplete_size)
    # The target is unknown (the head did not parse); "" refers to the request itself.
    body = problem_body(status, detail, "")
    # Encoded whole, with no checkpoint between the events: when only the body was malformed
    # the app already runs, and its own response, tried between two of ours, would put h11
    # into ERROR and drop our body (hypercorn's bodyless answer did not mind).
    head = h11.Response(status_code=status,
                        headers=_headers(body) + self.config.response_headers("h11"))
    try:
        data = b"".join(self.connection.send(event)
                        for event in (head, h11.Data(data=body), h11.EndOfMessage()))
    except h11.LocalProtocolError:
        return  # as hypercorn's _send_h11_event: no answer once h11 refuses ours
    await self.send(RawData(data=data))


async def _ws_error_response(self: WSStream, status_code: int) -> None:
    """Stands in for WSStream._send_error_response: an upgrade the app does not take."""
    detail = WS_DETAILS.get(status_code, "WebSocket upgrade failed")
    body = problem_body(status_code, detail, self.scope["path"])
    await self.send(Response(stream_id=self.stream_id, status_code=status_code,
                             headers=_headers(body)))
    await self.send(Body(stream_id=self.stream_id, data=body))
    await self.send(EndBody(stream_id=self.stream_id))
    await self.config.log.access(self.scope, {"status": status_code, "headers": []},
                                 time() - self.start_time)


REPLACEMENTS: dict[type, ErrorResponse] = {H11Protocol: _h11_error_response,
                                           WSStream: _ws_error_response}


def hypercorn_version() -> str:
    """The installed hypercorn's version."""
    return importlib.metadata.version("hypercorn")


def hypercorn_version_verified() -> bool:
    """True when the installed hypercorn's major.minor is one this module was read against."""
    return ".".join(hypercorn_version().split(".")[:2]) in VERIFIED_HYPERCORN


def mismatches() -> list[str]:
    """What the swap relies on and the installed hypercorn no longer has (empty: it fits)."""
    found = []
    for cls, (names, caller) in EXPECTED.items():
        where = f"{cls.__name__}._send_error_response"
        original = _originals.get(cls, getattr(cls, "_send_error_response", None))
        if original is None or not inspect.iscoroutinefunction(original):
            found.append(f"{where}: no such coroutine method")
            continue
        if list(inspect.signature(original).parameters) != ["self", "status_code"]:
            found.append(f"{where}: signature is now {inspect.signature(original)}")
        if frozenset(original.__code__.co_names) != names:
            found.append(f"{where}: uses {sorted(original.__code__.co_names)}")
        if "_send_error_response" not in caller.__code__.co_names:
            found.append(f"{where}: no longer called by {caller.__qualname__}")
    return found


def install() -> bool:
    """Give hypercorn's own refusals problem+json bodies; False (and a warning) if it can't."""
    if all(getattr(cls, "_send_error_response", None) is fn for cls, fn in REPLACEMENTS.items()):
        return True
    if problems := mismatches():
        log.warning("api: hypercorn internals changed, its own refusals keep empty bodies",
                    extra={"hypercorn": hypercorn_version(), "mismatches": problems})
        return False
    for cls, fn in REPLACEMENTS.items():
        _originals[cls] = getattr(cls, "_send_error_response")  # noqa: B009
        setattr(cls, "_send_error_response", fn)  # noqa: B010 (mypy refuses method assignment)
    return True
