"""Generated domains answered as QEMU answers them: a bench-only shim over libvirt's bulk calls.

libvirt's test driver answers the bulk stats call with `state.*` alone, so on generated hosts
the daemon reads memory from the cgroup (`memory.current` and `memory.stat`, the dearest file)
and has no disks, vCPUs or NIC counters to bill. A QEMU host answers with ~50 keys a domain
(the lab's guests: `cpu.*`, `balloon.*`, `vcpu.*`, `net.0.*`, `block.0.*`), memory then comes
from the balloon, and the daemon converts, assembles and bills all of it. `install()` wraps
`virConnect.getAllDomainStats` and `domainListGetStats` so that each domain's answer carries
the lab guest's keys (`TEMPLATE`, recorded with `virsh domstats` on halab-1) for the stats
groups asked, with counters that grow every call, and the domain's own NIC and disk names
(bench/pass_cost.py's XML: tap `bt<N>`, disk `vda`).

The added keys are built in Python (a dict copy and ~15 stores a domain), where libvirt-python
builds them in C from the RPC's typed parameters: the cost lands in the same process, at about
the same size (measured: `python bench/qemu_shape.py --cost`). `bench/daemon_cost.py
--qemu-shaped` runs hostagent and the raw bulk call through it, so their ratio compares like
with like; the per-domain collector's calls are not shaped.

    python bench/qemu_shape.py --config CFG run     # hostagent run, shaped
    python bench/qemu_shape.py --cost               # the shim's own cost per domain
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import libvirt

REPO = Path(__file__).resolve().parents[1]

# halab-1's answer (libvirt 9.0, QEMU 7.2, TCG), by stats group: the keys a QEMU host sends.
TEMPLATE: dict[int, dict[str, Any]] = {
    libvirt.VIR_DOMAIN_STATS_CPU_TOTAL: {
        "cpu.time": 0, "cpu.user": 0, "cpu.system": 0, "cpu.cache.monitor.count": 0,
        "cpu.haltpoll.success.time": 0, "cpu.haltpoll.fail.time": 0},
    libvirt.VIR_DOMAIN_STATS_BALLOON: {
        "balloon.current": 1048576, "balloon.maximum": 1048576, "balloon.swap_in": 0,
        "balloon.swap_out": 0, "balloon.major_fault": 0, "balloon.minor_fault": 500441,
        "balloon.unused": 83016, "balloon.available": 1012448, "balloon.usable": 88028,
        "balloon.last-update": 1796587355, "balloon.disk_caches": 2480,
        "balloon.hugetlb_pgalloc": 0, "balloon.hugetlb_pgfail": 0, "balloon.rss": 274060},
    libvirt.VIR_DOMAIN_STATS_VCPU: {
        "vcpu.current": 2, "vcpu.maximum": 2, "vcpu.0.state": 1, "vcpu.0.time": 0,
        "vcpu.0.wait": 0, "vcpu.0.delay": 0, "vcpu.1.state": 1, "vcpu.1.time": 0,
        "vcpu.1.wait": 0, "vcpu.1.delay": 0},
    libvirt.VIR_DOMAIN_STATS_INTERFACE: {
        "net.count": 1, "net.0.name": "", "net.0.rx.bytes": 0, "net.0.rx.pkts": 0,
        "net.0.rx.errs": 0, "net.0.rx.drop": 0, "net.0.tx.bytes": 0, "net.0.tx.pkts": 0,
        "net.0.tx.errs": 0, "net.0.tx.drop": 0},
    libvirt.VIR_DOMAIN_STATS_BLOCK: {
        "block.count": 1, "block.0.name": "vda", "block.0.path": "",
        "block.0.backingIndex": 1, "block.0.rd.reqs": 0, "block.0.rd.bytes": 0,
        "block.0.rd.times": 144094, "block.0.wr.reqs": 0, "block.0.wr.bytes": 0,
        "block.0.wr.times": 1996671817, "block.0.fl.reqs": 0, "block.0.fl.times": 0,
        "block.0.allocation": 8716288, "block.0.capacity": 67108864,
        "block.0.physical": 8658944},
}

_calls: dict[int, int] = {}  # by domain id: answers given (the counters grow with them)
_taps: dict[int, str] = {}  # by domain id: its tap's name


def shape(domid: int, stats: dict[str, Any], mask: int, tap: str = "") -> dict[str, Any]:
    """`stats` (the test driver's) with the QEMU keys of the groups in `mask`; `tap`: the
    NIC's name (pass_cost.py's domain `bench-N` has tap `btN`)."""
    k = _calls[domid] = _calls.get(domid, 0) + 1
    out = dict(stats)
    for group, keys in TEMPLATE.items():
        if mask & group:
            out.update(keys)
    if mask & libvirt.VIR_DOMAIN_STATS_CPU_TOTAL:
        cpu = domid * 10**9 + k * 31_415_926
        out["cpu.time"], out["cpu.user"], out["cpu.system"] = cpu, cpu // 2, cpu // 4
    if mask & libvirt.VIR_DOMAIN_STATS_VCPU:
        out["vcpu.0.time"] = out["vcpu.1.time"] = domid * 10**9 + k * 15_707_963
    if mask & libvirt.VIR_DOMAIN_STATS_INTERFACE:
        out["net.0.name"] = tap
        out["net.0.rx.bytes"], out["net.0.rx.pkts"] = 67_662 + k * 1_500, 100 + k
        out["net.0.tx.bytes"], out["net.0.tx.pkts"] = 67_396 + k * 900, 100 + k
    if mask & libvirt.VIR_DOMAIN_STATS_BLOCK:
        out["block.0.path"] = f"/var/lib/bench/bench-{domid}.qcow2"
        out["block.0.rd.bytes"], out["block.0.rd.reqs"] = 12_288 + k * 4_096, 3 + k
        out["block.0.wr.bytes"], out["block.0.wr.reqs"] = 88_866_816 + k * 65_536, 3812 + k
    return out


def _tap(dom: libvirt.virDomain) -> str:
    domid = dom.ID()
    tap = _taps.get(domid)
    if tap is None:
        tap = _taps[domid] = "bt" + dom.name().rpartition("-")[2]
    return tap


def install() -> Callable[[], None]:
    """Shape every bulk answer of this process's libvirt connections; returns the undo."""
    def wrap(original: Callable[..., Any], mask_at: int) -> Callable[..., Any]:
        def shaped(self: libvirt.virConnect, *args: Any) -> Any:
            got = original(self, *args)
            mask = args[mask_at]
            return [(dom, shape(dom.ID(), stats, mask, _tap(dom))) for dom, stats in got]
        return shaped

    conn = libvirt.virConnect
    bulk, listed = conn.getAllDomainStats, conn.domainListGetStats
    conn.getAllDomainStats = wrap(bulk, 0)  # type: ignore[method-assign]
    conn.domainListGetStats = wrap(listed, 1)  # type: ignore[method-assign]

    def undo() -> None:
        conn.getAllDomainStats = bulk  # type: ignore[method-assign]
        conn.domainListGetStats = listed  # type: ignore[method-assign]
    return undo


def _cost() -> None:
    """The shim's own CPU per domain (what it adds to a process's bulk call)."""
    mask = (libvirt.VIR_DOMAIN_STATS_STATE | libvirt.VIR_DOMAIN_STATS_BALLOON
            | libvirt.VIR_DOMAIN_STATS_VCPU | libvirt.VIR_DOMAIN_STATS_INTERFACE
            | libvirt.VIR_DOMAIN_STATS_BLOCK)
    base = {"state.state": 1, "state.reason": 1}
    best = float("inf")
    for _ in range(20):
        t0 = time.process_time()
        for i in range(1, 1001):
            shape(i, base, mask)
        best = min(best, time.process_time() - t0)
    print(f"shape(): {best * 1e3:.3f} us a domain (best of 20 x 1,000)")


def main(argv: list[str]) -> int:
    if argv == ["--cost"]:
        _cost()
        return 0
    sys.path.insert(0, str(REPO))
    install()
    from hostagent.cli.main import main as hostagent_main
    return hostagent_main(argv) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
