"""The JetStream sink when the server side changes under a live connection (a real nats-server,
the stream changed by an operator's JetStream API calls, as `nats stream rm/edit/add` does):

* the stream deleted: with `create_stream = true` re-created on the same connection at once;
  without it the events wait, the reason ("does not exist") on the failed rows, and go out
  once the operator re-creates it;
* the stream's subjects changed so ours are not covered: the events wait ("not covered") and
  go out once the subjects are back (the sink never edits an operator's stream);
* a stream re-created with a smaller max_msg_size, or a max_bytes (discard new) an event can
  never fit: that event is dead-lettered with the server's reason, not retried; a stream that
  is merely full (discard new) is transient: the events wait ("full") and go out once there
  is room;
* JetStream disabled (the server restarted without it): transient, the reason names JetStream.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from nats.js.api import DiscardPolicy, StreamConfig

from hostagent.clock import SystemClock
from hostagent.delivery.engine import Delivery
from hostagent.delivery.sinks.base import Undeliverable
from hostagent.delivery.sinks.nats_jetstream import NatsSink
from hostagent.errors import SinkUnavailable
from hostagent.model import Baseline, OutEvent
from tests.delivery.sinks.test_nats import NODE, nats_cfg
from tests.delivery.test_engine import delivering as engine_delivering
from tests.nats_support import NatsServer, manage, nats_server, read_stream
from tests.standins.queue import PERIOD_NS, T0_NS, usage_event

STREAM = "HOSTAGENT"


def operator(url: str, action: Callable[[Any], Any]) -> Any:
    """An operator's JetStream API call on a connection of its own (from a worker thread)."""
    return trio.to_thread.run_sync(manage, url, action)


def ours(**kw: Any) -> StreamConfig:
    """The stream as an operator creates it: owning hostagent.>, plus `kw`."""
    return StreamConfig(name=STREAM, subjects=["hostagent.>"], **kw)


async def recreate(url: str, **kw: Any) -> None:
    async def action(js: Any) -> None:
        await js.delete_stream(STREAM)
        await js.add_stream(ours(**kw))
    await operator(url, action)


async def stored_ids(url: str) -> list[str]:
    return [m.headers["Nats-Msg-Id"]
            for m in await trio.to_thread.run_sync(read_stream, url, STREAM)]


@asynccontextmanager
async def delivering(tmp_path: Path, sink: NatsSink) -> AsyncIterator[tuple[Any, Delivery]]:
    """The real outbox and delivery engine driving `sink` (closed afterwards)."""
    try:
        async with engine_delivering(tmp_path, [sink], clock=SystemClock(), node_id=NODE,
                                     maintenance_interval_s=0.2) as got:
            yield got
    finally:
        await sink.aclose()


async def commit(store: Any, d: Delivery, events: list[OutEvent], k: int) -> None:
    bases = [Baseline(e.instance_id, "inc-1", T0_NS + (k + 1) * PERIOD_NS, k + 1)
             for e in events]
    await trio.to_thread.run_sync(store.commit_pass, bases, events)
    d.wake()


def pending_reasons(store: Any) -> list[str]:
    """`last_error` of the rows still pending (what `hostagent outbox` shows)."""
    with store.reading("test") as c:
        assert isinstance(c, sqlite3.Connection)
        rows = c.execute("SELECT last_error FROM deliveries WHERE sink = 'nats' AND "
                         "status = 'pending'").fetchall()
    return [r[0] or "" for r in rows]


async def until(check: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s}s: {what}")
        await trio.sleep(0.05)


async def drained(store: Any, d: Delivery, timeout_s: float = 30.0) -> None:
    """Until nothing of the sink is pending."""
    deadline = time.monotonic() + timeout_s
    while True:
        await d.refresh_metrics()
        if d.metrics().sinks["nats"].depth == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"still pending: {pending_reasons(store)}")
        d.wake()
        await trio.sleep(0.1)


def waiting_because(store: Any, reason: str) -> Callable[[], bool]:
    return lambda: any(reason in r for r in pending_reasons(store))


def passes(n: int, first: int = 0) -> list[list[OutEvent]]:
    return [[usage_event(f"i{i}", k) for i in range(3)] for k in range(first, first + n)]


# --- 1. the stream deleted -------------------------------------------------------------------

async def test_a_deleted_stream_is_recreated_on_the_live_connection(tmp_path: Path) -> None:
    """Before: every publish got "no stream answered" for as long as the connection lived (the
    stream was only checked when connecting), so `create_stream = true` never re-created it."""
    with nats_server(tmp_path) as srv:
        sink = NatsSink(nats_cfg(srv.url, create_stream=True), node_id=NODE)
        await sink.send(usage_event("i0", 0))
        conn = sink._conn
        await operator(srv.url, lambda js: js.delete_stream(STREAM))
        await sink.send(usage_event("i0", 1))  # re-created, and this event published
        await sink.send(usage_event("i0", 2))
        assert sink._conn is conn  # no reconnect was needed
        ids = await stored_ids(srv.url)
        await sink.aclose()
    assert ids == [usage_event("i0", k).event_id for k in (1, 2)]


async def test_a_deleted_stream_without_create_stream_waits_with_its_reason(
        tmp_path: Path) -> None:
    with nats_server(tmp_path) as srv:
        await operator(srv.url, lambda js: js.add_stream(ours()))
        sink = NatsSink(nats_cfg(srv.url, create_stream=False), node_id=NODE)
        later = passes(2, first=1)
        async with delivering(tmp_path, sink) as (store, d):
            await commit(store, d, passes(1)[0], 0)
            await drained(store, d)
            await operator(srv.url, lambda js: js.delete_stream(STREAM))
            for k, evs in enumerate(later, start=1):
                await commit(store, d, evs, k)
            await until(waiting_because(store, f"stream '{STREAM}' does not exist"),
                        "the reason on the waiting rows")
            assert d.metrics().sinks["nats"].failed > 0
            assert not store.dead_letters()
            await operator(srv.url, lambda js: js.add_stream(ours()))  # the operator's fix
            await drained(store, d)
            assert not store.dead_letters()
        ids = await stored_ids(srv.url)
    assert sorted(ids) == sorted(e.event_id for evs in later for e in evs)  # each once


# --- 2. the stream's subjects changed --------------------------------------------------------

@pytest.mark.parametrize("create_stream", [False, True])
async def test_subjects_changed_away_wait_with_their_reason_until_restored(
        tmp_path: Path, create_stream: bool) -> None:
    with nats_server(tmp_path) as srv:
        await operator(srv.url, lambda js: js.add_stream(ours()))
        sink = NatsSink(nats_cfg(srv.url, create_stream=create_stream), node_id=NODE)
        all_passes = passes(3)
        async with delivering(tmp_path, sink) as (store, d):
            await commit(store, d, all_passes[0], 0)
            await drained(store, d)
            await operator(srv.url, lambda js: js.update_stream(
                StreamConfig(name=STREAM, subjects=["billing.>"])))
            await commit(store, d, all_passes[1], 1)
            await commit(store, d, all_passes[2], 2)
            await until(waiting_because(store, f"is not covered by stream '{STREAM}'"),
                        "the reason on the waiting rows")
            assert not store.dead_letters()
            await operator(srv.url, lambda js: js.update_stream(ours()))
            await drained(store, d)
            assert not store.dead_letters()
        ids = await stored_ids(srv.url)
    assert sorted(ids) == sorted(e.event_id for evs in all_passes for e in evs)


# --- 3. limits: an event that can never fit, and a full stream ----------------------------------

async def test_a_smaller_max_msg_size_dead_letters_the_event_at_once(tmp_path: Path) -> None:
    """Before: the refusal (10054) never reached the publish (nats-py raised it inside its
    reply handler), so it looked like a lost PubAck and was retried forever."""
    small, big = usage_event("i0", 1), usage_event("i1", 1, pad=4000)
    with nats_server(tmp_path) as srv:
        sink = NatsSink(nats_cfg(srv.url, timeout_s=3.0), node_id=NODE)
        await sink.send(usage_event("i0", 0))
        await recreate(srv.url, max_msg_size=2048)
        t0 = time.monotonic()
        with pytest.raises(Undeliverable, match="message size exceeds maximum allowed"):
            await sink.send(big)
        assert time.monotonic() - t0 < 1.0  # the server's answer, not a PubAck timeout
        await sink.send(small)
        ids = await stored_ids(srv.url)
        await sink.aclose()
    assert ids == [small.event_id]


async def test_a_smaller_max_msg_size_dead_letters_through_delivery(
        tmp_path: Path) -> None:
    with nats_server(tmp_path) as srv:
        sink = NatsSink(nats_cfg(srv.url), node_id=NODE)
        async with delivering(tmp_path, sink) as (store, d):
            await commit(store, d, [usage_event("i0", 0)], 0)
            await drained(store, d)
            await recreate(srv.url, max_msg_size=2048)
            await commit(store, d, [usage_event("i0", 1), usage_event("i1", 1, pad=4000)], 1)
            await drained(store, d)
            [dead] = store.dead_letters("nats")
        ids = await stored_ids(srv.url)
    assert dead.event_id == usage_event("i1", 1, pad=4000).event_id
    assert "message size exceeds maximum allowed" in dead.reason
    assert dead.attempts == 1
    assert ids == [usage_event("i0", 1).event_id]


async def test_an_event_over_a_discard_new_streams_max_bytes_is_dead_lettered(
        tmp_path: Path) -> None:
    small, big = usage_event("i0", 1), usage_event("i1", 1, pad=4000)
    with nats_server(tmp_path) as srv:
        sink = NatsSink(nats_cfg(srv.url, timeout_s=3.0), node_id=NODE)
        await sink.send(usage_event("i0", 0))
        await recreate(srv.url, max_bytes=3000, discard=DiscardPolicy.NEW)
        t0 = time.monotonic()
        with pytest.raises(Undeliverable, match="max_bytes 3000"):
            await sink.send(big)
        assert time.monotonic() - t0 < 1.0
        await sink.send(small)  # fits: the stream is not full
        ids = await stored_ids(srv.url)
        await sink.aclose()
    assert ids == [small.event_id]


async def test_an_event_over_a_discard_old_streams_max_bytes_is_dead_lettered_not_dropped(
        tmp_path: Path) -> None:
    """With discard old, nats-server 2.9 acknowledges a message larger than the stream's
    max_bytes and drops it at once: before, the event counted as delivered and was gone. The
    sink checks the size against the max_bytes it read when it checked the stream."""
    small, big = usage_event("i0", 0), usage_event("i1", 0, pad=4000)
    with nats_server(tmp_path) as srv:
        await operator(srv.url, lambda js: js.add_stream(ours(max_bytes=3000)))
        sink = NatsSink(nats_cfg(srv.url, create_stream=False), node_id=NODE)
        with pytest.raises(Undeliverable, match="max_bytes 3000"):
            await sink.send(big)
        await sink.send(small)
        ids = await stored_ids(srv.url)
        await sink.aclose()
    assert ids == [small.event_id]


async def test_a_full_discard_new_stream_is_transient_until_there_is_room(
        tmp_path: Path) -> None:
    with nats_server(tmp_path) as srv:
        sink = NatsSink(nats_cfg(srv.url, timeout_s=3.0), node_id=NODE)
        await sink.send(usage_event("i0", 0))

        async def fill(js: Any) -> None:
            await js.delete_stream(STREAM)
            await js.add_stream(ours(max_msgs=1, discard=DiscardPolicy.NEW))
            await js.publish("hostagent.other", b"filler")

        await operator(srv.url, fill)
        t0 = time.monotonic()
        with pytest.raises(SinkUnavailable, match=f"stream '{STREAM}' is full"):
            await sink.send(usage_event("i0", 1))
        assert time.monotonic() - t0 < 1.0
        await operator(srv.url, lambda js: js.purge_stream(STREAM))  # room again
        await sink.send(usage_event("i0", 1))
        ids = await stored_ids(srv.url)
        await sink.aclose()
    assert ids == [usage_event("i0", 1).event_id]


async def test_a_full_stream_waits_through_delivery_and_is_never_dead_lettered(
        tmp_path: Path) -> None:
    with nats_server(tmp_path) as srv:
        await operator(srv.url, lambda js: js.add_stream(
            ours(max_msgs=3, discard=DiscardPolicy.NEW)))
        sink = NatsSink(nats_cfg(srv.url, create_stream=False), node_id=NODE)
        all_passes = passes(3)
        async with delivering(tmp_path, sink) as (store, d):
            await commit(store, d, all_passes[0], 0)  # fills it
            await drained(store, d)
            await commit(store, d, all_passes[1], 1)
            await commit(store, d, all_passes[2], 2)
            await until(waiting_because(store, "is full"), "the reason on the waiting rows")
            assert not store.dead_letters()
            await operator(srv.url, lambda js: js.update_stream(ours(discard=DiscardPolicy.NEW)))
            await drained(store, d)
            assert not store.dead_letters()
        ids = await stored_ids(srv.url)
    assert sorted(ids) == sorted(e.event_id for evs in all_passes for e in evs)


# --- 4. JetStream disabled ---------------------------------------------------------------------

async def test_jetstream_disabled_on_the_server_is_transient_with_its_reason(
        tmp_path: Path) -> None:
    with nats_server(tmp_path) as srv:
        assert isinstance(srv, NatsServer)
        sink = NatsSink(nats_cfg(srv.url), node_id=NODE)  # create_stream = true
        all_passes = passes(3)
        async with delivering(tmp_path, sink) as (store, d):
            await commit(store, d, all_passes[0], 0)
            await drained(store, d)
            srv.kill()
            srv.jetstream = False
            await trio.to_thread.run_sync(srv.start)
            await commit(store, d, all_passes[1], 1)
            await commit(store, d, all_passes[2], 2)
            await until(waiting_because(store, "JetStream"), "the reason on the waiting rows")
            assert not store.dead_letters()
            srv.kill()
            srv.jetstream = True
            await trio.to_thread.run_sync(srv.start)
            await drained(store, d)
            assert not store.dead_letters()
        ids = await stored_ids(srv.url)
    assert sorted(ids) == sorted(e.event_id for evs in all_passes for e in evs)
