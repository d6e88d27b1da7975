"""Two hostagent checkouts on the same host at the same time: whole-daemon CPU per pass and RSS.

`bench/daemon_cost.py` runs its collectors one after another; a small difference between two
versions of hostagent drowns there in the machine's drift (another run of the same code moves
by 10 %). Here both daemons run at once, each with its own store and JSONL file, over the same
guests, so drift hits both alike; rounds alternate which one starts first. CPU is the
process's CPU-time clock (ns, every thread, the exited ones included: bench/daemon_cost.py).

    python bench/side_by_side.py --against /path/to/other/checkout --live --window 90
    python bench/side_by_side.py --against DIR --domains 1000 --rounds 2
    python bench/side_by_side.py --against DIR --domains 1000 --cgroupfs --interval 10

`--cgroupfs`: the generated host's cgroups made for real (root, a hybrid host like the lab):
its files are then kept open and re-read, as on a host, instead of read like `cat`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from daemon_cost import CpuMark, hostagent_config, rss_mb, stop  # noqa: E402
from pass_cost import RealCgroups, generate  # noqa: E402


def run_pair(checkouts: list[Path], uri: str, root: str, work: Path, args: argparse.Namespace
             ) -> list[tuple[float, float, float]]:
    """Both daemons at once: (ms per pass, passes, RSS MB) of each, in `checkouts` order."""
    procs = []
    for i, checkout in enumerate(checkouts):
        state = work / f"state{i}"
        shutil.rmtree(state, ignore_errors=True)
        state.mkdir(parents=True)
        cfg = hostagent_config(state, uri, root, args.interval)
        env = dict(os.environ, PYTHONPATH=str(checkout))
        procs.append(subprocess.Popen([sys.executable, "-m", "hostagent.cli", "--config",
                                       str(cfg), "run"], cwd=checkout, env=env,
                                      stderr=subprocess.DEVNULL))
    try:
        time.sleep(args.warmup)
        first = [CpuMark(p.pid) for p in procs]
        time.sleep(args.window)
        last = [CpuMark(p.pid) for p in procs]
        rss = [rss_mb(p.pid) for p in procs]
    finally:
        for p in procs:
            stop(p)
    passes = args.window / args.interval
    return [(a.until(b) * 1e3 / passes, passes, r) for a, b, r in zip(first, last, rss,
                                                                         strict=True)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--against", required=True, type=Path, help="the other checkout")
    ap.add_argument("--live", action="store_true", help="the lab's running guests")
    ap.add_argument("--domains", type=int, default=0, help="a generated host of N domains")
    ap.add_argument("--cgroupfs", action="store_true", help="real cgroups for a generated host")
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--warmup", type=float, default=12.0)
    ap.add_argument("--window", type=float, default=60.0)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    if args.live == bool(args.domains):
        ap.error("give --live or --domains N")
    this, other = REPO, args.against.resolve()
    real = RealCgroups() if args.cgroupfs and args.domains else None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return compare(this, other, Path(tmp), real, args)
        finally:
            if real is not None:
                real.remove()


def compare(this: Path, other: Path, work: Path, real: RealCgroups | None,
            args: argparse.Namespace) -> int:
    """Print one row per round: both checkouts at once, rounds alternating who starts."""
    if args.live:
        uri, root, label = "qemu:///system", "/", "live lab guests"
    else:
        node_xml, root_path = generate(args.domains, work / "gen", real)
        uri, root = f"test+unix://{node_xml}", str(root_path)
        label = f"{args.domains} generated domains" + (" (real cgroups)" if real else "")
    print(f"{label}, interval {args.interval} s, {args.window} s windows, both at once")
    print("| round | this checkout | other checkout | this / other |")
    print("|---|---|---|---|")
    for n in range(args.rounds):
        order = [this, other] if n % 2 == 0 else [other, this]
        got = dict(zip(order, run_pair(order, uri, root, work / f"r{n}", args),
                       strict=True))
        (a, _, ra), (b, _, rb) = got[this], got[other]
        print(f"| {n + 1} | {a:.2f} ms, {ra:.0f} MB | {b:.2f} ms, {rb:.0f} MB | "
              f"{a / b:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
