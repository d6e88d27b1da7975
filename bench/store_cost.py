"""What the outbox costs per pass: the pass commit, the JSONL round's claim and its
acknowledgements, on a store already holding ROWS acknowledged events.

Each case runs in a subprocess of its own (a fresh store in a temporary directory, SQLite's
page cache cold as in the daemon), `--against DIR` runs the same cases on another checkout in
the same run (alternately), so the ratio is measured side by side:

    python bench/store_cost.py                              # this checkout
    python bench/store_cost.py --against /path/to/old/checkout

Cases are EVENTS:ROWS (events a pass, acknowledged rows in the store first). The JSONL sink's
rows are claimed by the pass commit (`Store.claim_at_commit`, as in the daemon while the sink
is healthy); acknowledgements are committed unsynced, as the last batch of a round is.
Payloads are 900 bytes, one instance per event, thread CPU time (`time.thread_time`), medians.
`--at-commit`: the daemon's path for a caught-up sink (local_round.LocalRound.at_commit): the
acknowledgements of the rows the commit returned, no claim (its column is then 0).
`--rounds N`: each case N times per checkout, the two alternating; the median of the rounds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PAYLOAD = b'{"x":"' + b"y" * 900 + b'"}'


def worker(events: int, rows: int, passes: int, at_commit: bool) -> dict[str, float]:
    """Run in the checkout on sys.path; medians in ms."""
    from hostagent.clock import SystemClock
    from hostagent.model import Baseline, OutEvent
    from hostagent.store.outbox import Outcome, Store

    def outcome(p: Any) -> Any:  # Outcome.of since schema version 2, by event id before
        return Outcome.of(p, "acked") if hasattr(Outcome, "of") else Outcome(
            p.event.event_id, "acked")

    work = Path(tempfile.mkdtemp(prefix="store-cost-"))
    store = Store.open(work / "state.db", clock=SystemClock(), node_id="bench",
                       sink_names=["jsonl"])
    if hasattr(store, "claim_at_commit"):
        store.claim_at_commit("jsonl", True)
    n = 0
    t_ns = 10**18
    times: dict[str, list[float]] = {"commit": [], "claim": [], "acks": []}

    def one_pass(keep: bool) -> None:
        nonlocal n, t_ns
        t_ns += 10**9
        evs = []
        for i in range(events):
            n += 1
            evs.append(OutEvent(hashlib.sha256(str(n).encode()).hexdigest()[:32],
                                "resource_usage", f"inst-{i}", t_ns, t_ns + 10**9, PAYLOAD))
        bases = [Baseline(f"inst-{i}", "inc", t_ns, n, 0, 0, {}, {}) for i in range(events)]
        t0 = time.thread_time()
        claimed = store.commit_pass(bases, evs)
        t1 = time.thread_time()
        batch = claimed["jsonl"] if at_commit else store.record_and_take(
            "jsonl", [], 10**6, t_ns, dead_letter_after=3).batch
        t2 = time.thread_time()
        store.record_and_take("jsonl", [outcome(p) for p in batch], 0, t_ns,
                              dead_letter_after=3, durable=False)
        t3 = time.thread_time()
        if keep:
            times["commit"].append(t1 - t0)
            times["claim"].append(t2 - t1)
            times["acks"].append(t3 - t2)

    for _ in range(rows // events):
        one_pass(False)
    for _ in range(passes):
        one_pass(True)
    store.close()
    out = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    out["total"] = sum(out.values())
    return out


def measure(checkout: Path, events: int, rows: int, passes: int,
            at_commit: bool) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(checkout))
    out = subprocess.run([sys.executable, str(Path(__file__)), "--worker", str(events),
                          str(rows), str(passes)] + (["--at-commit"] if at_commit else []),
                         env=env, cwd=checkout, check=True, capture_output=True,
                         text=True).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", nargs=3, type=int, metavar=("EVENTS", "ROWS", "PASSES"))
    ap.add_argument("--cases", default="8:8000,1000:60000,1000:300000",
                    help="EVENTS:ROWS, comma-separated")
    ap.add_argument("--passes", type=int, default=20, help="measured passes per case")
    ap.add_argument("--against", type=Path, help="another checkout, measured alternately")
    ap.add_argument("--at-commit", action="store_true",
                    help="acknowledge the rows the commit claimed, as a caught-up sink does")
    ap.add_argument("--rounds", type=int, default=1, help="runs per case and checkout")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.at_commit)))
        return 0
    sides = [("this checkout", REPO)] + ([("against", args.against)] if args.against else [])
    print("store work per pass (ms of thread CPU, medians): commit / claim / acks = total"
          + (" (acknowledged at the commit)" if args.at_commit else "")
          + (f", median of {args.rounds} alternating rounds" if args.rounds > 1 else ""))
    print("| events a pass | rows stored | " + " | ".join(s for s, _ in sides)
          + (" | this / against |" if args.against else " |"))
    print("|---|---|" + "---|" * len(sides) + ("---|" if args.against else ""))
    for case in args.cases.split(","):
        events, rows = (int(x) for x in case.split(":"))
        runs: dict[str, list[dict[str, float]]] = {name: [] for name, _ in sides}
        for _ in range(args.rounds):
            for name, path in sides:
                runs[name].append(measure(path, events, rows, args.passes, args.at_commit))
        got = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
               for name, rs in runs.items()}
        cells = [f"{r['commit']:.2f} / {r['claim']:.2f} / {r['acks']:.2f} = "
                 f"**{r['total']:.2f}**" for r in got.values()]
        ratio = ([f"{got['this checkout']['total'] / got['against']['total']:.2f}x"]
                 if args.against else [])
        print(f"| {events:,} | {rows:,} | " + " | ".join(cells + ratio) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
