"""The README's consumer example (docs/nats_consumer.py): hour splitting, dedup on event_id,
and a run against a real stream the sink filled."""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import math
import sys
from pathlib import Path
from types import ModuleType

import orjson
import trio
from hypothesis import given
from hypothesis import strategies as st

from hostagent.config.sinks import NatsSinkConfig
from hostagent.delivery.sinks.nats_jetstream import NatsSink
from tests.nats_support import nats_server
from tests.standins.queue import usage_event

EXAMPLE = Path(__file__).resolve().parents[3] / "docs" / "nats_consumer.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("nats_consumer_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look the module up
    spec.loader.exec_module(mod)
    return mod


consumer = load_example()


@given(st.integers(0, 10**10), st.integers(1, 5 * 86400))
def test_hour_shares_cover_the_period_once(start: int, length: int) -> None:
    shares = consumer.hour_shares(start, start + length)
    assert math.isclose(sum(f for _, f in shares), 1.0)
    hours = [h for h, _ in shares]
    assert hours[0] == start // 3600 * 3600
    assert all(b - a == 3600 for a, b in itertools.pairwise(hours))
    assert all(f > 0 for _, f in shares)


def test_totals_count_an_event_once_and_split_across_hours() -> None:
    t = consumer.Totals()
    ev = orjson.loads(usage_event("i0", 0).payload)
    ev["period"] = {"start": 7200 - 15, "end": 7200 + 15}
    assert t.add(ev) is True
    assert t.add(ev) is False
    assert t.duplicates == 1
    cpu = ev["metrics"]["cpu_seconds"]
    assert math.isclose(t.sums[("user-1", 3600)]["cpu_seconds"], cpu / 2)
    assert math.isclose(t.sums[("user-1", 7200)]["cpu_seconds"], cpu / 2)


async def test_consumer_sums_a_real_stream(tmp_path: Path) -> None:
    events = [usage_event(f"i{i}", k, user=f"user-{i % 2}") for i in range(4) for k in range(3)]
    with nats_server(tmp_path) as srv:
        sink = NatsSink(NatsSinkConfig(servers=(srv.url,), create_stream=True), node_id="h1")
        for ev in events:
            await sink.send(ev)
        await sink.aclose()

        async def resend_outside_the_window() -> None:  # what JetStream cannot catch
            import nats

            nc = await nats.connect(srv.url)
            await nc.jetstream().publish("hostagent.usage.h1", events[0].payload,
                                         headers={"Nats-Msg-Id": "another-id"})
            await nc.close()

        await trio.to_thread.run_sync(asyncio.run, resend_outside_the_window())
        totals = await trio.to_thread.run_sync(lambda: asyncio.run(consumer.consume(
            [srv.url], "HOSTAGENT", "hostagent.usage.>", "test", True, 60.0,
            consumer.Totals())))
    assert totals.seen == {e.event_id for e in events}
    assert totals.duplicates == 1
    for user in ("user-0", "user-1"):
        want = sum(orjson.loads(e.payload)["metrics"]["cpu_seconds"] for e in events
                   if orjson.loads(e.payload)["user_id"] == user)
        got = sum(row["cpu_seconds"] for (u, _), row in totals.sums.items() if u == user)
        assert math.isclose(got, want)
    assert "user-0" in totals.table()
