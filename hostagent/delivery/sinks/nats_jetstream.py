"""NATS JetStream sink: each event is one JetStream publish, acknowledged by the server's PubAck.

::

    PUB <subject> with headers  Nats-Msg-Id: <event_id>
                                Nats-Expected-Stream: <stream>
    body = the event's JSON bytes (the JSONL sink's line without its newline)

    PubAck {stream, seq}               stored: the row is acknowledged
    PubAck {..., duplicate: true}      stored before (a resend after a crash or a lost ack):
                                       delivered, nothing new stored
    no PubAck within timeout_s, no responders, disconnected, server error, stream full
    (discard new)                    → SinkUnavailable (retried; the event waits in the outbox)
    larger than the server's max_payload (headers counted), than the stream's max_msg_size
    or max_bytes                     → Undeliverable (dead-lettered)

Exactly once in the stream: the outbox re-sends an event until a PubAck came back, and the
stream drops a re-sent `Nats-Msg-Id` inside its duplicate window, so each event is stored once
as long as every resend happens within the window (`duplicate_window_s`, default 1 day).

Subjects: `threshold_violation` events go to `alert_subject`, every other kind to `subject`
(`{node_id}` and `{kind}` filled in, made subject-safe). The sink answers to the Notify channel
"nats", like the queue sink answers to "queue".

The client is nats-py (asyncio) in its own thread (hostagent.delivery.sinks.nats_bridge). The
connection is opened on the first send: connect (servers in turn), then the stream is checked
(or created when `create_stream = true`) and both subjects must be covered by it; a failure is
ONE clear line (logged once per distinct reason, and the error of every failed round) and the
events wait in the outbox. A publish nobody answers (the stream deleted, its subjects changed,
JetStream off) re-runs that check on the live connection: the stream is re-created
(`create_stream = true`) and the publish repeated, or the check's line is the reason the
events wait. Many publishes are in flight at once (`max_in_flight`): the engine
sends one instance's events in order and different instances concurrently; their PubAcks are
awaited together.
"""

from __future__ import annotations

import asyncio
import logging

import nats
import nats.errors
import nats.js.errors
import trio
import trio.lowlevel
from nats.js import JetStreamContext
from nats.js.api import PubAck, StreamInfo

from hostagent.config.nats_check import covered, render_subject
from hostagent.config.sinks import NatsSinkConfig
from hostagent.delivery.sinks.base import ConfiguredSink, Undeliverable
from hostagent.delivery.sinks.nats_bridge import AsyncioThread
from hostagent.delivery.sinks.nats_client import (
    CLOSE_TIMEOUT_S,
    ERR_MSG_TOO_LARGE,
    ERR_STORE_FAILED,
    EXPECTED_STREAM,
    MSG_ID,
    PROBE_STREAM,
    Conn,
    JetStream,
    Pub,
    SetupError,
    connect_budget_s,
    connect_options,
    message_bytes,
    stream_config,
)
from hostagent.errors import SinkUnavailable
from hostagent.model import OutEvent

log = logging.getLogger(__name__)

ALERT_KIND = "threshold_violation"
CHANNEL = "nats"  # what a Notify rule's notification_channels name to reach this sink
class NatsSink(ConfiguredSink[NatsSinkConfig]):
    """Publishes events to a JetStream stream through nats-py in a dedicated asyncio thread."""

    channels: frozenset[str] | None = frozenset({CHANNEL})

    def __init__(self, cfg: NatsSinkConfig, *, node_id: str = "") -> None:
        self.cfg = cfg
        self.node_id = node_id
        self.subjects = {ALERT_KIND: render_subject(cfg.alert_subject, node_id=node_id,
                                                    kind=ALERT_KIND)}
        self._bridge = AsyncioThread(f"nats-{cfg.name}")
        self._conn: Conn | None = None  # touched only in the asyncio thread
        self._lock: asyncio.Lock | None = None
        self._last_setup_error = ""
        self._pending: list[Pub] = []  # the batch the next leader sends
        self.duplicates = 0  # PubAcks with duplicate: true (re-sent events the stream had)

    @property
    def max_in_flight(self) -> int:
        """Publishes awaiting their PubAck at once."""
        return self.cfg.max_in_flight

    def subject_for(self, kind: str) -> str:
        """The subject of an event of this kind."""
        subject = self.subjects.get(kind)
        if subject is None:
            subject = self.subjects[kind] = render_subject(
                self.cfg.subject, node_id=self.node_id, kind=kind)
        return subject

    # --- asyncio side (runs in the bridge's thread) ---------------------------------------

    async def _connection(self) -> Conn:
        if self._conn is not None and not self._conn.nc.is_closed:
            return self._conn
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._conn is None or self._conn.nc.is_closed:
                self._conn = await self._open()
            return self._conn

    async def _open(self) -> Conn:
        cfg, errors = self.cfg, list[str]()
        try:
            async with asyncio.timeout(connect_budget_s(cfg)):
                nc = await nats.connect(**connect_options(cfg, errors))
        except (TimeoutError, nats.errors.Error, OSError) as err:
            reason = errors[-1] if errors else f"{type(err).__name__}: {err}"
            raise SetupError(f"cannot connect to {', '.join(cfg.servers)}: {reason}") from None
        try:
            # Enough async-publish permits that a batch never stalls on them (the engine keeps
            # at most max_in_flight sends), so publish_async needs no wait_stall timer.
            js = JetStream(nc, timeout=cfg.timeout_s,
                            publish_async_max_pending=max(4000, 2 * cfg.max_in_flight))
            info = await self._ensure_stream(js)
        except BaseException:
            await nc.close()
            raise
        return Conn(nc, js, info, errors)

    async def _ensure_stream(self, js: JetStreamContext) -> StreamInfo:
        cfg = self.cfg
        try:
            info = await js.stream_info(cfg.stream)
        except nats.js.errors.NotFoundError:
            if not cfg.create_stream:
                raise SetupError(f"stream {cfg.stream!r} does not exist; fix: create it (see "
                                 "README, Fleet) or set create_stream = true") from None
            info = await js.add_stream(stream_config(cfg))
            log.info("created stream", extra={"sink": cfg.name, "stream": cfg.stream})
        except (nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError,
                nats.errors.TimeoutError) as err:
            raise SetupError(f"no JetStream answer for stream {cfg.stream!r} "
                             f"({type(err).__name__}): JetStream disabled for this account, "
                             "or the cluster is still electing a leader") from None
        except nats.js.errors.APIError as err:
            raise SetupError(f"stream {cfg.stream!r}: {err.description}") from None
        patterns = info.config.subjects or []
        for subject in {self.subject_for("resource_usage"), self.subject_for(ALERT_KIND)}:
            if not covered(patterns, subject):
                raise SetupError(f"subject {subject!r} is not covered by stream {cfg.stream!r} "
                                 f"(subjects {patterns}); fix: add it to the stream or change "
                                 "subject/alert_subject")
        window_s = info.config.duplicate_window or 0
        if window_s < cfg.retry.round_backoff_max_s:
            log.warning("stream duplicate window shorter than the retry schedule",
                        extra={"sink": cfg.name, "duplicate_window_s": window_s,
                               "round_backoff_max_s": cfg.retry.round_backoff_max_s})
        return info

    async def _publish_batch(self, batch: list[Pub]) -> None:
        """Publish every message, then await their PubAcks together (asyncio side)."""
        try:
            conn = await self._connection()
        except SetupError as err:
            for p in batch:
                p.error = err
            return
        await self._publish(conn, batch)
        await self._after_refusals(conn, batch)

    def _never_fits(self, p: Pub, conn: Conn) -> Undeliverable | None:
        """Why this event can never be stored (None: it can), from the server's max_payload and
        the stream's max_bytes as last checked."""
        size = message_bytes(p.payload, p.event_id, self.cfg.stream)
        if size > (limit := conn.nc.max_payload):
            return Undeliverable(f"event is {size} bytes with its headers ({len(p.payload)} "
                                 f"without), over the server's max_payload {limit}")
        # The stream holds at least the subject and the headers too (the store adds more).
        max_bytes = conn.info.config.max_bytes or -1
        if 0 < max_bytes < size + len(p.subject):
            return Undeliverable(f"event is {size + len(p.subject)} bytes with its subject "
                                 f"and headers, over stream {self.cfg.stream!r}'s max_bytes "
                                 f"{max_bytes}")
        return None

    async def _after_refusals(self, conn: Conn, batch: list[Pub]) -> None:
        """The stream changed under the live connection: check it again, as at connect.

        No responders: the stream was deleted, its subjects no longer cover ours, or JetStream
        is off. Re-checking re-creates it (`create_stream = true`) and publishes those events
        again at once, or replaces "no responders" by the check's reason. A full stream
        (discard new) refusing an event that could never fit its max_bytes dead-letters it."""
        gone = [p for p in batch if isinstance(p.error, nats.js.errors.NoStreamResponseError)]
        full = [p for p in batch if isinstance(p.error, nats.js.errors.APIError)
                and p.error.err_code == ERR_STORE_FAILED]
        if not gone and not full:
            return
        try:
            conn.info = await self._ensure_stream(conn.js)
        except SetupError as err:
            for p in gone:
                p.error = err
            return
        except (nats.errors.Error, OSError):
            return  # the publishes' own errors stand
        for p in full:
            p.error = self._never_fits(p, conn) or p.error
        for p in gone:
            p.error = None
        await self._publish(conn, gone)

    async def _publish(self, conn: Conn, batch: list[Pub]) -> None:
        js = conn.js
        futures: dict[asyncio.Future[PubAck], Pub] = {}
        for p in batch:
            if (refusal := self._never_fits(p, conn)) is not None:
                p.error = refusal
                continue
            try:
                fut = await js.publish_async(p.subject, p.payload, stream=self.cfg.stream,
                                             headers={MSG_ID: p.event_id})
            except (nats.errors.Error, OSError) as err:
                p.error = err
                continue
            futures[fut] = p
        if not futures:
            return
        done, pending = await asyncio.wait(futures, timeout=self.cfg.timeout_s)
        denied = next((e for e in reversed(conn.errors) if "ermission" in e), "")
        for fut in pending:
            fut.cancel()
            futures[fut].error = TimeoutError(f"no PubAck within {self.cfg.timeout_s}s"
                                              + (f" (server said: {denied})" if denied else ""))
        for fut in done:
            if fut.cancelled():
                futures[fut].error = TimeoutError("publish cancelled")
            elif (exc := fut.exception()) is not None:
                futures[fut].error = exc
            else:
                futures[fut].duplicate = bool(fut.result().duplicate)

    async def _report(self) -> list[str]:
        conn = await self._connection()
        nc, info, cfg = conn.nc, conn.info, self.cfg
        url = nc.connected_url
        v = nc.connected_server_version
        lines = [f"connected: {url.geturl() if url else '?'} (nats-server "
                 f"{v.major}.{v.minor}.{v.patch})"]
        c = info.config
        lines.append(f"stream {cfg.stream}: subjects {c.subjects}, storage "
                     f"{getattr(c.storage, 'value', c.storage)}, replicas {c.num_replicas}, "
                     f"max_age {c.max_age or 0:.0f}s, duplicate_window "
                     f"{c.duplicate_window or 0:.0f}s, {info.state.messages} messages")
        if c.duplicate_window is not None and c.duplicate_window < cfg.retry.round_backoff_max_s:
            lines.append(f"warning: duplicate_window {c.duplicate_window:.0f}s < "
                         f"retry.round_backoff_max_s {cfg.retry.round_backoff_max_s:.0f}s")
        for kind in ("resource_usage", ALERT_KIND):
            subject = self.subject_for(kind)
            # The probe names a stream that does not exist: the owning stream refuses it
            # without storing anything, which proves publish permission and ownership.
            try:
                await conn.js.publish(subject, b"", timeout=cfg.timeout_s,
                                      headers={EXPECTED_STREAM: PROBE_STREAM})
            except nats.js.errors.APIError as err:
                lines.append(f"subject {subject} ({kind}): covered by {cfg.stream}, publish "
                             f"permitted (probe refused as expected: {err.description})")
                continue
            except (nats.errors.TimeoutError, nats.js.errors.NoStreamResponseError) as err:
                why = next((e for e in reversed(conn.errors) if "ermission" in e),
                           type(err).__name__)
                raise SetupError(f"subject {subject}: publish not answered ({why}); check "
                                 "the user's publish permissions") from None
            raise SetupError(f"subject {subject}: the probe was stored; is the stream's "
                             "Nats-Expected-Stream check missing?")
        return lines

    async def report(self) -> list[str]:
        """Connect, check the stream, the subjects and the publish permission; what was found.
        SetupError (one line) when something is wrong."""
        try:
            return await self._bridge.call(self._report, 4 * self.cfg.timeout_s +
                                           connect_budget_s(self.cfg))
        except SinkUnavailable as err:
            raise SetupError(str(err)) from None

    async def _close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await conn.nc.close()

    # --- trio side -----------------------------------------------------------------------

    async def send(self, event: OutEvent) -> None:
        """Publish one event; return once its PubAck (new or duplicate) came back.

        Sends that are ready in the same scheduler tick go out as ONE batch (one hop to the
        asyncio thread, acks awaited together): the first sender of a batch leads it, shielded
        from cancellation for at most the bridge's timeout; the others wait for its outcome."""
        p = Pub(self.subject_for(event.kind), event.event_id, event.payload)
        self._pending.append(p)
        if len(self._pending) == 1:
            with trio.CancelScope(shield=True):
                await trio.lowlevel.checkpoint()  # the other senders of this tick join the batch
                batch, self._pending = self._pending, []
                await self._run_batch(batch)
        else:
            await p.done.wait()
        self._outcome(p)

    async def _run_batch(self, batch: list[Pub]) -> None:
        try:
            await self._bridge.call(lambda: self._publish_batch(batch),
                                    self.cfg.timeout_s * 2 + connect_budget_s(self.cfg))
        except Exception as err:
            for p in batch:
                p.error = p.error or err
        for p in batch:
            p.done.set()

    def _outcome(self, p: Pub) -> None:
        err = p.error
        if err is None:
            self._last_setup_error = ""
            if p.duplicate:
                self.duplicates += 1
            return
        if isinstance(err, SetupError):
            if str(err) != self._last_setup_error:
                self._last_setup_error = str(err)
                log.error("nats sink not usable", extra={"sink": self.name, "error": str(err)})
            raise SinkUnavailable(str(err))
        if isinstance(err, (Undeliverable, SinkUnavailable)):
            raise err
        if isinstance(err, nats.js.errors.APIError):
            if err.err_code == ERR_MSG_TOO_LARGE:
                raise Undeliverable(f"JetStream refused the event: {err.description}")
            if err.err_code == ERR_STORE_FAILED and "exceeded" in (err.description or ""):
                raise SinkUnavailable(f"stream {self.cfg.stream!r} is full ({err.description};"
                                      " it discards new messages): the event waits for room")
            raise SinkUnavailable(f"JetStream error {err.code}/{err.err_code}: "
                                  f"{err.description}")
        if isinstance(err, nats.js.errors.NoStreamResponseError):
            raise SinkUnavailable(f"no stream answered on {p.subject!r}")
        raise SinkUnavailable(f"{type(err).__name__}: {err}")

    async def flush(self) -> None:
        """Nothing to flush: a PubAck means the stream stored the event."""

    async def aclose(self) -> None:
        """Close the connection and stop the asyncio thread (bounded)."""
        await self._bridge.aclose(self._close, CLOSE_TIMEOUT_S)
