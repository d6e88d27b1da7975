"""A local sink's round (the JSONL file, sinks.base.BatchWriter): ONE worker-thread call per
round, two commits (the claim before the write, which changes nothing when the pass commit
claimed the rows already, and the acknowledgements after it), one fsync of the file; a backlog
in full batches; a failed write is retried like a failed flush, and a sink whose breaker opened
gets its new rows unclaimed (mergeable)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest
import trio
import trio.testing

from hostagent import handoff
from hostagent.config.schema import OutboxConfig
from hostagent.config.sinks import JsonlSinkConfig
from hostagent.delivery import local_round
from hostagent.delivery.engine import Delivery
from hostagent.delivery.sinks.base import BatchWriter
from hostagent.delivery.sinks.jsonl import JsonlSink
from hostagent.errors import SinkUnavailable
from hostagent.store.outbox import Store
from tests.clocks import TrioClock
from tests.delivery.test_engine import eventually, idle_after_start
from tests.standins.queue import usage_event

T = TypeVar("T")


class Counts:
    """Worker-thread hand-offs, SQLite statements and fsyncs while `on`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, store: Store) -> None:
        self.on = False
        self.threads = self.fsyncs = 0
        self.calls: list[str] = []
        self.statements: list[str] = []
        run_sync, fsync = handoff.run_sync, os.fsync

        async def counting_run_sync(fn: Callable[..., T], *args: Any, **kw: Any) -> T:
            self.threads += self.on
            self.calls.append(getattr(fn, "__name__", ""))
            return await run_sync(fn, *args, **kw)

        def counting_fsync(fd: int) -> None:
            self.fsyncs += self.on
            fsync(fd)

        def trace(statement: str) -> None:
            if self.on:
                self.statements.append(statement)

        monkeypatch.setattr(handoff, "run_sync", counting_run_sync)
        monkeypatch.setattr(os, "fsync", counting_fsync)
        store._conn.set_trace_callback(trace)

    def commits(self) -> list[str]:
        return [s for s in self.statements if s in ("BEGIN IMMEDIATE", "COMMIT")]


def test_the_jsonl_sink_writes_whole_batches() -> None:
    assert isinstance(JsonlSink(JsonlSinkConfig(path="/nonexistent")), BatchWriter)


@pytest.mark.parametrize("domains", [8, 1000])
async def test_a_jsonl_round_is_one_hand_off_two_commits_one_fsync(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, domains: int) -> None:
    # 1,000 domains: more than outbox.batch_size (256, sized for network sinks), less than
    # outbox.local_batch_size: still one claim, one write, one fsync, one acknowledgement
    clock = TrioClock()
    store = Store.open(tmp_path / "state.db", clock=clock, node_id="h", sink_names=["file"])
    sink = JsonlSink(JsonlSinkConfig(name="file", path=str(tmp_path / "events.jsonl")))
    cfg = OutboxConfig(maintenance_interval_s=3600)
    assert cfg.batch_size == 256 and cfg.local_batch_size == 4096
    d = Delivery(store, [sink], clock, cfg)
    counts = Counts(monkeypatch, store)
    events = []
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(d.run)
            with trio.fail_after(20):
                await idle_after_start(d)
                for k in range(5):
                    evs = [usage_event(f"i{i:04}", k) for i in range(domains)]
                    events += evs
                    await trio.to_thread.run_sync(store.commit_pass, [], evs)
                    # the sink's rows come claimed by the pass commit (its breaker is closed)
                    with store.reading("claimed") as c:
                        assert c.execute("SELECT COUNT(*) FROM deliveries WHERE claimed = 0"
                                         ).fetchone() == (0,)
                    changes = store._conn.total_changes
                    counts.on = True
                    d.wake()
                    await d.drained()
                    counts.on = False
                    # the take loaded the rows the pass commit claimed (a commit that changed
                    # nothing: no statement to claim, no page written, no sync), wrote and
                    # fsynced, recorded the acks (commit)
                    assert counts.threads == 1 and counts.fsyncs == 1, vars(counts)
                    assert counts.commits() == ["BEGIN IMMEDIATE", "COMMIT"] * 2
                    assert store._conn.total_changes - changes == len(evs)  # the acks only
                    # the claim's commit is a synced one (it writes nothing here); only the
                    # acknowledgements' commit is not
                    st = counts.statements
                    claim = st[:st.index("PRAGMA synchronous=NORMAL")]
                    acks = st[st.index("PRAGMA synchronous=NORMAL"):]
                    assert claim[0] == "BEGIN IMMEDIATE" and claim[-1] == "COMMIT", claim
                    assert any("JOIN events" in x for x in claim), claim  # loaded
                    assert not [x for x in st if "SET claimed = 1" in x], st
                    assert acks[1] == "BEGIN IMMEDIATE" and acks[-1] == "PRAGMA synchronous=FULL"
                    counts.threads = counts.fsyncs = 0
                    counts.statements.clear()
            nursery.cancel_scope.cancel()
        assert store.stats()["file"].acked == 5 * domains
        with store.reading("setting") as c:
            assert c.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL again
        sent = d.metrics().sinks["file"]
        assert sent.published == sent.latency_count == 5 * domains
    finally:
        store.close()
    lines = (tmp_path / "events.jsonl").read_bytes().splitlines()
    assert lines == [e.payload for e in events]  # byte for byte, in period order


async def test_a_backlog_goes_in_full_batches_each_event_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = TrioClock()
    store = Store.open(tmp_path / "state.db", clock=clock, node_id="h", sink_names=["file"])
    store.commit_pass([], [usage_event(f"i{i}", k) for k in range(3) for i in range(15)])
    sink = JsonlSink(JsonlSinkConfig(name="file", path=str(tmp_path / "events.jsonl")))
    d = Delivery(store, [sink], clock, OutboxConfig(batch_size=5, local_batch_size=5,
                                                    maintenance_interval_s=3600))
    counts = Counts(monkeypatch, store)
    try:
        async with trio.open_nursery() as nursery:
            counts.on = True
            await nursery.start(d.run)
            with trio.fail_after(20):
                await d.drained()
            nursery.cancel_scope.cancel()
        assert store.stats()["file"].acked == 45
    finally:
        store.close()
    lines = (tmp_path / "events.jsonl").read_bytes().splitlines()
    assert len(lines) == len(set(lines)) == 45
    assert counts.fsyncs == 9  # one per batch of 5
    # a round writes up to LOCAL_BATCHES_PER_CALL batches per hand-off: 4 + 4 + 1
    assert local_round.LOCAL_BATCHES_PER_CALL == 4
    assert counts.calls.count("_local_rounds") == 3, counts.calls


class FullDisk(JsonlSink):
    """The JSONL file on a disk that is full for its first `fails` writes."""

    fails = 0

    def write_batch(self, payloads: Any) -> None:
        if self.fails:
            self.fails -= 1
            raise SinkUnavailable("write failed: ENOSPC")
        super().write_batch(payloads)


def full_disk(tmp_path: Path, *, fails: int) -> tuple[Store, FullDisk, Delivery]:
    clock = TrioClock()
    store = Store.open(tmp_path / "state.db", clock=clock, node_id="h", sink_names=["file"])
    sink = FullDisk(JsonlSinkConfig(name="file", path=str(tmp_path / "events.jsonl")))
    sink.fails = fails
    return store, sink, Delivery(store, [sink], clock, OutboxConfig(maintenance_interval_s=3600))


async def test_a_failed_write_is_sent_again_after_the_round_backoff(
        tmp_path: Path, mock_clock: trio.testing.MockClock) -> None:
    mock_clock.autojump_threshold = 0.01
    store, _, d = full_disk(tmp_path, fails=2)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(d.run)
            await trio.to_thread.run_sync(store.commit_pass, [],
                                          [usage_event("i", k) for k in range(3)])
            t0 = trio.current_time()
            d.wake()
            await eventually(lambda: d.metrics().sinks["file"].published == 3, 600)
            # two failed rounds, each waiting the round backoff (max_backoff_s 10 s ±10 %)
            assert trio.current_time() - t0 >= 2 * 9
            nursery.cancel_scope.cancel()
        assert store.stats()["file"].acked == 3 and store.stats()["file"].pending == 0
        assert d.metrics().sinks["file"].breaker_state == "closed"  # a write is not a send
    finally:
        store.close()
    assert len((tmp_path / "events.jsonl").read_bytes().splitlines()) == 3


async def test_a_failing_write_leaves_the_next_rows_unclaimed_until_a_write_succeeds(
        tmp_path: Path, mock_clock: trio.testing.MockClock) -> None:
    """Rows held back behind a failed write must stay mergeable (a long outage of the file's
    disk): the pass commit claims a local sink's rows only while its writes succeed."""
    mock_clock.autojump_threshold = 0.01
    store, sink, d = full_disk(tmp_path, fails=1)

    def claimed(k: int) -> int:
        with store.reading("claimed") as c:
            row = c.execute("SELECT claimed FROM deliveries WHERE event_id = ?",
                            (usage_event("i", k).event_id,)).fetchone()
        return int(row[0])

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(d.run)
            await d.drained()
            assert store.claimed_at_commit == {"file"}
            await trio.to_thread.run_sync(store.commit_pass, [], [usage_event("i", 0)])
            assert claimed(0) == 1
            d.wake()
            await eventually(lambda: sink.fails == 0 and not store.claimed_at_commit, 5)
            await trio.to_thread.run_sync(store.commit_pass, [], [usage_event("i", 1)])
            assert claimed(1) == 0  # held back behind the failed one: mergeable
            d.wake()
            await eventually(lambda: d.metrics().sinks["file"].published == 2, 600)
            assert store.claimed_at_commit == {"file"}  # written again: claimed at commit
            await trio.to_thread.run_sync(store.commit_pass, [], [usage_event("i", 2)])
            assert claimed(2) == 1
            d.wake()
            await eventually(lambda: d.metrics().sinks["file"].published == 3, 600)
            nursery.cancel_scope.cancel()
    finally:
        store.close()
    lines = (tmp_path / "events.jsonl").read_bytes().splitlines()
    assert lines == [usage_event("i", k).payload for k in range(3)]


async def test_a_full_disk_is_counted_in_failed_and_logged(
        tmp_path: Path, tmpfs: Callable[[str], Path], mock_clock: trio.testing.MockClock,
        caplog: pytest.LogCaptureFixture) -> None:
    """A JSONL file on a full filesystem: its failed writes were neither counted (`failed`
    stayed 0) nor logged; only the backlog grew. Now each is, the breaker still closed."""
    mock_clock.autojump_threshold = 0.01
    fs = tmpfs("64k")
    (fs / "filler").write_bytes(b"\0" * 60_000)  # one 4 KiB page left
    clock = TrioClock()
    store = Store.open(tmp_path / "state.db", clock=clock, node_id="h", sink_names=["file"])
    sink = JsonlSink(JsonlSinkConfig(name="file", path=str(fs / "events.jsonl")))
    d = Delivery(store, [sink], clock, OutboxConfig(maintenance_interval_s=3600))
    events = [usage_event(f"i{i}", 0) for i in range(8)]  # ~10 KB
    try:
        with caplog.at_level(logging.WARNING):
            async with trio.open_nursery() as nursery:
                await nursery.start(d.run)
                await trio.to_thread.run_sync(store.commit_pass, [], events)
                d.wake()
                await eventually(lambda: d.metrics().sinks["file"].failed >= 8, 60)
                m = d.metrics().sinks["file"]
                assert (m.published, m.breaker_state) == (0, "closed")
                (fs / "filler").unlink()  # the operator frees space
                await eventually(lambda: d.metrics().sinks["file"].published == 8, 600)
                nursery.cancel_scope.cancel()
    finally:
        store.close()
    assert any(r.getMessage() == "sink write failed" and "No space left" in r.error
               for r in caplog.records)
    got = [orjson.loads(line)["event_id"] for line in
           (fs / "events.jsonl").read_bytes().splitlines() if line.startswith(b"{")
           and line.endswith(b"}")]
    assert got[-8:] == [e.event_id for e in events]
