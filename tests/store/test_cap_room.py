"""The size cap with passes bigger than the room the 90 % mark leaves: a refused commit makes
room the cap's way (prune acked, then merge never-sent) and commits; upkeep counts the next
pass; and with nothing it may remove, the commit keeps failing without losing a row."""

from __future__ import annotations

import itertools
import logging
import math
from pathlib import Path
from typing import Any

import orjson
import pytest

from hostagent.errors import StoreFull
from hostagent.model import Baseline, OutEvent
from hostagent.store.inspect import Pending
from hostagent.store.outbox import Outcome, Store
from hostagent.store.upkeep import MERGE_AT, near_cap, pass_bytes
from tests.clocks import FakeClock
from tests.standins.queue import PERIOD_NS, T0_NS, usage_event

CAP = 2 * 1024 * 1024
BIG_PAD = 300_000  # ~300 KB a big event: one pass is ~14 % of CAP, over the 10 % above MERGE_AT
SINK = "file"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def open_store(path: Path, clock: FakeClock) -> Store:
    return Store.open(path, clock=clock, node_id="host-a", sink_names=[SINK], max_bytes=CAP)


def base(instance: str, k: int) -> Baseline:
    return Baseline(instance_id=instance, incarnation="inc-1", t_wall_ns=T0_NS + k * PERIOD_NS,
                    cpu_ns=k * 10**9)


def one_pass(k: int) -> tuple[list[Baseline], list[OutEvent]]:
    """Pass `k`: a domain whose events are ~300 KB (a huge owner string) and an ordinary one."""
    return ([base("big", k + 1), base("small", k + 1)],
            [usage_event("big", k, pad=BIG_PAD), usage_event("small", k)])


def ack_all(s: Store, clock: FakeClock) -> list[Pending]:
    """What a caught-up sink does: take every due row, write it, acknowledge it."""
    batch = s.take(SINK, 10_000, clock.wall_ns)
    s.record(SINK, [Outcome.of(p, "acked") for p in batch], dead_letter_after=3)
    return batch


def refusals(caplog: pytest.LogCaptureFixture) -> int:
    return sum("refused for room" in r.getMessage() for r in caplog.records)


def test_a_pass_bigger_than_the_room_left_is_committed_after_pruning_acked_rows(
        tmp_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    """No upkeep runs at all: the refused commit makes room itself (the fuzzer's deadlock: the
    8th pass found less room than it needed below 90 %, where pruning never starts)."""
    caplog.set_level(logging.WARNING)
    s = open_store(tmp_path / "s.db", clock)
    sent: list[str] = []
    for k in range(30):
        s.commit_pass(*one_pass(k))  # the old store: StoreFull from pass 6 on, for ever
        clock.advance(1)
        sent += [p.event.event_id for p in ack_all(s, clock)]
        assert s.size().used_bytes <= CAP
    assert s.load_baselines()["big"] == base("big", 30)
    assert s.load_baselines()["small"] == base("small", 30)
    # every event reached the sink once, in commit order; only acknowledged rows were pruned
    assert sent == [e.event_id for k in range(30) for e in one_pass(k)[1]]
    assert refusals(caplog) >= 1
    assert s.stats()[SINK].pending == 0
    s.close()


def test_upkeep_counts_the_next_pass_so_no_commit_is_refused(
        tmp_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    """The upkeep after each commit (as it rides on the pass commit) prunes early enough."""
    caplog.set_level(logging.WARNING)
    s = open_store(tmp_path / "s.db", clock)
    for k in range(30):
        s.commit_pass(*one_pass(k))
        clock.advance(1)
        ack_all(s, clock)
        s.maintain(retention_s=86400)
    assert refusals(caplog) == 0
    assert s.load_baselines()["big"] == base("big", 30)
    # the reserve is what a pass adds: about one big event
    assert BIG_PAD < s.reserve_bytes < 1.2 * BIG_PAD
    used = s.size().used_bytes
    mark = math.ceil(MERGE_AT * CAP)
    assert s.near_cap(mark - s.reserve_bytes)  # 90 % with the next pass, not without
    assert not s.near_cap(mark - s.reserve_bytes - 1)
    assert used + s.reserve_bytes < MERGE_AT * CAP
    s.close()


def test_never_sent_big_events_are_merged_to_make_room_keeping_totals(
        tmp_path: Path, clock: FakeClock) -> None:
    """The sink is down and nothing was claimed: the refused commit merges the backlog."""
    s = open_store(tmp_path / "s.db", clock)
    committed: list[Any] = []
    for k in range(30):
        bases, events = one_pass(k)
        s.commit_pass(bases, events)  # the old store: StoreFull from pass 6 on
        committed += [orjson.loads(e.payload) for e in events]
        assert s.size().used_bytes <= CAP
    assert s.load_baselines()["big"] == base("big", 30)
    pending = [orjson.loads(p.event.payload) for p in s.pending(SINK, 10_000, clock.wall_ns)]
    assert len(pending) < 20  # merged
    for instance in ("big", "small"):
        mine = [p for p in pending if p["instance_id"] == instance]
        parts = [c for c in committed if c["instance_id"] == instance]
        # the periods still tile from the first to the last pass: nothing dropped
        assert mine[0]["period_ns"]["start"] == T0_NS
        assert mine[-1]["period_ns"]["end"] == T0_NS + 30 * PERIOD_NS
        for a, b in itertools.pairwise(mine):
            assert a["period_ns"]["end"] == b["period_ns"]["start"]
        for key in ("cpu_seconds", "cpu_ns", "gpu_seconds"):
            assert sum(m["metrics"][key] for m in mine) == sum(c["metrics"][key] for c in parts)
        originals = [i for m in mine for i in m.get("merged_from", [m["event_id"]])]
        assert originals == [c["event_id"] for c in parts]
    s.close()


def commit_until_full(s: Store, committed: list[str]) -> int:
    """Commit passes 0, 1, … until StoreFull (at most 30); the pass refused."""
    for k in range(30):
        bases, events = one_pass(k)
        try:
            s.commit_pass(bases, events)
        except StoreFull:
            return k
        committed += [e.event_id for e in events]
    raise AssertionError("never full")


def test_with_nothing_it_may_remove_the_commit_keeps_failing_and_loses_nothing(
        tmp_path: Path, clock: FakeClock) -> None:
    """Rows claimed (maybe sent) and not acknowledged can be neither pruned nor merged: the
    commit fails with StoreFull, the baselines stay; once the sink acknowledges, the next
    commit makes room and goes through, with no upkeep in between."""
    s = open_store(tmp_path / "s.db", clock)
    s.claim_at_commit(SINK, True)
    committed: list[str] = []
    k = commit_until_full(s, committed)
    assert 3 < k < 8
    assert s.load_baselines()["big"] == base("big", k)  # the refused pass advanced nothing
    with pytest.raises(StoreFull):  # and again: still no room, still loud
        s.commit_pass(*one_pass(k))
    batch = s.pending(SINK, 10_000, clock.wall_ns)
    assert [p.event.event_id for p in batch] == committed
    s.record(SINK, [Outcome.of(p, "acked") for p in batch], dead_letter_after=3)
    s.commit_pass(*one_pass(k))
    assert s.load_baselines()["big"] == base("big", k + 1)
    assert [p.event.event_id for p in s.pending(SINK, 10_000, clock.wall_ns)] == [
        e.event_id for e in one_pass(k)[1]]
    s.close()


def test_a_store_without_a_cap_or_far_from_it_prunes_nothing_on_a_refusal(
        tmp_path: Path, clock: FakeClock) -> None:
    """A disk that is full is not the cap: nothing is pruned early for it."""
    s = open_store(tmp_path / "s.db", clock)
    s.commit_pass(*one_pass(0))
    ack_all(s, clock)
    assert not s._make_room([], StoreFull("disk full"))
    assert s.stats()[SINK].acked == 2
    s.max_bytes = None
    assert not s._make_room([(e, [SINK]) for e in one_pass(1)[1]], StoreFull("disk full"))
    assert s.stats()[SINK].acked == 2
    s.close()


def test_near_cap_and_the_pass_estimate() -> None:
    assert not near_cap(10**9, None, 10**9)
    assert near_cap(80, 100, 10) and not near_cap(79, 100, 10)
    assert near_cap(90, 100, 0) and not near_cap(89, 100, 0)
    assert pass_bytes([1000, 10], 3) == 1010 + 2 * 384 + 3 * 128


def page_count_reads(s: Store, commits: int, clock: FakeClock, *, seen: int | None = None,
                     first: int = 0) -> int:
    """How many of `commits` ordinary passes read `PRAGMA page_count` (the measure), the store
    last seen at `seen` bytes in use (near_cap, as delivery reports it)."""
    statements: list[str] = []
    s._conn.set_trace_callback(statements.append)
    try:
        for k in range(first, first + commits):
            if seen is not None:
                s.near_cap(seen)
            s.commit_pass([base("small", k + 1)], [usage_event("small", k)])
            ack_all(s, clock)
    finally:
        s._conn.set_trace_callback(None)
    return sum("page_count" in st for st in statements)


def test_a_commit_far_from_the_cap_measures_only_now_and_then(tmp_path: Path,
                                                            clock: FakeClock) -> None:
    # two PRAGMAs before and two after each commit: ~0.04 ms of an 8-event commit's 0.25
    s = open_store(tmp_path / "state.db", clock)
    try:
        assert page_count_reads(s, 32, clock) == 2 * (1 + 2)  # the first (never seen) + 2 of 32
        assert page_count_reads(s, 8, clock, seen=CAP // 2, first=32) == 2 * 8  # half: each
        assert page_count_reads(s, 8, clock, seen=CAP // 10, first=40) <= 2
    finally:
        s.close()
