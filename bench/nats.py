"""NATS JetStream sink benchmark: a backlog in the outbox drains to a local JetStream (a real
nats-server, file storage, in a temp dir) and, in the same run, to the Formation queue
stand-in, through the real delivery engine. Prints events/s and publish latency p50/p99 per
sink; target for JetStream: >= 10,000 events/s. Run from the repo root:

    .venv/bin/python bench/nats.py [--passes 20] [--instances 1000] [--in-flight 256]
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
# This file is named nats.py: drop its folder from the path so `import nats` is nats-py.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

from hostagent.clock import SystemClock  # noqa: E402
from hostagent.config.schema import OutboxConfig  # noqa: E402
from hostagent.config.sinks import NatsSinkConfig, QueueSinkConfig  # noqa: E402
from hostagent.delivery.engine import Delivery  # noqa: E402
from hostagent.delivery.sinks.base import Sink  # noqa: E402
from hostagent.delivery.sinks.formation_queue import FormationQueueSink  # noqa: E402
from hostagent.delivery.sinks.nats_jetstream import NatsSink  # noqa: E402
from hostagent.model import Baseline, OutEvent  # noqa: E402
from hostagent.store.outbox import Store  # noqa: E402
from tests.nats_support import NatsServer, read_stream  # noqa: E402
from tests.standins.queue import PERIOD_NS, T0_NS, usage_event  # noqa: E402

STANDIN = ("import sys, time; sys.path.insert(0, %r)\n"
           "from tests.standins.queue import QueueStandIn\n"
           "q = QueueStandIn(); q.start(); print(q.port, flush=True)\n"
           "while True: time.sleep(3600)\n")


class Timed:
    """The real sink, timing each successful send (send → PubAck / "OpSuccess")."""

    def __init__(self, inner: Sink) -> None:
        self.inner = inner
        self.latencies: list[float] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    async def send(self, event: OutEvent) -> None:
        t0 = time.perf_counter()
        await self.inner.send(event)
        self.latencies.append(time.perf_counter() - t0)


def ingest(path: Path, name: str, passes: int, instances: int) -> None:
    store = Store.open(path, clock=SystemClock(), node_id="bench", sink_names=[name])
    for k in range(passes):
        evs = [usage_event(f"vm-{i}", k) for i in range(instances)]
        bases = [Baseline(f"vm-{i}", "inc-1", T0_NS + (k + 1) * PERIOD_NS, k)
                 for i in range(instances)]
        store.commit_pass(bases, evs)
    store.close()


async def drain(path: Path, sink: Timed, total: int, batch: int) -> tuple[float, float]:
    """(events/s, process CPU µs per event: all threads of this process) of one drain."""
    clock = SystemClock()
    store = Store.open(path, clock=clock, node_id="bench", sink_names=[sink.name])
    d = Delivery(store, [sink], clock, OutboxConfig(batch_size=batch))  # type: ignore[list-item]
    async with trio.open_nursery() as nursery:
        t0, c0 = time.perf_counter(), time.process_time()
        await nursery.start(d.run)
        await d.drained()
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        nursery.cancel_scope.cancel()
    assert d.metrics().sinks[sink.name].published == total
    store.close()
    return total / dt, cpu / total * 1e6


async def direct(sink: Sink, total: int, concurrency: int) -> tuple[float, float]:
    """The sink alone, without the delivery engine: `concurrency` tasks sending in turn."""
    events = [usage_event(f"vm-{i % 1000}", 1000 + i // 1000) for i in range(total)]
    t0, c0 = time.perf_counter(), time.process_time()
    async with trio.open_nursery() as nursery:
        for c in range(concurrency):
            async def worker(mine: list[OutEvent]) -> None:
                for e in mine:
                    await sink.send(e)
            nursery.start_soon(worker, events[c::concurrency])
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    await sink.aclose()
    return total / dt, cpu / total * 1e6


def report(label: str, rate_cpu: tuple[float, float], lat: list[float], total: int,
           in_flight: int) -> None:
    rate, cpu_us = rate_cpu
    q = statistics.quantiles(lat, n=100)
    print(f"[{label}] drain {rate:,.0f} events/s ({total} events, {in_flight} in flight, "
          f"{cpu_us:.0f} µs CPU/event in hostagent) | "
          f"publish latency p50 {q[49] * 1e3:.2f} ms p99 {q[98] * 1e3:.2f} ms", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--passes", type=int, default=20)
    ap.add_argument("--instances", type=int, default=1000)
    ap.add_argument("--in-flight", type=int, default=256)
    ap.add_argument("--queue-in-flight", type=int, default=8)
    ap.add_argument("--batch", type=int, default=2000, help="outbox.batch_size")
    args = ap.parse_args()
    total = args.passes * args.instances
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        srv = NatsServer(root).start()
        try:
            ingest(root / "nats.db", "nats", args.passes, args.instances)
            sink = Timed(NatsSink(NatsSinkConfig(servers=(srv.url,), create_stream=True,
                                                 max_in_flight=args.in_flight),
                                  node_id="bench"))
            rate = trio.run(drain, root / "nats.db", sink, total, args.batch)
            trio.run(sink.inner.aclose)
            stored = len(read_stream(srv.url, "HOSTAGENT"))
            assert stored == total, (stored, total)
            report("nats jetstream", rate, sink.latencies, total, args.in_flight)
            alone = trio.run(direct, NatsSink(NatsSinkConfig(servers=(srv.url,)),
                                              node_id="bench"), total, args.in_flight)
            print(f"[nats jetstream, sink alone] {alone[0]:,.0f} events/s, {alone[1]:.0f} µs "
                  f"CPU/event", flush=True)
        finally:
            srv.kill()
        ingest(root / "queue.db", "q", args.passes, args.instances)
        proc = subprocess.Popen([sys.executable, "-c", STANDIN % str(ROOT)],
                                stdout=subprocess.PIPE, text=True)
        try:
            port = int(proc.stdout.readline())  # type: ignore[union-attr]
            qsink = Timed(FormationQueueSink(QueueSinkConfig(
                name="q", url=f"http://127.0.0.1:{port}", max_in_flight=args.queue_in_flight)))
            rate = trio.run(drain, root / "queue.db", qsink, total, args.batch)
            report("formation queue (stand-in, h11)", rate, qsink.latencies, total,
                   args.queue_in_flight)
        finally:
            proc.kill()


if __name__ == "__main__":
    main()
