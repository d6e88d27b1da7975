"""What one read between passes costs (a VM started, a device plugged: `read_host(only=...)`,
hostagent/tailing.py), at N generated domains: the targeted read (`LibvirtSource.stats_of`:
a UUID lookup and one `domainListGetStats`) against the bulk call it replaced (the same
`read_host` with `TARGETED_MAX = 0`), alternating in one process, after a warm-up pass.

CPU is this process's CPU time (all threads) and libvirtd's (utime+stime, CLK_TCK ticks, so
the libvirtd column needs enough reads to be more than a few ticks), per read. Printed, not
asserted. Needs libvirtd running (the test driver inside it, as bench/daemon_cost.py).

    python bench/lifecycle_read.py [--domains 1000] [--reads 40] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.daemon_cost import libvirtd_pid
from bench.pass_cost import bench_collector, generate
from hostagent.collector import Collector

CLK_TCK = os.sysconf("SC_CLK_TCK")


def ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--domains", type=int, default=1000)
    ap.add_argument("--reads", type=int, default=40, help="reads per path and round")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    daemon = libvirtd_pid()
    if daemon is None or not shutil.which("libvirtd"):
        sys.exit("needs libvirtd running (the test driver inside it)")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        node_xml, root = generate(args.domains, work / "gen")
        coll, store = bench_collector(f"test+unix://{node_xml}", str(root), work)

        async def reads(target: str, targeted_max: int) -> tuple[float, float]:
            coll.TARGETED_MAX = targeted_max
            c0, d0 = time.process_time(), ticks(daemon)
            for _ in range(args.reads):
                got = await coll.read_host(only={target})
                assert [r.uuid for r in got.domains] == [target], got.errors
            return ((time.process_time() - c0) / args.reads * 1e3,
                    (ticks(daemon) - d0) / CLK_TCK / args.reads * 1e3)

        async def run() -> None:
            first = await coll.run_pass()
            if first.error:
                raise RuntimeError(first.error)
            target = first.samples[len(first.samples) // 2].uuid
            print(f"{first.domains} domains: one domain read between passes, "
                  f"{args.reads} reads a cell (ms per read: ours / libvirtd's)")
            for r in range(args.rounds):
                bulk = await reads(target, 0)
                one = await reads(target, Collector.TARGETED_MAX)
                print(f"round {r + 1}: bulk call {bulk[0]:7.2f} / {bulk[1]:6.2f}   "
                      f"targeted {one[0]:6.2f} / {one[1]:5.2f}   "
                      f"ours {bulk[0] / one[0]:5.1f}x less, with libvirtd's "
                      f"{sum(bulk) / sum(one):5.1f}x less")

        try:
            trio.run(run)
        finally:
            coll.cgroups.close()
            store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
