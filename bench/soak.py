"""Soak: `hostagent run` for a long time, its RSS and CPU per pass sampled on a fixed cadence.

The daemon runs as in production (its own process, `hostagent run`, JSONL sink, delivery
included) at `--interval` seconds per pass over the lab's running guests (`--live`, default) or
a generated host (`--domains N`: libvirt's test driver inside libvirtd and a generated cgroup
tree, bench/pass_cost.py's generator). Every `--every` seconds one line: elapsed time, passes
so far (counted from the events written), RSS, and the CPU per pass since the previous line.
At the end: the curve as a markdown table and the growth after warm-up (the first
`--warmup-min` minutes are excluded), which is what "flat" means here.

CPU as bench/daemon_cost.py reads it (the process's CPU-time clock, ns, exited threads included).

    python bench/soak.py [--live | --domains 1000] [--minutes 60] [--every 60] [--interval 1]

Printed, not asserted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import libvirt

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

from daemon_cost import CpuMark, events_counter, hostagent_config, rss_mb, stop  # noqa: E402
from pass_cost import generate  # noqa: E402


def soak(cmd: list[str], passes_so_far: Callable[[], int], args: argparse.Namespace,
         env: dict[str, str]) -> None:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    rows: list[tuple[float, int, float, float]] = []
    try:
        start = time.monotonic()
        prev, prev_passes = CpuMark(proc.pid), passes_so_far()
        print("| t (s) | passes | RSS (MB) | CPU per pass (ms) |")
        print("|---|---|---|---|")
        end = start + args.minutes * 60
        while time.monotonic() < end:
            time.sleep(args.every)
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise RuntimeError(f"hostagent exited: {err[-2000:]}")
            mark, passes = CpuMark(proc.pid), passes_so_far()
            used_s = prev.until(mark)
            n = max(passes - prev_passes, 1)
            t = time.monotonic() - start
            rows.append((t, passes, rss_mb(proc.pid), used_s * 1e3 / n))
            print(f"| {t:.0f} | {passes} | {rows[-1][2]:.2f} | {rows[-1][3]:.2f} |", flush=True)
            prev, prev_passes = mark, passes
    finally:
        stop(proc)
    after = [r for r in rows if r[0] >= args.warmup_min * 60]
    if len(after) >= 2:
        rss = [r[2] for r in after]
        cpu = sorted(r[3] for r in after)
        print(f"\nafter {args.warmup_min} min of warm-up: RSS {after[0][2]:.2f} -> "
              f"{after[-1][2]:.2f} MB (min {min(rss):.2f}, max {max(rss):.2f}; growth "
              f"{after[-1][2] - after[0][2]:+.2f} MB over {(after[-1][0] - after[0][0]) / 60:.0f}"
              f" min); CPU per pass median {cpu[len(cpu) // 2]:.2f} ms "
              f"(range {cpu[0]:.2f}-{cpu[-1]:.2f})")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--live", action="store_true", help="the lab's running guests (default)")
    ap.add_argument("--domains", type=int, default=0, help="a generated host of N domains")
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--every", type=float, default=60.0, help="seconds between samples")
    ap.add_argument("--interval", type=float, default=1.0, help="the daemon's interval_s")
    ap.add_argument("--warmup-min", type=float, default=5.0)
    args = ap.parse_args()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "hostagent.cli", "--config", "", "run"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.domains:
            node_xml, root = generate(args.domains, work / "gen")
            uri = f"test+unix://{node_xml}" if shutil.which("libvirtd") else f"test://{node_xml}"
            n = args.domains
            where = f"{n} generated domains ({uri.split(':', maxsplit=1)[0]})"
        else:
            conn = libvirt.openReadOnly("qemu:///system")
            n = len(conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE))
            conn.close()
            uri, root, where = "qemu:///system", Path("/"), f"{n} live lab guests"
        cmd[4] = str(hostagent_config(work, uri, str(root), args.interval))
        print(f"soak: hostagent run, {where}, interval {args.interval} s, JSONL sink, "
              f"{args.minutes:.0f} min, a sample every {args.every:.0f} s; "
              f"started {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}")
        soak(cmd, events_counter(work / "events.jsonl", n), args, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
