"""The hand-over of light readings from the sampler thread to trio (hostagent/light_inbox.py)."""

from __future__ import annotations

import threading
import time

from hostagent.accounting.closeout import IoBytes, LightReading
from hostagent.light_inbox import LightInbox
from hostagent.model import NicCounters


def reading(uuid: str, t_ns: int, cpu_ns: int | None, *, domid: int = 1,
            nics: tuple[NicCounters, ...] = (), io: IoBytes | None = None) -> LightReading:
    return LightReading(uuid=uuid, domid=domid, t_wall_ns=t_ns, cpu_ns=cpu_ns, nics=nics,
                        io=io, missing={} if cpu_ns is not None else {"cpu": "absent"})


def nic(rx: int, tx: int) -> NicCounters:
    return NicCounters("52:54:00:00:00:01", "tap1", 7, rx, tx, "netlink-stats64")


def latest(got: list[LightReading]) -> dict[tuple[str, int], LightReading]:
    """The last reading per incarnation, as merge_into leaves it (oldest first)."""
    return {(r.uuid, r.domid): r for r in got}


def test_take_gives_the_newest_reading_per_domain_once() -> None:
    box = LightInbox()
    box.begin()
    box.put({"a": reading("a", 1, 10), "b": reading("b", 1, 20)})
    box.begin()
    box.put({"a": reading("a", 2, 11)})
    got = latest(box.take())
    assert {u: r.cpu_ns for (u, _), r in got.items()} == {"a": 11, "b": 20}
    assert box.take() == []


def test_a_reading_without_cpu_never_replaces_a_good_one() -> None:
    """Samples after a destroy read no CPU (the cgroup is gone): the last good one stays."""
    box = LightInbox()
    box.put({"a": reading("a", 1, 10, nics=(nic(5, 6),))})
    box.put({"a": reading("a", 2, None)})
    box.put({"a": reading("a", 3, None)})
    assert [(r.t_wall_ns, r.cpu_ns, r.nics) for r in box.take()] == [(1, 10, (nic(5, 6),))]
    box.put({"a": reading("a", 4, None)})
    assert box.take() == []


def test_a_nic_missing_from_a_later_reading_keeps_its_last_counters() -> None:
    """A destroyed VM's tap is deleted before its cgroup empties: a sample in between has the
    CPU but not the tap, whose last counters must survive the merge."""
    box = LightInbox()
    box.put({"a": reading("a", 1, 10, nics=(nic(5, 6),), io=IoBytes(1, 2))})
    box.put({"a": reading("a", 2, 12)})
    first, last = box.take()
    assert (first.t_wall_ns, first.io) == (1, IoBytes(1, 2))  # the tail's anchor_io
    assert (last.t_wall_ns, last.cpu_ns, last.nics, last.io) == (2, 12, (nic(5, 6),),
                                                                 IoBytes(1, 2))


def test_a_restart_between_two_takes_keeps_both_incarnations() -> None:
    box = LightInbox()
    box.put({"a": reading("a", 1, 500, domid=1)})
    box.put({"a": reading("a", 2, 3, domid=2)})  # a new QEMU process counts from zero
    assert {k: r.cpu_ns for k, r in latest(box.take()).items()} == {("a", 1): 500,
                                                                   ("a", 2): 3}


def test_wait_idle_waits_for_the_sample_in_flight_and_times_out_without_its_end() -> None:
    box = LightInbox()
    assert box.wait_idle(0) and not box.busy
    box.begin()
    assert box.busy
    t0 = time.monotonic()
    assert not box.wait_idle(0.05)
    assert time.monotonic() - t0 >= 0.05
    ender = threading.Timer(0.05, box.put, args=({"a": reading("a", 3, 12)},))
    ender.start()
    assert box.wait_idle(5)
    assert [r.cpu_ns for r in box.take()] == [12]
    ender.join()


def test_a_failed_sample_ends_with_nothing_to_take() -> None:
    box = LightInbox()
    box.begin()
    box.put({})
    assert not box.busy and box.take() == []
