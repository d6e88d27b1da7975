"""A queue that answers `Failure` to every write (its own trouble) holds the backlog pending,
never dead-letters it, and delivers all of it once it takes writes again; a poison event among
events the queue takes is still dead-lettered (tests/delivery/test_engine.py). Through the real
outbox, engine and stand-in queue server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.delivery.test_engine import (
    assert_exactly,
    commit,
    delivering,
    eventually,
    qsink,
    use_mock_time,
)
from tests.standins.queue import QueueStandIn, serve_queue, usage_event


@pytest.fixture
def queue() -> Iterator[QueueStandIn]:
    with serve_queue() as q:
        yield q


async def test_a_queue_refusing_every_write_dead_letters_nothing(
        tmp_path: Path, queue: QueueStandIn, mock_clock: trio.testing.MockClock,
        caplog: pytest.LogCaptureFixture) -> None:
    use_mock_time(mock_clock)
    queue.faults.failure = True
    events = [usage_event(i, k) for k in range(3) for i in ("a", "b", "c")]
    async with delivering(tmp_path, [qsink(queue)], dead_letter_after=3) as (store, d):
        await commit(store, d, events)
        # Six rounds of refusals (twice dead_letter_after) for each instance's first event.
        await eventually(lambda: d.metrics().sinks["q"].rejected >= 18, 3600, 30)
        await d.refresh_metrics()
        m = d.metrics().sinks["q"]
        assert store.dead_letters() == []
        assert (m.dead_lettered, m.published, m.depth) == (0, 0, len(events))
        assert "sink refuses every event" in caplog.text
        queue.faults.clear()
        d.wake()
        with trio.fail_after(3600):  # the rows wait out their backoff (up to 300 s) first
            while d.metrics().sinks["q"].depth:
                await trio.sleep(30)
                await d.refresh_metrics()
        m = d.metrics().sinks["q"]
        assert (m.dead_lettered, m.published) == (0, len(events))
    assert_exactly(queue, events)  # every one, per instance in period order


async def test_one_instance_refused_alone_is_still_dead_lettered(
        tmp_path: Path, queue: QueueStandIn, mock_clock: trio.testing.MockClock) -> None:
    use_mock_time(mock_clock)
    queue.faults.failure = True  # a round that sends only one instance's event proves nothing
    events = [usage_event("a", 0)]
    async with delivering(tmp_path, [qsink(queue)], dead_letter_after=3) as (store, d):
        await commit(store, d, events)
        await eventually(lambda: len(store.dead_letters()) == 1, 3600, 30)
        assert store.dead_letters()[0].attempts == 3
