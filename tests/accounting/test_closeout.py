"""Close-out math: examples per rule, then property tests over recorded event sequences."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from hostagent.accounting.closeout import IoBytes, LightReading, close_out, overlay
from hostagent.accounting.events import event_id
from hostagent.accounting.sampling import NS_PER_S, usage
from hostagent.model import Baseline, GpuReading, NicCounters, Sample, Usage

S = NS_PER_S
T0 = 1_700_000_000 * S
CREATED = T0 - 3600 * S
MAC = "52:54:00:aa:bb:01"


def nic(rx: int, tx: int, ifindex: int = 7) -> NicCounters:
    return NicCounters(MAC, "tap0", ifindex, guest_rx_bytes=rx, guest_tx_bytes=tx,
                       source="netlink")


def sample(t: int, cpu: int | None, *, rx: int = 0, tx: int = 0, domid: int = 3,
           started: int | None = CREATED - 60 * S, gpus: int = 0) -> Sample:
    return Sample(
        instance_id="i-1", uuid="u-1", name="vm1", domid=domid,
        incarnation=f"{domid}:{started}", started_wall_ns=started, t_wall_ns=t, vcpus=2,
        memory_alloc_bytes=2 << 30, cpu_ns=cpu, memory=None, nics=(nic(rx, tx),),
        gpus=tuple(GpuReading(f"0000:3b:00.{i}", "pci", "A100", None, None)
                   for i in range(gpus)))


def light(t: int, cpu: int | None, *, rx: int = 0, tx: int = 0, domid: int = 3,
          ifindex: int = 7, io: IoBytes | None = None) -> LightReading:
    return LightReading("u-1", domid, t, cpu, (nic(rx, tx, ifindex),), io)


def committed(t: int, cpu: int, rx: int = 0, tx: int = 0) -> Baseline:
    first = sample(t, cpu, rx=rx, tx=tx)
    _, base = usage(None, first, store_created_ns=CREATED, count_preexisting=True)
    return dataclasses.replace(base, t_wall_ns=t, cpu_ns=cpu)


def test_destroy_bills_up_to_the_last_light_reading() -> None:
    prev = committed(T0, 10 * S, rx=100, tx=200)
    anchor = sample(T0, 10 * S, rx=100, tx=200)
    out = close_out(prev, anchor, light(T0 + 12 * S, 13 * S + 5, rx=150, tx=260),
                    reason="DESTROYED", store_created_ns=CREATED)
    assert out.usage is not None
    assert (out.usage.period_start_ns, out.usage.period_end_ns) == (T0, T0 + 12 * S)
    assert (out.usage.cpu_ns, out.usage.cpu_seconds) == (3 * S + 5, 3)
    assert (out.usage.net_ingress_bytes, out.usage.net_egress_bytes) == (50, 60)
    assert out.baseline.t_wall_ns == T0 + 12 * S and out.reason == "DESTROYED"


def test_nothing_after_the_last_commit_emits_nothing_and_keeps_the_baseline() -> None:
    prev = committed(T0, 10 * S)
    out = close_out(prev, sample(T0, 10 * S), None, reason="DESTROYED",
                    store_created_ns=CREATED)
    assert out.usage is None and out.baseline == prev


def test_a_reading_from_another_process_or_a_lower_counter_is_never_billed() -> None:
    anchor = sample(T0, 10 * S, rx=100, tx=100)
    # After STOPPED libvirt reported far less CPU than the domain had: not the domain's.
    assert overlay(anchor, light(T0 + S, 2 * S)).cpu_ns == 10 * S
    assert overlay(anchor, light(T0 + S, 20 * S, domid=4)) is anchor  # a new process
    assert overlay(anchor, light(T0 - S, 20 * S)) is anchor  # older than the anchor
    recreated = overlay(anchor, light(T0 + S, 11 * S, rx=500, tx=500, ifindex=9))
    assert recreated.nics[0].guest_rx_bytes == 100 and recreated.cpu_ns == 11 * S


def test_io_stat_growth_after_the_anchor_is_added_once() -> None:
    prev = committed(T0, S)
    out = close_out(prev, sample(T0, S), light(T0 + 2 * S, 2 * S, io=IoBytes(1500, 2600)),
                    anchor_io=IoBytes(1000, 2000), reason="DESTROYED", store_created_ns=CREATED)
    assert out.usage is not None
    assert (out.usage.disk_read_bytes, out.usage.disk_write_bytes) == (500, 600)
    no_anchor_io = close_out(prev, sample(T0, S), light(T0 + 2 * S, 2 * S, io=IoBytes(9, 9)),
                             reason="DESTROYED", store_created_ns=CREATED)
    assert no_anchor_io.usage is not None and no_anchor_io.usage.disk_read_bytes == 0


def test_a_short_lived_vm_is_billed_from_its_own_zero() -> None:
    started = T0 + 5 * S  # after the last pass at T0, destroyed before the next
    anchor = sample(started + S // 10, S // 5, rx=10, tx=20, domid=9, started=started)
    out = close_out(None, anchor, light(started + 10 * S, 7 * S, rx=40, tx=90, domid=9),
                    reason="DESTROYED", store_created_ns=CREATED)
    assert out.usage is not None and out.usage.new_incarnation
    assert (out.usage.period_start_ns, out.usage.period_end_ns) == (started, started + 10 * S)
    assert (out.usage.cpu_ns, out.usage.net_ingress_bytes, out.usage.net_egress_bytes) == (
        7 * S, 40, 90)


def test_gpu_time_runs_to_the_last_reading() -> None:
    prev = committed(T0, 0)
    anchor = sample(T0, 0, gpus=2)
    out = close_out(prev, anchor, light(T0 + 3 * S, S), reason="DESTROYED",
                    store_created_ns=CREATED)
    assert out.usage is not None and out.usage.gpu_seconds == 6


# --- property tests over recorded sequences ---------------------------------------------------


@dataclass
class Host:
    """One host's store and in-memory tail state, driven the way docs/billing-tail.md says the
    pass integrates close-out: ended incarnations wait in `ended` until the next pass, which
    closes them in order, oldest first, before it bills the current one."""

    name: str
    created_ns: int
    baseline: Baseline | None = None
    anchor: Sample | None = None
    latest: LightReading | None = None
    ended: list[tuple[Sample, LightReading | None]] = field(default_factory=list)
    events: list[tuple[Usage, str]] = field(default_factory=list)

    def commit(self, u: Usage | None, base: Baseline) -> None:
        if u is not None:
            self.events.append((u, event_id(self.name, u.instance_id, u.incarnation,
                                            u.period_start_ns)))
        self.baseline = base

    def _close_ended(self, reason: str) -> None:
        for anchor, latest in self.ended:
            out = close_out(self.baseline, anchor, latest, reason=reason,
                            store_created_ns=self.created_ns)
            self.commit(out.usage, out.baseline)
        self.ended.clear()

    def full_read(self, s: Sample, *, committed: bool) -> None:
        if self.anchor is not None and self.anchor.incarnation != s.incarnation:
            self.ended.append((self.anchor, self.latest))  # a new process: the old one ended
        if committed:  # a pass: close what ended, then commit what it read
            self._close_ended("DESTROYED")
            self.commit(*usage(self.baseline, s, store_created_ns=self.created_ns))
        self.anchor, self.latest = s, None

    def light_read(self, r: LightReading) -> None:
        self.latest = r

    def gone(self, reason: str) -> None:
        """A pass that no longer sees the domain."""
        if self.anchor is not None:
            self.ended.append((self.anchor, self.latest))
        self._close_ended(reason)
        self.anchor = self.latest = None


def cpu_at(rate: int, start: int, t: int) -> int:
    return rate * (t - start) // S


@st.composite
def lives(draw: st.DrawFn) -> list[tuple[int, int, int, int]]:
    """Successive incarnations as (start, stop, cpu rate ns/s, tap rate bytes/s)."""
    out = []
    t = T0 + draw(st.integers(-40, 40)) * S
    for _ in range(draw(st.integers(1, 3))):
        life = draw(st.integers(1, 90)) * S + draw(st.integers(0, S - 1))
        out.append((t, t + life, draw(st.integers(0, 2 * S)), draw(st.integers(0, 10**6))))
        t += life + draw(st.integers(0, 40)) * S
    return out


@settings(max_examples=300, deadline=None)
@given(lives(), st.integers(1, 30), st.integers(1, 10), st.data())
def test_every_incarnation_is_billed_to_its_last_reading_once(
    incarnations: list[tuple[int, int, int, int]], pass_s: int, sample_s: int,
    data: st.DataObject,
) -> None:
    """Passes every pass_s, light samples every sample_s, lifecycle reads at start; each
    incarnation's Σ equals its counters at its last reading, periods tile, ids are unique."""
    host = Host("h1", CREATED)
    expected_cpu = expected_rx = 0
    t = T0 - 60 * S
    end = incarnations[-1][1] + 2 * max(pass_s, sample_s) * S
    pass_t = t
    life_iter = iter(incarnations)
    life = next(life_iter, None)
    running: tuple[int, int, int, int] | None = None
    domid = 10
    last_cpu = last_rx = 0
    while t <= end:
        if life is not None and running is None and t >= life[0]:
            running, life = life, next(life_iter, None)
            domid += 1
            start = running[0]
            # STARTED: a full lifecycle read right away, not committed.
            s = sample(t, cpu_at(running[2], start, t), rx=cpu_at(running[3], start, t),
                       domid=domid, started=start)
            host.full_read(s, committed=False)
            last_cpu, last_rx = s.cpu_ns or 0, s.nics[0].guest_rx_bytes
        if running is not None and t >= running[1]:
            expected_cpu += last_cpu
            expected_rx += last_rx
            running = None
        if t >= pass_t:
            pass_t += pass_s * S
            if running is None:
                host.gone("DESTROYED")
            else:
                start = running[0]
                s = sample(t, cpu_at(running[2], start, t), rx=cpu_at(running[3], start, t),
                           domid=domid, started=start)
                host.full_read(s, committed=True)
                last_cpu, last_rx = s.cpu_ns or 0, s.nics[0].guest_rx_bytes
        elif running is not None and data.draw(st.booleans(), label="sample taken"):
            start = running[0]
            r = light(t, cpu_at(running[2], start, t), rx=cpu_at(running[3], start, t),
                      domid=domid)
            host.light_read(r)
            last_cpu, last_rx = r.cpu_ns or 0, r.nics[0].guest_rx_bytes
        t += sample_s * S
    host.gone("DESTROYED")
    usages = [u for u, _ in host.events]
    assert sum(u.cpu_ns for u in usages) == expected_cpu
    assert sum(u.net_ingress_bytes for u in usages) == expected_rx
    for a, b in itertools.pairwise(usages):
        assert b.period_start_ns == a.period_end_ns  # tiling, across incarnations too
    by_inc: dict[str, int] = {}
    for u in usages:
        by_inc[u.incarnation] = by_inc.get(u.incarnation, 0) + u.cpu_ns
    for inc, total in by_inc.items():
        secs = sum(u.cpu_seconds for u in usages if u.incarnation == inc)
        assert secs == total // S  # the carry keeps the fraction within an incarnation
    ids = [eid for _, eid in host.events]
    assert len(ids) == len(set(ids))


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 60), st.integers(1, 5), st.integers(0, 2 * S), st.integers(1, 30),
       st.integers(1, 10))
def test_migration_bills_source_to_the_pause_and_destination_from_its_own_zero(
    run_s: int, switch_s: int, rate: int, pass_s: int, incoming_s: int,
) -> None:
    """Recorded sequence (the lab cannot migrate between hosts): source pass, SUSPENDED
    (MIGRATED) read-before-gone, STOPPED (MIGRATED) close; destination QEMU started
    `incoming_s` before the switch-over, RESUMED (MIGRATED), then its own passes."""
    src, dst = Host("src", CREATED), Host("dst", CREATED)
    start = CREATED - 600 * S
    src.full_read(sample(T0, cpu_at(rate, start, T0), started=start), committed=True)
    pause = T0 + run_s * S
    src.light_read(light(pause, cpu_at(rate, start, pause)))  # SUSPENDED MIGRATED: last read
    switch = pause + switch_s * S
    # STOPPED MIGRATED arrives; a reading after it would not be the domain's, so none is taken.
    src.gone("MIGRATED")
    src_total = cpu_at(rate, start, pause) - cpu_at(rate, start, T0)
    assert sum(u.cpu_ns for u, _ in src.events) == src_total  # the first pass only observed
    assert src.events[-1][0].period_end_ns == pause

    d_start = switch - incoming_s * S  # the incoming QEMU existed before the switch-over
    dst.full_read(sample(switch, cpu_at(rate, d_start, switch), domid=77, started=d_start),
                  committed=False)  # RESUMED MIGRATED: read now
    t_pass = switch + pass_s * S
    dst.full_read(sample(t_pass, cpu_at(rate, d_start, t_pass), domid=77, started=d_start),
                  committed=True)
    first = dst.events[0][0]
    assert first.new_incarnation and first.period_start_ns == d_start
    assert first.cpu_ns == cpu_at(rate, d_start, t_pass)  # from the destination's own zero
    assert {u.instance_id for u, _ in src.events + dst.events} == {"i-1"}
    # Two processes, two hosts: event ids never collide, so no sink dedupes one away.
    assert not {e for _, e in src.events} & {e for _, e in dst.events}


def test_a_daemon_killed_between_a_lifecycle_read_and_the_next_pass_bills_nothing_twice() -> None:
    """kill -9 loses the in-memory tail: the stored baseline is unchanged, so the restarted
    daemon bills a still-running domain from it (no loss) and a gone one not at all (the loss
    of polling alone); replaying the lost close-out could never bill more than once."""
    start = CREATED - 600 * S
    host = Host("h1", CREATED)
    host.full_read(sample(T0, 10 * S, started=start), committed=True)
    host.full_read(sample(T0 + 30 * S, 40 * S, started=start), committed=True)
    stored = host.baseline
    host.light_read(light(T0 + 45 * S, 55 * S))  # SUSPENDED: read before gone ... then kill -9
    restarted = Host("h1", CREATED, baseline=stored, events=list(host.events))
    restarted.full_read(sample(T0 + 60 * S, 70 * S, started=start), committed=True)
    assert sum(u.cpu_ns for u, _ in restarted.events) == 60 * S  # T0..T0+60: all, once
    gone = Host("h1", CREATED, baseline=stored, events=list(host.events))
    gone.gone("DESTROYED")  # the domain died meanwhile: no tail survived, nothing new billed
    assert sum(u.cpu_ns for u, _ in gone.events) == 30 * S
    # The close-out the first daemon would have committed is the same event every time.
    host.gone("DESTROYED")
    again = Host("h1", CREATED, baseline=stored,
                 anchor=sample(T0 + 30 * S, 40 * S, started=start),
                 latest=light(T0 + 45 * S, 55 * S))
    again.gone("DESTROYED")
    assert again.events[-1][1] == host.events[-1][1]  # same event_id: a sink dedupes it
