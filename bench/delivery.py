"""Delivery benchmark (move to bench/delivery.py): outbox ingest, drain rate to the stand-in
queue on loopback, publish latency p50/p99. Run from the repo root:

    .venv/bin/python bench/delivery.py [--passes 10] [--instances 1000] [--in-flight 8]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hostagent.clock import SystemClock  # noqa: E402
from hostagent.config.schema import OutboxConfig  # noqa: E402
from hostagent.config.sinks import QueueSinkConfig  # noqa: E402
from hostagent.delivery.engine import Delivery  # noqa: E402
from hostagent.delivery.sinks.formation_queue import FormationQueueSink  # noqa: E402
from hostagent.model import Baseline, OutEvent  # noqa: E402
from hostagent.store.outbox import Store  # noqa: E402
from tests.standins.queue import PERIOD_NS, T0_NS, usage_event  # noqa: E402

STANDIN = ("import sys, time; sys.path.insert(0, %r)\n"
           "from tests.standins.queue import QueueStandIn\n"
           "q = QueueStandIn(); q.start(); print(q.port, flush=True)\n"
           "while True: time.sleep(3600)\n")


class Timed:
    """The real sink, timing each successful send."""

    def __init__(self, inner: FormationQueueSink) -> None:
        self.inner = inner
        self.latencies: list[float] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    async def send(self, event: OutEvent) -> None:
        t0 = time.perf_counter()
        await self.inner.send(event)
        self.latencies.append(time.perf_counter() - t0)


def ingest(path: Path, passes: int, instances: int) -> float:
    store = Store.open(path, clock=SystemClock(), node_id="bench", sink_names=["q"])
    work = []
    for k in range(passes):
        evs = [usage_event(f"vm-{i}", k) for i in range(instances)]
        bases = [Baseline(f"vm-{i}", "inc-1", T0_NS + (k + 1) * PERIOD_NS, k)
                 for i in range(instances)]
        work.append((bases, evs))
    t0 = time.perf_counter()
    for bases, evs in work:
        store.commit_pass(bases, evs)
    dt = time.perf_counter() - t0
    store.close()
    return passes * instances / dt


async def drain(path: Path, url: str, client: str, in_flight: int,
                total: int) -> tuple[float, list[float]]:
    clock = SystemClock()
    store = Store.open(path, clock=clock, node_id="bench", sink_names=["q"])
    sink = Timed(FormationQueueSink(QueueSinkConfig(name="q", url=url, http_client=client,
                                                    max_in_flight=in_flight)))
    d = Delivery(store, [sink], clock, OutboxConfig())  # type: ignore[list-item]
    async with trio.open_nursery() as nursery:
        t0 = time.perf_counter()
        await nursery.start(d.run)
        await d.drained()
        dt = time.perf_counter() - t0
        nursery.cancel_scope.cancel()
    assert d.metrics().sinks["q"].published == total
    store.close()
    return total / dt, sink.latencies


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--passes", type=int, default=10)
    ap.add_argument("--instances", type=int, default=1000)
    ap.add_argument("--in-flight", type=int, default=8)
    args = ap.parse_args()
    total = args.passes * args.instances
    for client in ("h11", "httpx"):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "state.db"
            rate = ingest(path, args.passes, args.instances)
            proc = subprocess.Popen([sys.executable, "-c", STANDIN % str(ROOT)],
                                    stdout=subprocess.PIPE, text=True)
            try:
                port = int(proc.stdout.readline())  # type: ignore[union-attr]
                drain_rate, lat = trio.run(drain, path, f"http://127.0.0.1:{port}", client,
                                           args.in_flight, total)
            finally:
                proc.kill()
            q = statistics.quantiles(lat, n=100)
            print(f"[{client}] ingest {rate:,.0f} events/s (passes of {args.instances} with "
                  f"baselines) | drain {drain_rate:,.0f} events/s ({args.in_flight} in flight, "
                  f"{total} events) | publish latency p50 {q[49] * 1e3:.2f} ms "
                  f"p99 {q[98] * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
