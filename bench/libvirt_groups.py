"""What each stats group of the bulk call costs libvirtd (and QEMU), measured in ONE run.

For the bulk call hostagent makes (`getAllDomainStats`, ACTIVE | NOWAIT), and for the same call
with one group left out at a time, `--calls` calls back to back: the client's CPU, libvirtd's
CPU and the QEMU processes' main threads' CPU (where QMP is answered) per call, rounds
interleaved so drift hits every variant alike. The difference to "all" is what that group
costs libvirtd (docs/benchmarks.md, "Sixteenth session": CPU_TOTAL and BALLOON each cost a QMP
round trip to every QEMU per call).

    python bench/libvirt_groups.py [--uri qemu:///system] [--calls 300] [--rounds 3]

Printed, not asserted (the machines are noisy). Root (libvirtd's and QEMU's /proc entries).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import libvirt

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from daemon_cost import libvirtd_pid, process_cpu_ns  # noqa: E402

GROUPS = {
    "state": libvirt.VIR_DOMAIN_STATS_STATE,
    "cpu-total": libvirt.VIR_DOMAIN_STATS_CPU_TOTAL,
    "balloon": libvirt.VIR_DOMAIN_STATS_BALLOON,
    "vcpu": libvirt.VIR_DOMAIN_STATS_VCPU,
    "interface": libvirt.VIR_DOMAIN_STATS_INTERFACE,
    "block": libvirt.VIR_DOMAIN_STATS_BLOCK,
}
ALL = sum(GROUPS.values())
FLAGS = (libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE
         | libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT)


def qemu_main_threads_ns() -> int:
    """CPU (ns) of every QEMU process's main thread, where its monitor (QMP) is served."""
    total = 0
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().startswith("qemu-system"):
                pid = comm.parent.name
                total += int(Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()[0])
        except OSError:
            continue
    return total


def measure(conn: libvirt.virConnect, mask: int, calls: int, lv: int
            ) -> tuple[float, float, float]:
    """(client, libvirtd, QEMU main threads) CPU in ms per call of `mask`."""
    c0, l0, q0 = time.process_time_ns(), process_cpu_ns(lv), qemu_main_threads_ns()
    for _ in range(calls):
        conn.getAllDomainStats(mask, FLAGS)
    c1, l1, q1 = time.process_time_ns(), process_cpu_ns(lv), qemu_main_threads_ns()
    return (c1 - c0) / calls / 1e6, (l1 - l0) / calls / 1e6, (q1 - q0) / calls / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--uri", default="qemu:///system")
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    conn = libvirt.openReadOnly(args.uri)
    lv = libvirtd_pid()
    domains = len(conn.getAllDomainStats(libvirt.VIR_DOMAIN_STATS_STATE, FLAGS))
    variants = {"all six (hostagent's call)": ALL}
    variants.update({f"without {name}": ALL & ~bit for name, bit in GROUPS.items()})
    results: dict[str, list[tuple[float, float, float]]] = {k: [] for k in variants}
    measure(conn, ALL, 20, lv)  # warm
    for _ in range(args.rounds):
        for name, mask in variants.items():
            results[name].append(measure(conn, mask, args.calls, lv))
    print(f"{domains} running domains on {args.uri}, {args.calls} calls x {args.rounds} rounds; "
          "CPU ms per call (median of rounds)")
    print(f"{'stats groups':32s} {'client':>8s} {'libvirtd':>9s} {'QEMU main':>10s} "
          f"{'libvirtd saved':>15s}")
    base = statistics.median(r[1] for r in results["all six (hostagent's call)"])
    for name, rows in results.items():
        client, daemon, qemu = (statistics.median(r[i] for r in rows) for i in range(3))
        saved = "" if name.startswith("all") else f"{base - daemon:+.3f}"
        print(f"{name:32s} {client:8.3f} {daemon:9.3f} {qemu:10.3f} {saved:>15s}")
    conn.close()


if __name__ == "__main__":
    main()
