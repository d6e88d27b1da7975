"""What a pass's thread hand-offs cost: the daemon's skeleton, four ways, side by side.

Each variant runs in its own process, all at once (the machine's drift hits them alike; their
wake-ups a quarter second apart), for `--passes` passes one second apart, and prints its
process CPU per pass (every thread):

- `trio idle`: trio waking once a second, nothing else (the floor of any trio daemon);
- `trio.to_thread`: + the bulk stats call in one worker call and a commit (SQLite WAL,
  synchronous=FULL, one row per domain), a JSONL write + fsync and an unsynced
  acknowledgement in a second one, both through `trio.to_thread.run_sync` (what the daemon
  did before hostagent/handoff.py);
- `handoff`: the same work through `hostagent.handoff.run_sync`, after a `trio.sleep` (what
  it did before hostagent/tick.py);
- `handoff, tick in the worker`: the same, the sleep done by the bulk call's worker before
  the call (`threading.Event.wait`; what the daemon does now: one wake-up of trio fewer);
- `no trio`: the same work in a plain loop on one thread (no event loop, no hand-off).

    python bench/handoff_cost.py [--uri qemu:///system] [--passes 30]

The lab's live guests (`deploy/lab/lab.py up 8`) give the daemon's small host; any libvirt
URI works (`test:///default`: the test driver inside this process). Printed, not asserted.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = ("trio idle", "trio.to_thread", "handoff", "handoff, tick in the worker", "no trio")
PAYLOAD = b"x" * 800


class Work:
    """The blocking half of a pass: the bulk call, then the commit and the JSONL write."""

    def __init__(self, uri: str, state: Path) -> None:
        import libvirt

        from hostagent.sources.libvirt import stats_mask
        self.conn = libvirt.openReadOnly(uri)
        self.mask = stats_mask()
        self.flags = libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE
        self.db = sqlite3.connect(state / "s.db", isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE ev(seq INTEGER PRIMARY KEY, payload BLOB, st TEXT)")
        self.fd = os.open(state / "e.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.seq = 0

    def bulk(self) -> int:
        return len([(d.UUIDString(), s) for d, s in
                    self.conn.getAllDomainStats(self.mask, self.flags)])

    def commit(self, n: int) -> None:
        first, db = self.seq, self.db
        db.execute("BEGIN IMMEDIATE")
        db.executemany("INSERT INTO ev VALUES(?, ?, 'pending')",
                       [(first + i, PAYLOAD) for i in range(n)])
        db.execute("COMMIT")
        self.seq += n
        os.write(self.fd, b"".join(PAYLOAD + b"\n" for _ in range(n)))
        os.fsync(self.fd)
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("BEGIN IMMEDIATE")
        db.execute("UPDATE ev SET st = 'acked' WHERE seq >= ?", (first,))
        db.execute("COMMIT")
        db.execute("PRAGMA synchronous=FULL")


def cpu_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_PROCESS_CPUTIME_ID)


def child(variant: str, uri: str, passes: int, warmup: int) -> None:
    import trio

    from hostagent import handoff
    work = Work(uri, Path(tempfile.mkdtemp(prefix="handoff-")))
    # Staggered by a quarter second each: the variants' wake-ups (and their bulk calls, which
    # libvirtd serves one after another) do not collide.
    time.sleep(VARIANTS.index(variant) / len(VARIANTS))
    marks: list[int] = []

    async def main() -> None:
        limiter = trio.CapacityLimiter(4)
        hand: Any = trio.to_thread.run_sync if variant == "trio.to_thread" else handoff.run_sync
        tick = threading.Event()  # never set: the wait always runs to its tick

        def wait_then_bulk() -> int:
            tick.wait(1)
            return work.bulk()

        for i in range(warmup + passes + 1):
            if i == warmup:
                marks.append(cpu_ns())
            if variant == "handoff, tick in the worker":
                n = await hand(wait_then_bulk, limiter=limiter)
                await hand(work.commit, n, limiter=limiter)
                continue
            await trio.sleep(1)
            if variant != "trio idle":
                n = await hand(work.bulk, limiter=limiter)
                await hand(work.commit, n, limiter=limiter)
        marks.append(cpu_ns())

    if variant == "no trio":
        for i in range(warmup + passes + 1):
            if i == warmup:
                marks.append(cpu_ns())
            time.sleep(1)
            work.commit(work.bulk())
        marks.append(cpu_ns())
    else:
        trio.run(main)
    print(f"{(marks[1] - marks[0]) / 1e6 / (passes + 1):.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--uri", default="qemu:///system")
    ap.add_argument("--passes", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.uri, args.passes, args.warmup)
        return
    procs = {v: subprocess.Popen([sys.executable, __file__, "--child", v, "--uri", args.uri,
                                  "--passes", str(args.passes), "--warmup", str(args.warmup)],
                                 stdout=subprocess.PIPE, text=True) for v in VARIANTS}
    got = {v: float(p.communicate()[0].strip()) for v, p in procs.items()}
    base = got["trio.to_thread"]
    print(f"{args.uri}, {args.passes} passes 1 s apart, all variants at once; "
          "process CPU per pass (every thread):")
    print("| variant | CPU per pass | vs trio.to_thread |")
    print("|---|---|---|")
    for v in VARIANTS:
        print(f"| {v} | {got[v]:.3f} ms | {got[v] / base:.2f} |")


if __name__ == "__main__":
    main()
