"""Delivery benchmark: outbox ingest, then the drain rate and CPU per event to the JSONL sink
(a file, fsynced per batch) and to the stand-in queue on loopback (h11 and httpx clients),
with the mean send latency (the delivery's latency histogram). Run from the repo root:

    .venv/bin/python bench/delivery.py [--passes 10] [--instances 1000] [--in-flight 8]
                                       [--sinks jsonl,h11,httpx] [--rounds 1] [--steady 8]

`--steady N` first measures a daemon's steady state: 300 rounds of N events (a pass of N
domains) to the JSONL sink, CPU and wall time per round (0: skip). `--rounds N` repeats each
drain N times on a fresh store and prints the median (the machine is shared: medians are
steadier). CPU is this process's user+system time during the drain; the stand-in queue runs
in its own process and is not counted.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal

import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hostagent.clock import SystemClock  # noqa: E402
from hostagent.config.schema import OutboxConfig  # noqa: E402
from hostagent.config.sinks import JsonlSinkConfig, QueueSinkConfig  # noqa: E402
from hostagent.delivery.engine import Delivery  # noqa: E402
from hostagent.delivery.sinks.base import Sink  # noqa: E402
from hostagent.delivery.sinks.formation_queue import FormationQueueSink  # noqa: E402
from hostagent.delivery.sinks.jsonl import JsonlSink  # noqa: E402
from hostagent.model import Baseline  # noqa: E402
from hostagent.store.outbox import Store  # noqa: E402
from tests.standins.queue import PERIOD_NS, T0_NS, usage_event  # noqa: E402

STANDIN = ("import sys, time; sys.path.insert(0, %r)\n"
           "from tests.standins.queue import QueueStandIn\n"
           "q = QueueStandIn(); q.start(); print(q.port, flush=True)\n"
           "while True: time.sleep(3600)\n")


def ingest(path: Path, passes: int, instances: int) -> float:
    store = Store.open(path, clock=SystemClock(), node_id="bench", sink_names=["s"])
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


async def drain(path: Path, sink: Sink, total: int) -> tuple[float, float, float]:
    """(events/s, CPU µs per event, mean publish latency ms) of one drain of `total` events."""
    clock = SystemClock()
    store = Store.open(path, clock=clock, node_id="bench", sink_names=["s"])
    d = Delivery(store, [sink], clock, OutboxConfig())
    async with trio.open_nursery() as nursery:
        c0, t0 = time.process_time(), time.perf_counter()
        await nursery.start(d.run)
        await d.drained()
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        nursery.cancel_scope.cancel()
    m = d.metrics().sinks["s"]
    assert m.published == total
    store.close()
    return total / dt, cpu / total * 1e6, m.latency_sum_s / max(m.latency_count, 1) * 1e3


async def steady(path: Path, sink: Sink, rounds: int, per_round: int) -> tuple[float, float]:
    """A daemon's steady state: a pass commits `per_round` events, delivery drains them.
    Returns (CPU ms, wall ms) per round, from the wake-up to idle (the commit not counted)."""
    clock = SystemClock()
    store = Store.open(path, clock=clock, node_id="bench", sink_names=["s"])
    d = Delivery(store, [sink], clock, OutboxConfig(maintenance_interval_s=3600))
    cpu = wall = 0.0
    async with trio.open_nursery() as nursery:
        await nursery.start(d.run)
        await d.drained()
        for k in range(rounds):
            evs = [usage_event(f"vm-{i}", k) for i in range(per_round)]
            await trio.to_thread.run_sync(store.commit_pass, [], evs)
            c0, t0 = time.process_time(), time.perf_counter()
            d.wake()
            await d.drained()
            cpu, wall = cpu + time.process_time() - c0, wall + time.perf_counter() - t0
        nursery.cancel_scope.cancel()
    assert d.metrics().sinks["s"].published == rounds * per_round
    store.close()
    return cpu / rounds * 1e3, wall / rounds * 1e3


def one(kind: str, args: argparse.Namespace, tmp: Path,
        url: str) -> tuple[float, float, float, float]:
    path = tmp / "state.db"
    for p in tmp.iterdir():
        p.unlink()
    rate = ingest(path, args.passes, args.instances)
    sink: Sink
    if kind == "jsonl":
        sink = JsonlSink(JsonlSinkConfig(name="s", path=str(tmp / "events.jsonl")))
    else:
        client: Literal["h11", "httpx"] = "h11" if kind == "h11" else "httpx"
        sink = FormationQueueSink(QueueSinkConfig(name="s", url=url, http_client=client,
                                                  max_in_flight=args.in_flight))
    return (rate, *trio.run(drain, path, sink, args.passes * args.instances))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--passes", type=int, default=10)
    ap.add_argument("--instances", type=int, default=1000)
    ap.add_argument("--in-flight", type=int, default=8)
    ap.add_argument("--sinks", default="jsonl,h11,httpx")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--steady", type=int, default=8, metavar="N",
                    help="also: 300 rounds of N events each (a pass of N domains), to JSONL")
    args = ap.parse_args()
    if args.steady:
        with tempfile.TemporaryDirectory() as tmp:
            sink = JsonlSink(JsonlSinkConfig(name="s", path=str(Path(tmp) / "events.jsonl")))
            cpu_ms, wall_ms = trio.run(steady, Path(tmp) / "state.db", sink, 300, args.steady)
        print(f"[jsonl steady] {args.steady} events per round: CPU {cpu_ms:.2f} ms/round, "
              f"wall {wall_ms:.2f} ms/round (wake-up to idle; the pass's commit not counted)")
    total = args.passes * args.instances
    proc = subprocess.Popen([sys.executable, "-c", STANDIN % str(ROOT)],
                            stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())  # type: ignore[union-attr]
        for kind in filter(None, args.sinks.split(",")):
            runs = []
            for _ in range(args.rounds):
                with tempfile.TemporaryDirectory() as tmp:
                    runs.append(one(kind, args, Path(tmp), f"http://127.0.0.1:{port}"))
            ingest_rate, rate, cpu_us, lat_ms = (statistics.median(x)
                                                 for x in zip(*runs, strict=True))
            where = "file, fsync per batch" if kind == "jsonl" else f"{args.in_flight} in flight"
            print(f"[{kind}] ingest {ingest_rate:,.0f} events/s | drain {rate:,.0f} events/s "
                  f"({where}, {total} events) | CPU {cpu_us:.0f} µs/event | mean send "
                  f"{lat_ms:.2f} ms")
    finally:
        proc.kill()


if __name__ == "__main__":
    main()
