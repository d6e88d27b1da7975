"""kill -9 safety of the JSONL sink's one-call round (claim, write + fsync, acknowledge): a
producer+delivery process (this file run as a program) is SIGKILLed at random moments while it
commits passes and writes them to the file. Afterwards every committed event is in the file,
duplicates are the same bytes, a torn line never spoils the next, and per instance the first
sightings tile time in period order."""

from __future__ import annotations

import itertools
import random
import subprocess
import sys
import time
from pathlib import Path

import orjson
import trio

from hostagent.config.schema import OutboxConfig
from hostagent.config.sinks import JsonlSinkConfig
from hostagent.delivery.engine import Delivery
from hostagent.delivery.sinks.jsonl import JsonlSink
from hostagent.store.outbox import Store
from tests.clocks import FakeClock, TrioClock
from tests.delivery.miniature import (
    deliver_until_done,
    kill_while_running,
    run_to_done,
    spawn_child,
)
from tests.standins.queue import T0_NS
from tests.standins.queue import usage_event as make_event

INSTANCES = 6
PASSES = 25


async def child(state: str, path: str) -> None:
    """The daemon in miniature with a JSONL sink (small batches: many rounds to die in)."""
    clock = TrioClock(wall0_ns=time.time_ns())
    store = Store.open(state, clock=clock, node_id="host-a", sink_names=["file"])
    sink = JsonlSink(JsonlSinkConfig(name="file", path=path))
    # retention: TrioClock follows trio's clock, whose offset differs from run to run
    d = Delivery(store, [sink], clock, OutboxConfig(batch_size=4, local_batch_size=4,
                                                    maintenance_interval_s=0.5,
                                                    retention_s=1e9))
    await deliver_until_done(store, d, "file", instances=INSTANCES, passes=PASSES)


def spawn(state: Path, path: Path) -> subprocess.Popen[str]:
    return spawn_child(__file__, str(state), str(path))


def test_sigkill_during_jsonl_rounds_loses_nothing(tmp_path: Path) -> None:
    rng = random.Random(2424)
    state, path = tmp_path / "state.db", tmp_path / "events.jsonl"
    for _ in range(20):
        kill_while_running(lambda: spawn(state, path), rng, max_wait_s=0.25)
    run_to_done(lambda: spawn(state, path))
    store = Store.open(state, clock=FakeClock(), node_id="host-a", sink_names=["file"],
                       create=False)
    try:
        st = store.stats()["file"]
        assert (st.pending, st.acked) == (0, INSTANCES * PASSES)
    finally:
        store.close()

    expected = {make_event(f"i{i}", k).event_id: make_event(f"i{i}", k).payload
                for i in range(INSTANCES) for k in range(PASSES)}
    seen: dict[str, bytes] = {}
    firsts: dict[str, list[tuple[int, int]]] = {}
    for line in path.read_bytes().splitlines():
        try:
            ev = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue  # a line torn by a kill: readers skip it
        eid = ev["event_id"]
        if eid in seen:
            assert seen[eid] == line, "a redelivered event differs"
            continue
        seen[eid] = line
        firsts.setdefault(ev["instance_id"], []).append(
            (ev["period_ns"]["start"], ev["period_ns"]["end"]))
    assert seen == expected  # every committed event, byte for byte, nothing else
    for periods in firsts.values():  # in order, tiling time
        assert periods[0][0] == T0_NS
        assert all(a[1] == b[0] for a, b in itertools.pairwise(periods))
        assert len(periods) == PASSES


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "child":
    trio.run(child, sys.argv[2], sys.argv[3])
