"""Delivery against the stand-in queue (a real HTTP server): wire format, metrics, transient
faults that never drop, dead letters and replay, the breaker and retry schedule on trio's mock
clock, a 10-minute outage with commits going on, and one slow sink not holding back another."""

from __future__ import annotations

import hashlib
import itertools
import random
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
import trio.testing

from hostagent.clock import Clock
from hostagent.config.schema import OutboxConfig
from hostagent.config.sinks import BreakerConfig, JsonlSinkConfig, QueueSinkConfig, RetryConfig
from hostagent.delivery.engine import Delivery
from hostagent.delivery.sinks.base import Sink
from hostagent.delivery.sinks.formation_queue import FormationQueueSink
from hostagent.delivery.sinks.jsonl import JsonlSink
from hostagent.errors import SinkUnavailable, StateError, StoreFull
from hostagent.model import OutEvent
from hostagent.store.outbox import Store
from tests.clocks import TrioClock
from tests.standins.queue import (
    PERIOD_NS,
    QueueStandIn,
    decode,
    read_topic,
    serve_queue,
    usage_event,
)

USAGE_TOPIC_HASH = "ed54877daae9a0ac5d8dd627316b43916b5b010503be90c37d5f12c048405a72"


@pytest.fixture
def queue() -> Iterator[QueueStandIn]:
    with serve_queue() as q:
        yield q


def qsink(q: QueueStandIn, **kw: Any) -> FormationQueueSink:
    return FormationQueueSink(QueueSinkConfig(name="q", url=q.url, **kw))


@asynccontextmanager
async def delivering(tmp_path: Path, sinks: Sequence[Sink], *, clock: Clock | None = None,
                     node_id: str = "host-a", **cfg: Any
                     ) -> AsyncIterator[tuple[Store, Delivery]]:
    """The real outbox and delivery engine driving `sinks` (trio's clock unless `clock`)."""
    clock = TrioClock() if clock is None else clock
    store = Store.open(tmp_path / "state.db", clock=clock, node_id=node_id,
                       sink_names=[s.name for s in sinks])
    d = Delivery(store, sinks, clock, OutboxConfig(**cfg), rng=random.Random(7))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(d.run)
            yield store, d
            nursery.cancel_scope.cancel()
    finally:
        store.close()


async def commit(store: Store, d: Delivery, events: Sequence[OutEvent]) -> float:
    """Commit like the collector does (in a thread), wake delivery; real seconds it took."""
    t0 = time.perf_counter()
    await trio.to_thread.run_sync(store.commit_pass, [], events)
    d.wake()
    return time.perf_counter() - t0


async def drain(d: Delivery, timeout_s: float = 600) -> None:
    """Wait (virtual time under a mock clock) until no sink has anything pending."""
    with trio.fail_after(timeout_s):
        while True:
            await d.drained()
            await d.refresh_metrics()
            if all(s.depth == 0 for s in d.metrics().sinks.values()):
                return
            await trio.sleep(1)


def consumer_view(q: QueueStandIn, topic: str = "usage_events") -> dict[str, list[bytes]]:
    """What a consumer reading get_after sees: payloads by event_id, in arrival order."""
    seen: dict[str, list[bytes]] = {}
    for m in read_topic(q.url, topic):
        sub, ev = decode(m)
        assert sub == 0
        seen.setdefault(ev["event_id"], []).append(m[1:])
    return seen


def assert_exactly(q: QueueStandIn, committed: Sequence[OutEvent],
                   replayed: Collection[str] = ()) -> None:
    """Deduped by event_id the queue holds exactly `committed`, byte for byte, and per instance
    the first copies arrived in period order (except dead letters replayed later)."""
    view = consumer_view(q)
    assert set(view) == {e.event_id for e in committed}
    by_id = {e.event_id: e for e in committed}
    for eid, copies in view.items():
        assert all(c == by_id[eid].payload for c in copies), "a duplicate differs"
    firsts: dict[str, list[int]] = {}
    for m in read_topic(q.url, "usage_events"):
        ev = decode(m)[1]
        if ev["event_id"] in replayed:
            continue
        starts = firsts.setdefault(ev["instance_id"], [])
        if ev["period_ns"]["start"] not in starts:
            starts.append(ev["period_ns"]["start"])
    for starts in firsts.values():
        assert starts == sorted(starts)
        if not replayed:
            assert all(b - a == PERIOD_NS for a, b in itertools.pairwise(starts))


async def eventually(pred: Callable[[], bool], timeout_s: float, step_s: float = 0.5) -> None:
    """Poll state owned by other tasks and threads (virtual time under a mock clock)."""
    with trio.fail_after(timeout_s):
        while not pred():  # noqa: ASYNC110 - the state lives in other threads too
            await trio.sleep(step_s)


async def idle_after_start(d: Delivery) -> None:
    """Every sink found nothing to send, and the first maintenance run is over."""
    await d.drained()
    await trio.sleep(0.05)


# With virtual time frozen between jumps (rate 0), a jump taken while the queue stand-in (a
# real server in a thread) is still answering moves time past the request's timeout: on a
# loaded 2-core VM (eight TCG guests beside the suite) 50 ms was not always enough.
FROZEN_JUMP_S = 0.5


def use_mock_time(clock: trio.testing.MockClock, *, rate: float = 1.0,
                  threshold_s: float = 0.05) -> None:
    """Time flows with real time, and jumps ahead whenever everything waits (backoffs)."""
    clock.rate = rate
    clock.autojump_threshold = FROZEN_JUMP_S if rate == 0 and threshold_s == 0.05 \
        else threshold_s


# --- the happy path ---------------------------------------------------------------------------


async def test_exact_wire_format_and_metrics(tmp_path: Path, queue: QueueStandIn) -> None:
    alert = OutEvent("alert-1", "threshold_violation", "i0", 0, 0,
                     orjson.dumps({"event_type": "threshold_violation", "event_id": "alert-1"}))
    events = [usage_event(f"i{i}", k) for k in range(4) for i in range(3)]
    async with delivering(tmp_path, [qsink(queue)]) as (store, d):
        await commit(store, d, [*events, alert])
        await drain(d, 20)
        m = d.metrics().sinks["q"]
    assert (m.published, m.failed, m.retried, m.dead_lettered, m.depth) == (13, 0, 0, 0, 0)
    assert m.latency_count == 13
    assert m.breaker_state == "closed"
    # The queue keys topics by SHA3-256 of the name (FORMATION.md's value for usage_events).
    assert set(queue.topics) == {USAGE_TOPIC_HASH,
                                 hashlib.sha3_256(b"usage_alerts").hexdigest()}
    msgs = read_topic(queue.url, "usage_events")
    assert [m[0] for m in msgs] == [0] * 12  # sub-topic byte first
    assert sorted(m[1:] for m in msgs) == sorted(e.payload for e in events)  # byte-exact
    assert_exactly(queue, events)
    alerts = read_topic(queue.url, "usage_alerts")
    assert [decode(m)[1]["event_id"] for m in alerts] == ["alert-1"]


async def test_backlog_drains_with_several_requests_in_flight(tmp_path: Path,
                                                             queue: QueueStandIn) -> None:
    queue.faults.slow_s = 0.01
    events = [usage_event(f"i{i}", k) for k in range(3) for i in range(40)]
    async with delivering(tmp_path, [qsink(queue, max_in_flight=8)]) as (store, d):
        await commit(store, d, events)
        await drain(d, 60)
    assert queue.max_in_flight > 1
    assert_exactly(queue, events)


# --- transient faults never drop ----------------------------------------------------------------


@pytest.mark.parametrize("fault", ["503", "garbage", "reset", "slow", "down"])
async def test_transient_faults_never_drop(tmp_path: Path, queue: QueueStandIn, fault: str,
                                           mock_clock: trio.testing.MockClock) -> None:
    use_mock_time(mock_clock)
    events = [usage_event(f"i{i}", k) for k in range(4) for i in range(5)]
    sink = qsink(queue, timeout_s=0.2)
    async with delivering(tmp_path, [sink]) as (store, d):
        if fault == "503":
            queue.faults.status = 503
        elif fault == "garbage":
            queue.faults.garbage = True
        elif fault == "reset":
            queue.faults.reset = True
        elif fault == "slow":
            queue.faults.slow_s = 0.5
        else:
            queue.stop()
        await commit(store, d, events[:10])
        await trio.sleep(120)  # two minutes of trouble, with a pass in the middle
        await commit(store, d, events[10:])
        await trio.sleep(60)
        await d.refresh_metrics()
        m = d.metrics().sinks["q"]
        assert m.depth == 20
        assert m.failed >= 5
        assert m.dead_lettered == 0
        assert m.breaker_opened >= 1
        queue.faults.clear()
        if fault == "down":
            queue.start()
        await drain(d)
        m = d.metrics().sinks["q"]
    assert m.published == 20
    assert_exactly(queue, events)


# --- rejections: dead letters and replay ----------------------------------------------------


@pytest.mark.parametrize("refusal", ["Failure", "422"])
async def test_refusals_dead_letter_after_n_and_replay(
        tmp_path: Path, queue: QueueStandIn, mock_clock: trio.testing.MockClock,
        refusal: str) -> None:
    use_mock_time(mock_clock)
    answer: str | int = "bad event" if refusal == "Failure" else 422
    queue.faults.reject_if = lambda ev: answer if ev["instance_id"] == "x" else None
    events = [usage_event(i, k) for k in range(2) for i in ("x", "y")]
    async with delivering(tmp_path, [qsink(queue)], dead_letter_after=3) as (store, d):
        await commit(store, d, events)
        # The store commits the dead letters in a worker thread; the counters follow in trio
        # once that call returns: wait for both.
        await eventually(lambda: len(store.dead_letters()) == 2
                         and d.metrics().sinks["q"].dead_lettered == 2, 600, 1)
        letters = store.dead_letters()
        assert {x.event_id for x in letters} == {e.event_id for e in events
                                                 if e.instance_id == "x"}
        reason = "queue Failure: bad event" if refusal == "Failure" else "HTTP 422: "
        assert all(x.reason.startswith(reason) and x.attempts == 3 for x in letters)
        m = d.metrics().sinks["q"]
        assert (m.rejected, m.dead_lettered, m.published, m.failed) == (6, 2, 2, 0)
        assert m.breaker_state == "closed"  # a refusal is a working sink
        queue.faults.clear()
        assert store.replay(sink="q") == 2
        d.wake()
        await drain(d)
    assert_exactly(queue, events)


async def test_oversized_event_is_dead_lettered_without_a_request(tmp_path: Path,
                                                                  queue: QueueStandIn) -> None:
    big = usage_event("i0", 0, pad=600_000)  # ~2.4 MB once each byte is a JSON number
    ok = usage_event("i1", 0)
    async with delivering(tmp_path, [qsink(queue)]) as (store, d):
        await commit(store, d, [big, ok])
        await drain(d, 20)
        letters = store.dead_letters()
    assert [x.event_id for x in letters] == [big.event_id]
    assert "max_request_bytes" in letters[0].reason
    assert queue.writes == 1
    assert set(consumer_view(queue)) == {ok.event_id}


# --- breaker and retry schedule on the mock clock ------------------------------------------


class Recording:
    """A real queue sink that also notes the (virtual) time of every send."""

    def __init__(self, inner: FormationQueueSink) -> None:
        self.inner = inner
        self.times: list[float] = []
        self._sent = trio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def send(self, event: OutEvent) -> None:
        self.times.append(trio.current_time())
        self._sent.set()
        self._sent = trio.Event()
        await self.inner.send(event)

    async def sent(self, n: int) -> None:
        """Wait until `n` sends have started."""
        with trio.fail_after(100_000):
            while len(self.times) < n:
                await self._sent.wait()


async def test_retry_round_follows_the_seed_schedule(
        tmp_path: Path, queue: QueueStandIn, mock_clock: trio.testing.MockClock) -> None:
    use_mock_time(mock_clock, rate=0)  # virtual time only moves by jumps: exact timings
    queue.faults.status = 503
    sink = Recording(qsink(queue, timeout_s=1000, breaker=BreakerConfig(failure_threshold=100)))
    async with delivering(tmp_path, [sink], maintenance_interval_s=3600) as (store, d):
        await commit(store, d, [usage_event("i0", 0)])
        await sink.sent(4)
        await trio.sleep(5)  # round one is over and recorded; round two starts after ~10 s
        m = d.metrics().sinks["q"]
        assert (m.failed, m.retried, len(sink.times)) == (4, 3, 4)
        assert store.pending("q", 10, 2**62)[0].attempts == 1
        await sink.sent(5)
        gaps = [b - a for a, b in itertools.pairwise(sink.times)]
        # one round: 1 try + 3 retries, 100 ms ×2 with ±10 % jitter; then the outbox waits
        # max_backoff_s (10 s) ±10 % before the next round
        for gap, want in zip(gaps, [0.1, 0.2, 0.4, 10.0], strict=True):
            assert want * 0.9 - 0.002 <= gap <= want * 1.1 + 0.002, gaps


async def test_breaker_opens_stays_shut_and_half_opens(
        tmp_path: Path, queue: QueueStandIn, mock_clock: trio.testing.MockClock) -> None:
    use_mock_time(mock_clock, rate=0)
    queue.faults.status = 503
    sink = Recording(qsink(queue, max_in_flight=1, timeout_s=1000))
    events = [usage_event(i, 0) for i in ("a", "b", "c")]
    async with delivering(tmp_path, [sink], maintenance_interval_s=3600) as (store, d):
        await commit(store, d, events)
        await sink.sent(5)
        t_open = sink.times[-1]
        await trio.sleep(1)
        assert d.metrics().sinks["q"].breaker_state == "open"
        assert queue.writes == 5  # a: 1 try + 3 retries, b: 1 try → 5 failures → open
        await trio.sleep(59.5 - (trio.current_time() - t_open))
        assert queue.writes == 5  # nothing while open
        assert store.stats()["q"].breaker_state == "open"  # recorded for `outbox status`
        queue.faults.clear()
        await sink.sent(6)
        assert sink.times[-1] - t_open == pytest.approx(60, abs=0.01)  # the reset timeout
        await drain(d, 10_000)
        m = d.metrics().sinks["q"]
        assert m.breaker_state == "closed"
        assert (m.failed, m.published, m.breaker_opened) == (5, 3, 1)
        assert m.refused_by_breaker >= 1
        assert queue.writes == 8
        assert store.stats()["q"].breaker_state == "closed"
    assert_exactly(queue, events)


async def test_half_open_failure_reopens(tmp_path: Path, queue: QueueStandIn,
                                         mock_clock: trio.testing.MockClock) -> None:
    use_mock_time(mock_clock, rate=0)
    queue.faults.status = 503
    sink = qsink(queue, max_in_flight=1, timeout_s=1000,
                 retry=RetryConfig(max_retries=0))
    async with delivering(tmp_path, [sink], maintenance_interval_s=3600) as (store, d):
        await commit(store, d, [usage_event(i, 0) for i in "abcdefg"])
        await trio.sleep(30)
        assert queue.writes == 5
        await trio.sleep(31)  # half-open: one trial, it fails, open again for 60 s
        assert queue.writes == 6
        assert d.metrics().sinks["q"].breaker_state == "open"
        await trio.sleep(58)
        assert queue.writes == 6
        await trio.sleep(3)
        assert queue.writes == 7
        assert d.metrics().sinks["q"].breaker_opened == 3


# --- a long outage while passes keep committing ---------------------------------------------


async def test_ten_minute_outage_backlog_drains_in_order(
        tmp_path: Path, queue: QueueStandIn, mock_clock: trio.testing.MockClock) -> None:
    use_mock_time(mock_clock)
    queue.stop()
    committed: list[OutEvent] = []
    async with delivering(tmp_path, [qsink(queue)]) as (store, d):
        for k in range(20):  # 20 passes of 10 instances, every 30 s: 10 minutes
            evs = [usage_event(f"i{i}", k) for i in range(10)]
            committed += evs
            took = await commit(store, d, evs)
            assert took < 2.0  # the collector is never held up by the dead sink
            await trio.sleep(30)
        await d.refresh_metrics()
        m = d.metrics().sinks["q"]
        assert m.depth == 200
        assert m.oldest_pending_age_s is not None
        assert m.oldest_pending_age_s >= 570
        assert m.breaker_state in ("open", "half_open")
        queue.start()
        t_back = trio.current_time()
        await drain(d)
        assert trio.current_time() - t_back < 120  # within the breaker reset + a round
        assert d.metrics().sinks["q"].published == 200
    assert_exactly(queue, committed)


# --- sinks are independent -----------------------------------------------------------------------


async def test_a_dead_queue_does_not_hold_back_the_file_sink(
        tmp_path: Path, queue: QueueStandIn, mock_clock: trio.testing.MockClock) -> None:
    use_mock_time(mock_clock)
    queue.faults.slow_s = 1.0
    jsonl = JsonlSink(JsonlSinkConfig(name="file", path=str(tmp_path / "events.jsonl")))
    events = [usage_event(f"i{i}", k) for k in range(3) for i in range(5)]
    async with delivering(tmp_path, [qsink(queue, timeout_s=0.5), jsonl]) as (store, d):
        await commit(store, d, events)
        await eventually(lambda: d.metrics().sinks["file"].published == len(events), 30, 0.1)
        await d.refresh_metrics()
        assert d.metrics().sinks["q"].depth == len(events)
        queue.faults.clear()
        await drain(d)
    lines = (tmp_path / "events.jsonl").read_bytes().splitlines()
    assert sorted(lines) == sorted(e.payload for e in events)
    assert_exactly(queue, events)


async def test_jsonl_fsync_failure_is_retried(tmp_path: Path) -> None:
    class FailingOnce(JsonlSink):
        fails = 1

        def _write_and_sync(self, payloads: Sequence[bytes]) -> None:
            super()._write_and_sync(payloads)  # written, then the fsync fails
            if self.fails:
                self.fails -= 1
                raise SinkUnavailable("fsync failed: EIO")

    sink = FailingOnce(JsonlSinkConfig(name="file", path=str(tmp_path / "e.jsonl"),
                                       retry=replace(RetryConfig(), max_backoff_s=0.01)))
    events = [usage_event("i0", k) for k in range(3)]
    async with delivering(tmp_path, [sink]) as (store, d):
        await commit(store, d, events)
        await drain(d, 30)
    lines = (tmp_path / "e.jsonl").read_bytes().splitlines()
    # written, not known durable, written again: duplicates that consumers dedupe
    assert {orjson.loads(x)["event_id"] for x in lines} == {e.event_id for e in events}
    assert len(lines) == 6


# --- the size cap during an outage: merged, and the totals still add up ---------------------


class CountingDelivery(Delivery):
    """Delivery that names each of its own worker calls in `calls`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[str] = []

    async def _db(self, fn: Callable[..., Any], *args: Any) -> Any:
        self.calls.append(getattr(fn, "__name__", "?"))
        return await super()._db(fn, *args)


async def test_while_passes_commit_the_upkeep_rides_on_their_worker_call(
        tmp_path: Path, mock_clock: trio.testing.MockClock) -> None:
    """A pass every 30 s, upkeep every 30 s: each runs with a pass's commit, in its worker call
    (heartbeat, gauges), and the maintenance task never wakes on its own; without passes it
    does, 1.5 intervals after the last."""
    use_mock_time(mock_clock)
    clock = TrioClock()
    sink = FormationQueueSink(QueueSinkConfig(name="q", url="http://127.0.0.1:9/"))
    store = Store.open(tmp_path / "state.db", clock=clock, node_id="host-a",
                       sink_names=[sink.name])
    d = CountingDelivery(store, [sink], clock, OutboxConfig(maintenance_interval_s=30))
    calls = d.calls

    async def a_pass(k: int) -> None:
        def work() -> Callable[[], None]:  # the collector's commit call (nothing claimed)
            return d.write_committed(store.commit_pass([], [usage_event("i1", k)]))
        (await trio.to_thread.run_sync(work))()

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(d.run)
            await trio.sleep(1)
            calls.clear()
            beats = []
            for k in range(8):  # 4 minutes of passes
                await trio.sleep(30)
                await a_pass(k)
                beats.append(int(store.meta()["delivery_heartbeat_ns"]))
            assert "_upkeep" not in calls, calls
            assert all(b < a for b, a in itertools.pairwise(beats))  # one per pass
            assert d.metrics().sinks["q"].depth == 8  # the gauges, from the last pass's
            calls.clear()
            await trio.sleep(44)
            assert "_upkeep" not in calls
            await trio.sleep(2)  # 45 s after the last pass's
            assert calls.count("_upkeep") == 1
            nursery.cancel_scope.cancel()
    finally:
        store.close()


async def test_merge_near_the_cap_during_an_outage_keeps_totals(
        tmp_path: Path, queue: QueueStandIn, mock_clock: trio.testing.MockClock) -> None:
    use_mock_time(mock_clock, threshold_s=0.01)  # the queue is down: nothing to wait for
    queue.stop()
    committed: list[OutEvent] = []
    async with delivering(tmp_path, [qsink(queue)], max_bytes=1024 * 1024,
                          maintenance_interval_s=5) as (store, d):
        k = 0
        while d.metrics().sinks["q"].merged < 100:
            evs = [usage_event(f"i{i}", k, pad=2000) for i in range(10)]
            try:
                await commit(store, d, evs)
            except StoreFull:  # like the collector: the same period again at the next pass
                await trio.sleep(30)
                continue
            committed += evs
            k += 1
            await trio.sleep(30)
        assert store.merge_records()
        queue.start()
        # The queue answers now: no jump while a send waits on it (see FROZEN_JUMP_S).
        mock_clock.autojump_threshold = FROZEN_JUMP_S
        await drain(d)
        m = d.metrics().sinks["q"]
        assert m.merged >= 100
        assert d.metrics().merges >= 1
    received = [orjson.loads(c[0]) for c in consumer_view(queue).values()]
    covered = [i for ev in received for i in ev.get("merged_from", [ev["event_id"]])]
    assert sorted(covered) == sorted(e.event_id for e in committed)  # each exactly once
    assert any("merged_from" in ev for ev in received)
    sent = [orjson.loads(e.payload) for e in committed]
    for key in ("cpu_seconds", "cpu_ns", "gpu_seconds"):
        assert sum(ev["metrics"][key] for ev in received) == sum(e["metrics"][key] for e in sent)
    for key in ("network_egress_mb", "network_ingress_mb", "disk_read_mb", "disk_write_mb"):
        assert sum(ev["metrics"][key] for ev in received) == pytest.approx(
            sum(e["metrics"][key] for e in sent), rel=1e-12)
    for iid in {e.instance_id for e in committed}:  # merged or not, periods still tile
        mine = sorted((ev["period_ns"]["start"], ev["period_ns"]["end"]) for ev in received
                      if ev["instance_id"] == iid)
        assert all(a[1] == b[0] for a, b in itertools.pairwise(mine))


async def test_a_maintenance_run_is_one_worker_call(tmp_path: Path,
                                                    mock_clock: trio.testing.MockClock) -> None:
    """Every maintenance interval, on an idle host too: prune, heartbeat and the gauges' figures
    in ONE worker call (a hand-off and a wake-up per step cost more than the steps)."""
    use_mock_time(mock_clock)
    clock = TrioClock()
    sink = JsonlSink(JsonlSinkConfig(path=str(tmp_path / "e.jsonl")))
    store = Store.open(tmp_path / "state.db", clock=clock, node_id="host-a",
                       sink_names=[sink.name])
    d = CountingDelivery(store, [sink], clock, OutboxConfig(maintenance_interval_s=10))
    calls = d.calls
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(d.run)
            await trio.sleep(1)
            first = store.meta()["delivery_heartbeat_ns"]
            calls.clear()
            # an event committed behind delivery's back shows in the gauges at the next run
            store.commit_pass([], [usage_event("i1", 0)])
            await trio.sleep(10)  # no pass rode: alone 1.5 intervals after the last
            assert calls == []
            await trio.sleep(5)
            assert calls == ["_upkeep"]
            assert int(store.meta()["delivery_heartbeat_ns"]) > int(first)
            assert d.metrics().sinks[sink.name].depth == 1
            nursery.cancel_scope.cancel()
    finally:
        store.close()


async def test_a_failing_maintenance_waits_its_interval_instead_of_spinning(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A store that cannot be maintained (disk full, a file gone): the upkeep is tried again
    after the maintenance interval, not at once. It was tried again at once, forever: a daemon
    whose state disk filled up burned 80 % of a core between the trio thread and a worker
    (7,572 tries in 2 s here)."""
    sink = JsonlSink(JsonlSinkConfig(path=str(tmp_path / "e.jsonl")))
    store = Store.open(tmp_path / "state.db", clock=TrioClock(), node_id="host-a",
                       sink_names=[sink.name])
    tries: list[float] = []

    def broken(retention_s: float) -> Any:
        tries.append(time.monotonic())
        raise StateError("state.db: maintain: store or disk full (database or disk is full)")

    d = CountingDelivery(store, [sink], TrioClock(), OutboxConfig(maintenance_interval_s=0.5))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(d.run)
            monkeypatch.setattr(store, "maintain", broken)
            await trio.sleep(2.0)
            nursery.cancel_scope.cancel()
    finally:
        store.close()
    assert 1 <= len(tries) <= 6, len(tries)  # about one every 0.5 s, not thousands


async def test_health_says_why_a_sink_is_not_delivering(tmp_path: Path,
                                                        queue: QueueStandIn) -> None:
    """A queue answering 503: health names the last failure and when (it only showed the
    breaker and counts, so an operator had to read the log to learn why)."""
    queue.faults.status = 503
    async with delivering(tmp_path, [qsink(queue, timeout_s=0.5)]) as (store, d):
        assert d.health()["sinks"]["q"]["last_error"] is None
        await commit(store, d, [usage_event("i1", 0)])
        await eventually(lambda: d.health()["sinks"]["q"]["last_error"] is not None, 30, 0.05)
        h = d.health()["sinks"]["q"]
        assert "503" in h["last_error"], h
        assert h["last_error_at"].endswith("Z") and h["depth"] >= 0
        queue.faults.status = None
        await drain(d, 60)
    assert_exactly(queue, [usage_event("i1", 0)])
