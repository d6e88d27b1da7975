"""Chaos against a real nats-server: a producer+delivery process (this file run as a program:
the real Store, Delivery and NatsSink) is SIGKILLed at random moments 20+ times while it commits
passes and publishes them, and nats-server itself is SIGKILLed and restarted (same port, same
store) under it, so PubAcks are lost after the server stored the message. Afterwards the stream
holds every committed event exactly once (0 missing, 0 duplicates), byte for byte, and per
instance the periods tile time with no gap."""

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
from hostagent.config.sinks import BreakerConfig, NatsSinkConfig, RetryConfig
from hostagent.delivery.engine import Delivery
from hostagent.delivery.sinks.nats_jetstream import NatsSink
from hostagent.store.outbox import Store
from tests.clocks import TrioClock
from tests.delivery.miniature import (
    deliver_until_done,
    kill_while_running,
    run_to_done,
    spawn_child,
)
from tests.nats_support import nats_server, read_stream
from tests.standins.queue import T0_NS
from tests.standins.queue import usage_event as make_event

INSTANCES = 6
PASSES = 25
KILLS = 22


async def child(state: str, url: str) -> None:
    """The daemon in miniature: commit passes from the persisted baselines, publish them."""
    clock = TrioClock(wall0_ns=time.time_ns())
    store = Store.open(state, clock=clock, node_id="host-a", sink_names=["nats"])
    sink = NatsSink(NatsSinkConfig(
        servers=(url,), create_stream=True, timeout_s=1.0, connect_timeout_s=0.5,
        max_in_flight=8, retry=RetryConfig(max_retries=1, initial_backoff_s=0.05,
                                           max_backoff_s=0.2, round_backoff_max_s=0.3),
        breaker=BreakerConfig(reset_timeout_s=0.3)), node_id="host-a")
    d = Delivery(store, [sink], clock, OutboxConfig(maintenance_interval_s=0.5))
    await deliver_until_done(store, d, "nats", instances=INSTANCES, passes=PASSES)


def spawn(state: Path, url: str) -> subprocess.Popen[str]:
    return spawn_child(__file__, str(state), url, stderr=subprocess.DEVNULL)


def test_sigkill_daemon_and_server_repeatedly_stores_each_event_once(tmp_path: Path) -> None:
    rng = random.Random(1818)
    state = tmp_path / "state.db"
    t0 = time.monotonic()
    kills = server_kills = 0
    with nats_server(tmp_path) as srv:
        def server_dies() -> None:  # under the publishes in flight, half the time
            nonlocal server_kills
            if rng.random() < 0.5:
                srv.kill()
                server_kills += 1
                time.sleep(rng.choice([0.0, 0.1, 0.5]))
                srv.start()
                time.sleep(rng.uniform(0.0, 0.2))

        while kills < KILLS:
            kill_while_running(lambda: spawn(state, srv.url), rng, max_wait_s=0.3,
                               between=server_dies)
            kills += 1
        run_to_done(lambda: spawn(state, srv.url), timeout_s=40)
        stored = read_stream(srv.url, "HOSTAGENT")
    elapsed = time.monotonic() - t0
    assert elapsed < 60

    expected = {make_event(f"i{i}", k).event_id: make_event(f"i{i}", k).payload
                for i in range(INSTANCES) for k in range(PASSES)}
    ids = [m.headers["Nats-Msg-Id"] for m in stored]
    assert len(ids) == len(set(ids)), "an event is stored twice"
    assert {m.headers["Nats-Msg-Id"]: m.data for m in stored} == expected  # 0 missing, exact
    periods: dict[str, list[tuple[int, int]]] = {}
    for m in stored:
        ev = orjson.loads(m.data)
        periods.setdefault(ev["instance_id"], []).append(
            (ev["period_ns"]["start"], ev["period_ns"]["end"]))
    for ps in periods.values():  # in order per instance, tiling time
        assert ps[0][0] == T0_NS
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ps))
        assert len(ps) == PASSES
    assert server_kills >= 5
    print(f"{kills} daemon kills, {server_kills} nats-server kills, {len(stored)} messages for "
          f"{len(expected)} events in {elapsed:.1f}s")


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "child":
    trio.run(child, sys.argv[2], sys.argv[3])
