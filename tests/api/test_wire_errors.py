"""Requests refused below the app (by h11 inside hypercorn) still get a problem+json answer.

Real server, real sockets: the raw bytes here never reach the ASGI app, so only the bytes on
the wire tell what a client sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson
import pytest
import trio
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.ws_stream import WSStream

from hostagent.api import wire_errors
from hostagent.api.problems import PROBLEM_TYPE_BASE, Problem, problem_response
from tests.api.support import Server

WS_HANDSHAKE = (b"Connection: Upgrade\r\nUpgrade: websocket\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n")

# name → (raw request, status hypercorn chooses; it was the same status with an empty body)
MALFORMED = {
    "bad request line": (b"GARBAGE\r\n\r\n", 400),
    "request line without version": (b"GET /health\r\n\r\n", 400),
    "conflicting content-length": (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
                                   b"Content-Length: 2\r\n\r\n", 400),
    "content-length not a number": (b"POST /health HTTP/1.1\r\nHost: x\r\n"
                                    b"Content-Length: abc\r\n\r\n", 400),
    "header without colon": (b"GET /health HTTP/1.1\r\nHost: x\r\nNoColonHere\r\n\r\n", 400),
    "no host on HTTP/1.1": (b"GET /health HTTP/1.1\r\n\r\n", 400),
    "non-ascii target": (b"GET /\xff HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "transfer-encoding gzip": (b"POST /health HTTP/1.1\r\nHost: x\r\n"
                               b"Transfer-Encoding: gzip\r\n\r\n", 501),
    "transfer-encoding gzip, chunked": (b"POST /health HTTP/1.1\r\nHost: x\r\n"
                                        b"Transfer-Encoding: gzip, chunked\r\n\r\n", 501),
    "two transfer-encoding headers": (b"POST /health HTTP/1.1\r\nHost: x\r\n"
                                      b"Transfer-Encoding: chunked\r\n"
                                      b"Transfer-Encoding: chunked\r\n\r\n", 501),
    "headers past the cap": (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000
                             + b"\r\n\r\n", 431),
}


@dataclass
class Answer:
    """One HTTP/1.1 response as read off the socket."""

    status: int
    headers: dict[str, str]
    body: bytes


def parse(data: bytes) -> tuple[Answer, bytes]:
    """The first response in `data` (framed by Content-Length) and the bytes after it."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    assert sep, data[:300]
    lines = head.decode("latin1").split("\r\n")
    version, status = lines[0].split(" ")[:2]
    assert version == "HTTP/1.1"
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        assert name.lower() not in headers, f"duplicate header {name}"
        headers[name.lower()] = value.strip()
    n = int(headers["content-length"])
    assert len(rest) >= n, (headers, rest)
    return Answer(int(status), headers, rest[:n]), rest[n:]


async def exchange(url: str, raw: bytes, *, until_eof: bool = True) -> bytes:
    """Send `raw` on a fresh connection; what comes back until the server closes it."""
    host, port = url.removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    data = b""
    try:
        await stream.send_all(raw)
        with trio.fail_after(5):  # the server must close the connection, not wait for more
            while chunk := await stream.receive_some():
                data += chunk
                if not until_eof and b"\r\n\r\n" in data:
                    try:
                        parse(data)
                    except AssertionError:
                        continue
                    break
    finally:
        await stream.aclose()
    return data


def assert_problem(a: Answer, status: int) -> dict[str, object]:
    """`a` is a complete problem+json answer of `status`; its body."""
    assert a.status == status, a
    assert a.headers["content-type"] == "application/problem+json", a.headers
    assert int(a.headers["content-length"]) == len(a.body)
    body = orjson.loads(a.body)
    assert isinstance(body, dict)
    assert body["status"] == status
    assert isinstance(body["type"], str) and body["type"].startswith(PROBLEM_TYPE_BASE)
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    assert isinstance(body["instance"], str)
    return body


@pytest.mark.parametrize("name", list(MALFORMED))
async def test_malformed_requests_get_problem_json_and_a_closed_connection(
        server: Server, name: str) -> None:
    raw, status = MALFORMED[name]
    data = await exchange(server.url, raw)  # returns only once the server has closed
    answer, rest = parse(data)
    assert rest == b""
    assert_problem(answer, status)
    assert answer.headers["connection"] == "close"
    assert answer.status != 500


async def test_problem_titles_and_types_name_the_status(server: Server) -> None:
    bodies = {}
    for name in ("bad request line", "transfer-encoding gzip", "headers past the cap"):
        raw, status = MALFORMED[name]
        answer, _ = parse(await exchange(server.url, raw))
        bodies[status] = assert_problem(answer, status)
    assert bodies[400]["title"] == "Bad Request"
    assert bodies[400]["type"] == PROBLEM_TYPE_BASE + "bad-request"
    assert bodies[501]["title"] == "Not Implemented"
    assert bodies[501]["type"] == PROBLEM_TYPE_BASE + "not-implemented"
    assert "Transfer-Encoding" in str(bodies[501]["detail"])
    assert bodies[431]["title"] == "Request Header Fields Too Large"


async def test_a_bad_chunked_body_is_a_problem(server: Server) -> None:
    # The head is fine (the app may already run); the body's framing is not. Whoever answers
    # first, the client gets a 4xx problem, and the connection closes.
    raw = (b"POST /api/v1/webhooks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n")
    answer, rest = parse(await exchange(server.url, raw))
    assert rest == b""
    assert 400 <= answer.status < 500
    assert_problem(answer, answer.status)


async def test_keep_alive_then_a_malformed_request_closes_the_connection(
        server: Server) -> None:
    good = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    data = await exchange(server.url, good + b"GARBAGE\r\n\r\n" + good)
    first, rest = parse(data)
    assert first.status == 200 and first.body == b"healthy"
    assert "connection" not in first.headers  # kept alive up to the bad request
    second, rest = parse(rest)
    assert_problem(second, 400)
    assert second.headers["connection"] == "close"
    assert rest == b""  # the request after the bad one is never served


async def test_a_good_connection_after_a_bad_one_is_served(server: Server) -> None:
    parse(await exchange(server.url, b"GARBAGE\r\n\r\n"))
    answer, _ = parse(await exchange(server.url, b"GET /health HTTP/1.1\r\nHost: x\r\n"
                                                 b"Connection: close\r\n\r\n"))
    assert answer.status == 200 and answer.body == b"healthy"


@pytest.mark.parametrize(("headers", "status"), [
    (WS_HANDSHAKE, 403),                                        # the app serves no WebSockets
    (b"Connection: upgrade\r\nUpgrade: websocket\r\n", 400),    # not even a valid handshake
])
async def test_websocket_upgrades_get_problem_json(server: Server, headers: bytes,
                                                   status: int) -> None:
    raw = b"GET /health HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n"
    answer, _ = parse(await exchange(server.url, raw, until_eof=False))
    body = assert_problem(answer, status)
    assert body["instance"] == "/health"
    assert answer.headers["connection"] == "close"


def test_wire_problems_have_the_apps_shape() -> None:
    for status in (400, 413, 431):
        assert (wire_errors.problem_body(status, "why", "/x")
                == problem_response(Problem(status, "why"), "/x").body)
    body = orjson.loads(wire_errors.problem_body(501, "why", ""))
    assert body == {"type": PROBLEM_TYPE_BASE + "not-implemented", "title": "Not Implemented",
                    "status": 501, "detail": "why", "instance": ""}


def test_hypercorn_internals_still_fit_the_hook() -> None:
    # Fails here, loudly, when a hypercorn upgrade moves what the hook replaces; at run time
    # the server then logs a warning and serves with hypercorn's empty bodies.
    assert wire_errors.mismatches() == []
    assert wire_errors.install() is True
    assert wire_errors.install() is True  # idempotent
    assert wire_errors.hypercorn_version_verified(), wire_errors.hypercorn_version()


def test_changed_internals_leave_hypercorn_alone(monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    assert wire_errors.install() is True
    originals = dict(wire_errors._originals)
    for cls, fn in originals.items():  # as before any install
        monkeypatch.setattr(cls, "_send_error_response", fn)
    monkeypatch.setattr(wire_errors, "_originals", {})
    monkeypatch.setitem(wire_errors.EXPECTED, H11Protocol,  # as if hypercorn had changed it
                        (frozenset({"something_else"}), H11Protocol._handle_events))
    used = sorted(originals[H11Protocol].__code__.co_names)
    assert wire_errors.mismatches() == [f"H11Protocol._send_error_response: uses {used}"]
    assert wire_errors.install() is False
    assert H11Protocol._send_error_response is originals[H11Protocol]  # left alone
    assert WSStream._send_error_response is originals[WSStream]
    assert "hypercorn internals changed" in caplog.text
