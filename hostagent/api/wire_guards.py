"""Requests that made hypercorn raise out of a connection, kept from the code that raised.

Hypercorn's trio server ends with the first exception a connection lets out, and the
daemon's nursery with it: one unauthenticated request stopped the API, the collector and
everything else. Each had a way in that `install()` closes (once per process):

- HTTP/2. Hypercorn speaks it to a client that asks: by ALPN over TLS, and in cleartext to
  one that opens with the HTTP/2 preface (prior knowledge) or sends `Upgrade: h2c`. Its
  HTTP/2 layer raised on DATA for a stream the app had already answered (a 401 or 413 sent
  before the client's body ended: KeyError in `H2Protocol._handle_events`,
  pgjones/hypercorn#329) and on a CONNECT without `:path` (UnboundLocalError in
  `H2Protocol._create_stream`). The API needs nothing from HTTP/2 (small requests, on
  loopback or behind a proxy), so it offers none: `ALPN` is all that
  `server.hypercorn_config` offers over TLS, and `H11Protocol._check_protocol`, the one
  place that raises hypercorn's two switches to HTTP/2, is swapped for a method that never
  switches. An `Upgrade: h2c` is then ignored (RFC 9110 §7.8 lets a server) and answered in
  HTTP/1.1; the preface's `PRI * HTTP/2.0` is a request like another (404 problem+json), and
  h11 refuses the binary frames after it (400, connection closed: `wire_errors`).
- A WebSocket upgrade whose `Connection`, `Sec-WebSocket-Extensions` or
  `Sec-WebSocket-Protocol` is not ASCII: hypercorn's `Handshake` splits them with wsproto's
  `split_comma_header`, which raised UnicodeDecodeError. `_Handshake` reads such a request as
  no valid handshake: the 400 problem+json of every other one (`wire_errors`).
- Bytes after a valid WebSocket upgrade request, sent before any answer (a body, or the
  frames of a client that does not wait for the 101): hypercorn refused them with a 400 from
  the connection's task while the app's own refusal (403) was being sent from the app's, and
  the two answers raced on one socket (trio.BusyResourceError). `_ws_handle` drops such bytes
  while the app decides: the app accepts no WebSocket, so its 403 is the one answer.
- A client that closes while the app still answers it (found by an API sweep: thousands of
  pipelined requests never read, then a close; 2 of 4 tries). `TCPServer._close` sends the EOF
  without the `send_lock` that the app's answers take, so an answer's `send_all` meeting it
  raised trio.BusyResourceError out of `TCPServer.protocol_send`, which only takes a broken or
  closed stream for the client gone: the app logged "api route failed" and hypercorn a
  traceback, and a 5xx was counted, for a client that had left. `_protocol_send` takes that
  error for what it is, the connection closing, as hypercorn takes a broken stream.

The four swaps are hypercorn internals, read against hypercorn 0.18 (0.17 not checked). As
in `wire_errors`, `mismatches()` compares what they rely on with the installed hypercorn; on
any mismatch `install()` logs a warning and leaves hypercorn alone, and
tests/api/test_sweep_requests.py fails.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import h11
import trio
from hypercorn import events as conn_events
from hypercorn.protocol import ws_stream
from hypercorn.protocol.events import Body, Data, Event
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio.tcp_server import TCPServer

from hostagent.api.wire_errors import hypercorn_version

log = logging.getLogger(__name__)

ALPN = ("http/1.1",)  # the protocols offered over TLS (hypercorn's default adds h2)
SWITCHES = frozenset({"H2CProtocolRequiredError", "H2ProtocolAssumedError"})
_originals: dict[str, Any] = {}


async def _stay_http1(self: H11Protocol, event: h11.Request) -> None:
    """Stands in for H11Protocol._check_protocol: the connection stays HTTP/1.1."""
    del self, event


class _Handshake(ws_stream.Handshake):
    """Hypercorn's WebSocket handshake; token lists that are not ASCII make it invalid."""

    def __init__(self, headers: list[tuple[bytes, bytes]], http_version: str) -> None:
        try:
            super().__init__(headers, http_version)
        except UnicodeDecodeError:  # from wsproto's split_comma_header
            super().__init__([], http_version)  # no key, no version: is_valid() is False


async def _ws_handle(self: ws_stream.WSStream, event: Event) -> None:
    """Stands in for WSStream.handle: what the client sends while the app decides on its
    upgrade is dropped (the app's refusal answers it), not refused in a second answer."""
    if isinstance(event, Body | Data) and self.app_put is not None \
            and not self.handshake.accepted:
        return
    await _originals["ws_handle"](self, event)


async def _protocol_send(self: TCPServer, event: conn_events.Event) -> None:
    """Stands in for TCPServer.protocol_send: a send that meets the connection's EOF being
    sent (`TCPServer._close`, the client gone) ends like a send to a broken stream."""
    try:
        await _originals["protocol_send"](self, event)
    except trio.BusyResourceError:
        await self.protocol.handle(conn_events.Closed())


def mismatches() -> list[str]:
    """What the swaps rely on and the installed hypercorn no longer has (empty: they fit)."""
    found = []
    where = "H11Protocol._check_protocol"
    check = _originals.get("check_protocol", getattr(H11Protocol, "_check_protocol", None))
    if check is None or not inspect.iscoroutinefunction(check):
        found.append(f"{where}: no such coroutine method")
    else:
        if list(inspect.signature(check).parameters) != ["self", "event"]:
            found.append(f"{where}: signature is now {inspect.signature(check)}")
        if not SWITCHES.issubset(check.__code__.co_names):
            found.append(f"{where}: no longer raises {sorted(SWITCHES)}")
    others = [name for name, fn in vars(H11Protocol).items() if name != "_check_protocol"
              and inspect.isfunction(fn) and SWITCHES & set(fn.__code__.co_names)]
    if others:
        found.append(f"{where}: the switches are raised in {sorted(others)} too")
    if "_check_protocol" not in H11Protocol._handle_events.__code__.co_names:
        found.append(f"{where}: no longer called by H11Protocol._handle_events")
    where = "ws_stream.Handshake"
    handshake = _originals.get("handshake", ws_stream.Handshake)
    if list(inspect.signature(handshake.__init__).parameters) != [
            "self", "headers", "http_version"]:
        found.append(f"{where}: signature is now {inspect.signature(handshake.__init__)}")
    where = "WSStream.handle"
    handle = _originals.get("ws_handle", ws_stream.WSStream.handle)
    if list(inspect.signature(handle).parameters) != ["self", "event"]:
        found.append(f"{where}: signature is now {inspect.signature(handle)}")
    if not {"Handshake", "app_put", "accepted", "_send_error_response"}.issubset(
            handle.__code__.co_names):
        found.append(f"{where}: no longer makes a Handshake, spawns the app (app_put) and "
                     "refuses bytes before it accepted")
    where = "TCPServer.protocol_send"
    send = _originals.get("protocol_send", getattr(TCPServer, "protocol_send", None))
    if send is None or not inspect.iscoroutinefunction(send):
        found.append(f"{where}: no such coroutine method")
    elif list(inspect.signature(send).parameters) != ["self", "event"]:
        found.append(f"{where}: signature is now {inspect.signature(send)}")
    elif not {"send_all", "send_lock", "BrokenResourceError", "Closed"}.issubset(
            send.__code__.co_names):
        found.append(f"{where}: no longer sends under send_lock, taking a broken stream for "
                     "the client gone")
    close = getattr(TCPServer, "_close", None)
    if close is None or "send_eof" not in close.__code__.co_names:
        found.append("TCPServer._close: no longer sends the EOF")
    return found


def install() -> bool:
    """Close both ways in; False (and a warning, hypercorn left alone) if hypercorn changed."""
    if _originals:
        return True
    if problems := mismatches():
        log.warning("api: hypercorn internals changed, its guards against crashing requests "
                    "are off", extra={"hypercorn": hypercorn_version(), "mismatches": problems})
        return False
    _originals["check_protocol"] = H11Protocol._check_protocol
    _originals["handshake"] = ws_stream.Handshake
    _originals["ws_handle"] = ws_stream.WSStream.handle
    _originals["protocol_send"] = TCPServer.protocol_send
    setattr(H11Protocol, "_check_protocol", _stay_http1)  # noqa: B010 (as in wire_errors)
    setattr(ws_stream, "Handshake", _Handshake)  # noqa: B010
    setattr(ws_stream.WSStream, "handle", _ws_handle)  # noqa: B010
    setattr(TCPServer, "protocol_send", _protocol_send)  # noqa: B010
    return True
