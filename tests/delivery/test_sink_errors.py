"""A sink that raises outside its contract (a bug: anything but SinkUnavailable or
SinkRejected, e.g. the email package's ValueError for a header with a line break) ends neither
the delivery task nor the daemon: the event is a rejection, dead-lettered after
`dead_letter_after` rounds with the error as its reason, and the other events are delivered.
Against the stand-in queue (a real HTTP server)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio
import trio.testing

from hostagent.config.sinks import QueueSinkConfig
from hostagent.delivery.sinks.formation_queue import FormationQueueSink
from hostagent.model import OutEvent
from tests.delivery.test_engine import (
    assert_exactly,
    commit,
    delivering,
    drain,
    eventually,
    queue,  # noqa: F401 (the fixture)
    use_mock_time,
)
from tests.standins.queue import QueueStandIn, usage_event


class Buggy(FormationQueueSink):
    """The queue sink with a bug for instance "x": send raises ValueError, flush too once."""

    flush_bugs = 0

    def body_for(self, event: OutEvent) -> bytes:
        if event.instance_id == "x":
            raise ValueError("Header values may not contain linefeed")
        return super().body_for(event)

    async def flush(self) -> None:
        if self.flush_bugs:
            self.flush_bugs -= 1
            raise RuntimeError("flush bug")


async def test_a_sink_bug_dead_letters_its_event_and_delivery_goes_on(
        tmp_path: Path, queue: QueueStandIn, mock_clock: trio.testing.MockClock,  # noqa: F811
        caplog: pytest.LogCaptureFixture) -> None:
    use_mock_time(mock_clock)
    sink = Buggy(QueueSinkConfig(name="q", url=queue.url))
    events = [usage_event(i, k) for k in range(2) for i in ("x", "y")]
    with caplog.at_level(logging.ERROR):
        async with delivering(tmp_path, [sink], dead_letter_after=3) as (store, d):
            await commit(store, d, events)
            await eventually(lambda: len(store.dead_letters()) == 2, 600, 1)
            letters = store.dead_letters()
            assert {x.event_id for x in letters} == {e.event_id for e in events
                                                     if e.instance_id == "x"}
            assert all(x.reason == "sink error: ValueError: Header values may not contain "
                       "linefeed" for x in letters)
            await drain(d)
            m = d.metrics().sinks["q"]
            assert (m.published, m.dead_lettered, m.breaker_state) == (2, 2, "closed")
            # a bug in flush: the batch is sent again, nothing is lost
            sink.flush_bugs = 1
            more = [usage_event("y", k) for k in (2, 3)]
            await commit(store, d, more)
            await drain(d)
            assert d.metrics().sinks["q"].published == 4
    assert "sink failed unexpectedly" in caplog.text
    assert "sink flush failed unexpectedly" in caplog.text
    assert_exactly(queue, [e for e in events if e.instance_id == "y"] + more)
