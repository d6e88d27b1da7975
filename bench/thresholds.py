"""Threshold evaluation per pass: the indexed `thresholds.evaluate` vs a naive loop over rules.

1,000 instances × 10,000 rules, side by side in one process. Rule mixes (fleet-wide rule sets:
most instance rules name instances on other hosts):

* typical: 7,000 instance rules over 5,000 instance ids, 2,950 user rules over 500 users,
  50 wildcard rules;
* heavy:   5,000 instance rules over 1,000 local instances, 4,500 user rules over 100 users,
  500 wildcard rules.

3 % of instances run hot (85-105 % of the rule levels) so alerts open and the state machine
runs, the rest at 0-70 %. The naive loop does what seed 000's ThresholdManager does (every
rule, a match test, the comparison) and then the same state machine step. Printed, not
asserted; "checks" is how many rules apply per pass (what the naive loop compares after
matching all 10,000 × 1,000).

    python bench/thresholds.py [--passes 5]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hostagent.alerts.index import RuleIndex, Settings, build_index, measure
from hostagent.alerts.rules import Rule, parse_rules
from hostagent.alerts.state import AlertState, evaluate, fingerprint, step
from hostagent.model import Usage

S = 1_000_000_000
T0 = 1_700_000_000 * S
RESOURCES = [("Cpu", "Percentage", None), ("Memory", "Percentage", None),
             ("Storage", "Percentage", None), ("Storage", "Absolute", "GB"),
             ("NetworkEgress", "Absolute", "MB"), ("Cpu", "Absolute", "cores")]


def make_usages(n: int, rng: random.Random, t: int) -> list[Usage]:
    out = []
    for i in range(n):
        # 3 % of instances run hot (near or over their thresholds), the rest 0-70 %.
        f = rng.uniform(0.85, 1.05) if i % 33 == 0 else rng.uniform(0.0, 0.7)
        out.append(Usage(
            instance_id=f"vm-{i}", uuid=f"u{i}", name=f"n{i}", incarnation="1",
            new_incarnation=False, period_start_ns=T0 + (t - 30) * S, period_end_ns=T0 + t * S,
            vcpus=4, memory_alloc_bytes=8 << 30, cpu_ns=int(f * 120 * S),
            cpu_seconds=0, cpu_percent_avg=f * 100, memory_bytes=4 << 30,
            memory_source="balloon", memory_percent=f * 100,
            storage_bytes=int(f * 100 * 2**30), storage_capacity_bytes=100 << 30,
            net_egress_bytes=int(f * 500 * 2**20), net_ingress_bytes=0,
            disk_read_bytes=0, disk_write_bytes=0, gpu_count=0, gpu_seconds=0,
            gpu_util_avg=None))
    return out


def make_rules(mix: str, rng: random.Random) -> list[Rule]:
    n_inst, inst_ids, n_user, users, n_wild = (
        (7000, 5000, 2950, 500, 50) if mix == "typical" else (5000, 1000, 4500, 100, 500))
    raw: list[dict[str, Any]] = []
    for k in range(n_inst + n_user + n_wild):
        res, kind, unit = rng.choice(RESOURCES)
        value = rng.uniform(90, 100) if unit is None else {"GB": 95.0, "MB": 480.0,
                                                             "cores": 3.9}[unit]
        tt: dict[str, Any] = ({"Percentage": {"value": value}} if kind == "Percentage"
                              else {"Absolute": {"value": value, "unit": unit}})
        r: dict[str, Any] = {"id": f"r{k}", "resource_type": res, "threshold_type": tt,
                             "action": "Alert", "notification_channels": []}
        if k < n_inst:
            r |= {"user_id": "*", "instance_id": f"vm-{rng.randrange(inst_ids)}"}
        elif k < n_inst + n_user:
            r |= {"user_id": f"user-{rng.randrange(users)}"}
        else:
            r |= {"user_id": "*"}
        raw.append(r)
    return list(parse_rules(raw))


def naive(index: RuleIndex, usages: list[Usage], owners: dict[str, str | None],
          states: dict[str, AlertState], now_ns: int) -> int:
    """Seed 000's shape: every rule for every instance, then the same state machine step."""
    steps = 0
    cooldown_ns = int(index.settings.cooldown_s * S)
    for u in usages:
        user = owners.get(u.instance_id)
        for r in index.rules:
            if r.instance_id is not None and r.instance_id != u.instance_id:
                continue
            if r.user_id not in ("*", user):
                continue
            v = measure(r, u)
            lv = index.levels[r.id]
            prev = states.get(fingerprint(r.id, u.instance_id))
            if prev is None and (v is None or v < min(lv.approach, lv.threshold)):
                continue
            step(r, lv, prev, u.instance_id, v, now_ns, cooldown_ns, None)
            steps += 1
    return steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--instances", type=int, default=1000)
    args = ap.parse_args()
    print(f"{'mix':8} {'checks/pass':>11} {'indexed ms/pass':>16} {'naive ms/pass':>14} "
          f"{'speed-up':>8} {'open alerts':>11} {'transitions':>11}")
    for mix in ("typical", "heavy"):
        rng = random.Random(7)
        rules = make_rules(mix, rng)
        owners: dict[str, str | None] = {
            f"vm-{i}": f"user-{rng.randrange(500 if mix == 'typical' else 100)}"
            for i in range(args.instances)}
        index = build_index(rules, Settings())
        states: dict[str, AlertState] = {}
        times, checks, trans = [], 0, 0
        for p in range(args.passes):
            usages = make_usages(args.instances, rng, p * 30)
            t0 = time.perf_counter()
            ev = evaluate(index, usages, owners, states, T0 + p * 30 * S)
            times.append(time.perf_counter() - t0)
            states, checks, trans = dict(ev.states), ev.checked, trans + len(ev.transitions)
        usages = make_usages(args.instances, rng, args.passes * 30)
        t0 = time.perf_counter()
        naive(index, usages, owners, states, T0 + args.passes * 30 * S)
        naive_s = time.perf_counter() - t0
        med = statistics.median(times)
        print(f"{mix:8} {checks:>11,} {med * 1e3:>16.2f} {naive_s * 1e3:>14.1f} "
              f"{naive_s / med:>7.0f}x {len(states):>11,} {trans:>11,}")


if __name__ == "__main__":
    main()
