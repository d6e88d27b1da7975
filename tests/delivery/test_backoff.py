"""Backoffs for any number of failed rounds: a sink down for days (thousands of rounds) must
get the capped wait, not an OverflowError from ``multiplier ** rounds`` that ends delivery."""

from __future__ import annotations

import dataclasses
import math
import random
import socket
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from hostagent.config.schema import OutboxConfig
from hostagent.config.sinks import QueueSinkConfig, RetryConfig
from hostagent.delivery.drain import attempt_backoff_s, capped_growth, round_backoff_s
from hostagent.delivery.engine import Delivery
from hostagent.delivery.sinks.formation_queue import FormationQueueSink
from hostagent.store.outbox import Store
from tests.clocks import TrioClock
from tests.delivery.test_engine import eventually
from tests.standins.queue import usage_event

# The config's own bounds (hostagent.config.sinks.RetryConfig).
retries = st.builds(
    RetryConfig, max_retries=st.integers(0, 100),
    initial_backoff_s=st.floats(0, 86400), max_backoff_s=st.floats(0, 86400),
    multiplier=st.floats(1, 10), jitter=st.floats(0, 1),
    round_backoff_max_s=st.floats(0, 86400))
rounds = st.one_of(st.integers(1, 2_000), st.integers(1, 10**6))


def naive(start: float, multiplier: float, steps: int, cap: float) -> float | None:
    """The formula as it was written; where its power overflows, the cap (the power is then
    past 1e308 and cap / start below it), or None for a start too near 0 to say."""
    if start <= 0:
        return min(start, cap)
    try:
        return min(cap, start * multiplier ** steps)
    except OverflowError:
        return cap if start >= 1e-300 else None


def check(got: float, want: float | None, cap: float) -> None:
    assert math.isfinite(got) and 0 <= got <= max(cap, 0)
    if want is not None:
        assert got == pytest.approx(want, rel=1e-9)


@given(st.floats(0, 86400), st.floats(1, 10), st.integers(-3, 10**6), st.floats(0, 86400))
def test_capped_growth_is_the_formula_without_its_overflow(start: float, multiplier: float,
                                                           steps: int, cap: float) -> None:
    got = capped_growth(start, multiplier, steps, cap)
    check(got, naive(start, multiplier, max(steps, 0), cap), cap)
    assert capped_growth(start, multiplier, steps + 1, cap) >= got


@given(retries, rounds)
def test_round_backoff_never_overflows_and_stays_capped(retry: RetryConfig, n: int) -> None:
    rng = random.Random(n)
    exact = dataclasses.replace(retry, jitter=0.0)
    first = max(retry.max_backoff_s, retry.initial_backoff_s)
    base = round_backoff_s(exact, n, rng)
    check(base, naive(first, retry.multiplier, n - 1, retry.round_backoff_max_s),
          retry.round_backoff_max_s)
    assert round_backoff_s(exact, n + 1, rng) >= base
    got = round_backoff_s(retry, n, rng)
    assert math.isfinite(got)
    assert base * (1 - retry.jitter) - 1e-9 <= got <= base * (1 + retry.jitter) + 1e-9
    assert int(got * 1e9) >= 0  # what the queues add to now


@given(retries, rounds)
def test_attempt_backoff_never_overflows_and_stays_capped(retry: RetryConfig, n: int) -> None:
    exact = dataclasses.replace(retry, jitter=0.0)
    got = attempt_backoff_s(exact, n, random.Random(0))
    check(got, naive(retry.initial_backoff_s, retry.multiplier, n - 1, retry.max_backoff_s),
          retry.max_backoff_s)


def test_a_sink_down_for_days_still_gets_the_capped_round_backoff() -> None:
    # multiplier 2 and rounds ~300 s apart: round 1,025 comes after ~3.5 days
    retry = RetryConfig(jitter=0.0)
    for n in (1_025, 1_100, 10**6):
        assert round_backoff_s(retry, n, random.Random(0)) == retry.round_backoff_max_s


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_row_that_failed_thousands_of_rounds_waits_the_cap_and_delivery_goes_on(
        tmp_path: Path) -> None:
    clock = TrioClock()
    store = Store.open(tmp_path / "state.db", clock=clock, node_id="h", sink_names=["q"])
    retry = RetryConfig(max_retries=0, jitter=0.0)
    sink = FormationQueueSink(QueueSinkConfig(name="q", url=f"http://127.0.0.1:{closed_port()}",
                                              timeout_s=1, retry=retry))
    d = Delivery(store, [sink], clock, OutboxConfig(maintenance_interval_s=3600))
    store.commit_pass([], [usage_event("i", 0)])
    with store.transaction("as after ~5,000 failed rounds") as c:  # two weeks down
        c.execute("UPDATE deliveries SET attempts = 5000, claimed = 1")

    def row() -> tuple[int, int]:
        with store.reading("row") as c:
            attempts, next_ns = c.execute(
                "SELECT attempts, next_attempt_ns FROM deliveries").fetchone()
        return int(attempts), int(next_ns)

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(d.run)  # the old formula: OverflowError out of this nursery
            await eventually(lambda: row()[0] == 5001, timeout_s=20, step_s=0.05)
            wait_s = (row()[1] - clock.now().wall_ns) / 1e9
            assert retry.round_backoff_max_s - 25 < wait_s <= retry.round_backoff_max_s
            await trio.sleep(0.2)  # the drain lives on, waiting for the row's time
            nursery.cancel_scope.cancel()
        assert store.stats()["q"].pending == 1  # nothing dropped
    finally:
        store.close()
