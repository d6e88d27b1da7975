"""NICs of one domain that share a MAC (libvirt takes that, in any case): each NIC is billed
from its own tap, once (inventory.keyed_nics, sources/net.nic_counters, pass_reads,
accounting/assemble, device_deltas.nic_deltas), also across an upgrade from baselines that
kept one entry per MAC, a NIC hot-plugged with a MAC in use, and one unplugged; the light samples,
tails and unplug billing follow each tap by its NIC's key."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from hostagent import pass_reads
from hostagent.accounting import ledger, tails
from hostagent.accounting.assemble import sample_of
from hostagent.accounting.closeout import LightReading
from hostagent.accounting.inventory import keyed_nics, parse_domain_xml
from hostagent.accounting.readings import DomainReading, HostFacts, HostReading
from hostagent.accounting.sampling import ESTABLISHED, usage
from hostagent.accounting.unplug import with_unplugged
from hostagent.model import Baseline, Nic, NicBase, NicCounters, Owner, OwnerHint, Usage
from hostagent.source_model import DomainStats, LinkStats
from hostagent.sources.domain_files import FilesResult
from hostagent.sources.light import LightSampler, light_nics

NS = 10**9
MIB = 1 << 20
STORE_NS = 1_000 * NS
SETTINGS = ledger.Settings(node_id="h", time_format="unix", store_created_ns=STORE_NS)
UUID = "5eed0000-0000-4000-8000-00000000e001"
MAC = "52:54:00:de:ad:01"
KEY0 = f"{MAC}@vnet0"  # the first of the two NICs; the last keeps the MAC
STATS = {"cpu.time": 0, "balloon.rss": 1000}  # CPU and memory: nothing else missing


def domain_xml(*nics: tuple[str, str]) -> str:
    """A live domain XML with NICs (MAC as written, target dev), in that order."""
    ifaces = "".join(f"<interface type='network'><mac address='{mac}'/><source network='d'/>"
                     f"<target dev='{tap}'/><model type='virtio'/></interface>"
                     for mac, tap in nics)
    return (f"<domain type='kvm' id='4'><name>vm-net2</name><uuid>{UUID}</uuid>"
            f"<memory unit='KiB'>1048576</memory><vcpu>1</vcpu>"
            f"<devices>{ifaces}</devices></domain>")


TWO = domain_xml((MAC, "vnet0"), (MAC.upper(), "vnet1"))  # as the fuzzer's dupmac_in.xml
ONE = domain_xml((MAC, "vnet0"))


def links(taps: dict[str, tuple[int, int]]) -> dict[str, LinkStats]:
    """Host links by name (vnetN: ifindex 50 + N): (host rx = guest egress, host tx = guest
    ingress) bytes."""
    return {name: LinkStats(50 + int(name[4:]), name, "fe:54:00:00:00:01", rx, tx, "tun")
            for name, (rx, tx) in taps.items()}


def reading(xml: str, t_ns: int, taps: dict[str, tuple[int, int]] | None,
            links_error: str | None = None) -> DomainReading:
    """The collector's reading of the domain (pass_reads.domain_reading) from its XML and the
    host's links (None: the link dump failed with `links_error`)."""
    info = parse_domain_xml(xml)
    files = FilesResult(links=None if taps is None else links(taps), links_error=links_error)
    facts = HostFacts(pid=4, start_ticks=28, started_wall_ns=STORE_NS + NS, cgroup=None)
    return pass_reads.domain_reading(DomainStats(UUID, "vm-net2", 4, STATS), info,
                                     UUID, t_ns, files, (), {(UUID, 4): facts},
                                     timed_out=False)


def bill(prev: Baseline | None, r: DomainReading) -> tuple[Usage | None, Baseline]:
    return usage(prev, sample_of(r), store_created_ns=STORE_NS)


# --- keys ----------------------------------------------------------------------------------------


def test_nics_sharing_a_mac_get_one_key_each_the_last_keeps_the_mac() -> None:
    info = parse_domain_xml(TWO)
    assert [(n.mac, n.target, n.key) for n in info.nics] == [
        (MAC, "vnet0", KEY0), (MAC, "vnet1", MAC)]
    # the common case: every NIC's key is its MAC, the very tuple kept
    one = (Nic(MAC, "bridge", "vnet0"), Nic("52:54:00:de:ad:02", "bridge", "vnet1"))
    assert keyed_nics(one) == one and [n.key for n in one] == [n.mac for n in one]
    # no target dev, or two naming one: still one key each
    odd = keyed_nics((Nic(MAC, "vdpa", None), Nic(MAC, "bridge", "vnet1"),
                      Nic(MAC, "bridge", "vnet1"), Nic(MAC, "bridge", "vnet2")))
    assert [n.key for n in odd] == [f"{MAC}@#0", f"{MAC}@vnet1", f"{MAC}@vnet1+", MAC]


# --- the fuzzer's repro: 4 and 8 MiB a pass of guest egress ------------------------------------


def test_each_nic_is_billed_from_its_own_tap_once() -> None:
    # Before: the taps' counters were kept by MAC, so both NICs read vnet1's: 16 MiB a pass
    # billed for 12 (vnet1 twice, vnet0 never).
    prev: Baseline | None = None
    for i in range(4):
        r = reading(TWO, 2_000 * NS + i * NS, {"vnet0": (4 * MIB * i, 2 * MIB * i),
                                               "vnet1": (8 * MIB * i, 4 * MIB * i)})
        assert r.netlink_nics is not None and set(r.netlink_nics) == {KEY0, MAC}
        u, prev = bill(prev, r)
        if i:
            assert u is not None
            assert (u.net_egress_bytes, u.net_ingress_bytes) == (12 * MIB, 6 * MIB)
            assert not u.missing
    assert prev is not None and set(prev.nics) == {KEY0, MAC}
    assert (prev.nics[KEY0].ifindex, prev.nics[MAC].ifindex) == (50, 51)


def test_each_nic_sharing_a_mac_is_listed_missing_on_its_own() -> None:
    r = reading(TWO, 2_000 * NS, None, links_error="netlink link dump failed: EIO")
    s = sample_of(r)
    assert {k: v for k, v in s.missing.items() if k.startswith("net:")} == {
        f"net:{KEY0}": "netlink link dump failed: EIO",
        f"net:{MAC}": "netlink link dump failed: EIO"}
    r = reading(TWO, 2_000 * NS, {"vnet1": (8, 4)})  # vnet0 not found
    s = sample_of(r)
    assert "vnet0 not found" in s.missing[f"net:{KEY0}"] and f"net:{MAC}" not in s.missing
    assert [n.ifname for n in s.nics] == ["vnet1"]


def test_missing_tap_defers_its_bytes_to_its_next_reading() -> None:
    _, b = bill(None, reading(TWO, 2_000 * NS, {"vnet0": (0, 0), "vnet1": (0, 0)}))
    u, b = bill(b, reading(TWO, 2_001 * NS, {"vnet1": (8 * MIB, 0)}))
    assert u is not None and u.net_egress_bytes == 8 * MIB and f"net:{KEY0}" in u.missing
    u, b = bill(b, reading(TWO, 2_002 * NS, {"vnet0": (8 * MIB, 0), "vnet1": (16 * MIB, 0)}))
    assert u is not None and u.net_egress_bytes == 16 * MIB  # vnet0's two passes, vnet1's one


# --- keyed otherwise than the baseline ---------------------------------------------------------


def test_a_baseline_of_the_version_that_kept_one_entry_per_mac_is_never_billed_again() -> None:
    # What the older version persisted for the two NICs: one entry, the MAC's, holding the
    # counters of the last NIC with it (vnet1's: it billed those for both NICs).
    stored = (b'{"v":1,"instance_id":"' + UUID.encode() + b'","incarnation":"4:28",'
              b'"t_wall_ns":2000000000000,"cpu_ns":0,"cpu_carry_ns":0,"gpu_carry_ns":0,'
              b'"nics":{"52:54:00:de:ad:01":[51,4194304,83886080]},"disks":{},'
              b'"cpu_t_wall_ns":2000000000000,"cpu_source":"libvirt"}')
    prev = Baseline.from_dict(orjson.loads(stored))
    assert prev.nics == {MAC: NicBase(51, 4 * MIB, 80 * MIB)}
    # vnet0 has moved 10 GiB in its life, never billed on its own; vnet1 8 MiB more since.
    taps = {"vnet0": (10 << 30, 1 << 30), "vnet1": (88 * MIB, 8 * MIB)}
    u, b = bill(prev, reading(TWO, 2_001 * NS, taps))
    assert u is not None
    # vnet1 on from its entry; vnet0 counted on from now, never from zero (10 GiB)
    assert (u.net_egress_bytes, u.net_ingress_bytes) == (8 * MIB, 4 * MIB)
    assert u.missing == {f"net:{KEY0}": ESTABLISHED}
    assert set(b.nics) == {KEY0, MAC}
    taps = {"vnet0": ((10 << 30) + 4 * MIB, 1 << 30), "vnet1": (96 * MIB, 8 * MIB)}
    u, b = bill(b, reading(TWO, 2_002 * NS, taps))
    assert u is not None and u.net_egress_bytes == 12 * MIB and not u.missing


def test_a_nic_hot_plugged_with_a_mac_in_use_counts_from_zero_the_other_goes_on() -> None:
    _, b = bill(None, reading(ONE, 2_000 * NS, {"vnet0": (100 * MIB, 0)}))
    assert set(b.nics) == {MAC}
    # libvirt appends the new NIC: it keeps the MAC, the first becomes MAC@vnet0
    u, b = bill(b, reading(TWO, 2_001 * NS, {"vnet0": (104 * MIB, 0), "vnet1": (3 * MIB, 0)}))
    assert u is not None and u.net_egress_bytes == 4 * MIB + 3 * MIB and not u.missing
    assert (b.nics[KEY0].guest_tx_bytes, b.nics[MAC].guest_tx_bytes) == (104 * MIB, 3 * MIB)


def test_the_nic_left_when_its_twin_is_unplugged_goes_on_from_its_own_entry() -> None:
    _, b = bill(None, reading(TWO, 2_000 * NS, {"vnet0": (100 * MIB, 0), "vnet1": (7, 0)}))
    # vnet1 unplugged: vnet0's NIC is the MAC's alone again, under the key vnet1 had
    u, b = bill(b, reading(ONE, 2_001 * NS, {"vnet0": (104 * MIB, 0)}))
    assert u is not None and u.net_egress_bytes == 4 * MIB and not u.missing
    assert b.nics == {MAC: NicBase(50, 0, 104 * MIB)}


def test_a_re_created_tap_still_counts_from_zero() -> None:
    _, b = bill(None, reading(TWO, 2_000 * NS, {"vnet0": (100 * MIB, 0), "vnet1": (9, 0)}))
    r = reading(TWO, 2_001 * NS, {"vnet0": (104 * MIB, 0), "vnet1": (2 * MIB, 0)})
    assert r.netlink_nics is not None
    nics = dict(r.netlink_nics)
    nics[MAC] = dataclasses.replace(nics[MAC], ifindex=77)  # vnet1 deleted and made again
    u, b = bill(b, dataclasses.replace(r, netlink_nics=nics))
    assert u is not None and u.net_egress_bytes == 4 * MIB + 2 * MIB


# --- light samples, tails and the unplug billing -------------------------------------------------


def light_of(r: DomainReading, t_ns: int, counters: dict[int, tuple[int, int]]) -> LightReading:
    """A light sample of `r`'s taps (sources/light.py) with host (rx, tx) by ifindex."""
    assert r.netlink_nics is not None
    want = light_nics(r.info.nics, tuple(r.netlink_nics.values()))
    missing: dict[str, str] = {}
    nics = LightSampler._nics(want, counters, None, missing)
    return LightReading(UUID, 4, t_ns, 0, nics, None, missing)


def test_light_samples_follow_each_tap_and_merge_by_nic() -> None:
    r = reading(TWO, 2_000 * NS, {"vnet0": (1, 2), "vnet1": (3, 4)})
    one = light_of(r, 2_010 * NS, {50: (10, 20), 51: (30, 40)})
    assert [(n.key, n.ifindex, n.guest_tx_bytes) for n in one.nics] == [
        (KEY0, 50, 10), (MAC, 51, 30)]
    two = light_of(r, 2_020 * NS, {50: (11, 21)})  # vnet1 gone from the dump
    assert two.missing == {f"net:{MAC}": "ifindex 51 gone"}
    merged = tails.newer_light(one, two)
    assert merged is not None
    assert sorted((n.ifindex, n.guest_tx_bytes) for n in merged.nics) == [(50, 11), (51, 30)]


class Everyone:
    def resolve(self, instance_id: str, hint: OwnerHint | None, *,
                build_id: str | None = None) -> Owner:
        return Owner(user_id="u", org_id=None, source="test")


@dataclass
class Host:
    """Baselines and tails across passes, as hostagent/collector.py keeps them."""

    baselines: dict[str, Baseline] = field(default_factory=dict)
    tails: dict[tails.Key, tails.Tail] = field(default_factory=dict)
    usages: list[Usage] = field(default_factory=list)

    def run_pass(self, r: DomainReading) -> None:
        host = HostReading(t_wall_ns=r.t_wall_ns, domains=(r,), listed={UUID: "vm-net2"})
        closing = tails.ended(self.tails, host)
        acc, samples = ledger.account(self.baselines, host.domains, owners=Everyone(),
                                      settings=SETTINGS, now_ns=r.t_wall_ns, closing=closing,
                                      live=self.tails)
        self.baselines.update({b.instance_id: b for b in acc.baselines})
        self.tails = tails.after_pass(self.tails, host, [c.key for c in closing], samples)
        self.usages.extend(acc.usages)

    def run_pass_without_it(self, t_ns: int) -> None:
        """A pass that no longer lists the domain: its tail is closed out."""
        host = HostReading(t_wall_ns=t_ns, domains=())
        closing = tails.ended(self.tails, host)
        acc, _ = ledger.account(self.baselines, (), owners=Everyone(), settings=SETTINGS,
                                now_ns=t_ns, closing=closing, live=self.tails)
        self.tails = tails.after_pass(self.tails, host, [c.key for c in closing], [])
        self.usages.extend(acc.usages)

    def light(self, reading: LightReading) -> None:
        key = (reading.uuid, reading.domid)
        self.tails[key] = tails.with_light(self.tails[key], reading)


def test_a_nic_unplugged_between_passes_is_billed_up_to_its_tap_s_end_once() -> None:
    for gone in ("vnet0", "vnet1"):
        h = Host()
        first = reading(TWO, 2_000 * NS, {"vnet0": (0, 0), "vnet1": (0, 0)})
        h.run_pass(first)
        h.run_pass(reading(TWO, 2_030 * NS, {"vnet0": (4 * MIB, 0), "vnet1": (8 * MIB, 0)}))
        # the last light sample, at the unplugged tap's deletion
        h.light(light_of(first, 2_040 * NS, {50: (5 * MIB, 0), 51: (10 * MIB, 0)}))
        left = "vnet1" if gone == "vnet0" else "vnet0"
        grown = {"vnet0": 6 * MIB, "vnet1": 12 * MIB}[left]
        h.run_pass(reading(ONE.replace("vnet0", left), 2_060 * NS, {left: (grown, 0)}))
        h.run_pass(reading(ONE.replace("vnet0", left), 2_090 * NS, {left: (grown + 1, 0)}))
        # vnet0 moved 4 + 1 (+ 1 + 1), vnet1 8 + 2 (+ 2 + 1): each byte once, the gone tap's
        # up to its end, the one left never from zero
        total = {"vnet0": 5 * MIB, "vnet1": 10 * MIB}[gone] + grown + 1
        assert sum(u.net_egress_bytes for u in h.usages) == total
        assert set(h.baselines[UUID].nics) == {MAC}


def test_unplug_tells_the_twin_taps_apart() -> None:
    r = reading(TWO, 2_000 * NS, {"vnet0": (1, 2), "vnet1": (3, 4)})
    tail = tails.Tail.of(r)
    tail = tails.with_light(tail, light_of(r, 2_010 * NS, {50: (10, 20), 51: (30, 40)}))
    now = sample_of(reading(ONE, 2_020 * NS, {"vnet0": (11, 21)}))
    assert with_unplugged(now, tail).gone_taps == ((51, 40, 30),)
    # libvirt's counters (no ifindex) of the NIC left: still read, by its key
    lib = dataclasses.replace(now, nics=(NicCounters(MAC, "vnet1", None, 1, 1, "libvirt",
                                                     MAC),))
    assert with_unplugged(lib, tail).gone_taps == ((50, 20, 10),)


# --- property: Σ billed = Σ the taps' growth -----------------------------------------------------

MACS = ["52:54:00:de:ad:01", "52:54:00:DE:AD:01", "52:54:00:de:ad:02"]


@settings(max_examples=200, deadline=None)
@given(
    macs=st.lists(st.sampled_from(MACS), min_size=1, max_size=4),
    passes=st.lists(st.lists(st.tuples(st.integers(0, 10 * MIB), st.integers(0, 10 * MIB),
                                       st.booleans()), min_size=4, max_size=4),
                    min_size=1, max_size=8),
)
def test_billed_nic_bytes_sum_to_the_taps_growth(
        macs: list[str], passes: list[list[tuple[int, int, bool]]]) -> None:
    """NICs with MACs from a small pool (sharing one often, in either case), each on its own
    tap; every pass each tap grows, or is not found (its growth deferred). Over the passes,
    Σ egress and Σ ingress billed equal Σ of the taps' growth since the first reading."""
    taps = [f"vnet{i}" for i in range(len(macs))]  # ifindex 50, 51, ...
    xml = domain_xml(*zip(macs, taps, strict=True))
    host = {t: [0, 0] for t in taps}  # rx (guest egress), tx (guest ingress)
    prev: Baseline | None = None
    egress = ingress = 0
    t_ns = 2_000 * NS
    _, prev = bill(None, reading(xml, t_ns, dict.fromkeys(taps, (0, 0))))
    for step in [*passes, [(0, 0, True)] * 4]:  # a last pass that finds every tap
        t_ns += NS
        found = {}
        for tap, (rx, tx, seen) in zip(taps, step, strict=False):
            host[tap][0] += rx
            host[tap][1] += tx
            if seen:
                found[tap] = (host[tap][0], host[tap][1])
        u, prev = bill(prev, reading(xml, t_ns, found))
        if u is not None:
            egress += u.net_egress_bytes
            ingress += u.net_ingress_bytes
    assert egress == sum(rx for rx, _ in host.values())
    assert ingress == sum(tx for _, tx in host.values())


def test_a_domain_gone_between_passes_is_closed_out_with_each_taps_last_counters() -> None:
    h = Host()
    first = reading(TWO, 2_000 * NS, {"vnet0": (0, 0), "vnet1": (0, 0)})
    h.run_pass(first)
    h.run_pass(reading(TWO, 2_030 * NS, {"vnet0": (4 * MIB, 0), "vnet1": (8 * MIB, 0)}))
    h.light(light_of(first, 2_040 * NS, {50: (5 * MIB, 0), 51: (10 * MIB, 0)}))
    h.run_pass_without_it(2_060 * NS)
    assert sum(u.net_egress_bytes for u in h.usages) == 15 * MIB
