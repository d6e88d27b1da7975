"""The pure accounting step, driven directly: generated histories of domains across passes.

Each history mixes good readings, readings with the CPU or tap counters missing, passes where a
domain's read failed (withheld: no reading), reboots (a new QEMU process: new incarnation, counters
from zero), re-created taps (new ifindex, counter from zero) and domains that disappear with a
last reading (closed out). Whatever the mix:
- per instance, the periods of its usages tile time, from its start to its last reading;
- per incarnation, Σ cpu_ns is the last CPU counter read and Σ cpu_seconds its floor in s;
- per tap lifetime, Σ bytes are the last counters read, in both directions;
- a withheld domain keeps its baseline, a closed-out one's moves to its last reading.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from itertools import pairwise

from hypothesis import given, settings
from hypothesis import strategies as st

from hostagent.accounting import ledger
from hostagent.accounting.closeout import Closing, LightReading
from hostagent.accounting.readings import DomainReading, HostFacts
from hostagent.model import Baseline, DomainInfo, Nic, NicCounters, Owner, OwnerHint

NS = 10**9
STORE_NS = 1_000 * NS
SETTINGS = ledger.Settings(node_id="host-1", time_format="unix", store_created_ns=STORE_NS)
STEPS = ("read", "read", "read", "no_cpu", "no_net", "withheld", "reboot", "new_tap", "gone")


class Everyone:
    """Owner lookup: every instance belongs to one user."""

    def resolve(self, instance_id: str, hint: OwnerHint | None, *,
                build_id: str | None = None) -> Owner:
        return Owner(user_id="alice", org_id=None, source="test")


@dataclass
class Vm:
    """One simulated domain: its live counters and what a biller should have seen."""

    n: int
    domid: int
    ticks: int
    started_ns: int
    cpu_ns: int = 0
    ifindex: int = 100
    rx: int = 0
    tx: int = 0
    alive: bool = True
    first_start_ns: int | None = None  # start of the first incarnation ever read
    # Last counters read per incarnation / per tap lifetime: what Σ usage must equal.
    cpu_read: dict[tuple[int, int], int] = field(default_factory=dict)
    net_read: dict[tuple[int, int, int], tuple[int, int]] = field(default_factory=dict)

    @property
    def uuid(self) -> str:
        return f"00000000-0000-0000-0000-{self.n:012d}"

    @property
    def mac(self) -> str:
        return f"52:54:00:00:00:{self.n:02x}"

    def reading(self, t_ns: int, *, cpu: bool = True, net: bool = True) -> DomainReading:
        nic = Nic(mac=self.mac, kind="bridge", target=f"vnet{self.n}")
        info = DomainInfo(uuid=self.uuid, name=f"vm{self.n}", domid=self.domid, vcpus=1,
                          memory_bytes=1 << 30, max_memory_bytes=1 << 30, nics=(nic,))
        incarnation = (self.domid, self.ticks)
        if self.first_start_ns is None:
            self.first_start_ns = self.started_ns
        if cpu:
            self.cpu_read[incarnation] = self.cpu_ns
        if net:
            # (egress, ingress): the guest sends what the tap receives
            self.net_read[(*incarnation, self.ifindex)] = (self.rx, self.tx)
        counters = NicCounters(mac=self.mac, ifname=f"vnet{self.n}", ifindex=self.ifindex,
                               guest_rx_bytes=self.tx, guest_tx_bytes=self.rx, source="netlink")
        return DomainReading(
            info=info, instance_id=self.uuid, t_wall_ns=t_ns,
            stats={"cpu.time": self.cpu_ns} if cpu else {},
            facts=HostFacts(pid=1000 + self.n, start_ticks=self.ticks,
                            started_wall_ns=self.started_ns, cgroup=None),
            netlink_nics={self.mac: counters} if net else None,
            netlink_missing={} if net else {f"net:{self.mac}": "link dump failed"})


@st.composite
def histories(draw: st.DrawFn) -> list[list[tuple[str, int, int, int]]]:
    """Per pass, per domain: (step, seconds since the last pass, cpu growth, byte growth)."""
    domains = draw(st.integers(1, 3))
    passes = draw(st.integers(1, 10))
    return [[(draw(st.sampled_from(STEPS)), draw(st.integers(1, 60)),
              draw(st.integers(0, 7 * NS)), draw(st.integers(0, 10**7)))
             for _ in range(domains)] for _ in range(passes)]


def run(history: list[list[tuple[str, int, int, int]]]) -> tuple[list[Vm], list, dict]:
    vms = [Vm(n=i, domid=10 + i, ticks=500 + i, started_ns=STORE_NS + NS) for i in
           range(len(history[0]))]
    baselines: dict[str, Baseline] = {}
    usages = []
    t_ns = STORE_NS + 10 * NS
    for step in history:
        readings, closing = [], []
        t_ns += max(dt for _, dt, _, _ in step) * NS
        for vm, (what, _, cpu_growth, bytes_growth) in zip(vms, step, strict=True):
            if not vm.alive:
                continue
            vm.cpu_ns += cpu_growth
            vm.rx += bytes_growth
            vm.tx += bytes_growth // 3
            if what == "reboot":  # a new QEMU process: new id, counters from zero
                vm.domid += 10
                vm.ticks += 7
                vm.started_ns = t_ns - NS // 2
                vm.cpu_ns, vm.rx, vm.tx = cpu_growth // 2, bytes_growth // 2, 0
            elif what == "new_tap":  # tap re-created: new ifindex, counters from zero
                vm.ifindex += 1
                vm.rx, vm.tx = bytes_growth // 5, 0
            if what == "withheld":
                continue
            if what == "gone":
                closing.append(vm.reading(t_ns))
                vm.alive = False
                continue
            readings.append(vm.reading(t_ns, cpu=what != "no_cpu", net=what != "no_net"))
        acc, _ = ledger.account(baselines, readings, owners=Everyone(), settings=SETTINGS,
                                now_ns=t_ns, closing=closing)
        assert len(acc.events) == len(acc.usages)
        for b in acc.baselines:
            baselines[b.instance_id] = b
        for iid in acc.removed:
            baselines.pop(iid, None)
        for r in closing:  # closed out: the baseline is the last reading
            assert baselines[r.instance_id].t_wall_ns == r.t_wall_ns
        usages.extend(acc.usages)
    return vms, usages, baselines


@settings(max_examples=300, deadline=None)
@given(histories())
def test_usage_tiles_time_and_sums_to_counter_growth(
        history: list[list[tuple[str, int, int, int]]]) -> None:
    vms, usages, _ = run(history)
    by_instance = defaultdict(list)
    for u in usages:
        by_instance[u.instance_id].append(u)
    for vm in vms:
        mine = sorted(by_instance[vm.uuid], key=lambda u: u.period_start_ns)
        for a, b in pairwise(mine):
            assert b.period_start_ns == a.period_end_ns  # tiling
        if mine:
            assert mine[0].period_start_ns == vm.first_start_ns  # billed from its own start
        cpu: dict[str, int] = defaultdict(int)
        seconds: dict[str, int] = defaultdict(int)
        for u in mine:
            cpu[u.incarnation] += u.cpu_ns
            seconds[u.incarnation] += u.cpu_seconds
        expected = {f"{domid}:{ticks}": v for (domid, ticks), v in vm.cpu_read.items()}
        assert set(expected) <= set(cpu)
        assert cpu == {k: expected.get(k, 0) for k in cpu}
        assert seconds == {k: v // NS for k, v in cpu.items()}
        egress = sum(u.net_egress_bytes for u in mine)
        ingress = sum(u.net_ingress_bytes for u in mine)
        assert egress == sum(out for out, _ in vm.net_read.values()) or not mine
        assert ingress == sum(into for _, into in vm.net_read.values()) or not mine


def test_a_withheld_domain_keeps_its_baseline_and_the_next_reading_covers_the_gap() -> None:
    history = [[("read", 10, 3 * NS, 1000)], [("withheld", 10, 4 * NS, 2000)],
               [("read", 10, 5 * NS, 4000)]]
    vms, usages, baselines = run(history)
    assert len(usages) == 2
    assert usages[1].period_start_ns == usages[0].period_end_ns
    assert usages[1].period_end_ns - usages[1].period_start_ns == 20 * NS  # the gap included
    assert sum(u.cpu_ns for u in usages) == 12 * NS
    assert vms[0].uuid in baselines


def test_a_domain_that_disappears_is_closed_out_at_its_last_reading() -> None:
    history = [[("read", 10, 3 * NS, 1000)], [("gone", 10, 2 * NS, 500)]]
    _, usages, baselines = run(history)
    assert [u.cpu_ns for u in usages] == [3 * NS, 2 * NS]
    assert [b.t_wall_ns for b in baselines.values()] == [usages[-1].period_end_ns]


def test_a_short_lived_domain_is_billed_from_its_own_zero_at_close_out() -> None:
    _, usages, baselines = run([[("gone", 10, 3 * NS, 1000)]])
    assert [u.cpu_ns for u in usages] == [3 * NS]
    assert usages[0].net_egress_bytes == 1000
    assert [b.cpu_ns for b in baselines.values()] == [3 * NS]


def test_baselines_of_instances_unseen_past_the_retention_are_removed() -> None:
    old = Baseline(instance_id="old", incarnation="1:1", t_wall_ns=STORE_NS, cpu_ns=0)
    fresh = Baseline(instance_id="fresh", incarnation="2:2", t_wall_ns=STORE_NS + 10 * NS,
                     cpu_ns=0)
    short = ledger.Settings(node_id="h", time_format="unix", store_created_ns=STORE_NS,
                            baseline_retention_ns=60 * NS)
    acc, _ = ledger.account({"old": old, "fresh": fresh}, [], owners=Everyone(),
                            settings=short, now_ns=STORE_NS + 65 * NS)
    assert acc.removed == ("old",)


def test_a_domain_restarted_between_passes_closes_its_old_incarnation_then_tiles_on() -> None:
    """Destroyed after its light sample and started again before the pass: the old process is
    billed to its last light reading, the new one from its own zero, the periods tile."""
    vm = Vm(n=1, domid=10, ticks=500, started_ns=STORE_NS + NS)
    t0 = STORE_NS + 10 * NS
    acc, _ = ledger.account({}, [vm.reading(t0)], owners=Everyone(), settings=SETTINGS,
                            now_ns=t0)
    baselines = {b.instance_id: b for b in acc.baselines}
    vm.cpu_ns += 3 * NS
    anchor = vm.reading(t0)  # the tail's anchor is the pass's reading
    light = LightReading(uuid=vm.uuid, domid=vm.domid, t_wall_ns=t0 + 20 * NS,
                         cpu_ns=vm.cpu_ns)
    # destroyed at t0 + 21 s, started again at t0 + 25 s; the pass reads it at t0 + 30 s
    vm.domid, vm.ticks, vm.started_ns, vm.cpu_ns = 11, 900, t0 + 25 * NS, 2 * NS
    t1 = t0 + 30 * NS
    acc, _ = ledger.account(baselines, [vm.reading(t1)], owners=Everyone(), settings=SETTINGS,
                            now_ns=t1, closing=[Closing(anchor, light, reason="DESTROYED")])
    old, new = acc.usages
    assert (old.incarnation, new.incarnation) == ("10:500", "11:900")
    assert (old.period_start_ns, old.period_end_ns) == (t0, t0 + 20 * NS)
    assert old.cpu_ns == 3 * NS
    assert (new.period_start_ns, new.period_end_ns) == (t0 + 20 * NS, t1)
    assert new.cpu_ns == 2 * NS and new.new_incarnation
    assert acc.removed == () and [b.incarnation for b in acc.baselines] == ["11:900"]


def test_a_closing_of_the_incarnation_still_running_bills_nothing_twice() -> None:
    vm = Vm(n=2, domid=10, ticks=500, started_ns=STORE_NS + NS)
    t0 = STORE_NS + 10 * NS
    acc, _ = ledger.account({}, [vm.reading(t0)], owners=Everyone(), settings=SETTINGS,
                            now_ns=t0)
    baselines = {b.instance_id: b for b in acc.baselines}
    stale = vm.reading(t0)
    vm.cpu_ns += 5 * NS
    t1 = t0 + 30 * NS
    light = LightReading(uuid=vm.uuid, domid=10, t_wall_ns=t0 + 10 * NS, cpu_ns=NS)
    acc, _ = ledger.account(baselines, [vm.reading(t1)], owners=Everyone(), settings=SETTINGS,
                            now_ns=t1, closing=[Closing(stale, light)])
    assert [(u.period_start_ns, u.cpu_ns) for u in acc.usages] == [(t0, 5 * NS)]
