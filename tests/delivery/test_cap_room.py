"""The fuzzer's case through the daemon's commit path: a small `outbox.max_bytes`, a domain
whose every event is a big part of it, a JSONL sink written at the commit. Every pass commits
(the old daemon: StoreFull at every pass after the 6th, for ever, the other domain too)."""

from __future__ import annotations

from pathlib import Path

import trio

from hostagent.config.schema import OutboxConfig
from hostagent.config.sinks import JsonlSinkConfig
from hostagent.delivery.engine import Delivery
from hostagent.delivery.sinks.jsonl import JsonlSink
from hostagent.model import OutEvent
from hostagent.store.outbox import Store
from tests.clocks import TrioClock
from tests.delivery.test_engine import idle_after_start
from tests.delivery.test_write_at_commit import commit, lines
from tests.standins.queue import usage_event

CAP = 2 * 1024 * 1024


def one_pass(k: int) -> list[OutEvent]:
    return [usage_event("big", k, pad=300_000), usage_event("small", k)]


async def test_passes_bigger_than_the_room_below_the_mark_keep_committing(
        tmp_path: Path) -> None:
    clock = TrioClock()
    store = Store.open(tmp_path / "state.db", clock=clock, node_id="h", sink_names=["file"])
    sink = JsonlSink(JsonlSinkConfig(name="file", path=str(tmp_path / "events.jsonl")))
    d = Delivery(store, [sink], clock, OutboxConfig(max_bytes=CAP, maintenance_interval_s=2))
    events: list[OutEvent] = []
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(d.run)
            with trio.fail_after(30):
                await idle_after_start(d)
                for k in range(30):
                    await commit(store, d, one_pass(k))  # the old store: StoreFull at k = 6
                    events += one_pass(k)
                    await trio.sleep(0.02)
                    assert store.size().used_bytes <= CAP
                await d.drained()
            nursery.cancel_scope.cancel()
        assert store.stats()["file"].pending == 0
    finally:
        store.close()
    assert lines(tmp_path) == [e.payload for e in events]
