"""Formation's form-p2p message queue (FORMATION.md §1): one event per POST /queue/write_local.

Wire format, exactly::

    POST {url}/queue/write_local          Content-Type: application/json
    {"Write": {"content": [sub_topic, <UTF-8 bytes of the event JSON>...],
               "topic": "<lowercase hex SHA3-256 of the topic NAME>"}}

`threshold_violation` events go to `alert_topic`, everything else to `topic`. The sink answers
to the channel "queue": the outbox gives it usage events, Alert rules' alerts and the Notify
alerts naming "queue" (hostagent.alerts.routing), and it sends every one of them. Only HTTP 200
with the JSON string "OpSuccess" is success. `{"Failure": …}` and 4xx (except 408/429) are
rejections (the event is dead-lettered after `dead_letter_after` of them); transport errors,
timeouts, 408/429, 5xx and any other reply are transient. The queue does not deduplicate:
a resend after a crash or a lost reply is stored twice; consumers dedupe on `event_id`.

Batching is ours: the delivery keeps up to `max_in_flight` requests in flight over a pool of
keep-alive connections. Two HTTP clients: `http_client = "h11"` (default for http:// URLs) is
a small keep-alive pool speaking HTTP/1.1 through h11 (the protocol engine httpx itself uses)
on trio sockets, ~0.1 ms of CPU per event; "httpx" is httpx.AsyncClient (via anyio), ~0.5 ms
per event, used for https:// URLs. On a 2-core host that is the difference between ~1,000
and several thousand events/s when a backlog drains.
"""

from __future__ import annotations

import hashlib
import select
from typing import Any

import h11
import httpx
import orjson
import trio

from hostagent.config.sinks import QueueSinkConfig
from hostagent.delivery.sinks.base import ConfiguredSink, Undeliverable
from hostagent.errors import SinkRejected, SinkUnavailable
from hostagent.model import OutEvent

ALERT_KIND = "threshold_violation"
CHANNEL = "queue"  # what a Notify rule's notification_channels name to reach the queue
WRITE_PATH = "/queue/write_local"
MAX_REPLY_BYTES = 64 * 1024
_HEADERS = {"Content-Type": "application/json"}
_TRANSPORT_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError,
                     h11.ProtocolError, httpx.HTTPError)


def topic_hash(name: str) -> str:
    """The queue's topic key: lowercase hex SHA3-256 of the topic name."""
    return hashlib.sha3_256(name.encode()).hexdigest()


def encode_write(payload: bytes, sub_topic: int, topic_hex: str) -> bytes:
    """The exact request body for one event."""
    return orjson.dumps({"Write": {"content": [sub_topic, *payload], "topic": topic_hex}})


def classify_reply(status: int, body: bytes) -> None:
    """Return on success; raise SinkRejected or SinkUnavailable for anything else."""
    snippet = body[:200].decode("utf-8", "replace")
    if status == 200:
        try:
            reply: Any = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise SinkUnavailable(f"unparsable reply: {snippet!r}") from None
        if reply == "OpSuccess":
            return
        if isinstance(reply, dict) and "Failure" in reply:
            failure = reply["Failure"]
            reason = failure.get("reason") if isinstance(failure, dict) else failure
            raise SinkRejected(f"queue Failure: {reason}")
        raise SinkUnavailable(f"unexpected reply: {snippet!r}")
    if status in (408, 429) or status >= 500 or status < 400:
        raise SinkUnavailable(f"HTTP {status}: {snippet!r}")
    raise SinkRejected(f"HTTP {status}: {snippet!r}")


class _Conn:
    """One keep-alive HTTP/1.1 connection."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)


class H11Pool:
    """Keep-alive HTTP/1.1 connections to one host (plain TCP), at most `size` kept idle."""

    def __init__(self, host: str, port: int, size: int) -> None:
        self.host, self.port, self.size = host, port, size
        self._host_header = f"{host}:{port}"
        self._idle: list[_Conn] = []

    async def post(self, target: str, body: bytes) -> tuple[int, bytes]:
        """POST `body`; (status, reply body). A reused connection the server had closed is
        replaced by a fresh one once, before any reply byte arrived."""
        while self._idle:
            conn = self._idle.pop()
            if _readable(conn.stream):
                # Idle, yet the queue sent something: it closed the connection, or sent bytes
                # nobody asked for (a reply for no request), which the next request would
                # read as its own reply. Never reused.
                await trio.aclose_forcefully(conn.stream)
                continue
            try:
                return await self._exchange(conn, target, body, reused=True)
            except _Stale:
                continue
        conn = _Conn(await trio.open_tcp_stream(self.host, self.port))
        try:
            return await self._exchange(conn, target, body, reused=False)
        except _Stale as err:
            raise SinkUnavailable(f"connection closed by the queue: {err}") from None

    async def _exchange(self, conn: _Conn, target: str, body: bytes, *, reused: bool,
                        ) -> tuple[int, bytes]:
        c = conn.h11
        ok = got_any = False
        try:
            headers = [("Host", self._host_header), ("Content-Type", "application/json"),
                       ("Content-Length", str(len(body)))]
            data = b"".join(c.send(e) or b"" for e in (
                h11.Request(method="POST", target=target, headers=headers),
                h11.Data(data=body), h11.EndOfMessage()))
            await conn.stream.send_all(data)
            status, reply = 0, bytearray()
            while True:
                ev = c.next_event()
                if ev is h11.NEED_DATA:
                    chunk = await conn.stream.receive_some(65536)
                    if not chunk and not got_any:
                        raise _Stale("closed before replying")
                    got_any = True
                    c.receive_data(chunk)
                elif isinstance(ev, h11.Response):
                    status = ev.status_code
                elif isinstance(ev, h11.Data):
                    reply += ev.data
                    if len(reply) > MAX_REPLY_BYTES:
                        raise SinkUnavailable(f"reply larger than {MAX_REPLY_BYTES} bytes")
                elif isinstance(ev, h11.EndOfMessage):
                    break
                elif isinstance(ev, h11.ConnectionClosed):
                    raise SinkUnavailable("connection closed mid-reply")
            if (c.our_state is h11.DONE and c.their_state is h11.DONE
                    and not c.trailing_data[0]):  # bytes after the reply: not reusable
                c.start_next_cycle()
                ok = len(self._idle) < self.size
            return status, bytes(reply)
        except trio.BrokenResourceError as err:
            if reused and not got_any:
                # The queue closed this idle connection as we reused it (its keep-alive
                # timeout, or a close right after its last reply, before we saw the FIN):
                # the kernel answers our write with a reset. Nothing of a reply came, so it
                # is a stale connection like a clean close: once more on a fresh one.
                raise _Stale(f"reset before replying ({err})") from None
            raise
        finally:
            if ok:
                self._idle.append(conn)
            else:
                await trio.aclose_forcefully(conn.stream)

    async def aclose(self) -> None:
        """Close idle connections."""
        idle, self._idle = self._idle, []
        for conn in idle:
            await trio.aclose_forcefully(conn.stream)


def _readable(stream: trio.SocketStream) -> bool:
    """Whether an idle connection has anything to read (data or the peer's close): one
    poll(2) with no wait."""
    poller = select.poll()
    poller.register(stream.socket.fileno(), select.POLLIN)
    return bool(poller.poll(0))


class _NoAnswer(Exception):  # an internal signal: httpx got no status line (its cause)
    """The connection closed or reset before any answer."""


class _Stale(Exception):  # an internal signal, turned into SinkUnavailable above
    """A reused keep-alive connection turned out to be closed."""


class FormationQueueSink(ConfiguredSink[QueueSinkConfig]):
    """Publishes events to a form-p2p queue over HTTP."""

    channels: frozenset[str] | None = frozenset({CHANNEL})

    def __init__(self, cfg: QueueSinkConfig) -> None:
        self.cfg = cfg
        self._topics = {"default": topic_hash(cfg.topic), ALERT_KIND: topic_hash(cfg.alert_topic)}
        url = httpx.URL(cfg.url)
        self._target = url.path.rstrip("/") + WRITE_PATH
        self._pool: H11Pool | None = None
        self._client: httpx.AsyncClient | None = None
        if cfg.http_client == "h11" and url.scheme == "http":
            self._pool = H11Pool(url.host, url.port or 80, cfg.max_in_flight)
        else:
            limits = httpx.Limits(max_connections=cfg.max_in_flight,
                                  max_keepalive_connections=cfg.max_in_flight)
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(cfg.timeout_s), limits=limits,
                                             trust_env=False)
            self._url = str(url.copy_with(path=self._target))

    @property
    def max_in_flight(self) -> int:
        """Concurrent requests."""
        return self.cfg.max_in_flight

    def body_for(self, event: OutEvent) -> bytes:
        """The request body for `event` (topic chosen by kind)."""
        topic = self._topics.get(event.kind, self._topics["default"])
        return encode_write(event.payload, self.cfg.sub_topic, topic)

    async def _post_httpx(self, body: bytes) -> tuple[int, bytes]:
        """POST through httpx; once more when the first try got no answer at all (the
        connection closed or reset before a status line): httpx reuses a pooled connection
        the queue may have closed just then (its keep-alive timeout racing our write), and
        failed that write as the queue's error, as the h11 pool did (`H11Pool.post`)."""
        try:
            return await self._post_httpx_once(body)
        except _NoAnswer:
            pass
        try:
            return await self._post_httpx_once(body)
        except _NoAnswer as err:
            raise err.__cause__ or err from None

    async def _post_httpx_once(self, body: bytes) -> tuple[int, bytes]:
        assert self._client is not None
        answered = False
        try:
            async with self._client.stream("POST", self._url, content=body,
                                           headers=_HEADERS) as resp:
                answered = True
                reply = bytearray()
                async for chunk in resp.aiter_bytes():
                    reply += chunk
                    if len(reply) > MAX_REPLY_BYTES:
                        raise SinkUnavailable(f"reply larger than {MAX_REPLY_BYTES} bytes")
                return resp.status_code, bytes(reply)
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as err:
            if answered:
                raise
            raise _NoAnswer from err

    async def send(self, event: OutEvent) -> None:
        """POST one event; return only on "OpSuccess"."""
        body = self.body_for(event)
        if len(body) > self.cfg.max_request_bytes:
            raise Undeliverable(f"encoded request is {len(body)} bytes, over max_request_bytes="
                                f"{self.cfg.max_request_bytes} (the queue's body limit)")
        try:
            # One overall deadline (connect + send + reply): a drip-feeding server must not
            # hold a slot longer than timeout_s.
            with trio.fail_after(self.cfg.timeout_s):
                if self._pool is not None:
                    status, reply = await self._pool.post(self._target, body)
                else:
                    status, reply = await self._post_httpx(body)
        except trio.TooSlowError:
            raise SinkUnavailable(f"no reply within {self.cfg.timeout_s}s") from None
        except _TRANSPORT_ERRORS as err:
            raise SinkUnavailable(f"{type(err).__name__}: {err}") from err
        classify_reply(status, reply)

    async def flush(self) -> None:
        """Nothing to flush: "OpSuccess" means the queue has it."""

    async def aclose(self) -> None:
        """Close the connections."""
        if self._pool is not None:
            await self._pool.aclose()
        if self._client is not None:
            await self._client.aclose()
