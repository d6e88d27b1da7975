"""Requests from an adversarial sweep of the API over real HTTP on 127.0.0.1.

Each case here once stopped the server, and with it the daemon whose nursery serves it: found
by sending hostile requests to a running daemon, checked against a real server.
"""

from __future__ import annotations

import contextlib
import ssl
import types
from pathlib import Path

import h2.config
import h2.connection
import httpx
import pytest
import trio
from hypercorn.protocol import ws_stream
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio.tcp_server import TCPServer

from hostagent.api import wire_errors, wire_guards
from hostagent.api.server import hypercorn_config, make_app, serve_api
from hostagent.api.view import ApiView
from tests.api.support import Keys, Server, api_config
from tests.api.test_server import self_signed
from tests.api.test_wire_errors import WS_HANDSHAKE, Answer, assert_problem, exchange, parse


def h2_client() -> h2.connection.H2Connection:
    """An HTTP/2 client that sends what it is told, valid or not, with prior knowledge."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False))
    conn.initiate_connection()  # the preface (PRI * HTTP/2.0 ...) and a SETTINGS frame
    return conn


async def send_in_two_parts(url: str, first: bytes, then: bytes) -> bytes:
    """`first`, what the server answers within 0.5 s, `then`, and the rest until it closes."""
    host, port = url.removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    data = b""
    try:
        await stream.send_all(first)
        with trio.move_on_after(0.5):  # the app answers before the body's end has come
            while chunk := await stream.receive_some():
                data += chunk
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(then)
        with trio.fail_after(5), contextlib.suppress(trio.BrokenResourceError):
            while chunk := await stream.receive_some():
                data += chunk
    finally:
        await stream.aclose()
    return data


def answers(data: bytes) -> list[Answer]:
    """Every HTTP/1.1 response in `data`."""
    out = []
    while data:
        answer, data = parse(data)
        out.append(answer)
    return out


async def test_http2_body_after_the_answer_does_not_stop_the_server(
        server: Server, client: httpx.AsyncClient) -> None:
    # An unauthenticated HTTP/2 upload: the app answers 401 on the headers, the body comes
    # after. hypercorn's HTTP/2 layer looked the closed stream up (KeyError), and its trio
    # server, the API and the daemon ended with that one connection.
    conn = h2_client()
    conn.send_headers(1, [(":method", "POST"), (":path", "/api/v1/webhooks"),
                          (":scheme", "http"), (":authority", "127.0.0.1"),
                          ("content-type", "application/json")])
    first = conn.data_to_send()
    conn.send_data(1, b"{}", end_stream=True)
    got = answers(await send_in_two_parts(server.url, first, conn.data_to_send()))
    # Served as HTTP/1.1: `PRI *` is no route, and h11 refuses the frames after it.
    assert [a.status for a in got] == [404, 400]
    for a in got:
        assert_problem(a, a.status)
    assert got[-1].headers["connection"] == "close"
    assert (await client.get("/health")).text == "healthy"


async def test_http2_connect_without_a_path_does_not_stop_the_server(
        server: Server, client: httpx.AsyncClient) -> None:
    # hypercorn's HTTP/2 stream set-up read `:path` unconditionally (UnboundLocalError).
    conn = h2_client()
    conn.send_headers(1, [(":method", "CONNECT"), (":authority", "127.0.0.1:1")])
    got = answers(await send_in_two_parts(server.url, conn.data_to_send(), b""))
    assert got and all(400 <= a.status < 500 for a in got)
    assert (await client.get("/health")).text == "healthy"


async def test_an_h2c_upgrade_is_answered_in_http1(server: Server) -> None:
    raw = (b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
           b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n")
    data = await send_in_two_parts(server.url, raw, b"GET /health HTTP/1.1\r\nHost: x\r\n"
                                                    b"Connection: close\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200 ")  # no 101 Switching Protocols
    assert [(a.status, a.body) for a in answers(data)] == [(200, b"healthy")] * 2


@pytest.mark.parametrize("header", [
    b"Sec-WebSocket-Protocol: chat, \xe9", b"Sec-WebSocket-Extensions: \xff",
    b"Connection: Upgrade, \xe9"])
async def test_a_non_ascii_websocket_handshake_is_a_400_not_the_end_of_the_server(
        server: Server, client: httpx.AsyncClient, header: bytes) -> None:
    # hypercorn split these headers with wsproto's split_comma_header: UnicodeDecodeError.
    raw = (b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
           + header + b"\r\n\r\n")
    answer, _ = parse(await exchange(server.url, raw, until_eof=False))
    body = assert_problem(answer, 400)  # as every other invalid handshake
    assert body["instance"] == "/health"
    assert (await client.get("/health")).text == "healthy"


@pytest.mark.parametrize("after", [
    b"Content-Length: 5\r\n\r\nabcde",                            # a body
    b"Transfer-Encoding: chunked\r\n\r\n5\r\nabcde\r\n0\r\n\r\n",    # a chunked one
    b"\r\n\x81\x85abcd\x00\x00\x00\x00\x00",                         # frames, before the 101
])
async def test_bytes_after_a_websocket_upgrade_get_one_answer(
        server: Server, client: httpx.AsyncClient, after: bytes) -> None:
    # hypercorn refused them (400) while the app refused the upgrade (403): two answers raced
    # on one socket, trio.BusyResourceError ended the server.
    raw = b"GET /health HTTP/1.1\r\nHost: x\r\n" + WS_HANDSHAKE + after
    answer, rest = parse(await exchange(server.url, raw))
    assert_problem(answer, 403)  # the app's refusal, as without the bytes
    assert rest == b""
    assert (await client.get("/health")).text == "healthy"


async def test_tls_offers_http1_only(nursery: trio.Nursery, keys: Keys, tmp_path: Path) -> None:
    cf, kf = self_signed(tmp_path)
    cfg = api_config(keys, tls_cert_file=str(cf), tls_key_file=str(kf))
    assert hypercorn_config(cfg).alpn_protocols == ["http/1.1"]
    stop = trio.Event()
    binds = await nursery.start(serve_api, cfg, make_app(cfg, ApiView()), stop)
    ctx = ssl.create_default_context(cafile=str(cf))
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    host, port = binds[0].removeprefix("https://").split(":")
    stream = await trio.open_ssl_over_tcp_stream(host, int(port), ssl_context=ctx)
    await stream.do_handshake()
    assert stream.selected_alpn_protocol() == "http/1.1"
    await stream.aclose()
    stop.set()


def test_hypercorn_internals_still_fit_the_guards() -> None:
    # Fails here, loudly, when a hypercorn upgrade moves what the guards replace; at run time
    # the server then logs a warning and serves without them.
    assert wire_guards.mismatches() == []
    assert wire_guards.install() is True
    assert wire_guards.install() is True  # idempotent
    assert vars(H11Protocol)["_check_protocol"] is wire_guards._stay_http1
    assert vars(ws_stream)["Handshake"] is wire_guards._Handshake
    assert vars(TCPServer)["protocol_send"] is wire_guards._protocol_send


async def test_an_answer_meeting_the_closing_eof_ends_the_connection_quietly() -> None:
    """hypercorn's `_close` sends the EOF outside the `send_lock` the app's answers take: an
    answer sent meanwhile raised trio.BusyResourceError out of `protocol_send` into the app
    (an "api route failed" error, hypercorn's traceback and a 5xx counted, for a client that
    had closed: found by an API sweep). Now it ends the connection as a broken stream does."""
    from hypercorn.events import Closed, RawData

    assert wire_guards.install() is True
    handled: list[object] = []

    class Closing:  # the stream while `_close` holds it for its EOF
        async def send_all(self, data: bytes) -> None:
            raise trio.BusyResourceError("another task is currently sending data")

    class Protocol:
        async def handle(self, event: object) -> None:
            handled.append(event)

    conn = types.SimpleNamespace(send_lock=trio.Lock(), stream=Closing(), protocol=Protocol())
    await TCPServer.protocol_send(conn, RawData(b"HTTP/1.1 200 OK\r\n"))  # type: ignore[arg-type]
    assert [type(e) for e in handled] == [Closed]
    assert not conn.send_lock.locked()
    with pytest.raises(trio.BusyResourceError):  # what hypercorn itself does
        await wire_guards._originals["protocol_send"](conn, RawData(b"x"))


def test_changed_internals_leave_hypercorn_alone(monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(wire_guards, "_originals", {})
    monkeypatch.setattr(H11Protocol, "_check_protocol", wire_errors.problem_body)
    monkeypatch.setattr(ws_stream, "Handshake", H11Protocol)
    assert wire_guards.install() is False
    assert vars(H11Protocol)["_check_protocol"] is wire_errors.problem_body
    assert vars(ws_stream)["Handshake"] is H11Protocol
    assert "hypercorn internals changed" in caplog.text


@pytest.mark.parametrize("rule_id", [".", ".."])
async def test_a_rule_id_of_dot_segments_is_refused(client: httpx.AsyncClient, keys: Keys,
                                                    rule_id: str) -> None:
    # httpx and curl remove `.` and `..` from a URL: /api/v1/thresholds/.. could not be
    # addressed again once stored.
    rule = {"id": rule_id, "resource_type": "storage", "threshold_type": "absolute",
            "threshold_value": 500, "units": "GB", "action": "notify", "user_id": "u",
            "notification_channels": []}
    got = await client.post("/api/v1/thresholds", headers={"X-API-Key": keys.admin_key},
                            json=rule)
    assert got.status_code == 400, got.text
    assert_problem(Answer(got.status_code, dict(got.headers), got.content), 400)
    listed = await client.get("/api/v1/thresholds", headers={"X-API-Key": keys.admin_key})
    assert listed.json() == []
