"""The delta engine: one example test per rule, then a property test against a modelled truth."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import orjson
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hostagent.accounting.sampling import ESTABLISHED, NS_PER_S, SOURCE_CHANGED, usage
from hostagent.model import (
    CPU_FROM_CGROUP,
    CPU_FROM_LIBVIRT,
    Baseline,
    BlockCounters,
    DiskBase,
    GpuReading,
    MemoryReading,
    NicBase,
    NicCounters,
    Pressure,
    Sample,
    Usage,
)

S = NS_PER_S
T0 = 1_700_000_000 * S
CREATED = T0 - 3600 * S
MAC = "52:54:00:aa:bb:01"
MAC2 = "52:54:00:aa:bb:02"


def nic(mac: str = MAC, rx: int = 0, tx: int = 0, ifindex: int | None = 7) -> NicCounters:
    return NicCounters(mac, "vnet0", ifindex, guest_rx_bytes=rx, guest_tx_bytes=tx, source="tap")


def disk(
    target: str = "vda",
    rd: int | None = 0,
    wr: int | None = 0,
    alloc: int | None = 10 * 2**30,
    cap: int | None = 20 * 2**30,
) -> BlockCounters:
    return BlockCounters(target, rd, wr, alloc, cap)


def gpu(util: float | None = None) -> GpuReading:
    return GpuReading("0000:3b:00.0", "pci", "A100", util, None)


def sample(t: int = T0, **kw: Any) -> Sample:
    base: dict[str, Any] = {
        "instance_id": "i-1",
        "uuid": "u-1",
        "name": "vm1",
        "domid": 3,
        "incarnation": "inc-a",
        "started_wall_ns": CREATED - 60 * S,
        "t_wall_ns": t,
        "vcpus": 2,
        "memory_alloc_bytes": 4 * 2**30,
        "cpu_ns": 0,
        "memory": MemoryReading(2**30, "balloon"),
    }
    base.update(kw)
    return Sample(**base)


def base(t: int = T0, **kw: Any) -> Baseline:
    fields: dict[str, Any] = {"instance_id": "i-1", "incarnation": "inc-a", "t_wall_ns": t}
    fields.update({"cpu_ns": 0} | kw)
    return Baseline(**fields)


def run(prev: Baseline | None, cur: Sample, **kw: Any) -> tuple[Usage | None, Baseline]:
    return usage(prev, cur, store_created_ns=kw.pop("created", CREATED), **kw)


def emitted(prev: Baseline | None, cur: Sample, **kw: Any) -> tuple[Usage, Baseline]:
    u, b = run(prev, cur, **kw)
    assert u is not None
    return u, b


# --- rule 1: an instance never seen before ------------------------------------------------


def test_preexisting_instance_is_not_billed_for_its_past() -> None:
    cur = sample(cpu_ns=50 * S, nics=(nic(rx=100, tx=200),), disks=(disk(rd=5, wr=6),))
    u, b = run(None, cur)
    assert u is None
    assert (b.t_wall_ns, b.cpu_ns, b.incarnation) == (T0, 50 * S, "inc-a")
    assert b.nics == {MAC: NicBase(7, 100, 200)}
    assert b.disks == {"vda": DiskBase(5, 6)}
    u2, _ = emitted(b, sample(T0 + 10 * S, cpu_ns=53 * S, nics=(nic(rx=150, tx=260),)))
    assert (u2.cpu_ns, u2.net_ingress_bytes, u2.net_egress_bytes) == (3 * S, 50, 60)


def test_instance_started_after_store_counts_from_zero() -> None:
    started = CREATED + 100 * S
    cur = sample(started_wall_ns=started, cpu_ns=7 * S, nics=(nic(rx=10, tx=20),))
    u, b = emitted(None, cur)
    assert (u.period_start_ns, u.period_end_ns) == (started, T0)
    assert (u.cpu_ns, u.cpu_seconds, u.net_ingress_bytes, u.net_egress_bytes) == (7 * S, 7, 10, 20)
    assert u.new_incarnation
    assert b.t_wall_ns == T0
    assert b.cpu_ns == 7 * S


def test_count_preexisting_starts_at_store_creation() -> None:
    u, _ = emitted(None, sample(cpu_ns=9 * S), count_preexisting=True)
    assert (u.period_start_ns, u.cpu_ns) == (CREATED, 9 * S)
    u, _ = emitted(None, sample(started_wall_ns=None, cpu_ns=9 * S), count_preexisting=True)
    assert (u.period_start_ns, u.cpu_ns) == (CREATED, 9 * S)


def test_unknown_start_time_is_not_counted_without_count_preexisting() -> None:
    u, b = run(None, sample(started_wall_ns=None, cpu_ns=9 * S))
    assert u is None
    assert b.cpu_ns == 9 * S


def test_start_not_before_sample_time_defers_to_a_zero_baseline() -> None:
    cur = sample(started_wall_ns=T0, cpu_ns=S)
    u, b = run(None, cur)
    assert u is None
    assert (b.t_wall_ns, b.cpu_ns, b.incarnation) == (T0, 0, "inc-a")
    u2, _ = emitted(b, sample(T0 + 5 * S, started_wall_ns=T0, cpu_ns=2 * S))
    assert (u2.period_start_ns, u2.cpu_ns) == (T0, 2 * S)


# --- rule 2: same incarnation ---------------------------------------------------------------


def test_deltas_within_an_incarnation() -> None:
    prev = base(cpu_ns=10 * S, nics={MAC: NicBase(7, 100, 200)}, disks={"vda": DiskBase(1, 2)})
    cur = sample(
        T0 + 30 * S, cpu_ns=25 * S, nics=(nic(rx=400, tx=1200),), disks=(disk(rd=11, wr=22),)
    )
    u, b = emitted(prev, cur)
    assert (u.period_start_ns, u.period_end_ns, u.new_incarnation) == (T0, T0 + 30 * S, False)
    assert (u.cpu_ns, u.cpu_seconds) == (15 * S, 15)
    assert (u.net_egress_bytes, u.net_ingress_bytes) == (1000, 300)
    assert (u.disk_read_bytes, u.disk_write_bytes) == (10, 20)
    assert u.missing == {}
    assert b == base(
        T0 + 30 * S,
        cpu_ns=25 * S,
        nics={MAC: NicBase(7, 400, 1200)},
        disks={"vda": DiskBase(11, 22)},
        cpu_t_wall_ns=T0 + 30 * S,
        cpu_source=CPU_FROM_LIBVIRT,  # an unlabelled reading's CPU is libvirt's as a rule
    )


def test_counter_that_went_down_counts_from_its_own_zero() -> None:
    prev = base(cpu_ns=10 * S, nics={MAC: NicBase(7, 100, 200)}, disks={"vda": DiskBase(50, 60)})
    cur = sample(T0 + S, cpu_ns=3 * S, nics=(nic(rx=5, tx=300),), disks=(disk(rd=4, wr=70),))
    u, _ = emitted(prev, cur)
    assert u.cpu_ns == 3 * S
    assert (u.net_ingress_bytes, u.net_egress_bytes) == (5, 100)
    assert (u.disk_read_bytes, u.disk_write_bytes) == (4, 10)


def test_recreated_tap_counts_from_zero_even_when_bytes_grew() -> None:
    prev = base(nics={MAC: NicBase(7, 100, 200)})
    u, b = emitted(prev, sample(T0 + S, nics=(nic(rx=500, tx=900, ifindex=8),)))
    assert (u.net_ingress_bytes, u.net_egress_bytes) == (500, 900)
    assert b.nics[MAC] == NicBase(8, 500, 900)


def test_unknown_ifindex_falls_back_to_the_drop_rule_and_keeps_the_known_one() -> None:
    prev = base(nics={MAC: NicBase(7, 100, 200)})
    u, b = emitted(prev, sample(T0 + S, nics=(nic(rx=150, tx=50, ifindex=None),)))
    assert (u.net_ingress_bytes, u.net_egress_bytes) == (50, 50)
    assert b.nics[MAC].ifindex == 7


def test_nics_are_keyed_by_lowercase_mac_not_tap_name() -> None:
    prev = base(nics={MAC: NicBase(7, 100, 200)})
    renamed = NicCounters(MAC.upper(), "tap-other", 7, 130, 240, "tap")
    u, _ = emitted(prev, sample(T0 + S, nics=(renamed,)))
    assert (u.net_ingress_bytes, u.net_egress_bytes) == (30, 40)


def test_hotplug_counts_from_zero_and_unplug_drops() -> None:
    prev = base(nics={MAC: NicBase(7, 100, 200)}, disks={"vda": DiskBase(1, 1)})
    cur = sample(T0 + S, nics=(nic(MAC2, rx=30, tx=40, ifindex=9),), disks=(disk("vdb", 5, 6),))
    u, b = emitted(prev, cur)
    assert (u.net_ingress_bytes, u.net_egress_bytes) == (30, 40)
    assert (u.disk_read_bytes, u.disk_write_bytes) == (5, 6)
    assert set(b.nics) == {MAC2}
    assert set(b.disks) == {"vdb"}


# --- rule 3: new incarnation ---------------------------------------------------------------


def test_new_incarnation_counts_from_zero_and_tiles() -> None:
    prev = base(
        cpu_ns=900 * S, cpu_carry_ns=S - 1, gpu_carry_ns=S - 1, nics={MAC: NicBase(7, 10**9, 10**9)}
    )
    cur = sample(
        T0 + 100 * S,
        incarnation="inc-b",
        started_wall_ns=T0 + 60 * S,
        cpu_ns=S + S // 2,
        nics=(nic(rx=10, tx=20, ifindex=7),),
        gpus=(gpu(), gpu()),
    )
    u, b = emitted(prev, cur)
    assert u.new_incarnation
    assert u.incarnation == "inc-b"
    assert (u.period_start_ns, u.period_end_ns) == (T0, T0 + 100 * S)
    assert (u.cpu_ns, u.cpu_seconds, b.cpu_carry_ns) == (S + S // 2, 1, S // 2)  # carry reset
    assert (u.net_ingress_bytes, u.net_egress_bytes) == (10, 20)
    # GPUs are billed for the 40 s the new process ran, not the 60 s it was off.
    assert (u.gpu_seconds, b.gpu_carry_ns) == (80, 0)
    assert u.cpu_percent_avg == (S + S // 2) / (40 * S * 2) * 100


# --- rule 4: missing readings ---------------------------------------------------------------


def test_missing_cpu_defers_to_the_next_good_reading() -> None:
    prev = base(cpu_ns=10 * S, cpu_carry_ns=S // 2)
    u1, b1 = emitted(prev, sample(T0 + 30 * S, cpu_ns=None, missing={"cpu": "cgroup gone"}))
    assert (u1.cpu_ns, u1.cpu_seconds, u1.cpu_percent_avg) == (0, 0, None)
    assert u1.missing["cpu"] == "cgroup gone"
    assert (b1.cpu_ns, b1.cpu_carry_ns, b1.t_wall_ns) == (10 * S, S // 2, T0 + 30 * S)
    u2, b2 = emitted(b1, sample(T0 + 60 * S, cpu_ns=30 * S))
    assert (u2.period_start_ns, u2.cpu_ns, u2.cpu_seconds, b2.cpu_carry_ns) == (
        T0 + 30 * S,
        20 * S,
        20,
        S // 2,
    )


def test_flagged_reading_is_missing_even_with_a_value() -> None:
    prev = base(cpu_ns=10 * S)
    u, b = emitted(prev, sample(T0 + S, cpu_ns=99 * S, missing={"cpu": "stale"}))
    assert u.cpu_ns == 0
    assert b.cpu_ns == 10 * S


def test_missing_nic_and_disk_keep_their_baselines() -> None:
    prev = base(
        nics={MAC: NicBase(7, 100, 200), MAC2: NicBase(8, 1, 1)},
        disks={"vda": DiskBase(10, 20), "vdb": DiskBase(1, 1)},
    )
    cur = sample(
        T0 + S,
        nics=(nic(MAC2, rx=999, tx=999, ifindex=8),),
        disks=(disk("vda", rd=None, wr=25), disk("vdb", 9, 9)),
        missing={f"net:{MAC}": "netlink timeout", f"net:{MAC2}": "stale", "disk:vdb": "timeout"},
    )
    u, b = emitted(prev, cur)
    assert (u.net_ingress_bytes, u.net_egress_bytes, u.disk_read_bytes, u.disk_write_bytes) == (
        0,
        0,
        0,
        5,
    )
    assert b.nics == prev.nics
    assert b.disks == {"vda": DiskBase(10, 25), "vdb": DiskBase(1, 1)}
    assert u.missing[f"net:{MAC}"] == "netlink timeout"
    assert u.missing["disk:vda:rd_bytes"] == "not reported"


def test_missing_memory_is_none_not_zero() -> None:
    u, _ = emitted(base(), sample(T0 + S, memory=None, missing={"memory": "no balloon"}))
    assert (u.memory_bytes, u.memory_percent, u.memory_source) == (None, None, None)
    assert u.missing["memory"] == "no balloon"


def test_first_sight_with_missing_readings_establishes_later_without_billing() -> None:
    cur = sample(
        cpu_ns=None,
        disks=(disk("vda", rd=None, wr=3),),
        missing={"cpu": "x", f"net:{MAC}": "y", "disk:vdb": "z"},
    )
    u, b = run(None, cur)
    assert u is None
    assert b.cpu_ns is None
    assert b.nics == {MAC: NicBase(None, None, None)}
    assert b.disks == {"vda": DiskBase(None, 3), "vdb": DiskBase(None, None)}
    b = Baseline.from_dict(orjson.loads(orjson.dumps(b.to_dict())))  # the sentinel persists
    cur2 = sample(
        T0 + S,
        cpu_ns=5 * S,
        nics=(nic(rx=100, tx=100),),
        disks=(disk("vda", 50, 8), disk("vdb", 70, 70)),
    )
    u2, b2 = emitted(b, cur2)
    assert (u2.cpu_ns, u2.net_egress_bytes, u2.disk_read_bytes, u2.disk_write_bytes) == (0, 0, 0, 5)
    assert u2.missing["cpu"] == ESTABLISHED
    assert u2.missing[f"net:{MAC}"] == ESTABLISHED
    assert u2.cpu_percent_avg is None
    assert b2.cpu_ns == 5 * S
    assert b2.nics[MAC] == NicBase(7, 100, 100)
    u3, _ = emitted(b2, sample(T0 + 2 * S, cpu_ns=6 * S, nics=(nic(rx=101, tx=102),)))
    assert (u3.cpu_ns, u3.net_ingress_bytes, u3.net_egress_bytes) == (S, 1, 2)


def test_counting_instance_with_missing_cpu_counts_from_zero_later() -> None:
    started = CREATED + S
    u, b = emitted(None, sample(started_wall_ns=started, cpu_ns=None))
    assert u.cpu_ns == 0
    assert b.cpu_ns == 0
    u2, _ = emitted(b, sample(T0 + S, started_wall_ns=started, cpu_ns=4 * S))
    assert u2.cpu_ns == 4 * S


# --- rule 5: carries ------------------------------------------------------------------------


def test_fractional_seconds_are_carried_not_truncated() -> None:
    b = base()
    got = []
    for i in range(1, 5):
        u, b = emitted(b, sample(T0 + i * S * 3 // 4, cpu_ns=i * (S + S // 2), gpus=(gpu(), gpu())))
        got.append((u.cpu_seconds, u.gpu_seconds))
    assert got == [(1, 1), (2, 2), (1, 1), (2, 2)]
    assert (b.cpu_carry_ns, b.gpu_carry_ns) == (0, 0)


# --- rule 6: gauges and averages ------------------------------------------------------------


def test_gauges_and_averages() -> None:
    cur = sample(
        T0 + 10 * S,
        cpu_ns=5 * S,
        memory=MemoryReading(3 * 2**30, "cgroup"),
        disks=(disk("vda", alloc=2**30, cap=8 * 2**30), disk("vdb", alloc=None, cap=None)),
        gpus=(gpu(50.0), gpu(None), gpu(100.0)),
        pressure=Pressure(1.5, None, 0.25),
    )
    u, _ = emitted(base(), cur)
    assert u.cpu_percent_avg == 25.0
    assert (u.memory_bytes, u.memory_source, u.memory_percent) == (3 * 2**30, "cgroup", 75.0)
    assert (u.storage_bytes, u.storage_capacity_bytes) == (2**30, 8 * 2**30)
    assert u.missing == {"storage:vdb": "allocation not reported"}
    assert (u.gpu_count, u.gpu_util_avg, u.gpu_seconds) == (3, 75.0, 30)
    assert u.pressure == Pressure(1.5, None, 0.25)


def test_memory_percent_is_at_most_100_while_memory_bytes_stays_as_measured() -> None:
    # A host-side figure (cgroup working set, QEMU RSS) counts QEMU's own memory too: a domain
    # allocated 1 KiB "used" 20,479,902 % of it, which fired every memory rule.
    for source in ("cgroup", "rss", "balloon"):
        used = 200 * 2**20
        u, _ = emitted(base(), sample(T0 + S, memory=MemoryReading(used, source),
                                      memory_alloc_bytes=1024))
        assert (u.memory_bytes, u.memory_percent) == (used, 100.0)
    u, _ = emitted(base(), sample(T0 + S, memory=MemoryReading(2**30, "cgroup"),
                                  memory_alloc_bytes=2**30 + 1))
    assert u.memory_percent is not None and 99.99 < u.memory_percent < 100.0


def test_unknown_sizes_and_utilisation_are_none_but_diskless_is_zero() -> None:
    cur = sample(T0 + S, disks=(disk(alloc=None, cap=None),), gpus=(gpu(None),), vcpus=0)
    u, _ = emitted(base(), cur)
    assert (u.storage_bytes, u.storage_capacity_bytes, u.gpu_util_avg) == (None, None, None)
    assert u.cpu_percent_avg is None
    u, _ = emitted(base(), sample(T0 + S))
    assert (u.storage_bytes, u.storage_capacity_bytes) == (0, 0)


# --- rule 7: empty or reversed periods ----------------------------------------------------------


def test_zero_or_negative_period_emits_nothing_and_keeps_the_baseline() -> None:
    prev = base(cpu_ns=S)
    for t in (T0, T0 - S):
        for inc in ("inc-a", "inc-b"):
            u, b = run(prev, sample(t, cpu_ns=9 * S, incarnation=inc))
            assert u is None
            assert b is prev
    u, _ = emitted(prev, sample(T0 + S, cpu_ns=9 * S))
    assert (u.period_start_ns, u.cpu_ns) == (T0, 8 * S)


# --- property test ----------------------------------------------------------------------------

MACS = [f"52:54:00:00:00:0{i}" for i in range(3)]
TARGETS = ["vda", "vdb"]


@dataclass
class Ctr:
    """One cumulative counter of the modelled VM and what the engine may know of it."""

    value: int = 0
    established: bool = True  # is the engine's baseline for it known?
    settled: bool = False  # read well at the last step, which was accepted: nothing pending


@dataclass
class World:
    t: int
    accepted_t: int
    inc: int
    started: int | None
    gpus: int
    cpu: Ctr
    nics: dict[str, tuple[int, Ctr, Ctr]] = field(default_factory=dict)  # ifindex, rx, tx
    disks: dict[str, tuple[Ctr, Ctr]] = field(default_factory=dict)  # rd, wr
    pluggable_disks: set[str] = field(default_factory=lambda: set(TARGETS))
    next_ifindex: int = 100


def chance(data: st.DataObject, pct: int) -> bool:
    return data.draw(st.integers(0, 99)) < pct


def grow(data: st.DataObject, hi: int) -> int:
    return data.draw(st.integers(0, hi))


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_usage_accounts_every_unit_exactly_once(data: st.DataObject) -> None:
    count_preexisting = chance(data, 20)
    t0 = T0 + grow(data, 10 * S)
    created = t0 - data.draw(st.integers(-5 * S, 3600 * S))
    started = None if chance(data, 15) else t0 - data.draw(st.integers(-5 * S, 7200 * S))
    counting = count_preexisting or (started is not None and started >= created)
    start = (max(started, created) if started is not None else created) if counting else t0
    w = World(t=t0, accepted_t=start, inc=0, started=started, gpus=grow(data, 2), cpu=Ctr())

    # The truth: what was used while the engine could know it, per kind and per incarnation.
    billable: dict[str, int] = dict.fromkeys(("cpu", "egress", "ingress", "read", "write"), 0)
    billable_cpu_by_inc: dict[str, int] = {}
    running_start: dict[str, int] = {}
    last_accepted: dict[str, int] = {}
    gpus_of: dict[str, int] = {}
    # What the engine reported.
    reported: dict[str, int] = dict.fromkeys(billable, 0)
    cpu_by_inc: dict[str, int] = {}
    cpu_s_by_inc: dict[str, int] = {}
    gpu_s_by_inc: dict[str, int] = {}
    last_end: int | None = None
    baseline: Baseline | None = None

    def add(ctr: Ctr, amount: int, kind: str) -> None:
        ctr.value += amount
        if ctr.established:
            billable[kind] += amount
            if kind == "cpu":
                name = f"inc-{w.inc}"
                billable_cpu_by_inc[name] = billable_cpu_by_inc.get(name, 0) + amount

    def restart(ctr: Ctr, value: int, kind: str) -> None:
        ctr.value = 0
        add(ctr, value, kind)

    def fresh(kind: str, hi: int = 10**6) -> Ctr:
        c = Ctr()
        add(c, grow(data, hi), kind)
        return c

    def preexisting() -> Ctr:
        return Ctr(value=grow(data, 10**12), established=False)

    # Step 0: the VM as first seen; counters either count from zero or are not billable.
    w.cpu = fresh("cpu", 100 * S) if counting else preexisting()
    for mac in MACS[: grow(data, 2)]:
        pair = (fresh("ingress"), fresh("egress")) if counting else (preexisting(), preexisting())
        w.nics[mac] = (w.next_ifindex, *pair)
        w.next_ifindex += 1
    for target in TARGETS[: grow(data, 2)]:
        w.disks[target] = (
            (fresh("read"), fresh("write")) if counting else (preexisting(), preexisting())
        )
        w.pluggable_disks.discard(target)

    n_steps = data.draw(st.integers(1, 25))
    for k in range(n_steps + 1):
        flush = k == n_steps  # a final clean reading: everything deferred must come out
        if k > 0:
            if flush:
                w.t = max(w.t, w.accepted_t) + 1 + grow(data, 10 * S)
            elif chance(data, 12):
                event("clock stepped back")
                w.t -= grow(data, 5 * S)  # clock stepped back (or stood still)
            else:
                w.t += data.draw(st.integers(1, 90 * S))
        accepted = w.t > w.accepted_t or (k == 0 and not counting)

        def good(pct: int) -> bool:
            return flush or not chance(data, pct)  # noqa: B023

        # A discontinuity loses nothing only when nothing is pending just before it.
        all_settled = (
            w.cpu.settled
            and all(c.settled for _, rx, tx in w.nics.values() for c in (rx, tx))
            and all(c.settled for pair in w.disks.values() for c in pair)
        )
        new_inc = k > 0 and not flush and all_settled and chance(data, 10)
        can_change = k > 0 and not flush and not new_inc
        grows = k > 0 and not new_inc
        cpu_good = good(10)
        if new_inc:
            event("new incarnation")
            w.inc += 1
            w.started = None if chance(data, 20) else w.t - grow(data, 120 * S)
            w.gpus = grow(data, 2)
            w.cpu = fresh("cpu", 5 * S)
            w.nics = {
                m: (w.next_ifindex + i, fresh("ingress"), fresh("egress"))
                for i, m in enumerate(w.nics)
            }
            w.next_ifindex += len(w.nics)
            w.disks = {d: (fresh("read"), fresh("write")) for d in w.disks}
        elif grows:
            if (
                can_change
                and w.cpu.settled
                and accepted
                and cpu_good
                and w.cpu.value > 0
                and chance(data, 10)
            ):
                event("cpu reset")
                restart(w.cpu, grow(data, w.cpu.value - 1), "cpu")  # reset, visibly lower
            else:
                add(w.cpu, grow(data, 5 * S), "cpu")

        missing: dict[str, str] = {}
        nic_readings: list[NicCounters] = []
        for mac in MACS:
            if mac not in w.nics:
                if not (can_change and chance(data, 10)):
                    continue
                w.nics[mac] = (w.next_ifindex, fresh("ingress"), fresh("egress"))  # hot-plug
                w.next_ifindex += 1
                nic_good = good(10)
            else:
                _, rx, tx = w.nics[mac]
                op = (
                    data.draw(st.integers(0, 19))
                    if can_change and rx.settled and tx.settled
                    else 99
                )
                if op == 0:  # unplugged
                    event("nic unplugged")
                    del w.nics[mac]
                    continue
                nic_good = good(10)
                if op == 1:  # tap re-created: new ifindex, counters from zero
                    event("tap re-created")
                    w.nics[mac] = (w.next_ifindex, fresh("ingress"), fresh("egress"))
                    w.next_ifindex += 1
                elif op == 2 and accepted and nic_good and rx.value > 0 and tx.value > 0:
                    restart(rx, grow(data, rx.value - 1), "ingress")
                    restart(tx, grow(data, tx.value - 1), "egress")
                elif grows:
                    add(rx, grow(data, 10**6), "ingress")
                    add(tx, grow(data, 10**6), "egress")
            ifindex, rx, tx = w.nics[mac]
            reading = NicCounters(mac, f"vnet{ifindex}", ifindex, rx.value, tx.value, "tap")
            if nic_good:
                nic_readings.append(reading)
            else:
                missing[f"net:{mac}"] = "netlink timeout"
                if chance(data, 50):  # a flagged reading is ignored whatever it says
                    nic_readings.append(dataclasses.replace(reading, guest_rx_bytes=0))

        disk_readings: list[BlockCounters] = []
        disk_good: dict[str, tuple[bool, bool]] = {}
        for target in TARGETS:
            plugged_now = False
            if target not in w.disks:
                if not (target in w.pluggable_disks and can_change and chance(data, 10)):
                    if accepted:
                        w.pluggable_disks.add(target)  # the engine has dropped it by now
                    continue
                w.disks[target] = (fresh("read"), fresh("write"))
                w.pluggable_disks.discard(target)
                plugged_now = True
            else:
                rd, wr = w.disks[target]
                if can_change and rd.settled and wr.settled and chance(data, 5):
                    del w.disks[target]
                    continue
            rd, wr = w.disks[target]
            whole, rd_ok, wr_ok = good(6), good(6), good(6)
            disk_good[target] = (whole and rd_ok, whole and wr_ok)
            if grows and not plugged_now:
                if (
                    can_change
                    and rd.settled
                    and wr.settled
                    and accepted
                    and whole
                    and rd_ok
                    and wr_ok
                    and rd.value > 0
                    and wr.value > 0
                    and chance(data, 8)
                ):
                    restart(rd, grow(data, rd.value - 1), "read")
                    restart(wr, grow(data, wr.value - 1), "write")
                else:
                    add(rd, grow(data, 10**7), "read")
                    add(wr, grow(data, 10**7), "write")
            reading_b = BlockCounters(
                target, rd.value if rd_ok else None, wr.value if wr_ok else None, 2**30, 2**31
            )
            if whole:
                disk_readings.append(reading_b)
            else:
                missing[f"disk:{target}"] = "timeout"
                if chance(data, 50):
                    disk_readings.append(reading_b)

        if not cpu_good:
            event("cpu gap")
            missing["cpu"] = "cgroup unreadable"
        name = f"inc-{w.inc}"
        cur = Sample(
            instance_id="i-1",
            uuid="u-1",
            name="vm",
            domid=1,
            incarnation=name,
            started_wall_ns=w.started,
            t_wall_ns=w.t,
            vcpus=2,
            memory_alloc_bytes=2**32,
            cpu_ns=w.cpu.value if cpu_good or chance(data, 50) else None,
            memory=MemoryReading(grow(data, 2**32), "rss") if good(10) else None,
            nics=tuple(nic_readings),
            disks=tuple(disk_readings),
            gpus=tuple(gpu(50.0) for _ in range(w.gpus)),
            missing=missing,
        )

        before = baseline
        u, baseline = usage(
            before, cur, store_created_ns=created, count_preexisting=count_preexisting
        )

        if accepted:
            if name not in running_start:
                gpus_of[name] = w.gpus
                if w.inc == 0:
                    running_start[name] = start
                elif w.started is None:
                    running_start[name] = w.accepted_t
                else:
                    running_start[name] = min(max(w.started, w.accepted_t), w.t)
            last_accepted[name] = w.t
        if not accepted:
            assert u is None  # (7) never an empty or reversed period
            assert baseline is before or before is None
        elif k == 0 and not counting:
            assert u is None
        else:
            assert u is not None
            assert u.period_start_ns == (last_end if last_end is not None else start)  # (c)
            assert u.period_end_ns == w.t > u.period_start_ns
            last_end = u.period_end_ns
            for value in (
                u.cpu_ns,
                u.cpu_seconds,
                u.gpu_seconds,
                u.net_egress_bytes,
                u.net_ingress_bytes,
                u.disk_read_bytes,
                u.disk_write_bytes,
            ):
                assert value >= 0  # (b)
            assert u.cpu_percent_avg is None or u.cpu_percent_avg >= 0
            if not cpu_good:
                assert u.cpu_ns == 0
                assert "cpu" in u.missing
            reported["cpu"] += u.cpu_ns
            reported["egress"] += u.net_egress_bytes
            reported["ingress"] += u.net_ingress_bytes
            reported["read"] += u.disk_read_bytes
            reported["write"] += u.disk_write_bytes
            cpu_by_inc[u.incarnation] = cpu_by_inc.get(u.incarnation, 0) + u.cpu_ns
            cpu_s_by_inc[u.incarnation] = cpu_s_by_inc.get(u.incarnation, 0) + u.cpu_seconds
            gpu_s_by_inc[u.incarnation] = gpu_s_by_inc.get(u.incarnation, 0) + u.gpu_seconds
        assert 0 <= baseline.cpu_carry_ns < S
        assert 0 <= baseline.gpu_carry_ns < S

        # (a)/(e): once a kind is read in full at an accepted step, nothing of it is pending.
        if accepted:
            if cpu_good:
                assert reported["cpu"] == billable["cpu"]
            if not any(key.startswith("net:") for key in missing):
                assert reported["egress"] == billable["egress"]
                assert reported["ingress"] == billable["ingress"]
            if all(all(g) for g in disk_good.values()):
                assert reported["read"] == billable["read"]
                assert reported["write"] == billable["write"]

        # What the engine knows after this step.
        ok_now = {id(w.cpu): cpu_good}
        for mac, (_, rx, tx) in w.nics.items():
            ok_now[id(rx)] = ok_now[id(tx)] = f"net:{mac}" not in missing
        for target, (rd, wr) in w.disks.items():
            ok_now[id(rd)], ok_now[id(wr)] = disk_good[target]
        counters = [w.cpu]
        counters += [c for _, rx, tx in w.nics.values() for c in (rx, tx)]
        counters += [c for pair in w.disks.values() for c in pair]
        for ctr in counters:
            fine = accepted and ok_now[id(ctr)]
            ctr.established = ctr.established or fine
            ctr.settled = fine
        if accepted:
            w.accepted_t = w.t
        if accepted:  # unplugged devices leave the baseline
            assert set(baseline.nics) <= set(w.nics)
            assert set(baseline.disks) <= set(w.disks)
        if chance(data, 15):  # daemon restart: the baseline goes through the store
            baseline = Baseline.from_dict(orjson.loads(orjson.dumps(baseline.to_dict())))

    assert reported == billable  # (a) and (e): gaps were deferred, never lost
    for name, total_ns in billable_cpu_by_inc.items():
        assert cpu_by_inc.get(name, 0) == total_ns
        assert cpu_s_by_inc.get(name, 0) == total_ns // S  # (d)
    for name, rs in running_start.items():
        assert gpu_s_by_inc.get(name, 0) == gpus_of[name] * (last_accepted[name] - rs) // S  # (d)


# --- the CPU counter: libvirt's cpu.time or the VM cgroup's, one per incarnation ---------------


def test_a_lower_reading_from_another_counter_is_never_billed_as_a_reset() -> None:
    """The baseline holds libvirt's cpu.time; the VM cgroup's counter reads lower (libvirt
    read another cgroup: a machine scope, say). Within one process a lower counter of the SAME
    source is a reset; across sources it bills nothing and counts on from the new reading."""
    prev = base(cpu_ns=500 * S, cpu_source=CPU_FROM_LIBVIRT)
    cur = sample(T0 + 30 * S, cpu_ns=499 * S, cpu_source=CPU_FROM_CGROUP)
    u, b = emitted(prev, cur)
    assert u.cpu_ns == 0 and u.missing.get("cpu") == SOURCE_CHANGED
    assert (b.cpu_ns, b.cpu_source, b.cpu_t_wall_ns) == (499 * S, CPU_FROM_CGROUP, T0 + 30 * S)
    u2, _ = emitted(b, sample(T0 + 60 * S, cpu_ns=502 * S, cpu_source=CPU_FROM_CGROUP))
    assert u2.cpu_ns == 3 * S  # on from the cgroup's own figure
    # the same counter going down is still a reset (a v1 cpuacct.usage written to 0)
    u3, _ = emitted(b, sample(T0 + 60 * S, cpu_ns=2 * S, cpu_source=CPU_FROM_CGROUP))
    assert u3.cpu_ns == 2 * S


def test_a_change_of_counter_bills_in_the_old_one_when_the_reading_has_both() -> None:
    """An upgraded store (baselines in libvirt's cpu.time) meets a pass that reads the cgroup
    and asked libvirt too: the period bills libvirt's growth exactly, then the cgroup's."""
    prev = base(cpu_ns=500 * S, cpu_source=CPU_FROM_LIBVIRT)
    cur = sample(T0 + 30 * S, cpu_ns=480 * S, cpu_time_ns=530 * S, cpu_source=CPU_FROM_CGROUP)
    u, b = emitted(prev, cur)
    assert u.cpu_ns == 30 * S and "cpu" not in u.missing
    assert (b.cpu_ns, b.cpu_source) == (480 * S, CPU_FROM_CGROUP)
    u2, _ = emitted(b, sample(T0 + 60 * S, cpu_ns=490 * S, cpu_source=CPU_FROM_CGROUP))
    assert u2.cpu_ns == 10 * S
    # libvirt's figure below the baseline is no measurement either: nothing billed
    u3, _ = emitted(prev, sample(T0 + 30 * S, cpu_ns=480 * S, cpu_time_ns=400 * S,
                                 cpu_source=CPU_FROM_CGROUP))
    assert u3.cpu_ns == 0 and u3.missing.get("cpu") == SOURCE_CHANGED


def test_stores_written_before_sources_were_recorded_read_as_libvirt() -> None:
    raw = base(cpu_ns=5 * S).to_dict()
    assert "cpu_source" not in raw  # an unlabelled baseline writes no key
    old = Baseline.from_dict(raw)
    assert old == base(cpu_ns=5 * S) and old.cpu_counter == CPU_FROM_LIBVIRT
    assert base(cpu_ns=0).cpu_counter is None  # a new process's zero: any counter
    labelled = base(cpu_ns=5 * S, cpu_source=CPU_FROM_CGROUP)
    assert Baseline.from_dict(labelled.to_dict()) == labelled
    # the old store's counter goes on into a cgroup reading without a reset
    u, _ = emitted(old, sample(T0 + 30 * S, cpu_ns=4 * S, cpu_source=CPU_FROM_CGROUP))
    assert u.cpu_ns == 0 and u.missing.get("cpu") == SOURCE_CHANGED


def test_a_new_process_read_from_the_cgroup_after_a_restart_counts_from_its_zero() -> None:
    """A new incarnation whose first reading had no CPU keeps a zero baseline; reloaded from
    the store, that zero is any counter's: the next reading bills all of it."""
    zero = base(cpu_ns=0)
    reloaded = Baseline.from_dict(zero.to_dict())
    u, b = emitted(reloaded, sample(T0 + 30 * S, cpu_ns=7 * S, cpu_source=CPU_FROM_CGROUP))
    assert u.cpu_ns == 7 * S and b.cpu_source == CPU_FROM_CGROUP


@settings(max_examples=300, deadline=None)
@given(
    offset=st.integers(-50 * S, 50 * S),
    steps=st.lists(st.tuples(st.integers(0, 5 * S), st.sampled_from(["libvirt", "cgroup"]),
                             st.booleans()), min_size=1, max_size=12),
)
def test_switching_counters_never_bills_more_than_the_vm_used(
        offset: int, steps: list[tuple[int, str, bool]]) -> None:
    """libvirt's counter L(t) and the cgroup's C(t) = L(t) + offset grow together; each pass
    reads one of them (with libvirt's beside the cgroup's or not). Whatever the switches, the
    CPU billed never exceeds L's growth: a switch is never a reset."""
    start = 1000 * S
    used = 0
    prev = base(cpu_ns=start, cpu_source=CPU_FROM_LIBVIRT)
    billed = 0
    t = T0
    for grow, source, both in steps:
        used += grow
        t += 30 * S
        lib = start + used
        if source == "libvirt":
            cur = sample(t, cpu_ns=lib, cpu_source=None)
        else:
            cur = sample(t, cpu_ns=max(lib + offset, 0), cpu_source=CPU_FROM_CGROUP,
                         cpu_time_ns=lib if both else None)
        u, prev = run(prev, cur)
        if u is not None:
            billed += u.cpu_ns
    assert 0 <= billed <= used
