"""The daemon's in-memory tails: which incarnations a pass closes out, and light readings."""

from __future__ import annotations

import dataclasses

from hostagent.accounting import tails
from hostagent.accounting.closeout import IoBytes, LightReading
from hostagent.accounting.readings import DomainReading, HostFacts, HostReading, ReadError
from hostagent.model import (
    CPU_FROM_CGROUP,
    CPU_FROM_LIBVIRT,
    Baseline,
    DomainInfo,
    Nic,
    NicCounters,
)
from hostagent.source_model import CgroupPaths, CgroupReading, ControllerDir

NS = 10**9


def reading(uuid: str, domid: int, t_ns: int = 100 * NS) -> DomainReading:
    info = DomainInfo(uuid=uuid, name=uuid, domid=domid, vcpus=1, memory_bytes=1,
                      max_memory_bytes=1)
    return DomainReading(info=info, instance_id=uuid, t_wall_ns=t_ns, stats={})


def nic(mac: str, rx: int, ifindex: int | None = None) -> NicCounters:
    """A light reading's NIC: its own tap (`ifindex`: by default, one per MAC)."""
    tap = ifindex if ifindex is not None else sum(map(ord, mac))
    return NicCounters(mac, f"tap-{mac}", tap, guest_rx_bytes=rx, guest_tx_bytes=rx,
                       source="netlink-stats64")


def light(domid: int, t_ns: int, cpu_ns: int | None, *nics: NicCounters,
          io: IoBytes | None = None) -> LightReading:
    return LightReading("a", domid, t_ns, cpu_ns, nics=tuple(nics), io=io)


def test_only_domains_the_pass_no_longer_lists_or_reads_as_another_process_are_gone() -> None:
    t = {("gone", 1): tails.Tail.of(reading("gone", 1)),
         ("failing", 2): tails.Tail.of(reading("failing", 2)),
         ("withheld", 3): tails.Tail.of(reading("withheld", 3)),
         ("restarted", 4): tails.Tail.of(reading("restarted", 4)),
         ("same", 5): tails.Tail.of(reading("same", 5))}
    host = HostReading(
        t_wall_ns=130 * NS,
        domains=(reading("restarted", 9, 130 * NS), reading("same", 5, 130 * NS)),
        errors=(ReadError("failing", "failing", "stats", "call hung"),),
        listed={"withheld": "withheld", "restarted": "restarted", "same": "same"})
    assert sorted(tails.gone_keys(t, host)) == [("gone", 1), ("restarted", 4)]
    closing = tails.ended(t, host)
    assert [c.key for c in closing] == [("gone", 1), ("restarted", 4)]
    after = tails.after_pass(t, host, [c.key for c in closing])
    assert sorted(after) == [("failing", 2), ("restarted", 9), ("same", 5), ("withheld", 3)]
    assert after[("same", 5)].anchor.t_wall_ns == 130 * NS


def test_a_light_reading_without_cpu_never_replaces_the_last_good_one() -> None:
    t = tails.Tail.of(reading("a", 1))
    good = light(1, 102 * NS, 7 * NS, nic("m1", 10), io=IoBytes(5, 6))
    t = tails.with_light(t, good)
    assert t.latest == good and t.anchor_io == IoBytes(5, 6)
    assert tails.with_light(t, light(1, 104 * NS, None)) == t  # the cgroup is gone
    assert tails.with_light(t, light(2, 104 * NS, 9 * NS)) == t  # another process
    assert tails.with_light(t, light(1, 101 * NS, 9 * NS)) == t  # older
    later = tails.with_light(t, light(1, 104 * NS, 9 * NS, nic("m2", 3)))
    assert later.latest is not None and later.latest.cpu_ns == 9 * NS
    # a NIC the later dump missed keeps its last value; io.stat too; anchor_io stays the first
    assert {n.mac for n in later.latest.nics} == {"m1", "m2"}
    assert later.latest.io == IoBytes(5, 6) and later.anchor_io == IoBytes(5, 6)


def test_a_light_reading_taken_before_the_anchor_is_ignored() -> None:
    t = tails.Tail.of(reading("a", 1, t_ns=100 * NS))
    assert tails.with_light(t, light(1, 100 * NS, 5)) == t


def test_a_close_reason_marks_only_that_domains_open_tails() -> None:
    t = {("a", 1): tails.Tail.of(reading("a", 1)), ("b", 2): tails.Tail.of(reading("b", 2)),
         ("a", 3): dataclasses.replace(tails.Tail.of(reading("a", 3)), reason="CRASHED")}
    out = tails.with_reason(t, "a", "DESTROYED")
    assert [out[k].reason for k in sorted(out)] == ["DESTROYED", "CRASHED", None]
    assert out[("a", 1)].closing().reason == "DESTROYED"
    assert out[("b", 2)].closing().reason == "GONE"


class Stats(dict[str, object]):
    """libvirt's stats dict, weakly referenceable: the test sees when it is freed."""


def test_a_tail_keeps_the_anchors_sample_not_libvirts_stats_dict() -> None:
    """Between passes every running domain has a tail; the anchor's stats dict (~5.7 KB a lab
    guest) is not kept, and the close-out bills from the Sample the pass made of it."""
    import gc
    import weakref

    from hostagent.accounting import ledger
    from hostagent.accounting.assemble import sample_of
    from hostagent.model import Disk, Owner

    info = DomainInfo(uuid="a", name="vm-a", domid=1, vcpus=2, memory_bytes=2 << 30,
                      max_memory_bytes=2 << 30, disks=(Disk("vda", "disk", None),))
    stats = Stats({"state.state": 1, "cpu.time": 7 * NS, "balloon.current": 1 << 20,
                   "balloon.rss": 300_000, "block.count": 1, "block.0.name": "vda",
                   "block.0.rd.bytes": 4096, "block.0.wr.bytes": 8192,
                   "block.0.allocation": 1 << 30, "block.0.capacity": 8 << 30})
    r = DomainReading(info=info, instance_id="a", t_wall_ns=100 * NS, stats=stats)
    pass_sample = sample_of(r)
    host = HostReading(domains=(r,), errors=(), listed={"a": "vm-a"}, path="bulk",
                       t_wall_ns=100 * NS)
    t = tails.after_pass({}, host, [], [pass_sample])[("a", 1)]
    assert t.sample is pass_sample  # made once, by the pass
    assert t.anchor.stats == {} and t.anchor.cgroup is None and t.anchor.info is info
    gone = weakref.ref(stats)
    del stats, r, host
    gc.collect()
    assert gone() is None
    # The domain is gone at the next pass: its close-out bills the anchor's disks and CPU.
    closing = tails.ended({("a", 1): t}, HostReading(domains=(), errors=(), listed={},
                                                    path="bulk", t_wall_ns=130 * NS))
    (c,) = closing
    assert c.sample is pass_sample

    class NoOwners:
        def resolve(self, instance_id: str, hint: object, *, build_id: str | None = None
                    ) -> Owner:
            return Owner("u", "o", "test")

    settings = ledger.Settings(node_id="h", time_format="unix", store_created_ns=0,
                               count_preexisting=True)
    acc = ledger.account({}, [], owners=NoOwners(), settings=settings, now_ns=130 * NS,
                         closing=closing)[0]
    (u,) = acc.usages
    assert (u.cpu_ns, u.disk_read_bytes, u.disk_write_bytes) == (7 * NS, 4096, 8192)
    assert u.storage_bytes == 1 << 30


_VM_CPU = CgroupPaths(cpu=ControllerDir("/machine.slice/vm/libvirt", 2), memory=None, io=None,
                      unified=None)


def _cgroup(cpu_ns: int | None, *, gone: bool = False) -> CgroupReading:
    return CgroupReading(cpu_ns=cpu_ns, memory_current_bytes=None,
                         memory_working_set_bytes=None, memory_limit_bytes=None,
                         io_read_bytes=None, io_write_bytes=None, io_source=None, pressure=None,
                         cpu_gone=gone)


def on_cgroup(uuid: str, domid: int, t_ns: int, cpu_ns: int | None, *, gone: bool = False,
              paths: CgroupPaths | None = _VM_CPU) -> DomainReading:
    """A reading whose CPU comes from its VM cgroup (`gone`: that cgroup was removed)."""
    r = reading(uuid, domid, t_ns)
    return dataclasses.replace(r, facts=HostFacts(pid=10 + domid, start_ticks=500 + domid,
                                                  started_wall_ns=NS, cgroup=paths),
                               cgroup=_cgroup(cpu_ns, gone=gone))


def test_a_listed_vm_whose_cgroup_was_removed_after_a_read_of_it_has_ended() -> None:
    """libvirt's answer during a destroy lists the VM as running, its cgroup already removed:
    the incarnation ended (a populated cgroup cannot be removed) and the pass closes it out
    from its tail, never billing the stale reading over the tail's final counters."""
    read_before = tails.Tail.of(on_cgroup("a", 1, 100 * NS, 7 * NS))
    assert read_before.sample.cpu_ns == 7 * NS
    never_read = tails.Tail.of(on_cgroup("b", 2, 100 * NS, None))  # the path never had it
    light_only = tails.with_light(tails.Tail.of(on_cgroup("c", 3, 100 * NS, None)),
                                  LightReading("c", 3, 105 * NS, 8 * NS))
    t = {("a", 1): read_before, ("b", 2): never_read, ("c", 3): light_only,
         ("d", 4): tails.Tail.of(on_cgroup("d", 4, 100 * NS, 9 * NS))}
    now = 130 * NS
    host = HostReading(
        t_wall_ns=now,
        domains=(on_cgroup("a", 1, now, None, gone=True), on_cgroup("b", 2, now, None, gone=True),
                 on_cgroup("c", 3, now, None, gone=True), on_cgroup("d", 4, now, 10 * NS)),
        listed={"a": "a", "b": "b", "c": "c", "d": "d"})
    kept, gone = tails.ended_while_listed(t, {}, host)
    assert gone == ("a", "c")
    assert [r.uuid for r in kept.domains] == ["b", "d"] and sorted(kept.listed) == ["b", "d"]
    assert sorted(tails.gone_keys(t, kept)) == [("a", 1), ("c", 3)]
    closing = tails.ended(t, kept)
    assert [c.light.cpu_ns if c.light else None for c in closing] == [None, 8 * NS]
    # nothing removed: the same reading object back
    same = dataclasses.replace(host, domains=host.domains[3:])
    assert tails.ended_while_listed(t, {}, same) == (same, ())


def test_after_its_close_out_a_later_stale_answer_of_the_process_is_not_billed() -> None:
    """A destroy that outlasts a pass: the next pass gets the same stale answer, with no tail
    left; the baseline the close-out wrote (this incarnation, CPU from its cgroup) says it
    ended. A baseline of another incarnation, or of libvirt's CPU, says nothing."""
    stale = on_cgroup("a", 1, 140 * NS, None, gone=True)
    host = HostReading(t_wall_ns=140 * NS, domains=(stale,), listed={"a": "a"})
    closed = Baseline("a", "1:501", 130 * NS, 7 * NS, cpu_source=CPU_FROM_CGROUP)
    assert tails.ended_while_listed({}, {"a": closed}, host)[1] == ("a",)
    for other in (dataclasses.replace(closed, incarnation="9:509"),
                  dataclasses.replace(closed, cpu_source=CPU_FROM_LIBVIRT),
                  dataclasses.replace(closed, cpu_ns=None)):
        assert tails.ended_while_listed({}, {"a": other}, host) == (host, ())
    # a cgroup merely unreadable (not removed) is no end
    unreadable = dataclasses.replace(stale, cgroup=_cgroup(None))
    host2 = dataclasses.replace(host, domains=(unreadable,))
    assert tails.ended_while_listed({}, {"a": closed}, host2) == (host2, ())


def _anchored(uuid: str, domid: int, t_ns: int, *taps: tuple[str, int]) -> tails.Tail:
    """A tail anchored at a pass's reading that matched `taps` ((mac, ifindex) each)."""
    r = dataclasses.replace(reading(uuid, domid, t_ns), netlink_nics={
        mac: NicCounters(mac, f"tap{ifindex}", ifindex, guest_rx_bytes=t_ns,
                         guest_tx_bytes=t_ns, source="netlink-stats64")
        for mac, ifindex in taps})
    return tails.Tail.of(r)


def test_the_watch_moves_when_a_pass_brings_new_tails_or_other_taps() -> None:
    """The stop watch keeps a deleted tap's final counters only for the taps it follows; a
    pass must have it follow a NIC hot-plugged into a running VM (same tail key, one tap
    more) or re-plugged on a new tap (same MAC, another ifindex). Before, only new tail keys
    moved it: a hot-plugged NIC's unplug was never heard where passes come more often than
    light samples, and its bytes since the last pass were lost (lab: 67,704 of 68,336)."""
    one = {("a", 1): _anchored("a", 1, 100 * NS, ("m0", 7))}
    # the next pass: the same tap, new counters (a new anchor): nothing moves
    same = {("a", 1): _anchored("a", 1, 101 * NS, ("m0", 7))}
    assert not tails.watch_moved(one, same)
    assert not tails.watch_moved(one, {})  # tails closed out: nothing to watch anew
    assert tails.watch_moved({}, one)  # a new domain
    assert tails.watch_moved(one, {**same, ("a", 2): _anchored("a", 2, 101 * NS)})
    # a NIC hot-plugged into the running VM: one tap more under the same key
    plugged = {("a", 1): _anchored("a", 1, 101 * NS, ("m0", 7), ("m1", 9))}
    assert tails.watch_moved(one, plugged)
    assert not tails.watch_moved(plugged, plugged)
    # re-plugged: the same MAC on a new tap
    assert tails.watch_moved(one, {("a", 1): _anchored("a", 1, 101 * NS, ("m0", 8))})
    # unplugged: its tap is gone (the thread drops it from the watch)
    assert tails.watch_moved(plugged, same)
    # taps found again where a pass had none (a link dump that failed once)
    bare = dataclasses.replace(reading("a", 1, 101 * NS), netlink_nics=None)
    assert tails.watch_moved({("a", 1): tails.Tail.of(bare)}, same)
    assert tails.watch_moved(same, {("a", 1): tails.Tail.of(bare)})


def test_a_re_plugged_nic_keeps_its_old_taps_final_counters_beside_its_new_tap() -> None:
    # The same NIC (MAC) on a new tap after a DEVICE_ADDED read: a later light reading of the
    # new tap alone must not drop the old tap's final counters (the next pass bills them).
    t = tails.Tail.of(reading("a", 1))
    t = tails.with_light(t, light(1, 102 * NS, 7 * NS, nic("m1", 500, ifindex=7)))
    t = tails.with_light(t, light(1, 104 * NS, 8 * NS, nic("m1", 30, ifindex=8)))
    assert t.latest is not None
    assert sorted((n.ifindex, n.guest_rx_bytes) for n in t.latest.nics) == [(7, 500), (8, 30)]
    # the same taps in the same order: the new reading as it is (no merge)
    same = light(1, 106 * NS, 9 * NS, nic("m1", 40, ifindex=8), nic("m1", 500, ifindex=7))
    again = tails.with_light(t, same)
    assert again.latest is same


def _with_nics(r: DomainReading, *nics: NicCounters) -> DomainReading:
    """`r` with these NICs in its XML, each read on its tap."""
    info = dataclasses.replace(r.info, nics=tuple(
        Nic(mac=n.mac, kind="ethernet", target=n.ifname) for n in nics))
    return dataclasses.replace(r, info=info, netlink_nics={n.mac: n for n in nics})


def test_a_device_added_read_moves_the_anchors_taps_only() -> None:
    anchor = _with_nics(reading("a", 1, 100 * NS), nic("m1", 5, ifindex=7))
    t = tails.with_light(tails.Tail.of(anchor), light(1, 102 * NS, 7 * NS,
                                                      nic("m1", 9, ifindex=7)))
    plugged = _with_nics(reading("a", 1, 103 * NS), nic("m1", 10, ifindex=7),
                         nic("m2", 0, ifindex=8))
    moved = tails.with_taps(t, plugged)
    assert moved is not t
    assert moved.anchor.netlink_nics == plugged.netlink_nics
    assert moved.anchor.info is plugged.info
    # what the next pass and a close-out bill from stays the last pass's
    assert moved.anchor.t_wall_ns == 100 * NS and moved.sample is t.sample
    assert moved.latest is t.latest and moved.anchor_io is t.anchor_io
    assert moved.born == {8}  # the tap the last pass's Sample lacks
    # a later read that no longer finds it (unplugged, another NIC plugged) keeps it born
    replugged = tails.with_taps(moved, _with_nics(reading("a", 1, 104 * NS),
                                                  nic("m1", 11, ifindex=7),
                                                  nic("m3", 0, ifindex=9)))
    assert replugged.born == {8, 9}
    assert tails.with_light(replugged, light(1, 105 * NS, 8 * NS)).born == {8, 9}
    assert replugged.closing().born == {8, 9}
    # the same taps again, another process, or no tap reading: nothing moves
    assert tails.with_taps(moved, plugged) is moved
    assert tails.with_taps(t, _with_nics(reading("a", 2, 103 * NS), nic("m2", 0, 8))) is t
    assert tails.with_taps(t, dataclasses.replace(plugged, netlink_nics=None)) is t


def test_a_pass_that_reads_a_domain_without_a_followed_tap_asks_for_its_final_sample() -> None:
    """`taps_gone`: the incarnations a pass reads without a tap their tail follows (a NIC
    unplugged, or re-plugged on a new tap), whose final light sample the pass then asks for;
    a tap read under another key (its XML re-read), a NIC never matched to a tap, another
    process or a domain without a tail asks for nothing."""
    t = {("a", 1): _anchored("a", 1, 100 * NS, ("m0", 7), ("m1", 9)),
         ("b", 2): _anchored("b", 2, 100 * NS, ("m0", 11)),
         ("c", 3): _anchored("c", 3, 100 * NS, ("m0", 12)),
         ("d", 4): _anchored("d", 4, 100 * NS, ("m0", 13))}

    def host(*rs: DomainReading) -> HostReading:
        return HostReading(t_wall_ns=130 * NS, domains=rs, listed={r.uuid: r.uuid for r in rs})

    def now(uuid: str, domid: int, *taps: tuple[str, int]) -> DomainReading:
        return _anchored(uuid, domid, 130 * NS, *taps).anchor

    same = host(now("a", 1, ("m0", 7), ("m1", 9)), now("b", 2, ("m0", 11)),
                now("c", 3, ("m0", 12)), now("d", 4, ("m0", 13)))
    assert tails.taps_gone(t, same) == []
    changed = host(
        now("a", 1, ("m0", 7)),  # m1 unplugged
        now("b", 2, ("m0", 21)),  # re-plugged: the same MAC on a new tap
        now("c", 3, ("key-of-m0", 12)),  # the same tap under another key
        now("d", 5, ("m0", 14)),  # another process (gone_keys closes the old one)
        now("e", 6))  # no tail
    assert tails.taps_gone(t, changed) == [("a", 1), ("b", 2)]
    no_dump = dataclasses.replace(now("c", 3), netlink_nics=None)  # the link dump failed
    assert tails.taps_gone(t, host(no_dump)) == [("c", 3)]
    never_matched = {("a", 1): tails.Tail.of(dataclasses.replace(reading("a", 1), netlink_nics={
        "m0": NicCounters("m0", "tap0", None, guest_rx_bytes=1, guest_tx_bytes=1,
                          source="libvirt")}))}
    assert tails.taps_gone(never_matched, host(now("a", 1))) == []
