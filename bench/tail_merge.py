"""The daemon's own cost per light sample on top of `bench/light_sample.py`'s reading: picking
each domain's target and merging the reading into its in-memory tail (accounting/tails.py),
per domain, at 1,000 domains (pure Python, no I/O; best of 20 rounds)."""

from __future__ import annotations

import argparse
import time

from hostagent.accounting import tails
from hostagent.accounting.closeout import LightReading
from hostagent.accounting.readings import DomainReading
from hostagent.model import DomainInfo, NicCounters


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--domains", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=20)
    args = p.parse_args()
    n = args.domains
    state: dict[tails.Key, tails.Tail] = {}
    for i in range(n):
        info = DomainInfo(uuid=f"u{i}", name=f"vm{i}", domid=i + 1, vcpus=1, memory_bytes=1,
                          max_memory_bytes=1)
        state[(f"u{i}", i + 1)] = tails.Tail.of(DomainReading(info=info, instance_id=f"u{i}",
                                                           t_wall_ns=1, stats={}))
    best_s = float("inf")
    for r in range(args.rounds):
        got = {f"u{i}": LightReading(f"u{i}", i + 1, 100 + r, 5 + r,
                                     nics=(NicCounters("m", "tap", 3, r, r, "netlink"),))
               for i in range(n)}
        t0 = time.process_time()
        newest: dict[str, tails.Tail] = {}
        for t in state.values():  # light_samples.LightSamples._targets_now
            best = newest.get(t.anchor.uuid)
            if best is None or t.anchor.t_wall_ns > best.anchor.t_wall_ns:
                newest[t.anchor.uuid] = t
        for key, tail in list(state.items()):  # tailing.TailTasks.sample
            light = got.get(key[0])
            if light is not None and light.domid == key[1]:
                state[key] = tails.with_light(tail, light)
        best_s = min(best_s, time.process_time() - t0)
    print(f"{n} domains: target choice + tail merge {best_s / n * 1e3:.4f} ms per domain "
          f"per sample ({best_s * 1e3:.2f} ms per sample)")


if __name__ == "__main__":
    main()
