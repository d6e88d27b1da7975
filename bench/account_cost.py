"""CPU and memory of the pure accounting step alone: `ledger.account` + `tails.after_pass`.

No libvirt, no store: N domains' readings are built in memory in two shapes and fed through
passes like the collector does (the baselines and tails of one pass feed the next).
- `testdriver`: what the collector reads from libvirt's test driver with pass_cost.py's
  generated cgroup tree (near-empty bulk stats, cgroup CPU/memory/PSI, the tap not found, the
  disk without block stats): what the 1,000-domain profiles measured.
- `live`: what a real guest gives (bulk stats with cpu.time, balloon, net.0, block.0, the tap
  found by netlink, cgroup PSI).

CPU: process time per domain of tails.ended() + account() + after_pass() (median over passes
after a warm-up), and of `pass_reads.domain_reading` (the reading the collector builds on the
trio thread from the bulk stats, the worker call's files and the tap counters).
Memory: tracemalloc bytes per domain the daemon keeps between passes from the accounting step
(baselines, tails, the report's usages and samples), readings excluded, and the peak while it
runs (with the events, until the commit would free them).
Printed, not asserted.

    python bench/account_cost.py [--domains 1000] [--passes 20] [--shape testdriver|live|both]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hostagent import pass_reads
from hostagent.accounting import ledger, tails
from hostagent.accounting.readings import DomainReading, HostFacts, HostReading
from hostagent.model import Baseline, Disk, DomainInfo, Nic, NicCounters, Owner, OwnerHint, Pressure
from hostagent.source_model import CgroupReading, DomainStats, LinkStats
from hostagent.sources.domain_files import FilesResult
from hostagent.sources.net import _Links

NS = 10**9
T0 = 1_796_433_433_533_207_925
SETTINGS = ledger.Settings(node_id="bench", time_format="unix",
                           store_created_ns=1_700_000_000 * NS)
UNASSIGNED = Owner("unassigned", None, "default")


class Unassigned:
    """The owner lookup of a host without an owner service: everyone is unassigned."""

    def resolve(self, instance_id: str, hint: OwnerHint | None, *,
                build_id: str | None = None) -> Owner:
        return UNASSIGNED


def infos(n: int) -> list[DomainInfo]:
    """The generated domains' parsed XML (as bench/pass_cost.py generates them)."""
    out = []
    for i in range(1, n + 1):
        mac = f"52:54:00:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}"
        out.append(DomainInfo(
            uuid=f"00000000-0000-4000-8000-{i:012x}", name=f"bench-{i}", domid=i, vcpus=2,
            memory_bytes=1 << 30, max_memory_bytes=1 << 30,
            nics=(Nic(mac=mac, kind="ethernet", target=f"bt{i}", model="virtio"),),
            disks=(Disk("vda", "disk", f"/var/lib/bench/bench-{i}.qcow2"),
                   Disk("sda", "cdrom"))))
    return out


def reading(info: DomainInfo, k: int, t_ns: int, shape: str) -> DomainReading:
    """Domain `info`'s reading in pass `k` at `t_ns`, its counters grown since pass k-1."""
    i = info.domid
    facts = HostFacts(pid=100000 + i, start_ticks=1000 + i,
                      started_wall_ns=1_700_000_000 * NS + (1000 + i) * NS // 100, cgroup=None)
    psi = Pressure(0.0, 0.0, 0.0) if shape == "testdriver" else Pressure(0.12, 0.0, 1.5)
    cpu = i * 1_000_000 + k * 3_141_592
    cg = CgroupReading(cpu_ns=cpu, memory_current_bytes=200 << 20,
                       memory_working_set_bytes=(200 << 20) - 1000, memory_limit_bytes=None,
                       io_read_bytes=None, io_write_bytes=None, io_source=None, pressure=psi)
    nic = info.nics[0]
    if shape == "testdriver":
        return DomainReading(
            info=info, instance_id=info.uuid, t_wall_ns=t_ns,
            stats={"state.state": 1, "state.reason": 0}, facts=facts, cgroup=cg,
            netlink_nics={}, netlink_missing={
                f"net:{nic.mac}": f"tap {nic.target} not found on the host (unplugged or "
                                  "renamed?)"})
    stats: dict[str, Any] = {
        "state.state": 1, "state.reason": 1, "cpu.time": cpu, "cpu.user": cpu // 2,
        "cpu.system": cpu // 4, "balloon.current": 1 << 20, "balloon.maximum": 1 << 20,
        "balloon.unused": 83032, "balloon.available": 912448, "balloon.usable": 88044 + k,
        "balloon.disk_caches": 2480, "balloon.rss": 264792, "vcpu.current": 2,
        "vcpu.maximum": 2, "net.count": 1, "net.0.name": nic.target,
        "net.0.rx.bytes": 67662 + k * 1500, "net.0.tx.bytes": 67396 + k * 900,
        "block.count": 1, "block.0.name": "vda", "block.0.rd.bytes": 12288 + k * 4096,
        "block.0.wr.bytes": 88866816 + k * 65536, "block.0.allocation": 8716288,
        "block.0.capacity": 67108864, "block.0.physical": 8658944}
    counters = NicCounters(mac=nic.mac, ifname=nic.target, ifindex=1000 + i,
                           guest_rx_bytes=7000 + k * 900, guest_tx_bytes=9000 + k * 1500,
                           source="netlink-stats64")
    return DomainReading(info=info, instance_id=info.uuid, t_wall_ns=t_ns, stats=stats,
                         facts=facts, cgroup=cg, netlink_nics={nic.mac: counters})


def host(doms: list[DomainInfo], k: int, shape: str) -> HostReading:
    t_ns = T0 + k * NS + 1234
    rs = tuple(reading(d, k, t_ns, shape) for d in doms)
    return HostReading(t_wall_ns=t_ns, domains=rs, listed={d.uuid: d.name for d in doms})


def files(h: HostReading, k: int, shape: str) -> FilesResult:
    """The worker call's result for `h`: cgroups, and a link dump over the last names (the
    taps found for `live`, not for `testdriver`: pass_cost.py's taps do not exist)."""
    names = {"lo": LinkStats(1, "lo", None, 0, 0)}
    counters = {1: (0, 0)}
    if shape == "live":
        for r in h.domains:
            nic = r.info.nics[0]
            names[nic.target or ""] = LinkStats(1000 + r.info.domid, nic.target or "",
                                                "fe" + nic.mac[2:], 0, 0, "tun")
            counters[1000 + r.info.domid] = (9000 + k * 1500, 7000 + k * 900)
    cgroups: dict[tuple[str, int], CgroupReading | str] = {
        (r.info.uuid, r.info.domid): r.cgroup for r in h.domains if r.cgroup is not None}
    return FilesResult(links=_Links(names, counters), cgroups=cgroups)


def reading_cost_us(doms: list[DomainInfo], passes: int, shape: str) -> float:
    """Median CPU per domain of `pass_reads.domain_reading` over `passes` passes."""
    cpus = []
    for k in range(passes + 1):
        h = host(doms, k, shape)
        got = files(h, k, shape)
        facts = {(r.info.uuid, r.info.domid): r.facts for r in h.domains}
        stats = [DomainStats(r.info.uuid, r.info.name, r.info.domid, r.stats) for r in h.domains]
        gc.collect()
        c0 = time.process_time()
        for d, info in zip(stats, doms, strict=True):
            pass_reads.domain_reading(d, info, info.uuid, h.t_wall_ns, got, (), facts,
                                      timed_out=False)
        cpus.append(time.process_time() - c0)
    return statistics.median(cpus[1:]) * 1e6 / len(doms)


def run(n: int, passes: int, shape: str, gc_off: bool = False) -> None:
    doms = infos(n)
    owners = Unassigned()
    baselines: dict[str, Baseline] = {}
    tl: dict[tails.Key, tails.Tail] = {}
    cpus: list[float] = []
    events = 0
    kept: tuple[Any, ...] = ()
    for k in range(passes + 1):
        h = host(doms, k, shape)
        gc.collect()
        if gc_off:
            gc.disable()
        c0 = time.process_time()
        closing = tails.ended(tl, h)
        acc, samples = ledger.account(baselines, h.domains, owners=owners, settings=SETTINGS,
                                      now_ns=h.t_wall_ns, closing=closing)
        for b in acc.baselines:
            baselines[b.instance_id] = b
        tl = tails.after_pass(tl, h, [c.key for c in closing])
        cpus.append(time.process_time() - c0)
        gc.enable()
        events += len(acc.events)
        kept = (tuple(acc.usages), tuple(samples))
    cpu_us = statistics.median(cpus[1:]) * 1e6 / n
    # Memory: what the accounting step leaves alive between passes, readings excluded.
    h = host(doms, passes + 1, shape)
    del kept, acc, samples
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    closing = tails.ended(tl, h)
    acc, samples = ledger.account(baselines, h.domains, owners=owners, settings=SETTINGS,
                                  now_ns=h.t_wall_ns, closing=closing)
    new_baselines = {b.instance_id: b for b in acc.baselines}
    new_tails = tails.after_pass({}, h, [])
    kept = (tuple(acc.usages), tuple(samples))
    del acc, samples, closing
    gc.collect()
    now, peak = tracemalloc.get_traced_memory()
    retained, peak = now - before, peak - before
    tracemalloc.stop()
    del new_baselines, new_tails, kept
    reading_us = reading_cost_us(doms, passes, shape)
    label = f"{shape}{' gc off' if gc_off else ''}"
    print(f"{label:<17} {n:>6} domains | account+after_pass {cpu_us:7.2f} us/domain "
          f"(median of {passes}) | domain_reading {reading_us:5.2f} us/domain | "
          f"retained {retained / n:7.0f} B/domain "
          f"(baselines, tails, usages, samples), peak {peak / n:6.0f} B/domain | "
          f"{events} events")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--domains", type=int, default=1000)
    ap.add_argument("--passes", type=int, default=20)
    ap.add_argument("--shape", choices=["testdriver", "live", "both"], default="both")
    ap.add_argument("--gc-off", action="store_true", help="also measure with gc disabled")
    args = ap.parse_args()
    for shape in (["testdriver", "live"] if args.shape == "both" else [args.shape]):
        run(args.domains, args.passes, shape)
        if args.gc_off:
            run(args.domains, args.passes, shape, gc_off=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
