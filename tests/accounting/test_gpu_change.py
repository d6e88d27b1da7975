"""A GPU hot-plugged or unplugged while the VM runs (accounting/gpu_change.py, sampling.usage):
billed from the moment libvirt told of the change, through `ledger.account` as the collector
calls it (tails, `gpu_changes`), so that Σ gpu_seconds is the exact integral of the GPUs held
over time, and as before (the end reading's GPUs) when no change time is known."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from hostagent.accounting import ledger, tails
from hostagent.accounting.readings import DomainReading, HostFacts, HostReading
from hostagent.model import Baseline, DomainInfo, GpuReading, Owner, OwnerHint, Usage
from hostagent.xml_changes import XmlChanges

NS = 10**9
STORE_NS = 1_000 * NS
SETTINGS = ledger.Settings(node_id="h", time_format="unix", store_created_ns=STORE_NS)
UUID = "00000000-0000-0000-0000-0000000000g1".replace("g", "a")


class Everyone:
    def resolve(self, instance_id: str, hint: OwnerHint | None, *,
                build_id: str | None = None) -> Owner:
        return Owner(user_id="u", org_id=None, source="test")


def gpus(n: int) -> tuple[GpuReading, ...]:
    return tuple(GpuReading(f"0000:3b:0{i}.0", "pci", "H100", None, None) for i in range(n))


def reading(t_ns: int, n_gpus: int, domid: int = 4) -> DomainReading:
    info = DomainInfo(uuid=UUID, name="vm", domid=domid, vcpus=1, memory_bytes=1,
                      max_memory_bytes=1)
    return DomainReading(info=info, instance_id=UUID, t_wall_ns=t_ns, stats={"cpu.time": 0},
                         facts=HostFacts(pid=domid, start_ticks=domid * 7,
                                         started_wall_ns=2_000 * NS, cgroup=None),
                         gpus=gpus(n_gpus))


@dataclass
class Host:
    """The collector's side: baselines, tails and libvirt's change times (XmlChanges)."""

    changes: XmlChanges = field(default_factory=XmlChanges)
    baselines: dict[str, Baseline] = field(default_factory=dict)
    tails: dict[tails.Key, tails.Tail] = field(default_factory=dict)
    usages: list[Usage] = field(default_factory=list)

    def run_pass(self, r: DomainReading, *, failed: bool = False) -> Usage | None:
        self.changes.take()  # as the pass's inventory refresh does, before the XML re-read
        if failed:  # the domain's read failed this pass: its change waits for the next
            self.changes.settled({UUID})
            return None
        host = HostReading(t_wall_ns=r.t_wall_ns, domains=(r,), listed={UUID: "vm"})
        closing = tails.ended(self.tails, host)
        acc, samples = ledger.account(self.baselines, host.domains, owners=Everyone(),
                                      settings=SETTINGS, now_ns=r.t_wall_ns, closing=closing,
                                      live=self.tails, gpu_changes=self.changes.hostdev_changes)
        self.baselines.update({b.instance_id: b for b in acc.baselines})
        self.changes.settled({e.uuid for e in host.errors})
        self.tails = tails.after_pass(self.tails, host, [c.key for c in closing], samples)
        self.usages.extend(acc.usages)
        return acc.usages[-1] if acc.usages else None

    def gpu_seconds(self) -> int:
        return sum(u.gpu_seconds for u in self.usages)


def test_a_gpu_attached_mid_period_is_billed_from_the_attach() -> None:
    h = Host()
    h.run_pass(reading(2_000 * NS, 1))
    h.run_pass(reading(2_030 * NS, 1))  # 30 GPU-s
    h.changes.tell(UUID.upper(), "hostdev1", 2_040 * NS)  # libvirt's thread, its UUID case
    u = h.run_pass(reading(2_060 * NS, 2))
    assert u is not None and u.gpu_seconds == 1 * 10 + 2 * 20
    assert u.gpu_count == 2
    u = h.run_pass(reading(2_090 * NS, 2))  # the change is spent: the plain rule again
    assert u is not None and u.gpu_seconds == 60
    assert h.gpu_seconds() == 30 + 50 + 60 and h.changes.hostdev_changes == {}


def test_a_gpu_detached_mid_period_is_billed_up_to_the_detach() -> None:
    h = Host()
    h.run_pass(reading(2_000 * NS, 2))
    h.changes.tell(UUID, "hostdev0", 2_012_500_000_000)
    u = h.run_pass(reading(2_030 * NS, 1))
    # 2 GPUs for 12.5 s, 1 for 17.5 s: 42.5 GPU-s, floored, the half carried
    assert u is not None and u.gpu_seconds == 42
    u = h.run_pass(reading(2_060 * NS, 0))  # the last one, with no change time heard
    assert u is not None and u.gpu_seconds == 0  # the end reading's GPUs (as before)
    assert h.baselines[UUID].gpu_carry_ns == NS // 2


def test_without_a_change_time_the_end_reading_decides_as_before() -> None:
    h = Host()
    h.run_pass(reading(2_000 * NS, 0))
    u = h.run_pass(reading(2_030 * NS, 1))
    assert u is not None and u.gpu_seconds == 30


def test_other_devices_and_times_outside_the_period_change_nothing() -> None:
    h = Host()
    h.run_pass(reading(2_000 * NS, 0))
    h.changes.tell(UUID, "net1", 2_010 * NS)  # a NIC: its XML is re-read, no GPU time
    h.changes.tell(UUID)  # a metadata edit
    u = h.run_pass(reading(2_030 * NS, 1))
    assert u is not None and u.gpu_seconds == 30
    h.changes.tell(UUID, "hostdev0", 1_990 * NS)  # a clock stepped back: not in the period
    u = h.run_pass(reading(2_060 * NS, 2))
    assert u is not None and u.gpu_seconds == 60


def test_a_change_waits_for_the_pass_that_reads_the_domain() -> None:
    h = Host()
    h.run_pass(reading(2_000 * NS, 0))
    h.changes.tell(UUID, "hostdev0", 2_020 * NS)
    h.run_pass(reading(2_030 * NS, 1), failed=True)
    assert h.changes.hostdev_changes == {UUID: 2_020 * NS}
    u = h.run_pass(reading(2_060 * NS, 1))
    assert u is not None and u.gpu_seconds == 40


def test_a_new_incarnation_is_billed_from_its_own_start() -> None:
    h = Host()
    h.run_pass(reading(2_000 * NS, 0, domid=4))
    h.changes.tell(UUID, "hostdev0", 2_010 * NS)  # a change of the old process
    u = h.run_pass(reading(2_030 * NS, 1, domid=5))
    # the new process (started_wall_ns before the period: billed over all of it)
    assert u is not None and u.new_incarnation and u.gpu_seconds == 30


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 120), st.integers(0, 4),
                          st.one_of(st.none(), st.floats(0.01, 0.99))), min_size=1,
                max_size=25),
       st.integers(0, 4))
def test_gpu_seconds_are_the_integral_of_the_gpus_held(
        steps: list[tuple[int, int, float | None]], first: int) -> None:
    """Passes at random intervals; at most one change a period, at a random moment, told by
    libvirt: Σ gpu_seconds = ⌊∫ GPUs held dt⌋, exactly."""
    h = Host()
    t = 2_000 * NS
    held = first
    h.run_pass(reading(t, held))
    exact_ns = 0
    for dt_s, count, at in steps:
        end = t + dt_s * NS
        if count != held and at is not None:
            change_ns = t + max(1, int(dt_s * NS * at))
            h.changes.tell(UUID, "hostdev0", change_ns)
            exact_ns += held * (change_ns - t) + count * (end - change_ns)
        else:  # no change, or one libvirt did not tell: the end reading's GPUs
            exact_ns += count * (end - t)
        h.run_pass(reading(end, count))
        held, t = count, end
    assert h.gpu_seconds() == exact_ns // NS
