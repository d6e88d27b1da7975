"""Where a pass takes a VM's CPU from, on real libvirt + QEMU guests (the lab).

libvirt 9 answers the CPU_TOTAL stats group with a QMP `query-stats` round trip to every QEMU
(besides two reads of the cgroup's cpu.stat). A domain's CPU is its VM cgroup's counter wherever
that is found (`usage_usec`; LAB-NOTES: on the lab the very counter `cpu.time` reports), so
once every baseline is in it the pass does not ask libvirt; checked here on libvirtd itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import libvirt
import pytest
import trio

from hostagent.clock import SystemClock
from hostagent.collector import Collector
from hostagent.config.load import from_mapping
from hostagent.model import CPU_FROM_CGROUP
from hostagent.owners.resolver import Owners
from hostagent.sources.files import HostRoot
from hostagent.sources.libvirt import LibvirtSource
from hostagent.sources.net import SysfsLinkReader
from hostagent.store.outbox import Store

pytestmark = pytest.mark.lab

URI = "qemu:///system"
STATS_FLAGS = (libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE
               | libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT)


class Recording:
    """A real libvirt connection that notes the stats groups each bulk call asks for."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self.masks: list[int] = []

    def getAllDomainStats(self, stats: int, flags: int) -> Any:
        self.masks.append(stats)
        return self._conn.getAllDomainStats(stats, flags)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def libvirt_cpu_ns(conn: Any) -> dict[str, int]:
    """libvirt's own `cpu.time` of every running domain, by UUID."""
    return {dom.UUIDString().lower(): int(stats["cpu.time"]) for dom, stats in
            conn.getAllDomainStats(libvirt.VIR_DOMAIN_STATS_CPU_TOTAL, STATS_FLAGS)}


async def test_passes_read_cpu_from_the_cgroup_not_libvirts_cpu_group(
        lab_guests: list[str], tmp_path: Path) -> None:
    cfg = from_mapping({
        "host": {"node_id": "lab-cpu-source"},
        "libvirt": {"uri": URI, "readonly": True, "call_timeout_s": 5.0},
        "paths": {"root": "/"},
        "collector": {"state_path": str(tmp_path / "state.db"), "count_preexisting": False},
        "sinks": [{"type": "jsonl", "path": str(tmp_path / "events.jsonl")}],
    })
    clock = SystemClock()
    store = Store.open(cfg.collector.state_path, clock=clock, node_id="lab-cpu-source",
                       sink_names=["jsonl"])
    conns: list[Recording] = []

    def connect(uri: str, readonly: bool) -> Recording:
        conns.append(Recording(libvirt.openReadOnly(uri)))
        return conns[-1]

    limiter = trio.CapacityLimiter(4)
    lv = LibvirtSource(cfg.libvirt, clock=clock, limiter=limiter, connector=connect)
    coll = Collector(cfg, clock=clock, store=store, owners=Owners(cfg.owners, clock, None),
                     libvirt_source=lv, link_reader=SysfsLinkReader(HostRoot("/")),
                     gpu_source=None, limiter=limiter)
    ref = libvirt.openReadOnly(URI)
    try:
        first = await coll.run_pass()
        assert first.committed, first.error
        assert {s.cpu_source for s in first.samples} == {CPU_FROM_CGROUP}
        assert not lv.ask_cpu  # every lab guest's cgroup was found, every baseline is in it
        await trio.sleep(1.0)
        before = libvirt_cpu_ns(ref)
        second = await coll.run_pass()
        after = libvirt_cpu_ns(ref)
        assert second.committed, second.error
        masks = [m for c in conns for m in c.masks]
        assert masks[0] & libvirt.VIR_DOMAIN_STATS_CPU_TOTAL
        assert not masks[-1] & libvirt.VIR_DOMAIN_STATS_CPU_TOTAL
        seen = {s.uuid: s for s in second.samples}
        for name in lab_guests:
            uuid = next(u for u, s in seen.items() if s.name == name)
            s = seen[uuid]
            # The cgroup's counter is libvirt's: read between two cpu.time reads of libvirt.
            assert s.cpu_ns is not None and "cpu" not in s.missing
            assert before[uuid] <= s.cpu_ns <= after[uuid], (name, before[uuid], s.cpu_ns)
        # The periods tile on from the first pass, whose CPU came from libvirt.
        firsts = {s.uuid: s for s in first.samples}
        for u in second.usages:
            assert u.period_start_ns == firsts[u.uuid].t_wall_ns
            assert u.cpu_ns == seen[u.uuid].cpu_ns - firsts[u.uuid].cpu_ns >= 0
    finally:
        ref.close()
        lv.close()
        coll.cgroups.close()
        store.close()

