"""A stop does not wait out a drain that its store refuses.

A webhook endpoint whose outcome cannot be recorded (the receiver answered, but a full disk or
a damaged table refused the record) pauses 1 s and POSTs the same row again, for ever: it
never turned idle, so the daemon's stop (`WebhookDispatcher.drained`, inside its drain grace)
waited the whole grace, re-POSTing each second. Now a drain paused on a store error counts as
quiet (`drain.all_quiet`): the stop goes on at once, and the row stays owed in the store, sent
again (same event id) after the restart."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import trio
import trio.testing

from hostagent.config.sinks import BreakerConfig
from hostagent.delivery.breaker import Breaker
from hostagent.delivery.drain import STORE_ERROR_PAUSE_S, Drain, Taken, all_quiet
from hostagent.errors import StateError
from tests.clocks import FakeClock, TrioClock
from tests.store.test_guard import used_store
from tests.store.test_sweep_damage import stuck_on_an_unrecordable_row


class Unrecordable:
    """One row, always due; every record of its outcome fails."""

    name = "stuck"

    def __init__(self, breaker: Breaker) -> None:
        self.breaker = breaker
        self.sent = 0

    async def take(self, now_ns: int) -> Taken[int]:
        await trio.lowlevel.checkpoint()
        return Taken([1])

    async def deliver(self, rows: Sequence[int]) -> None:
        await trio.sleep(0.2)  # the send, answered
        self.sent += 1
        raise StateError("state.db: record: database or disk is full")

    async def settle(self) -> None:
        pass

    def store_failed(self, err: StateError) -> None:
        pass


async def test_a_drain_paused_on_a_store_error_is_quiet_at_once(
        mock_clock: trio.testing.MockClock) -> None:
    mock_clock.autojump_threshold = 0
    clock = TrioClock(wall0_ns=0)
    q = Unrecordable(Breaker(BreakerConfig(), clock))
    drain = Drain(q, clock)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain.run)
        await all_quiet(lambda: [drain], stalled_too=True)
        assert trio.current_time() < STORE_ERROR_PAUSE_S  # not the pause, nor the grace
        assert q.sent == 1 and drain.stalled and not drain.idle
        # the outbox's wait (its sinks keep unrecorded acks for the next take) goes on
        with trio.move_on_after(5) as outbox_wait:
            await all_quiet(lambda: [drain])
        assert outbox_wait.cancelled_caught
        nursery.cancel_scope.cancel()


async def test_stopping_a_webhook_endpoint_stuck_on_an_unrecordable_row_is_prompt(
        tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    used_store(path, FakeClock())
    async with stuck_on_an_unrecordable_row(path) as (receiver, dispatcher):
        # what the daemon's stop waits for, within its drain grace (5 s): it waited it all
        with trio.fail_after(STORE_ERROR_PAUSE_S * 3):
            await dispatcher.drained()
    assert 1 <= len(receiver.received) <= 3
    with contextlib.closing(sqlite3.connect(path)) as c:  # still owed: sent again later
        assert c.execute("SELECT status FROM webhook_deliveries").fetchall() == [("pending",)]
