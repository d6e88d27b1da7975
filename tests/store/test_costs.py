"""What the store's hot transactions cost in statements: an empty take only reads, a claimed row
is not written again, and the pass commit keeps its "committed by an earlier try" rule."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostagent.errors import StateError
from hostagent.store.outbox import Outcome, Store
from tests.clocks import FakeClock
from tests.standins.queue import usage_event


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.open(tmp_path / "state.db", clock=FakeClock(), node_id="h", sink_names=["q", "f"])
    yield s
    s.close()


def traced(store: Store) -> list[str]:
    """Every statement the store's connection runs from now on."""
    seen: list[str] = []
    store._conn.set_trace_callback(seen.append)
    return seen


def wal_bytes(store: Store) -> int:
    return os.stat(f"{store.path}-wal").st_size


def test_an_empty_take_writes_nothing(store: Store) -> None:
    store.commit_pass([], [usage_event("i", 0)])
    got = store.record_and_take("q", [], 10, 2**62, dead_letter_after=3)
    store.record_and_take("q", [Outcome.of(p, "acked") for p in got.batch], 10, 2**62,
                          dead_letter_after=3)
    before, seen = wal_bytes(store), traced(store)
    empty = store.record_and_take("q", [], 10, 2**62, dead_letter_after=3)
    assert empty.batch == [] and empty.next_due_ns is None and empty.used_bytes > 0
    assert not [s for s in seen if s.split()[0] in ("UPDATE", "INSERT", "DELETE")], seen
    assert wal_bytes(store) == before  # COMMIT wrote no WAL frame, so SQLite synced nothing


def test_claiming_a_claimed_row_again_writes_nothing(store: Store) -> None:
    store.commit_pass([], [usage_event("i", 0)])
    assert len(store.take("q", 10, 2**62)) == 1
    before = wal_bytes(store)
    assert len(store.take("q", 10, 2**62)) == 1  # still due (say a round ran out of time)
    assert wal_bytes(store) == before  # the empty commit wrote no WAL frame (and no fsync)


def test_an_event_of_an_earlier_try_keeps_its_rows(store: Store) -> None:
    # The pass's first try committed although it reported an error; since then the event was
    # merged away for "q" (its row gone). The retry must not give "q" a row again.
    ev, other = usage_event("i", 0), usage_event("j", 0)
    store.commit_pass([], [ev])
    with store.transaction("as a merge would") as c:
        c.execute("DELETE FROM deliveries WHERE sink = 'q' AND event_id = ?", (ev.event_id,))
    store.commit_pass([], [ev, other, other])  # the retry; a repeated id counts once
    with store.reading("rows") as c:
        rows = sorted(c.execute("SELECT sink, event_id FROM deliveries").fetchall())
    assert rows == sorted([("f", ev.event_id), ("q", other.event_id), ("f", other.event_id)])
    assert store.stats()["q"].pending == 1 and store.stats()["f"].pending == 2


def synchronous(store: Store) -> int:
    with store.reading("setting") as c:
        return int(c.execute("PRAGMA synchronous").fetchone()[0])


def test_only_acknowledgements_may_skip_the_sync(store: Store) -> None:
    store.commit_pass([], [usage_event("i", 0), usage_event("j", 0)])
    a, _ = store.take("q", 10, 2**62)
    with pytest.raises(ValueError, match="only acknowledgements"):
        store.record_and_take("q", [Outcome.of(a, "acked")], 10, 2**62,
                              dead_letter_after=3, durable=False)  # it would claim
    with pytest.raises(ValueError, match="only acknowledgements"):
        store.record_and_take("q", [Outcome.of(a, "failed", "x", 2**62)], 0, 2**62,
                              dead_letter_after=3, durable=False)
    seen = traced(store)
    got = store.record_and_take("q", [Outcome.of(a, "acked")], 0, 2**62,
                                dead_letter_after=3, durable=False)
    assert seen[0] == "PRAGMA synchronous=NORMAL" and seen[-1] == "PRAGMA synchronous=FULL"
    assert not [x for x in seen if "SET claimed = 1" in x]
    assert got.batch == [] and store.stats()["q"].acked == 1
    assert synchronous(store) == 2  # FULL for every other commit


def test_the_sync_setting_comes_back_after_a_failed_commit(store: Store) -> None:
    store.commit_pass([], [usage_event("i", 0)])
    (a,) = store.take("q", 10, 2**62)
    other = sqlite3.connect(store.path, timeout=0)  # another process holds the write lock
    other.execute("BEGIN IMMEDIATE")
    store._conn.execute("PRAGMA busy_timeout=0")
    try:
        with pytest.raises(StateError, match="locked"):
            store.record_and_take("q", [Outcome.of(a, "acked")], 0, 2**62,
                                  dead_letter_after=3, durable=False)
    finally:
        other.rollback()
        other.close()
    assert synchronous(store) == 2
    assert store.stats()["q"].acked == 0


def test_the_gauge_stats_read_only_what_is_pending_or_dead(store: Store) -> None:
    # Acked rows (a day of them, with retention) must not be walked by the daemon's gauges.
    events = [usage_event(f"i{n}", 0) for n in range(6)]
    store.commit_pass([], events)
    got = store.record_and_take("q", [], 10, 2**62, dead_letter_after=1)
    outcomes = [Outcome.of(p, "acked") for p in got.batch[:3]]
    outcomes.append(Outcome.of(got.batch[3], "rejected", "no", 0))
    store.record("q", outcomes, dead_letter_after=1)
    full, gauges = store.stats(), store.stats(acked=False)
    assert (full["q"].pending, full["q"].dead, full["q"].acked) == (2, 1, 3)
    assert full["f"].pending == 6
    for name in ("q", "f"):
        a, b = full[name], gauges[name]
        assert (b.pending, b.oldest_pending_ns, b.dead, b.breaker_state, b.acked) == \
            (a.pending, a.oldest_pending_ns, a.dead, a.breaker_state, 0)
    seen = traced(store)
    store.stats(acked=False)
    plans = [store._conn.execute(f"EXPLAIN QUERY PLAN {s}").fetchall()
             for s in seen if s.startswith("SELECT COUNT")]
    used = sorted(p[0][3].replace("COVERING ", "").split("USING INDEX ")[1] for p in plans)
    # pending and dead, per sink: a range of a partial index each
    assert used == ["deliveries_dead (sink=?)"] * 2 + ["deliveries_pending (sink=?)"] * 2, plans


def test_the_heartbeat_is_not_synced_and_the_next_commit_is(store: Store) -> None:
    seen = traced(store)
    store.heartbeat()
    assert seen[0] == "PRAGMA synchronous=NORMAL" and seen[-1] == "PRAGMA synchronous=FULL", seen
    assert store.meta()["delivery_heartbeat_ns"] == str(store.clock.now().wall_ns)
    assert store._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL again


def test_no_hot_statement_walks_the_rows_retention_keeps(store: Store) -> None:
    # A day of acknowledged rows stays in the store; a delivery round, the pass commit, the
    # gauges and the upkeep must cost what is pending, not what is kept. Every statement they
    # run is planned on a store with acked rows: none may scan a table or walk a sink's whole
    # primary key (what `next_due` did: 1.7 ms at 21,000 rows, every round, growing all day).
    for k in range(40):
        store.commit_pass([], [usage_event(f"i{n}", k) for n in range(5)])
        for sink in ("q", "f"):
            got = store.record_and_take(sink, [], 100, 2**62, dead_letter_after=3)
            store.record_and_take(sink, [Outcome.of(p, "acked") for p in got.batch],
                                  100, 2**62, dead_letter_after=3)
    seen = traced(store)
    store.commit_pass([], [usage_event("i0", 40)])
    got = store.record_and_take("q", [], 10, 2**62, dead_letter_after=3)
    later = store.record_and_take("q", [Outcome.of(got.batch[0], "failed", "down",
                                                2**61)], 10, 2**60, dead_letter_after=3)
    assert later.batch == [] and later.next_due_ns == 2**61  # asked when the next is due
    got = store.record_and_take("f", [], 10, 2**62, dead_letter_after=3)  # acks by key
    store.record_and_take("f", [Outcome.of(p, "acked")
                                for p in got.batch], 0, 2**62, dead_letter_after=3)
    assert store.stats(acked=False)["f"].pending == 0
    store.release_backoff("q", 0)
    store.stats(acked=False)
    store.size()
    store.heartbeat()
    store.maintain(retention_s=3600)
    store._conn.set_trace_callback(None)
    planned = [s for s in seen if s.split()[0] in ("SELECT", "UPDATE", "DELETE", "INSERT")]
    assert len(planned) > 10
    for sql in planned:
        plan = " | ".join(r[3] for r in store._conn.execute(f"EXPLAIN QUERY PLAN {sql}"))
        assert "SCAN deliveries" not in plan and "SCAN events" not in plan, (sql, plan)
        assert "PRIMARY KEY (sink=?)" not in plan, (sql, plan)
