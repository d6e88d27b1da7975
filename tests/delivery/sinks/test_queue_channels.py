"""A Notify rule's alerts reach the queue only when they name "queue"; Alert rules' alerts and
usage always do. The outbox decides (no delivery row otherwise); the queue sink sends whatever
it is given. Pending rows an older hostagent wrote for every sink are re-routed at start."""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import trio

from hostagent.config.schema import OutboxConfig
from hostagent.config.sinks import JsonlSinkConfig, QueueSinkConfig
from hostagent.delivery.engine import Delivery
from hostagent.delivery.sinks.formation_queue import FormationQueueSink
from hostagent.delivery.sinks.jsonl import JsonlSink
from hostagent.model import OutEvent
from hostagent.store.outbox import Store
from tests.clocks import TrioClock
from tests.standins.queue import QueueStandIn, read_topic, serve_queue, usage_event


def alert(action: str, channels: list[str], n: int, *, routed: bool = True) -> OutEvent:
    """An alert as alerts.build_alert_event makes it; `routed=False`: as an older hostagent
    did, without OutEvent.channels (every sink of the kind got a row)."""
    body = {"event_type": "threshold_violation", "event_id": f"a-{n}", "action": action,
            "channels": channels, "instance_id": "vm-1"}
    chans = frozenset(channels) if action == "notify" and routed else None
    return OutEvent(event_id=f"a-{n}", kind="threshold_violation", instance_id="vm-1",
                    period_start_ns=n, period_end_ns=n + 1, payload=orjson.dumps(body),
                    channels=chans)


def events(*, routed: bool = True) -> list[OutEvent]:
    return [usage_event("vm-1", 0), alert("alert", [], 1, routed=routed),
            alert("notify", ["webhook_0badc0de"], 2, routed=routed),
            alert("notify", ["queue", "email"], 3, routed=routed),
            alert("notify", [], 4, routed=routed)]


FOR_THE_QUEUE = ["a-1", "a-3"]


@pytest.fixture
def queue() -> Iterator[QueueStandIn]:
    with serve_queue() as q:
        yield q


def sinks(q: QueueStandIn, tmp_path: Path) -> list[FormationQueueSink | JsonlSink]:
    return [FormationQueueSink(QueueSinkConfig(name="q", url=q.url)),
            JsonlSink(JsonlSinkConfig(name="file", path=str(tmp_path / "events.jsonl")))]


def queued_alerts(q: QueueStandIn) -> list[str]:
    return [orjson.loads(bytes(m[1:]))["event_id"] for m in read_topic(q.url, "usage_alerts")]


def alert_rows(path: Path) -> dict[str, list[str]]:
    """Delivery rows of alert events by sink (what `outbox status` counts)."""
    with sqlite3.connect(path) as c:
        rows = c.execute("SELECT d.sink, d.event_id FROM deliveries d JOIN events e USING "
                         "(event_id) WHERE e.kind = 'threshold_violation' ORDER BY d.sink, "
                         "d.event_id").fetchall()
    out: dict[str, list[str]] = {}
    for sink, eid in rows:
        out.setdefault(sink, []).append(eid)
    return out


async def deliver(d: Delivery) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(d.run)
        with trio.fail_after(20):
            while True:
                await d.drained()
                await d.refresh_metrics()
                if all(s.depth == 0 for s in d.metrics().sinks.values()):
                    break
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()


def test_the_queue_answers_to_the_queue_channel_only() -> None:
    assert FormationQueueSink.channels == {"queue"}


async def test_the_sink_sends_what_it_is_given(queue: QueueStandIn) -> None:
    # Choosing is the outbox's job: given a Notify alert for other channels, the sink sends it.
    sink = FormationQueueSink(QueueSinkConfig(name="q", url=queue.url))
    try:
        await sink.send(alert("notify", ["webhook_0badc0de"], 2))
    finally:
        await sink.aclose()
    assert await trio.to_thread.run_sync(queued_alerts, queue) == ["a-2"]


async def test_only_the_queue_bound_alerts_reach_the_queue(queue: QueueStandIn,
                                                           tmp_path: Path) -> None:
    clock = TrioClock()
    path = tmp_path / "state.db"
    ss = sinks(queue, tmp_path)
    store = Store.open(path, clock=clock, node_id="h", sink_names=[s.name for s in ss])
    try:
        d = Delivery(store, ss, clock, OutboxConfig(), rng=random.Random(1))
        d.prepare()  # routing by channel: construction writes nothing, this does
        store.commit_pass([], events())
        # no delivery row for the queue where it is not among a Notify alert's channels
        assert alert_rows(path) == {"file": ["a-1", "a-2", "a-3", "a-4"], "q": FOR_THE_QUEUE}
        st = store.stats()
        assert (st["q"].pending, st["file"].pending) == (3, 5)  # with the usage event
        await deliver(d)
        st = store.stats()
        assert (st["q"].acked, st["file"].acked, st["q"].pending) == (3, 5, 0)
    finally:
        store.close()
    assert await trio.to_thread.run_sync(queued_alerts, queue) == FOR_THE_QUEUE
    assert len(read_topic(queue.url, "usage_events")) == 1
    lines = (tmp_path / "events.jsonl").read_bytes().splitlines()
    assert sorted(orjson.loads(x)["event_id"] for x in lines)[:4] == ["a-1", "a-2", "a-3", "a-4"]


async def test_rows_of_an_older_hostagent_are_rerouted_not_sent(queue: QueueStandIn,
                                                                tmp_path: Path) -> None:
    clock = TrioClock()
    path = tmp_path / "state.db"
    # Before: every sink that takes the kind got a row; the queue sink skipped at send time.
    old = Store.open(path, clock=clock, node_id="h", sink_names=["q", "file"])
    old.commit_pass([], events(routed=False))
    assert alert_rows(path) == {"file": ["a-1", "a-2", "a-3", "a-4"],
                                "q": ["a-1", "a-2", "a-3", "a-4"]}
    old.close()
    # An alert only the queue had a row for, and not meant for it: the whole event goes.
    lone = Store.open(path, clock=clock, node_id="h", sink_names=["q"])
    lone.commit_pass([], [alert("notify", ["email"], 9, routed=False)])
    lone.close()

    ss = sinks(queue, tmp_path)
    store = Store.open(path, clock=clock, node_id="h", sink_names=[s.name for s in ss])
    try:
        d = Delivery(store, ss, clock, OutboxConfig(), rng=random.Random(1))
        d.prepare()  # wires channels
        assert alert_rows(path) == {"file": ["a-1", "a-2", "a-3", "a-4"], "q": FOR_THE_QUEUE}
        with sqlite3.connect(path) as c:
            gone = c.execute("SELECT COUNT(*) FROM events WHERE event_id = 'a-9'").fetchone()
        assert gone == (0,)
        await deliver(d)
        assert (store.stats()["q"].acked, store.stats()["file"].acked) == (3, 5)
    finally:
        store.close()
    assert await trio.to_thread.run_sync(queued_alerts, queue) == FOR_THE_QUEUE
