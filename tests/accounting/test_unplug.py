"""A NIC hot-unplugged between two passes (accounting/unplug.py, device_deltas.nic_deltas): its
bytes up to its last light reading are billed at the next pass, through `ledger.account` as the
collector calls it, and never twice (a re-plugged NIC is a new tap that counts from zero). A NIC
plugged after a pass (libvirt's DEVICE_ADDED: `tails.with_taps`) and unplugged before the next
is billed from zero up to its final counters, at that pass or at the VM's close-out."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from hostagent.accounting import ledger, tails
from hostagent.accounting.closeout import LightReading
from hostagent.accounting.readings import DomainReading, HostFacts, HostReading
from hostagent.model import Baseline, DomainInfo, Nic, NicCounters, Owner, OwnerHint, Usage

NS = 10**9
STORE_NS = 1_000 * NS
SETTINGS = ledger.Settings(node_id="h", time_format="unix", store_created_ns=STORE_NS)
UUID = "00000000-0000-0000-0000-000000000001"
MAC = "52:54:00:aa:bb:01"


class Everyone:
    def resolve(self, instance_id: str, hint: OwnerHint | None, *,
                build_id: str | None = None) -> Owner:
        return Owner(user_id="u", org_id=None, source="test")


def reading(t_ns: int, tap: tuple[int | None, int, int] | None, *, listed: bool = True,
            domid: int = 4) -> DomainReading:
    """The domain at `t_ns` with its NIC's tap (ifindex, guest rx, guest tx; ifindex None:
    libvirt's counters), or without one: `listed` says whether the XML still lists the NIC
    (its tap then not found)."""
    nics = (Nic(mac=MAC, kind="ethernet", target="hatap1"),) if tap is not None or listed else ()
    info = DomainInfo(uuid=UUID, name="vm", domid=domid, vcpus=1, memory_bytes=1,
                      max_memory_bytes=1, nics=nics)
    counters = {} if tap is None else {
        MAC: NicCounters(MAC, "hatap1", tap[0], tap[1], tap[2], "netlink-stats64")}
    missing = {f"net:{MAC}": "tap hatap1 not found on the host"} if tap is None and listed \
        else {}
    return DomainReading(info=info, instance_id=UUID, t_wall_ns=t_ns, stats={"cpu.time": 0},
                         facts=HostFacts(pid=domid, start_ticks=domid * 7,
                                         started_wall_ns=STORE_NS + NS, cgroup=None),
                         netlink_nics=counters, netlink_missing=missing)


def light(t_ns: int, tap: tuple[int, int, int], domid: int = 4) -> LightReading:
    return LightReading(UUID, domid, t_ns, 0, (NicCounters(MAC, "hatap1", tap[0], tap[1],
                                                           tap[2], "netlink-stats64"),))


@dataclass
class Host:
    """The collector's side of the passes: baselines and tails, as collector.py keeps them."""

    live: bool = True  # hand the tails to the accounting (False: as before this change)
    baselines: dict[str, Baseline] = field(default_factory=dict)
    tails: dict[tails.Key, tails.Tail] = field(default_factory=dict)
    usages: list[Usage] = field(default_factory=list)

    def run_pass(self, r: DomainReading) -> Usage | None:
        host = HostReading(t_wall_ns=r.t_wall_ns, domains=(r,), listed={UUID: "vm"})
        closing = tails.ended(self.tails, host)
        acc, samples = ledger.account(self.baselines, host.domains, owners=Everyone(),
                                      settings=SETTINGS, now_ns=r.t_wall_ns, closing=closing,
                                      live=self.tails if self.live else None)
        self.baselines.update({b.instance_id: b for b in acc.baselines})
        self.tails = tails.after_pass(self.tails, host, [c.key for c in closing], samples)
        self.usages.extend(acc.usages)
        return acc.usages[-1] if acc.usages else None

    def light(self, reading: LightReading) -> None:
        key = (reading.uuid, reading.domid)
        self.tails[key] = tails.with_light(self.tails[key], reading)

    def device_added(self, r: DomainReading) -> None:
        """The read a DEVICE_ADDED makes (tailing.TailTasks._read_taps)."""
        key = (r.uuid, r.info.domid)
        self.tails[key] = tails.with_taps(self.tails[key], r)

    def stop(self, t_ns: int) -> None:
        """A pass that finds the VM gone: its close-out."""
        host = HostReading(t_wall_ns=t_ns, domains=(), listed={})
        closing = tails.ended(self.tails, host)
        acc, _ = ledger.account(self.baselines, (), owners=Everyone(), settings=SETTINGS,
                                now_ns=t_ns, closing=closing, live=self.tails)
        self.baselines.update({b.instance_id: b for b in acc.baselines})
        self.tails = tails.after_pass(self.tails, host, [c.key for c in closing])
        self.usages.extend(acc.usages)

    def billed(self) -> tuple[int, int]:
        return (sum(u.net_ingress_bytes for u in self.usages),
                sum(u.net_egress_bytes for u in self.usages))


def test_a_nic_detached_between_passes_is_billed_up_to_its_final_counters() -> None:
    for listed in (False, True):  # the XML re-read without it, or not yet (tap not found)
        h = Host()
        h.run_pass(reading(2_000 * NS, (7, 0, 0)))
        h.run_pass(reading(2_030 * NS, (7, 1_000, 2_000)))
        h.light(light(2_041 * NS, (7, 1_400, 2_300)))
        h.light(light(2_052 * NS, (7, 1_500, 2_600)))  # the sample at the tap's deletion
        u = h.run_pass(reading(2_060 * NS, None, listed=listed))
        assert u is not None and (u.net_ingress_bytes, u.net_egress_bytes) == (500, 600)
        assert f"net:{MAC}" not in u.missing  # its counters were known
        # Unplugged: dropped from the baseline; still listed: kept at the counters billed.
        kept = h.baselines[UUID].nics.get(MAC)
        if listed:
            assert kept is not None and (kept.guest_rx_bytes, kept.guest_tx_bytes) == (
                1_500, 2_600)
        else:
            assert kept is None
        # The pass after: nothing more (no light reading follows a tap the pass did not see)
        u = h.run_pass(reading(2_090 * NS, None, listed=listed))
        assert u is not None and (u.net_ingress_bytes, u.net_egress_bytes) == (0, 0)
        assert h.billed() == (1_500, 2_600)


def test_without_the_tails_those_bytes_were_lost() -> None:
    h = Host(live=False)
    h.run_pass(reading(2_000 * NS, (7, 0, 0)))
    h.run_pass(reading(2_030 * NS, (7, 1_000, 2_000)))
    h.light(light(2_052 * NS, (7, 1_500, 2_600)))
    h.run_pass(reading(2_060 * NS, None, listed=False))
    assert h.billed() == (1_000, 2_000)


def test_a_light_reading_of_another_tap_or_process_is_not_used() -> None:
    # The tap was re-created (another ifindex) after the last pass: its counters are not the
    # baseline's tap's, and a pass that sees neither bills nothing for it.
    h = Host()
    h.run_pass(reading(2_000 * NS, (7, 0, 0)))
    h.run_pass(reading(2_030 * NS, (7, 1_000, 2_000)))
    tail = h.tails[(UUID, 4)]
    h.tails[(UUID, 4)] = dataclasses.replace(tail, latest=light(2_040 * NS, (8, 50, 60)))
    u = h.run_pass(reading(2_060 * NS, None))
    assert u is not None and (u.net_ingress_bytes, u.net_egress_bytes) == (0, 0)
    assert f"net:{MAC}" in u.missing
    # A present NIC's own counters win over the light reading's.
    h.light(light(2_070 * NS, (7, 9_999, 9_999)))
    u = h.run_pass(reading(2_090 * NS, (7, 1_200, 2_100)))
    assert u is not None and (u.net_ingress_bytes, u.net_egress_bytes) == (200, 100)


def test_a_tap_read_through_libvirt_instead_is_not_billed_twice() -> None:
    # The link dump lacked the tap this pass, and libvirt's counters (no ifindex) stood in:
    # the tap is not gone, and its bytes are billed once, from those counters.
    h = Host()
    h.run_pass(reading(2_000 * NS, (7, 0, 0)))
    h.run_pass(reading(2_030 * NS, (7, 1_000, 2_000)))
    h.light(light(2_041 * NS, (7, 1_500, 2_600)))
    u = h.run_pass(reading(2_060 * NS, (None, 1_600, 2_700)))
    assert u is not None and (u.net_ingress_bytes, u.net_egress_bytes) == (600, 700)
    assert h.billed() == (1_600, 2_700)


def test_a_nic_plugged_and_unplugged_between_two_passes_is_billed_from_zero() -> None:
    h = Host()
    h.run_pass(reading(2_000 * NS, (7, 0, 0)))
    h.run_pass(reading(2_030 * NS, (7, 1_000, 2_000)))
    # plugged on tap 8 (the first NIC unplugged), heard, read, sampled at its deletion
    h.light(light(2_033 * NS, (7, 1_100, 2_100)))  # tap 7's end
    h.device_added(reading(2_035 * NS, (8, 10, 20)))
    h.light(light(2_045 * NS, (8, 300, 400)))  # tap 8's end
    u = h.run_pass(reading(2_060 * NS, None, listed=False))
    assert u is not None and (u.net_ingress_bytes, u.net_egress_bytes) == (100 + 300, 100 + 400)
    assert h.billed() == (1_400, 2_500)
    h.run_pass(reading(2_090 * NS, None, listed=False))
    assert h.billed() == (1_400, 2_500)  # once


def test_without_the_device_added_read_the_plugged_tap_was_lost() -> None:
    h = Host()
    h.run_pass(reading(2_000 * NS, (7, 0, 0)))
    h.run_pass(reading(2_030 * NS, (7, 1_000, 2_000)))
    h.light(light(2_045 * NS, (8, 300, 400)))  # not the anchor's tap: ignored
    h.run_pass(reading(2_060 * NS, (7, 1_000, 2_000)))
    assert h.billed() == (1_000, 2_000)


def test_a_tap_the_last_pass_did_not_read_by_its_id_is_never_billed_from_zero() -> None:
    # The last pass did not find the tap (the link dump lacked it: the NIC flagged, its
    # baseline kept): the tap the DEVICE_ADDED read then finds is the baseline's own, billed
    # from there.
    h = Host()
    h.run_pass(reading(2_000 * NS, (7, 0, 0)))
    h.run_pass(reading(2_030 * NS, (7, 1_000, 2_000)))
    h.run_pass(reading(2_040 * NS, None, listed=True))
    h.device_added(reading(2_045 * NS, (7, 1_050, 2_050)))
    h.light(light(2_050 * NS, (7, 1_300, 2_400)))
    h.run_pass(reading(2_060 * NS, None, listed=False))
    assert h.billed() == (1_300, 2_400)
    # The last pass read the NIC through libvirt's counters (no tap id): the tap may be that
    # very one, billed that way: never from zero either.
    h = Host()
    h.run_pass(reading(2_000 * NS, (7, 0, 0)))
    h.run_pass(reading(2_030 * NS, (None, 1_000, 2_000)))
    h.device_added(reading(2_035 * NS, (9, 1_050, 2_050)))
    h.light(light(2_045 * NS, (9, 1_300, 2_400)))
    h.run_pass(reading(2_060 * NS, None, listed=False))
    assert h.billed() == (1_000, 2_000)


def test_a_close_out_bills_a_plugged_tap_once() -> None:
    # Plugged after a pass, unplugged, then the VM destroyed: the close-out bills it from zero.
    h = Host()
    h.run_pass(reading(2_000 * NS, (7, 0, 0)))
    h.run_pass(reading(2_030 * NS, (7, 1_000, 2_000)))
    h.device_added(reading(2_035 * NS, (8, 0, 0)))
    h.light(light(2_045 * NS, (8, 300, 400)))
    h.light(light(2_046 * NS, (7, 1_200, 2_300)))
    h.stop(2_060 * NS)
    assert h.billed() == (1_500, 2_700)
    # Billed at a pass, then the VM destroyed: the close-out does not bill it again (a tail
    # keeps that pass's Sample, born taps included).
    h = Host()
    h.run_pass(reading(2_000 * NS, (7, 0, 0)))
    h.device_added(reading(2_005 * NS, (8, 0, 0)))
    h.light(light(2_010 * NS, (8, 300, 400)))
    h.run_pass(reading(2_030 * NS, (7, 1_000, 2_000)))
    assert h.billed() == (1_300, 2_400)
    h.light(light(2_040 * NS, (7, 1_100, 2_100)))
    h.stop(2_060 * NS)
    assert h.billed() == (1_400, 2_500)


STEPS = ("pass", "pass", "light", "grow", "grow", "unplug", "replug")


@given(st.lists(st.tuples(st.sampled_from(STEPS), st.integers(1, 5_000),
                          st.integers(1, 5_000), st.booleans()), max_size=40),
       st.booleans())
@settings(max_examples=300, deadline=None)
def test_every_tap_is_billed_up_to_its_last_reading_before_a_pass_and_never_twice(
        steps: list[tuple[str, int, int, bool]], stop: bool) -> None:
    """`listed` (the bool of a step): the XML still lists a NIC whose tap is gone, at a pass;
    libvirt's DEVICE_ADDED was heard, at a re-plug (`with_taps`: the new tap is followed).
    `stop`: the VM ends after the last step, and its close-out bills the rest."""
    h = Host()
    t = 2_000 * NS
    ifindex, rx, tx, attached = 7, 0, 0, True
    followed: set[int] = set()  # taps the last pass read: the light samples follow those
    last_read: dict[int, tuple[int, int]] = {}  # by tap: counters read by a pass or a sample
    billable: dict[int, tuple[int, int]] = {}  # by tap: what the passes so far must bill
    h.run_pass(reading(t, (ifindex, rx, tx)))
    followed, last_read[ifindex], billable[ifindex] = {ifindex}, (0, 0), (0, 0)
    for step, a, b, listed in steps:
        t += NS
        if step == "grow" and attached:
            rx, tx = rx + a, tx + b
        elif step == "light" and attached and ifindex in followed:
            h.light(light(t, (ifindex, rx, tx)))
            last_read[ifindex] = (rx, tx)
        elif step == "unplug" and attached:
            attached = False
            if ifindex in followed:  # the stop watch's sample: the RTM_DELLINK's counters
                h.light(light(t, (ifindex, rx, tx)))
                last_read[ifindex] = (rx, tx)
        elif step == "replug" and not attached:
            ifindex, rx, tx, attached = ifindex + 1, 0, 0, True
            if listed:  # heard: read at once, followed from then on
                h.device_added(reading(t, (ifindex, rx, tx)))
                followed.add(ifindex)
                last_read[ifindex] = (rx, tx)
        elif step == "pass":
            h.run_pass(reading(t, (ifindex, rx, tx) if attached else None, listed=listed))
            for k in followed:
                if k in last_read:
                    billable[k] = last_read[k]
            if attached:
                billable[ifindex] = last_read[ifindex] = (rx, tx)
            followed = {ifindex} if attached else set()
    if stop:
        t += NS
        h.stop(t)
        for k in followed:
            if k in last_read:
                billable[k] = last_read[k]
    assert h.billed() == (sum(v[0] for v in billable.values()),
                          sum(v[1] for v in billable.values()))
