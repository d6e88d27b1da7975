"""Chaos: passes keep committing while the stand-in queue goes through random faults (down,
5xx, garbage, resets, slow replies, Failure replies); afterwards, with dead letters replayed,
the consumer's view deduplicated by event_id is exactly the committed set, and per instance
everything but the replayed dead letters arrived in period order."""

from __future__ import annotations

import random
import time
from dataclasses import replace
from pathlib import Path

import trio
import trio.testing

from hostagent.config.sinks import BreakerConfig, QueueSinkConfig
from hostagent.delivery.sinks.formation_queue import FormationQueueSink
from hostagent.model import OutEvent
from tests.delivery.test_engine import assert_exactly, commit, delivering, drain, use_mock_time
from tests.standins.queue import QueueStandIn, serve_queue, usage_event

FAULTS = ("none", "503", "garbage", "reset", "slow", "down", "reject_every", "failure")


def apply(q: QueueStandIn, fault: str, rng: random.Random) -> None:
    q.faults.clear()
    if fault == "down":
        q.stop()
    elif not q.running:
        q.start()
    if fault == "503":
        q.faults.status = rng.choice([500, 502, 503])
    elif fault == "garbage":
        q.faults.garbage = True
    elif fault == "reset":
        q.faults.reset = True
    elif fault == "slow":
        q.faults.slow_s = 0.3
    elif fault == "reject_every":
        q.faults.reject_every = rng.choice([2, 3, 5])
    elif fault == "failure":
        q.faults.failure = True


async def test_chaos_final_view_is_the_committed_set(
        tmp_path: Path, mock_clock: trio.testing.MockClock) -> None:
    use_mock_time(mock_clock)
    rng = random.Random(20240501)
    t_real = time.monotonic()
    committed: list[OutEvent] = []
    sink_cfg = QueueSinkConfig(name="q", timeout_s=0.2, max_in_flight=4,
                               breaker=BreakerConfig(reset_timeout_s=20))
    with serve_queue() as q:
        sink = FormationQueueSink(replace(sink_cfg, url=q.url))
        async with delivering(tmp_path, [sink], dead_letter_after=3) as (store, d):

            async def chaos(stop: trio.Event) -> None:
                while not stop.is_set():
                    apply(q, rng.choice(FAULTS), rng)
                    with trio.move_on_after(rng.uniform(1, 8)):
                        await stop.wait()

            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(chaos, stop)
                for k in range(30):  # 30 passes of 10 instances, one every 5 s
                    evs = [usage_event(f"i{i}", k) for i in range(10)]
                    committed += evs
                    assert await commit(store, d, evs) < 2.0
                    await trio.sleep(5)
                stop.set()
            apply(q, "none", rng)
            d.wake()
            replayed: set[str] = set()
            while True:  # the operator's part: replay what the queue refused, until none left
                await drain(d)
                letters = store.dead_letters()
                if not letters:
                    break
                replayed |= {x.event_id for x in letters}
                store.replay()
                d.wake()
            m = d.metrics().sinks["q"]
        assert m.published >= len(committed)
        assert m.failed > 0
        assert m.retried > 0
        # A dead letter replayed at the end arrives after its instance's later events.
        assert_exactly(q, committed, replayed)
        assert len(q.messages("usage_events")) >= len(committed)
    assert time.monotonic() - t_real < 30

