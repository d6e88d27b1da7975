"""The pass commit's worker call writes a caught-up JSONL sink's new rows itself
(hostagent.delivery.local_round.LocalRound.at_commit): one fsync and one unsynced commit of
acknowledgements in that call, no claim, no drain round; otherwise (a backlog, a drain round in
progress, a failed write, a failed record, another filesystem, too many rows) the drain sends
them, each event exactly once and per instance in period order."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import trio

from hostagent import handoff
from hostagent.config.schema import OutboxConfig
from hostagent.config.sinks import JsonlSinkConfig
from hostagent.delivery import local_round
from hostagent.delivery.engine import Delivery
from hostagent.delivery.sinks.jsonl import JsonlSink
from hostagent.errors import SinkUnavailable, StateError
from hostagent.model import OutEvent
from hostagent.store.inspect import Pending
from hostagent.store.outbox import Store
from tests.clocks import TrioClock
from tests.delivery.test_engine import eventually, idle_after_start
from tests.delivery.test_local_round import Counts
from tests.standins.queue import usage_event


class File(JsonlSink):
    """The JSONL sink, with a write that can fail, be held, or a filesystem of its own."""

    def __init__(self, cfg: JsonlSinkConfig) -> None:
        super().__init__(cfg)
        self.fails = 0
        self.other_fs = False
        self.hold: threading.Event | None = None  # set: the write goes on
        self.entered = threading.Event()

    def device(self) -> int:
        return -1 if self.other_fs else super().device()

    def write_batch(self, payloads: Any) -> None:
        self.entered.set()
        if self.hold is not None:
            self.hold.wait(10)
        if self.fails:
            self.fails -= 1
            raise SinkUnavailable("write failed: ENOSPC")
        super().write_batch(payloads)


def setup(tmp_path: Path, **outbox: Any) -> tuple[Store, File, Delivery]:
    clock = TrioClock()
    store = Store.open(tmp_path / "state.db", clock=clock, node_id="h", sink_names=["file"])
    sink = File(JsonlSinkConfig(name="file", path=str(tmp_path / "events.jsonl")))
    return store, sink, Delivery(store, [sink], clock,
                                 OutboxConfig(maintenance_interval_s=3600, **outbox))


async def commit(store: Store, d: Delivery, events: Sequence[OutEvent]) -> None:
    """What the collector does: commit and write in one worker call, apply in trio, wake."""
    def work() -> Callable[[], None]:
        return d.write_committed(store.commit_pass([], events))
    (await handoff.run_sync(work))()
    d.wake(after_commit=True)


def lines(tmp_path: Path) -> list[bytes]:
    return (tmp_path / "events.jsonl").read_bytes().splitlines()


async def test_a_caught_up_sink_is_written_in_the_commits_call_and_its_drain_sleeps(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store, _, d = setup(tmp_path)
    counts = Counts(monkeypatch, store)
    events: list[OutEvent] = []
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(d.run)
            with trio.fail_after(20):
                await idle_after_start(d)
                counts.calls.clear()
                for k in range(3):
                    evs = [usage_event(f"i{i}", k) for i in range(8)]
                    events += evs
                    counts.on = True
                    await commit(store, d, evs)
                    await trio.sleep(0.05)  # a woken drain would have run by now
                    counts.on = False
                    # one hand-off (the commit's own), one fsync, the pass commit and the
                    # acknowledgements' unsynced commit; no claim, no drain round
                    assert counts.threads == 1 and counts.fsyncs == 1, vars(counts)
                    assert counts.calls[-1] == "work" and "_local_rounds" not in counts.calls
                    assert counts.commits() == ["BEGIN IMMEDIATE", "COMMIT"] * 2
                    st = counts.statements
                    assert st.index("PRAGMA synchronous=NORMAL") > st.index("COMMIT")
                    after = st[st.index("COMMIT"):]  # no claim: nothing loaded or marked
                    assert not [x for x in after if "JOIN events" in x], after
                    assert not [x for x in st if "SET claimed = 1" in x], st
                    assert all(dr.idle for dr in d._drains)
                    counts.threads = counts.fsyncs = 0
                    counts.statements.clear()
                    counts.calls.clear()
            nursery.cancel_scope.cancel()
        assert store.stats()["file"].acked == 24 and store.stats()["file"].pending == 0
        sent = d.metrics().sinks["file"]
        assert sent.published == sent.latency_count == 24
    finally:
        store.close()
    assert lines(tmp_path) == [e.payload for e in events]


async def test_a_backlog_is_the_drains_and_stays_in_period_order(tmp_path: Path) -> None:
    store, _, d = setup(tmp_path, local_batch_size=5)
    # 3 periods of 15 instances wait: the drain takes 4 batches of 5 per call, so it is not
    # caught up when the next pass commits; that pass's rows must come after them
    store.commit_pass([], [usage_event(f"i{i}", k) for k in range(3) for i in range(15)])
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(d.run)
            await commit(store, d, [usage_event(f"i{i}", 3) for i in range(15)])
            with trio.fail_after(20):
                await d.drained()
            nursery.cancel_scope.cancel()
        assert store.stats()["file"].acked == 60
    finally:
        store.close()
    got = lines(tmp_path)
    assert len(got) == len(set(got)) == 60
    for i in range(15):  # per instance: periods 0, 1, 2, 3 in order
        mine = [got.index(usage_event(f"i{i}", k).payload) for k in range(4)]
        assert mine == sorted(mine)


@pytest.mark.parametrize("why", ["drain round in progress", "other filesystem",
                                 "more than a round's batches"])
async def test_the_drain_sends_what_the_commit_may_not_write(tmp_path: Path, why: str) -> None:
    store, sink, d = setup(tmp_path, local_batch_size=8)
    local = d._queues[0]._local
    assert local is not None
    # a round's batches: LOCAL_BATCHES_PER_CALL (4) of local_batch_size (8)
    evs = [usage_event(f"i{i}", 0) for i in range(33 if why.startswith("more") else 8)]
    sink.other_fs = why == "other filesystem"
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(d.run)
            await d.drained()
            assert local.caught_up
            held, release = threading.Event(), threading.Event()
            if why == "drain round in progress":  # as the drain's worker call holds it

                def drain_round() -> None:
                    with local.lock:
                        held.set()
                        release.wait(10)
                threading.Thread(target=drain_round).start()
                held.wait(10)
            claimed = await trio.to_thread.run_sync(store.commit_pass, [], evs)
            apply = await trio.to_thread.run_sync(d.write_committed, claimed)
            assert not (tmp_path / "events.jsonl").exists()  # not written by the commit
            release.set()
            apply()
            d.wake(after_commit=True)  # so the drain is woken
            with trio.fail_after(20):
                await eventually(lambda: d.metrics().sinks["file"].published == len(evs), 10)
                await d.drained()
            nursery.cancel_scope.cancel()
    finally:
        store.close()
    got = lines(tmp_path)  # (the drain's order within a period is its own)
    assert len(got) == len(set(got)) and sorted(got) == sorted(e.payload for e in evs)


async def test_a_failed_write_at_the_commit_is_sent_again_by_the_drain(
        tmp_path: Path, mock_clock: trio.testing.MockClock) -> None:
    mock_clock.autojump_threshold = 0.01
    store, sink, d = setup(tmp_path)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(d.run)
            await d.drained()
            sink.fails = 1
            await commit(store, d, [usage_event("i", 0)])
            assert sink.fails == 0  # the commit's call tried, and failed
            assert store.stats()["file"].pending == 1
            assert not store.claimed_at_commit  # the next rows stay mergeable meanwhile
            await eventually(lambda: d.metrics().sinks["file"].published == 1, 600)
            await commit(store, d, [usage_event("i", 1)])  # written by the drain: caught up
            await eventually(lambda: d.metrics().sinks["file"].published == 2, 600)
            assert store.claimed_at_commit == {"file"}
            await commit(store, d, [usage_event("i", 2)])  # by the commit again
            assert d.metrics().sinks["file"].published == 3
            nursery.cancel_scope.cancel()
        assert store.stats()["file"].acked == 3
    finally:
        store.close()
    assert lines(tmp_path) == [usage_event("i", k).payload for k in range(3)]


async def test_acknowledgements_not_recorded_at_the_commit_are_recorded_by_the_drain(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store, _, d = setup(tmp_path)
    real = store.record_and_take
    broken = [True]

    def record_and_take(sink: str, outcomes: Sequence[Any], *a: Any, **kw: Any) -> Any:
        if broken and outcomes:
            broken.clear()
            raise StateError("database is locked")
        return real(sink, outcomes, *a, **kw)

    monkeypatch.setattr(store, "record_and_take", record_and_take)
    evs = [usage_event(f"i{i}", 0) for i in range(3)]
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(d.run)
            await d.drained()
            await commit(store, d, evs)
            assert not broken  # the record failed once
            with trio.fail_after(20):
                await eventually(lambda: store.stats()["file"].acked == 3, 10)
                await d.drained()
            nursery.cancel_scope.cancel()
        assert store.stats()["file"].pending == 0
        assert d.metrics().sinks["file"].published == 3
        assert d.metrics().sinks["file"].store_errors == 1
    finally:
        store.close()
    assert lines(tmp_path) == [e.payload for e in evs]  # written once: recorded, not resent


async def test_a_commit_never_writes_while_a_drain_round_writes(tmp_path: Path) -> None:
    """The drain's round holds the lock across claim, write and record: a commit meanwhile
    leaves its rows to the drain, so no event is written twice."""
    store, sink, d = setup(tmp_path)
    store.commit_pass([], [usage_event("i", 0)])
    sink.hold = threading.Event()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(d.run)
            await trio.to_thread.run_sync(sink.entered.wait, 10)  # the drain is writing
            local = d._queues[0]._local
            assert local is not None and local.lock.locked()
            got: list[Callable[[], None]] = []

            async def pass_commit() -> None:
                def work() -> Callable[[], None]:
                    claimed: Mapping[str, Sequence[Pending]] = store.commit_pass(
                        [], [usage_event("i", 1)])
                    return d.write_committed(claimed)
                got.append(await trio.to_thread.run_sync(work))

            await pass_commit()  # did not wait for the lock: the drain is still writing
            assert local.lock.locked() and not (tmp_path / "events.jsonl").exists()
            sink.hold.set()
            got[0]()
            d.wake(after_commit=True)
            with trio.fail_after(20):
                await eventually(lambda: store.stats()["file"].acked == 2, 10)
                await d.drained()
            nursery.cancel_scope.cancel()
    finally:
        store.close()
    assert lines(tmp_path) == [usage_event("i", k).payload for k in range(2)]


async def test_only_a_caught_up_sink_is_written_at_the_commit(tmp_path: Path) -> None:
    """Before the drain's first round, and after a round that left rows due, older rows of an
    instance may be waiting: the commit leaves its rows to the drain (period order)."""
    store, _, d = setup(tmp_path, local_batch_size=2)
    q = d._queues[0]
    local = q._local
    assert local is not None and not local.caught_up  # no round yet

    def caught_up() -> bool:  # (read again each time)
        assert local is not None
        return local.caught_up

    store.claim_at_commit("file", True)
    try:
        claimed = store.commit_pass([], [usage_event("i", k) for k in range(9)])
        assert local.at_commit(claimed["file"], 0) is None
        r = local.rounds([], TrioClock().now().wall_ns)  # 4 batches of 2: one row still due
        assert len(r.recorded) == 5 and r.claimed.batch and not caught_up()
        late = store.commit_pass([], [usage_event("i", 9)])
        assert local.at_commit(late["file"], 0) is None
        r = local.rounds([], TrioClock().now().wall_ns)  # the last two: caught up
        assert not r.claimed.batch and caught_up()
        last = store.commit_pass([], [usage_event("i", 10)])
        written = local.at_commit(last["file"], TrioClock().now().wall_ns)
        assert written is not None and written.settled
        assert store.stats()["file"].acked == 11 and store.stats()["file"].pending == 0
    finally:
        store.close()
    assert lines(tmp_path) == [usage_event("i", k).payload for k in range(11)]


async def test_a_pass_over_a_batch_is_written_in_batches_and_a_failed_one_waits(
        tmp_path: Path, mock_clock: trio.testing.MockClock,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """20 rows, batches of 8: three writes and fsyncs in the commit's call; when the second
    fails, its rows wait the round backoff and the third batch's rows go to the drain now."""
    mock_clock.autojump_threshold = 0.01
    assert local_round.LOCAL_BATCHES_PER_CALL * 8 >= 20
    store, _, d = setup(tmp_path, local_batch_size=8)
    counts = Counts(monkeypatch, store)
    evs = [usage_event(f"i{i:02}", 0) for i in range(20)]
    writes: list[int] = []
    fail_second = [False]
    real = File.write_batch

    def write_batch(self: File, payloads: Any) -> None:
        writes.append(len(payloads))
        if fail_second[0] and len(writes) == 2:
            raise SinkUnavailable("write failed: ENOSPC")
        real(self, payloads)

    monkeypatch.setattr(File, "write_batch", write_batch)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(d.run)
            await d.drained()
            counts.on = True
            await commit(store, d, evs)
            counts.on = False
            assert writes == [8, 8, 4] and counts.fsyncs == 3
            assert store.stats()["file"].acked == 20
            writes.clear()
            fail_second[0] = True  # the next pass's second batch
            # Virtual time stopped until the third batch's rows are written: autojump would
            # move it past the round backoff while a worker thread works on a loaded machine.
            mock_clock.autojump_threshold = math.inf
            await commit(store, d, [usage_event(f"i{i:02}", 1) for i in range(20)])
            assert writes == [8, 8]  # the third was not tried
            assert store.stats()["file"].acked == 28
            # The third batch's rows now; the failed one's after its backoff, once time flows
            # again (the file's order below).
            deadline = time.monotonic() + 30
            while store.stats()["file"].acked < 32 and time.monotonic() < deadline:
                await trio.to_thread.run_sync(time.sleep, 0.01)
            assert store.stats()["file"].acked == 32  # the failed batch still waits
            mock_clock.autojump_threshold = 0.01
            await eventually(lambda: store.stats()["file"].acked == 40, 600)  # after backoff
            nursery.cancel_scope.cancel()
    finally:
        store.close()
    got = lines(tmp_path)
    assert len(got) == len(set(got)) == 40
    assert got[:28] == [e.payload for e in evs] + [usage_event(f"i{i:02}", 1).payload
                                                   for i in range(8)]
    assert got[28:] == [usage_event(f"i{i:02}", 1).payload for i in [*range(16, 20),
                                                                     *range(8, 16)]]
