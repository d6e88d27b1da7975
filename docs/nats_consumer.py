"""Example consumer of the hostagent JetStream stream: usage per owner and per hour.

Reads `resource_usage` events with a durable pull consumer, deduplicates on `event_id`
(JetStream already drops re-sends inside the duplicate window; a consumer must still not count
an event twice if it is re-read: after a restart before its acks, or from a replayed backlog),
splits each event's counters over the clock hours its period covers (pro rata) and sums them
per (user_id, hour). Acks every message after it was counted. Run it next to a fleet:

    python docs/nats_consumer.py --server nats://n1:4222 --server nats://n2:4222 --once

`--once` drains what the stream holds and prints the table; without it the consumer keeps
reading and prints the table every `--every` seconds. A real billing consumer keeps the seen
`event_id`s and the sums in its own database, in the same transaction, before acking.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

HOUR_S = 3600
# Counters summed as they are; gauges turned into GB-hours over the period.
COUNTERS = ("cpu_seconds", "gpu_seconds", "network_egress_mb", "network_ingress_mb",
            "disk_read_mb", "disk_write_mb")
GAUGES = ("memory_gb", "storage_gb")


def hour_shares(start_s: float, end_s: float) -> list[tuple[int, float]]:
    """(hour start, fraction of the period in that hour) for a period [start_s, end_s)."""
    if end_s <= start_s:
        return [(int(start_s // HOUR_S * HOUR_S), 1.0)]
    out, t = [], start_s
    while t < end_s:
        hour = int(t // HOUR_S * HOUR_S)
        nxt = min(end_s, hour + HOUR_S)
        out.append((hour, (nxt - t) / (end_s - start_s)))
        t = nxt
    return out


@dataclass
class Totals:
    """Sums per (user_id, hour start), each event counted once."""

    seen: set[str] = field(default_factory=set)
    sums: dict[tuple[str, int], dict[str, float]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(float)))
    duplicates: int = 0

    def add(self, event: dict[str, Any]) -> bool:
        """Count one event; False (and nothing counted) if its event_id was seen before."""
        eid = event["event_id"]
        if eid in self.seen:
            self.duplicates += 1
            return False
        self.seen.add(eid)
        start, end = event["period"]["start"], event["period"]["end"]
        hours = max(end - start, 0) / HOUR_S
        metrics = event.get("metrics", {})
        owner = event.get("user_id") or "unknown"
        for hour, share in hour_shares(start, end):
            row = self.sums[(owner, hour)]
            for name in COUNTERS:
                row[name] += share * float(metrics.get(name) or 0)
            for name in GAUGES:
                row[f"{name}_h"] += share * hours * float(metrics.get(name) or 0)
            row["events"] += share
        return True

    def table(self) -> str:
        """The sums as a text table, by owner then hour."""
        names = [*COUNTERS, *(f"{g}_h" for g in GAUGES)]
        lines = ["user_id\thour_start\t" + "\t".join(names)]
        for (owner, hour), row in sorted(self.sums.items()):
            lines.append(f"{owner}\t{hour}\t" + "\t".join(f"{row[n]:.3f}" for n in names))
        return "\n".join(lines)


async def consume(servers: list[str], stream: str, subject: str, durable: str, once: bool,
                  every_s: float, totals: Totals) -> Totals:
    """Read the stream with a durable pull consumer into `totals`."""
    import nats

    nc = await nats.connect(servers)
    try:
        js = nc.jetstream()
        sub = await js.pull_subscribe(subject, durable=durable, stream=stream)
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            try:
                msgs = await sub.fetch(500, timeout=1.0)
            except TimeoutError:  # nats.errors.TimeoutError, or the bare one nats-py
                # raises when a fetch's deadline ran out before its second request
                # --once: drained when the server has nothing left for us (a slow server's
                # first fetch may time out with the whole stream still waiting).
                if once and not (await sub.consumer_info()).num_pending:
                    return totals
                msgs = []
            for m in msgs:
                totals.add(json.loads(m.data))
                await m.ack()
            if not once and loop.time() - last >= every_s:
                print(totals.table(), flush=True)
                last = loop.time()
    finally:
        await nc.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--server", action="append", default=[],
                    help="NATS URL (repeat for each cluster member)")
    ap.add_argument("--stream", default="HOSTAGENT")
    ap.add_argument("--subject", default="hostagent.usage.>")
    ap.add_argument("--durable", default="billing-example")
    ap.add_argument("--once", action="store_true", help="drain, print, exit")
    ap.add_argument("--every", type=float, default=60.0, help="print interval (s)")
    args = ap.parse_args()
    totals = asyncio.run(consume(args.server or ["nats://127.0.0.1:4222"], args.stream,
                                 args.subject, args.durable, args.once, args.every, Totals()))
    print(totals.table())
    print(f"# {len(totals.seen)} events, {totals.duplicates} duplicates skipped")


if __name__ == "__main__":
    main()
