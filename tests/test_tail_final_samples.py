"""A pass that finds a VM gone reads its final counters before it closes it out, on recorded host
trees (libvirt replayed, the real cgroup files read).

CI caught a close-out billed to a reading from before the destroy (3.8 s of a guest's 5.1 s of
CPU, the pass 1.1 s after a `virsh destroy`). Here the kernel's notification never comes at
all and the cgroup stays (as on a machined host): the pass must get the final counters, through
the thread that owns the stop watch, from the pass itself where no thread serves it, and not at
all with light samples off. A VM that ends before any light sample after the pass is billed its
disk bytes since that pass. And the CI failure's cause: a pass that meets a destroy, where
libvirt still lists the VM once its cgroup is gone (the last test).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import trio

from hostagent.sources.stop_watch import StopWatch
from hostagent.tailing import TailTasks
from tests.replay import Host
from tests.test_collector import editable_host, make_collector
from tests.test_tail_pass import (
    _add_events_files,
    _events_files,
    _noted_samples,
    drop_first_uuid,
    wait_real,
)


def _gone_usage(host: Host, report: Any, gone: str) -> int | None:
    """The CPU nanoseconds the pass billed `gone` (None: no usage of it)."""
    assert report.committed, report.error
    got = [u for u in report.usages if u.uuid == gone]
    return got[0].cpu_ns if got else None


def _every_end_watched(tmp_path: Path) -> tuple[Host, Any, Any, TailTasks, list[dict[str, Any]]]:
    """The systemd-v2 recording with `cgroup.events` files, a collector whose thread samples
    every domain's end at once (its periodic samples an hour apart), and the samples it takes."""
    host = editable_host(tmp_path, "systemd-v2")
    _add_events_files(host)
    coll, store = make_collector(host, tmp_path, sample_interval_s=0.02,
                                 watched_sample_interval_s=3600, lifecycle_events=False)
    tail = TailTasks(coll, clock=host.clock)
    tail.watch = StopWatch()  # the host's link notifications: every end counts as watched
    return host, coll, store, tail, _noted_samples(tail)


async def _a_domain_goes_between_two_passes(host: Host, coll: Any, tail: TailTasks
                                            ) -> tuple[str, Any, Any]:
    """With `tail` running: a pass, the counters grow (the t1 tree), the first domain is gone,
    another pass. (its uuid, the second pass's report, its tail after the first pass)."""
    async with trio.open_nursery() as nursery:
        await nursery.start(tail.run)
        assert (await coll.run_pass()).committed
        gone = next(uuid for uuid, _ in coll.tails)
        before = next(t for (u, _), t in coll.tails.items() if u == gone)
        host.move_to_t1()
        drop_first_uuid(host, gone)
        host.clock.advance(5.0)
        report = await coll.run_pass()
        nursery.cancel_scope.cancel()
    return gone, report, before


async def test_the_watching_thread_samples_a_gone_domain_whose_end_it_did_not_hear(
        tmp_path: Path) -> None:
    host, coll, store, tail, taken = _every_end_watched(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(tail.run)
        assert (await coll.run_pass()).committed
        await wait_real(lambda: tail.watch is not None and tail._watched_all)
        n = len(taken)
        host.move_to_t1()  # the counters grew; no `populated 0` is ever written
        gone = drop_first_uuid(host, next(uuid for uuid, _ in coll.tails))
        host.clock.advance(5.0)
        report = await coll.run_pass()
        nursery.cancel_scope.cancel()
    assert len(taken) == n + 1 and set(taken[-1]) == {gone}  # the thread's, that domain alone
    assert tail.stops_seen == 0  # no end was heard
    assert _gone_usage(host, report, gone) == \
        host.cgroup_cpu_ns("t1", gone) - host.cgroup_cpu_ns("t0", gone) > 0
    assert tail.health()["closeouts"] == {"GONE": 1}
    store.close()


async def test_without_a_watch_the_pass_reads_the_final_counters_itself(tmp_path: Path) -> None:
    host = editable_host(tmp_path, "lab-hybrid")
    coll, store = make_collector(host, tmp_path, sample_interval_s=3600,
                                 lifecycle_events=False)
    tail = TailTasks(coll, clock=host.clock, watch_stops=False)
    gone, report, _ = await _a_domain_goes_between_two_passes(host, coll, tail)
    assert tail.samples_total == 1  # the pass's own read: no periodic sample is due
    assert _gone_usage(host, report, gone) == \
        host.cgroup_cpu_ns("t1", gone) - host.cgroup_cpu_ns("t0", gone) > 0
    store.close()


async def test_a_thread_that_does_not_answer_leaves_the_final_read_to_the_pass(
        tmp_path: Path) -> None:
    """The thread seems to serve (a watch, `_serving`) but never runs: the pass waits
    `libvirt.call_timeout_s` (1 s) for it, then reads the domain itself."""
    host = editable_host(tmp_path, "systemd-v2")
    coll, store = make_collector(host, tmp_path, sample_interval_s=3600,
                                 lifecycle_events=False)
    tail = TailTasks(coll, clock=host.clock)
    tail.watch = StopWatch(links=False)
    tail._serving = True
    coll.final_samples = tail.final_samples
    try:
        assert (await coll.run_pass()).committed
        host.move_to_t1()
        gone = drop_first_uuid(host, next(uuid for uuid, _ in coll.tails))
        host.clock.advance(5.0)
        t0 = trio.current_time()
        report = await coll.run_pass()
        waited_s = trio.current_time() - t0
    finally:
        tail.watch.close()
    assert coll.cfg.libvirt.call_timeout_s <= waited_s < 5
    assert tail._final_keys  # asked, never taken
    assert _gone_usage(host, report, gone) == \
        host.cgroup_cpu_ns("t1", gone) - host.cgroup_cpu_ns("t0", gone) > 0
    store.close()


async def test_with_light_samples_off_the_close_out_bills_the_last_pass(tmp_path: Path) -> None:
    host = editable_host(tmp_path, "lab-hybrid")
    coll, store = make_collector(host, tmp_path, sample_interval_s=0, lifecycle_events=False)
    tail = TailTasks(coll, clock=host.clock, watch_stops=False)
    gone, report, _ = await _a_domain_goes_between_two_passes(host, coll, tail)
    assert tail.samples_total == 0
    assert _gone_usage(host, report, gone) is None  # nothing read after the last pass
    store.close()


async def test_a_gone_domain_is_billed_its_disk_bytes_since_the_pass(tmp_path: Path) -> None:
    """The pass reads v2 `io.stat` for the tails' anchor: a VM that ends before any light
    sample after the pass is billed the io.stat growth since that pass (before, only the
    growth since its first light sample, here none at all)."""
    host = editable_host(tmp_path, "systemd-v2")
    coll, store = make_collector(host, tmp_path, sample_interval_s=3600,
                                 lifecycle_events=False)
    tail = TailTasks(coll, clock=host.clock, watch_stops=False)
    gone, report, before = await _a_domain_goes_between_two_passes(host, coll, tail)
    anchor_io = before.anchor_io
    t0, t1 = host.io_bytes("t0", gone), host.io_bytes("t1", gone)
    assert anchor_io is not None and (anchor_io.read_bytes, anchor_io.write_bytes) == t0
    (u,) = [u for u in report.usages if u.uuid == gone]
    assert (u.disk_read_bytes, u.disk_write_bytes) == (t1[0] - t0[0], t1[1] - t0[1])
    assert t1[0] > t0[0] and t1[1] > t0[1]
    store.close()


async def test_a_pass_during_a_destroy_closes_the_vm_out_at_its_final_counters(
        tmp_path: Path) -> None:
    """The CI failure's cause: libvirt answers a stats call made just before a `virsh destroy`
    once the destroy is done, still with the VM running (its old id), and by then it has
    removed the VM cgroup. The pass billed that reading (no CPU) and dropped the
    tail holding the counters read when the cgroup emptied; the close-out at the next pass
    billed up to the pass before (lab, 1 s passes: 68–75 ms lost in 3 of 12 destroys timed
    to meet a pass; CI, 12 s passes: 1.2 s). Now the removed cgroup says the process ended:
    the pass closes the VM out at once from its tail, and a later stale answer is not billed."""
    host, coll, store, tail, taken = _every_end_watched(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(tail.run)
        assert (await coll.run_pass()).committed
        ends_t0 = _events_files(host, coll, "t0")
        ends_t1 = _events_files(host, coll, "t1")
        await wait_real(lambda: tail.watch is not None and tail._watched_all)
        host.move_to_t1()
        gone = next(iter(ends_t0))
        ends_t1[gone].write_text("populated 0\nfrozen 0\n")
        ends_t0[gone].write_text("populated 0\nfrozen 0\n")  # the watched inode
        await wait_real(lambda: any(gone in got for got in taken))  # read as it emptied
        final = next(got[gone] for got in taken if gone in got)
        shutil.rmtree(host.vm_cgroup("t1", gone))  # removed; libvirt still lists the VM
        host.clock.advance(5.0)
        report = await coll.run_pass()
        host.clock.advance(5.0)
        later = await coll.run_pass()  # the destroy outlasts a pass: the same stale answer
        nursery.cancel_scope.cancel()
    assert report.committed, report.error
    (u,) = [u for u in report.usages if u.uuid == gone]
    assert u.period_end_ns == final.t_wall_ns
    assert u.cpu_ns == final.cpu_ns - host.cgroup_cpu_ns("t0", gone) > 0
    assert gone not in {s.uuid for s in report.samples}
    assert tail.health()["closeouts"] == {"GONE": 1}
    assert later.committed, later.error
    assert gone not in {u.uuid for u in later.usages} | {s.uuid for s in later.samples}
    assert not [k for k in coll.tails if k[0] == gone]
    store.close()
