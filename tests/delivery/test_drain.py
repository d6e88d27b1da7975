"""The drain engine: one backoff formula (hypothesis), the loop's waits on trio's mock clock,
one transaction per round for the outbox, and a Delivery whose construction writes nothing."""

from __future__ import annotations

import dataclasses
import hashlib
import random
import sqlite3
import threading
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from hostagent.config.schema import OutboxConfig
from hostagent.config.sinks import BreakerConfig, JsonlSinkConfig, QueueSinkConfig, RetryConfig
from hostagent.delivery.breaker import Breaker
from hostagent.delivery.drain import (
    STORE_ERROR_PAUSE_S,
    Drain,
    Taken,
    attempt_backoff_s,
    round_backoff_s,
)
from hostagent.delivery.engine import Delivery
from hostagent.delivery.sinks.formation_queue import FormationQueueSink
from hostagent.delivery.sinks.jsonl import JsonlSink
from hostagent.errors import StateError
from hostagent.store.inspect import StoreSize
from hostagent.store.outbox import Claimed, Outcome, Store
from tests.clocks import FakeClock, TrioClock
from tests.delivery.sinks.test_queue_channels import alert, alert_rows
from tests.delivery.test_engine import idle_after_start
from tests.standins.queue import usage_event

retries = st.builds(
    RetryConfig, max_retries=st.integers(0, 5),
    initial_backoff_s=st.floats(0, 100, allow_nan=False),
    max_backoff_s=st.floats(0, 100, allow_nan=False), multiplier=st.floats(1, 10),
    jitter=st.floats(0, 1), round_backoff_max_s=st.floats(0, 86400))


@given(retries, st.integers(1, 60))
def test_round_backoff_is_one_capped_growing_formula(retry: RetryConfig, rounds: int) -> None:
    exact = dataclasses.replace(retry, jitter=0.0)
    rng = random.Random(0)
    first = max(retry.max_backoff_s, retry.initial_backoff_s)
    want = min(retry.round_backoff_max_s, first * retry.multiplier ** (rounds - 1))
    assert round_backoff_s(exact, rounds, rng) == pytest.approx(want)
    assert round_backoff_s(exact, rounds + 1, rng) >= round_backoff_s(exact, rounds, rng)
    if retry.round_backoff_max_s >= retry.max_backoff_s:
        # the first wait between rounds carries on where a round's own schedule is capped
        last_in_round = attempt_backoff_s(exact, retry.max_retries + 1, rng)
        assert round_backoff_s(exact, 1, rng) >= last_in_round
    got = round_backoff_s(retry, rounds, rng)
    assert want * (1 - retry.jitter) - 1e-9 <= got <= want * (1 + retry.jitter) + 1e-9


@dataclass(eq=False)
class ListQueue:
    """A queue held in a list: rows are due at their time; `fail` store errors come first."""

    due_at_ns: list[int]
    breaker: Breaker
    name: str = "list"
    fail: int = 0
    delivered: list[tuple[float, int]] = field(default_factory=list)
    events: list[str] = field(default_factory=list)

    async def take(self, now_ns: int) -> Taken[int]:
        await trio.lowlevel.checkpoint()
        if self.fail:
            self.fail -= 1
            raise StateError("database is locked")
        rows = [t for t in self.due_at_ns if t <= now_ns]
        later = [t for t in self.due_at_ns if t > now_ns]
        return Taken(rows, min(later) if later and not rows else None)

    async def deliver(self, rows: Sequence[int]) -> None:
        await trio.lowlevel.checkpoint()
        for r in rows:
            self.due_at_ns.remove(r)
            self.delivered.append((trio.current_time(), r))

    async def settle(self) -> None:
        self.events.append(f"settle@{trio.current_time():.1f}")

    def store_failed(self, err: StateError) -> None:
        self.events.append(f"store error@{trio.current_time():.1f}")


async def test_the_loop_pauses_on_store_errors_then_waits_for_the_next_due_row(
        mock_clock: trio.testing.MockClock) -> None:
    mock_clock.autojump_threshold = 0
    clock = TrioClock(wall0_ns=0)
    q = ListQueue([0, 30 * 10**9], Breaker(BreakerConfig(), clock), fail=2)
    drain = Drain(q, clock)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain.run)
        await trio.sleep(10)
        assert q.events == ["store error@0.0", f"store error@{STORE_ERROR_PAUSE_S:.1f}"]
        assert q.delivered == [(2 * STORE_ERROR_PAUSE_S, 0)]
        assert drain.idle
        await trio.sleep(25)  # the second row is due at 30 s: the loop wakes itself then
        assert q.delivered[1] == (30.0, 30 * 10**9)
        q.due_at_ns.append(0)
        await trio.sleep(100)
        assert len(q.delivered) == 2  # new rows wait for a wake-up (nothing is due-timed)
        drain.wake()
        await trio.sleep(0.001)
        assert len(q.delivered) == 3
        nursery.cancel_scope.cancel()


async def test_an_open_breaker_settles_then_waits_for_its_trial(
        mock_clock: trio.testing.MockClock) -> None:
    mock_clock.autojump_threshold = 0
    clock = TrioClock(wall0_ns=0)
    breaker = Breaker(BreakerConfig(failure_threshold=1, reset_timeout_s=60), clock)
    breaker.record_failure()
    q = ListQueue([0], breaker)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(Drain(q, clock).run)
        await trio.sleep(120)
        nursery.cancel_scope.cancel()
    assert q.events == ["settle@0.0"]
    assert q.delivered == [(60.0, 0)]  # half-open after reset_timeout_s: the trial goes


class CountingStore(Store):
    """The real store, listing the write transactions it runs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.done: list[str] = []

    def transaction(self, what: str) -> AbstractContextManager[sqlite3.Connection]:
        self.done.append(what)
        return super().transaction(what)


async def test_a_round_is_one_transaction_recording_and_claiming(tmp_path: Path) -> None:
    clock = TrioClock()
    store = CountingStore.open(tmp_path / "state.db", clock=clock, node_id="h",
                               sink_names=["file"])
    sink = JsonlSink(JsonlSinkConfig(name="file", path=str(tmp_path / "events.jsonl")))
    d = Delivery(store, [sink], clock, OutboxConfig(batch_size=10, local_batch_size=10,
                                                    maintenance_interval_s=3600))
    d.prepare()
    store.commit_pass([], [usage_event(f"i{i}", k) for k in range(3) for i in range(10)])
    store.done.clear()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(d.run)
            with trio.fail_after(20):
                await d.drained()
            rounds = [w for w in store.done  # the delivery's own, not upkeep's
                      if w in ("claim batch", "record outcomes", "record and claim")]
            nursery.cancel_scope.cancel()
        # 3 batches of 10: each claim also records the batch before it; the 4th finds none
        assert rounds == ["record and claim"] * 4
        assert store.stats()["file"].acked == 30
    finally:
        store.close()
    assert len((tmp_path / "events.jsonl").read_bytes().splitlines()) == 30


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.parent.glob(path.name + "*")):
        h.update(p.read_bytes())
    return h.hexdigest()


async def test_constructing_delivery_writes_nothing_prepare_does(tmp_path: Path) -> None:
    clock = TrioClock()
    path = tmp_path / "state.db"
    old = Store.open(path, clock=clock, node_id="h", sink_names=["q", "file"])
    old.commit_pass([], [alert("notify", ["email"], 1, routed=False)])  # as an older hostagent
    old.close()
    store = Store.open(path, clock=clock, node_id="h", sink_names=["q", "file"])
    try:
        sinks = [FormationQueueSink(QueueSinkConfig(name="q", url="http://127.0.0.1:9")),
                 JsonlSink(JsonlSinkConfig(name="file", path=str(tmp_path / "e.jsonl")))]
        before = _digest(path)
        d = Delivery(store, sinks, clock, OutboxConfig())
        assert _digest(path) == before
        assert alert_rows(path) == {"file": ["a-1"], "q": ["a-1"]}
        d.prepare()  # the queue does not answer to "email": its row goes
        assert alert_rows(path) == {"file": ["a-1"]}
    finally:
        store.close()


def test_the_take_reads_the_store_size_in_its_transaction(tmp_path: Path) -> None:
    # Delivery wakes maintenance from it instead of a size check after every commit
    store = Store.open(tmp_path / "state.db", clock=FakeClock(), node_id="h", sink_names=["q"])
    try:
        store.commit_pass([], [usage_event(f"i{i}", 0, pad=3000) for i in range(20)])
        got = store.record_and_take("q", [], 5, 2**62, dead_letter_after=3)
        assert len(got.batch) == 5 and got.next_due_ns is None
        assert got.used_bytes == store.size().used_bytes > 20 * 3000
    finally:
        store.close()


class FlakyStore(Store):
    """The real store; after `ok` more record-and-claim transactions, `fail` of them fail like
    a locked file."""

    ok = 0
    fail = 0

    def record_and_take(self, sink: str, outcomes: Sequence[Outcome], limit: int, now_ns: int,
                        *, dead_letter_after: int, durable: bool = True) -> Claimed:
        if self.ok:
            self.ok -= 1
        elif self.fail:
            assert outcomes  # the batch's outcomes are what this transaction would record
            self.fail -= 1
            raise StateError("database is locked")
        return super().record_and_take(sink, outcomes, limit, now_ns,
                                       dead_letter_after=dead_letter_after, durable=durable)


async def test_outcomes_survive_a_store_error_and_nothing_is_sent_twice(
        tmp_path: Path, mock_clock: trio.testing.MockClock) -> None:
    mock_clock.autojump_threshold = 0.01
    clock = TrioClock()
    store = FlakyStore.open(tmp_path / "state.db", clock=clock, node_id="h", sink_names=["file"])
    sink = JsonlSink(JsonlSinkConfig(name="file", path=str(tmp_path / "events.jsonl")))
    d = Delivery(store, [sink], clock, OutboxConfig(batch_size=5, local_batch_size=5,
                                                    maintenance_interval_s=3600))
    try:
        # Committed and armed before delivery starts: its first take is the claim of this
        # batch (armed after the start, an empty first take could use up the `ok`).
        store.commit_pass([], [usage_event(f"i{i}", 0) for i in range(5)])
        store.ok, store.fail = 1, 3  # the claim works; recording the batch fails 3 times
        async with trio.open_nursery() as nursery:
            await nursery.start(d.run)
            d.wake()
            # A real-time guard, not trio.fail_after: with the mock clock autojumping, a worker
            # thread slowed by a loaded machine let the clock jump to a mock deadline.
            token = trio.lowlevel.current_trio_token()
            with trio.CancelScope() as guard:
                timer = threading.Timer(60, lambda: token.run_sync_soon(guard.cancel))
                timer.start()
                try:
                    await d.drained()
                finally:
                    timer.cancel()
            assert not guard.cancelled_caught, "delivery did not drain within 60 s"
            nursery.cancel_scope.cancel()
        m = d.metrics().sinks["file"]
        assert (m.store_errors, m.published) == (3, 5)
        assert store.stats()["file"].acked == 5
    finally:
        store.close()
    assert len((tmp_path / "events.jsonl").read_bytes().splitlines()) == 5


class SizeCountingStore(Store):
    """The real store, counting the maintenance task's size checks."""

    sizes = 0

    def size(self) -> StoreSize:
        self.sizes += 1
        return super().size()


async def test_a_commit_costs_no_size_check_while_a_healthy_sink_takes(tmp_path: Path) -> None:
    # the take after the commit reads the size in its own transaction (fewer wake-ups)
    clock = TrioClock()
    store = SizeCountingStore.open(tmp_path / "state.db", clock=clock, node_id="h",
                                   sink_names=["file"])
    sink = JsonlSink(JsonlSinkConfig(name="file", path=str(tmp_path / "events.jsonl")))
    d = Delivery(store, [sink], clock, OutboxConfig(maintenance_interval_s=3600))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(d.run)
            with trio.fail_after(20):
                await idle_after_start(d)
                before = store.sizes
                for k in range(10):
                    await trio.to_thread.run_sync(store.commit_pass, [], [usage_event("i", k)])
                    d.wake()
                    await d.drained()
            nursery.cancel_scope.cancel()
        assert store.sizes == before
        assert store.stats()["file"].acked == 10
    finally:
        store.close()


class TaskSteps(trio.abc.Instrument):
    """Counts the scheduler steps of every task (each step is one pass of trio's run loop)."""

    def __init__(self) -> None:
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1


async def test_a_sequential_round_costs_no_scheduler_step_per_event(tmp_path: Path) -> None:
    # 600 instances in one batch to a jsonl sink (max_in_flight 1): the round used to take a
    # limiter checkpoint per instance, one trip through the run loop (and epoll) per event
    clock = TrioClock()
    store = Store.open(tmp_path / "state.db", clock=clock, node_id="h", sink_names=["file"])
    sink = JsonlSink(JsonlSinkConfig(name="file", path=str(tmp_path / "events.jsonl")))
    d = Delivery(store, [sink], clock, OutboxConfig(batch_size=1000, maintenance_interval_s=3600))
    d.prepare()
    store.commit_pass([], [usage_event(f"i{i}", 0) for i in range(600)])
    steps = TaskSteps()
    try:
        async with trio.open_nursery() as nursery:
            trio.lowlevel.add_instrument(steps)
            await nursery.start(d.run)
            with trio.fail_after(20):
                await d.drained()
            trio.lowlevel.remove_instrument(steps)
            nursery.cancel_scope.cancel()
        assert store.stats()["file"].acked == 600
    finally:
        store.close()
    assert len((tmp_path / "events.jsonl").read_bytes().splitlines()) == 600
    assert steps.steps < 100, steps.steps  # thread hand-offs and a yield every 256 instances
