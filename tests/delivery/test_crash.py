"""kill -9 safety: a producer+delivery process (this file run as a program) is SIGKILLed at
random moments, 20+ times, while it commits passes and delivers them to the stand-in queue.
Afterwards every committed event is in the queue, duplicates carry the same event_id and the
same bytes, and per instance the periods tile time with no gap and no overlap."""

from __future__ import annotations

import itertools
import random
import subprocess
import sys
import time
from pathlib import Path

import trio

from hostagent.config.schema import OutboxConfig
from hostagent.config.sinks import QueueSinkConfig
from hostagent.delivery.engine import Delivery
from hostagent.delivery.sinks.formation_queue import FormationQueueSink
from hostagent.store.outbox import Store
from tests.clocks import TrioClock
from tests.delivery.miniature import (
    deliver_until_done,
    kill_while_running,
    run_to_done,
    spawn_child,
)
from tests.standins.queue import T0_NS, decode, read_topic, serve_queue
from tests.standins.queue import usage_event as make_event

INSTANCES = 6
PASSES = 25


async def child(state: str, url: str) -> None:
    """The daemon in miniature: commit passes from the persisted baselines, deliver them."""
    clock = TrioClock(wall0_ns=time.time_ns())
    store = Store.open(state, clock=clock, node_id="host-a", sink_names=["q"])
    sink = FormationQueueSink(QueueSinkConfig(name="q", url=url, max_in_flight=4,
                                              timeout_s=2.0))
    d = Delivery(store, [sink], clock, OutboxConfig(maintenance_interval_s=0.5))
    await deliver_until_done(store, d, "q", instances=INSTANCES, passes=PASSES)


def spawn(state: Path, url: str) -> subprocess.Popen[str]:
    return spawn_child(__file__, str(state), url)


def test_sigkill_at_random_moments_loses_nothing(tmp_path: Path) -> None:
    rng = random.Random(4242)
    state = tmp_path / "state.db"
    t0 = time.monotonic()
    kills = 0
    with serve_queue() as q:
        while kills < 22:
            q.faults.slow_s = rng.choice([0.0, 0.0, 0.005, 0.02])  # requests in flight at death
            kill_while_running(lambda: spawn(state, q.url), rng, max_wait_s=0.3)
            kills += 1
        q.faults.clear()
        run_to_done(lambda: spawn(state, q.url))
        messages = read_topic(q.url, "usage_events")
    assert time.monotonic() - t0 < 60

    expected = {make_event(f"i{i}", k).event_id: make_event(f"i{i}", k).payload
                for i in range(INSTANCES) for k in range(PASSES)}
    seen: dict[str, bytes] = {}
    firsts: dict[str, list[tuple[int, int]]] = {}
    for m in messages:
        sub, ev = decode(m)
        assert sub == 0
        eid = ev["event_id"]
        if eid in seen:
            assert seen[eid] == m[1:], "a redelivered event differs"
            continue
        seen[eid] = m[1:]
        firsts.setdefault(ev["instance_id"], []).append(
            (ev["period_ns"]["start"], ev["period_ns"]["end"]))
    assert seen == expected  # every committed event, byte for byte, nothing else
    for periods in firsts.values():  # in order, tiling time
        assert periods[0][0] == T0_NS
        assert all(a[1] == b[0] for a, b in itertools.pairwise(periods))
        assert len(periods) == PASSES
    print(f"{kills} kills, {len(messages)} messages for {len(expected)} events "
          f"({len(messages) - len(expected)} redelivered duplicates)")


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "child":
    trio.run(child, sys.argv[2], sys.argv[3])
