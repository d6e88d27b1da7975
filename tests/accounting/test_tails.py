"""The daemon's in-memory tails: which incarnations a pass closes out, and light readings."""

from __future__ import annotations

from hostagent.accounting import tails
from hostagent.accounting.closeout import IoBytes, LightReading
from hostagent.accounting.readings import DomainReading, HostReading, ReadError
from hostagent.model import DomainInfo, NicCounters

NS = 10**9


def reading(uuid: str, domid: int, t_ns: int = 100 * NS) -> DomainReading:
    info = DomainInfo(uuid=uuid, name=uuid, domid=domid, vcpus=1, memory_bytes=1,
                      max_memory_bytes=1)
    return DomainReading(info=info, instance_id=uuid, t_wall_ns=t_ns, stats={})


def nic(mac: str, rx: int) -> NicCounters:
    return NicCounters(mac, "tap0", 7, guest_rx_bytes=rx, guest_tx_bytes=rx,
                       source="netlink-stats64")


def light(domid: int, t_ns: int, cpu_ns: int | None, *nics: NicCounters,
          io: IoBytes | None = None) -> LightReading:
    return LightReading("a", domid, t_ns, cpu_ns, nics=tuple(nics), io=io)


def test_only_domains_the_pass_no_longer_lists_or_reads_as_another_process_are_gone() -> None:
    t = {("gone", 1): tails.Tail(reading("gone", 1)),
         ("failing", 2): tails.Tail(reading("failing", 2)),
         ("withheld", 3): tails.Tail(reading("withheld", 3)),
         ("restarted", 4): tails.Tail(reading("restarted", 4)),
         ("same", 5): tails.Tail(reading("same", 5))}
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
    t = tails.Tail(reading("a", 1))
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
    t = tails.Tail(reading("a", 1, t_ns=100 * NS))
    assert tails.with_light(t, light(1, 100 * NS, 5)) == t


def test_a_close_reason_marks_only_that_domains_open_tails() -> None:
    t = {("a", 1): tails.Tail(reading("a", 1)), ("b", 2): tails.Tail(reading("b", 2)),
         ("a", 3): tails.Tail(reading("a", 3), reason="CRASHED")}
    out = tails.with_reason(t, "a", "DESTROYED")
    assert [out[k].reason for k in sorted(out)] == ["DESTROYED", "CRASHED", None]
    assert out[("a", 1)].closing().reason == "DESTROYED"
    assert out[("b", 2)].closing().reason == "GONE"
