"""The billing tail in the pass, on recorded host trees (libvirt replayed): light samples of the
real recorded cgroup files fill the tails, and a domain that disappears is closed out by the
next pass in its one transaction, billed to its last light reading."""

from __future__ import annotations

import dataclasses
import shutil
import threading
import time
import types
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio

from hostagent.accounting.lifecycle import DeviceAdded, LifecycleEvent, LifecycleKind
from hostagent.model import NicCounters
from hostagent.sources.stop_watch import StopWatch
from hostagent.tailing import TailTasks
from tests.replay import FakeDomain, Host
from tests.test_collector import editable_host, make_collector, store_payloads


@pytest.fixture(params=["lab-hybrid", "systemd-v2"])
def host(request: pytest.FixtureRequest, tmp_path: Path) -> Host:
    return Host(tmp_path, request.param)


def drop_first(host: Host) -> str:
    """The replayed libvirt stops listing its first domain; its uuid."""
    return drop_first_uuid(host, host.conn._domains()[0][0].UUIDString())


def drop_first_uuid(host: Host, gone: str) -> str:
    """The replayed libvirt stops listing domain `gone`."""
    real = host.conn._domains

    def without() -> list[tuple[FakeDomain, dict[str, Any]]]:
        return [(d, s) for d, s in real() if d.UUIDString() != gone]

    host.conn._domains = without  # type: ignore[method-assign]
    return gone


async def test_a_domain_gone_between_passes_is_billed_to_its_last_light_sample(
        host: Host, tmp_path: Path) -> None:
    coll, store = make_collector(host, tmp_path)
    tail = TailTasks(coll, clock=host.clock)
    first = await coll.run_pass()
    assert first.committed
    t0 = host.bulk("t0")
    host.move_to_t1()  # the cgroup files move on; the light sample reads them
    assert await tail.sample(None) == len(t0)
    gone = drop_first(host)
    last = next(t.latest for k, t in coll.tails.items() if k[0] == gone)
    assert last is not None and last.cpu_ns is not None
    await tail.on_event(LifecycleEvent(gone, "x", -1, LifecycleKind.STOPPED, "DESTROYED",
                                       host.clock.now().wall_ns, 0))
    host.clock.advance(5.0)
    report = await coll.run_pass()
    assert report.committed, report.error
    closed = [u for u in report.usages if u.uuid == gone]
    assert len(closed) == 1
    u = closed[0]
    assert u.period_start_ns == next(s.t_wall_ns for s in first.samples if s.uuid == gone)
    assert u.period_end_ns == last.t_wall_ns  # to the last light reading, not the pass
    assert u.cpu_ns == last.cpu_ns - host.cgroup_cpu_ns("t0", gone)
    # the baseline moves to the last reading (a next incarnation tiles on from it)
    assert store.load_baselines()[gone].t_wall_ns == last.t_wall_ns
    assert coll.closeouts_total == {"DESTROYED": 1}
    assert all(k[0] != gone for k in coll.tails)  # closed tails are dropped
    events = [orjson.loads(p) for p in store_payloads(store)]
    assert sum(1 for e in events if e.get("instance_id") == gone) == 1
    # the next pass bills nothing more for it
    host.clock.advance(2.0)
    again = await coll.run_pass()
    assert again.committed and all(u.uuid != gone for u in again.usages)
    store.close()


async def test_a_domain_gone_with_no_light_sample_costs_what_polling_costs(
        host: Host, tmp_path: Path) -> None:
    coll, store = make_collector(host, tmp_path, sample_interval_s=0)
    first = await coll.run_pass()
    assert first.committed
    host.move_to_t1()
    gone = drop_first(host)
    report = await coll.run_pass()
    assert report.committed, report.error
    assert all(u.uuid != gone for u in report.usages)  # nothing after the last pass was seen
    assert store.load_baselines()[gone].t_wall_ns == next(
        s.t_wall_ns for s in first.samples if s.uuid == gone)
    store.close()


async def test_a_migration_away_closes_the_source_at_its_paused_sample(
        host: Host, tmp_path: Path) -> None:
    """Recorded event sequence of a migration's source side (the lab has one host): SUSPENDED
    (MIGRATED) samples the paused domain, STOPPED (MIGRATED) names the reason, and the next pass
    bills up to that sample and closes the incarnation with reason MIGRATED."""
    coll, store = make_collector(host, tmp_path)
    tail = TailTasks(coll, clock=host.clock)
    first = await coll.run_pass()
    assert first.committed
    t0 = host.bulk("t0")
    host.move_to_t1()
    gone = next(iter(t0))
    domid = next(s.domid for s in first.samples if s.uuid == gone)
    now = host.clock.now().wall_ns
    await tail.on_event(LifecycleEvent(gone, "x", domid, LifecycleKind.SUSPENDED, "MIGRATED",
                                       now, 0))
    paused = next(t.latest for k, t in coll.tails.items() if k[0] == gone)
    assert paused is not None and paused.cpu_ns is not None
    drop_first_uuid(host, gone)
    host.clock.advance(1.0)
    await tail.on_event(LifecycleEvent(gone, "x", -1, LifecycleKind.STOPPED, "MIGRATED",
                                       host.clock.now().wall_ns, 0))
    host.clock.advance(1.0)
    report = await coll.run_pass()
    assert report.committed, report.error
    (u,) = [u for u in report.usages if u.uuid == gone]
    assert u.period_end_ns == paused.t_wall_ns
    assert u.cpu_ns == paused.cpu_ns - host.cgroup_cpu_ns("t0", gone)
    assert coll.closeouts_total == {"MIGRATED": 1}
    store.close()


async def test_a_burst_of_starts_costs_one_libvirt_call_and_a_restart_keeps_reasons_apart(
        host: Host, tmp_path: Path) -> None:
    coll, store = make_collector(host, tmp_path)
    tail = TailTasks(coll, clock=host.clock)
    t0 = host.bulk("t0")
    a, b = list(t0)[:2]
    now = host.clock.now().wall_ns
    old = LifecycleEvent(a, "a", 3, LifecycleKind.STARTED, "BOOTED", now - 10**9, 0)
    await tail.on_events([old])
    (key_a,) = [k for k in coll.tails if k[0] == a]
    coll.tails[(a, 999)] = coll.tails.pop(key_a)  # an older process of `a`, still in memory
    bulk, listed = host.conn.bulk_calls, host.conn.list_calls
    await tail.on_events([
        LifecycleEvent(a, "a", -1, LifecycleKind.STOPPED, "DESTROYED", now, 0),
        LifecycleEvent(a, "a", 3, LifecycleKind.STARTED, "BOOTED", now, 0),
        LifecycleEvent(b, "b", 4, LifecycleKind.STARTED, "BOOTED", now, 0),
    ])
    # both starts in one stats call of those two domains, not a bulk call of the host
    assert (host.conn.bulk_calls, host.conn.list_calls) == (bulk, listed + 1)
    reasons = {k: t.reason for k, t in coll.tails.items()}
    assert reasons[(a, 999)] == "DESTROYED"  # the old process
    assert [r for k, r in reasons.items() if k[0] == a and k != (a, 999)] == [None]
    assert any(k[0] == b for k in coll.tails)
    store.close()


async def test_light_targets_are_made_once_per_incarnation_not_once_per_pass(
        host: Host, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hostagent import light_samples

    made: list[str] = []
    real = light_samples.target_of

    def counted(anchor: Any) -> Any:
        made.append(anchor.uuid)
        return real(anchor)

    monkeypatch.setattr(light_samples, "target_of", counted)
    coll, store = make_collector(host, tmp_path)
    tail = TailTasks(coll, clock=host.clock)
    assert (await coll.run_pass()).committed
    n = await tail.sample(None)
    assert n and sorted(made) == sorted({k[0] for k in coll.tails})
    first = list(tail._targets.values())
    host.clock.advance(5.0)
    assert (await coll.run_pass()).committed  # new anchors, same domains
    assert await tail.sample(None) == n
    assert len(made) == len(first)  # nothing made again
    assert [h[3] for h in tail._targets.values()] == [h[3] for h in first]
    # a domain's taps moved (say a re-plugged NIC got a new ifindex): its target is made again
    key, t = next((k, t) for k, t in coll.tails.items() if t.anchor.netlink_nics)
    mac, nic = next(iter(t.anchor.netlink_nics.items()))
    replugged = dataclasses.replace(nic, ifindex=(nic.ifindex or 0) + 99)
    moved = {**t.anchor.netlink_nics, mac: replugged}
    coll.tails[key] = dataclasses.replace(t, anchor=dataclasses.replace(t.anchor,
                                                                          netlink_nics=moved))
    await tail.sample(None)
    assert made[len(first):] == [key[0]]
    assert tail._targets[key][3].nics[0].ifindex == (nic.ifindex or 0) + 99
    store.close()


# --- the periodic samples' thread ---------------------------------------------------------------


async def wait_real(pred: Any, timeout_s: float = 10) -> None:
    """Poll state another thread changes, in real time."""
    with trio.fail_after(timeout_s):
        while not pred():  # noqa: ASYNC110 - the sampler is a thread, not a trio task
            await trio.sleep(0.01)


async def test_the_sampler_thread_bills_a_gone_domain_to_its_last_periodic_sample(
        host: Host, tmp_path: Path) -> None:
    coll, store = make_collector(host, tmp_path, sample_interval_s=0.02, lifecycle_events=False)
    tail = TailTasks(coll, clock=host.clock)
    first = await coll.run_pass()
    assert first.committed
    host.move_to_t1()  # the files move on and the clock with them: samples newer than anchors
    taken: dict[str, Any] = {}
    real_sample = tail.sampler.sample
    gate = threading.Lock()
    stopped = threading.Event()

    def noted(targets: Any) -> Any:
        with gate:
            if stopped.is_set():  # after the clock moved: the sampler reads nothing more
                return {}
            got = real_sample(targets)
            taken.update(got)
            return got

    tail.sampler = types.SimpleNamespace(sample=noted)  # type: ignore[assignment]
    async with trio.open_nursery() as nursery:
        await nursery.start(tail.run)
        await wait_real(lambda: tail.samples_total >= 2)
        gone = drop_first(host)
        with gate:  # no sample in flight across the clock's move
            stopped.set()
        host.clock.advance(5.0)
        report = await coll.run_pass()
        nursery.cancel_scope.cancel()
    assert report.committed, report.error
    (u,) = [u for u in report.usages if u.uuid == gone]
    assert u.period_end_ns == host.clock.now().wall_ns - 5 * 10**9  # the sample, not the pass
    assert taken[gone].t_wall_ns == u.period_end_ns
    # the t1 tree's counter
    assert u.cpu_ns == taken[gone].cpu_ns - host.cgroup_cpu_ns("t0", gone) > 0
    assert tail.sample_errors == 0
    store.close()


async def after_a_pass(host: Host, tmp_path: Path, **collector: Any
                       ) -> tuple[Any, Any, TailTasks, dict[str, dict[str, Any]]]:
    """A collector sampling every 20 ms (no lifecycle events) and its tail tasks, after one
    committed pass over the t0 tree, the files moved on to t1: (collector, store, tail tasks,
    the t0 bulk stats by uuid)."""
    coll, store = make_collector(host, tmp_path, **{"sample_interval_s": 0.02,
                                                    "lifecycle_events": False, **collector})
    tail = TailTasks(coll, clock=host.clock)
    first = await coll.run_pass()
    assert first.committed
    t0 = host.bulk("t0")
    host.move_to_t1()
    return coll, store, tail, t0


async def test_samples_after_the_destroy_do_not_hide_the_last_good_one(
        host: Host, tmp_path: Path) -> None:
    """After a destroy the sampler thread goes on until the pass: its readings of the gone
    domain have no CPU (the cgroup is gone). Kept by domain alone, each replaced the last good
    reading in the inbox, and the pass closed the domain out at its previous pass instead."""
    coll, store, tail, _ = await after_a_pass(host, tmp_path)
    real_sample = tail.sampler.sample
    gone = host.conn._domains()[0][0].UUIDString()
    destroyed = threading.Event()
    good: dict[str, Any] = {}
    after = [0]

    def sample(targets: Any) -> Any:
        got = dict(real_sample(targets))
        if destroyed.is_set():  # what the real sampler reads once the cgroup is removed
            got[gone] = dataclasses.replace(got[gone], cpu_ns=None, nics=(),
                                            missing={"cpu": "absent: cgroup gone"})
            after[0] += 1
        else:
            good.update(got)
        return got

    tail.sampler = types.SimpleNamespace(sample=sample)  # type: ignore[assignment]
    async with trio.open_nursery() as nursery:
        await nursery.start(tail.run)
        await wait_real(lambda: gone in good)
        destroyed.set()
        await wait_real(lambda: after[0] >= 3)
        drop_first_uuid(host, gone)
        host.clock.advance(5.0)
        report = await coll.run_pass()
        nursery.cancel_scope.cancel()
    assert report.committed, report.error
    (u,) = [u for u in report.usages if u.uuid == gone]
    assert u.period_end_ns == good[gone].t_wall_ns
    assert u.cpu_ns == good[gone].cpu_ns - host.cgroup_cpu_ns("t0", gone) > 0
    store.close()


async def test_a_pass_waits_for_a_sample_in_flight_and_closes_out_at_it(
        host: Host, tmp_path: Path) -> None:
    """A domain sampled alive just before the pass found it gone: without waiting for that
    sample, the pass would close the domain out at the previous pass (its usage since lost)."""
    coll, store, tail, _ = await after_a_pass(host, tmp_path)
    real_sample = tail.sampler.sample
    in_sample = threading.Event()
    taken: dict[str, Any] = {}

    def slow(targets: Any) -> Any:
        got = real_sample(targets)  # read while the domain lives...
        taken.update(got)
        in_sample.set()
        time.sleep(0.3)  # ...and handed over after the pass has read the host
        return got

    tail.sampler = types.SimpleNamespace(sample=slow)  # type: ignore[assignment]
    async with trio.open_nursery() as nursery:
        await nursery.start(tail.run)
        assert await trio.to_thread.run_sync(in_sample.wait, 10)
        assert coll.light_inbox.busy
        gone = drop_first(host)
        report = await coll.run_pass()
        nursery.cancel_scope.cancel()
    assert report.committed, report.error
    (u,) = [u for u in report.usages if u.uuid == gone]
    assert u.period_end_ns == taken[gone].t_wall_ns
    assert u.cpu_ns == taken[gone].cpu_ns - host.cgroup_cpu_ns("t0", gone) > 0
    store.close()


async def test_periodic_samples_do_not_wake_trio(host: Host, tmp_path: Path) -> None:
    coll, store = make_collector(host, tmp_path, sample_interval_s=0.01, lifecycle_events=False)
    tail = TailTasks(coll, clock=host.clock)
    assert (await coll.run_pass()).committed

    class Wakes(trio.abc.Instrument):
        n = 0

        def after_io_wait(self, timeout: float) -> None:
            Wakes.n += 1

    async with trio.open_nursery() as nursery:
        await nursery.start(tail.run)
        await wait_real(lambda: tail.samples_total >= 1)
        before = tail.samples_total
        trio.lowlevel.add_instrument(Wakes())
        await trio.sleep(0.5)
        samples = tail.samples_total - before
        wakes = Wakes.n
        nursery.cancel_scope.cancel()
    assert samples >= 5
    assert wakes <= 2  # the test's own sleep (a sample through trio: two or more each)
    store.close()


async def test_no_light_sample_while_passes_read_the_host_more_often_than_it(
        host: Host, tmp_path: Path) -> None:
    """A sample is due sample_interval_s after the freshest reading, a pass's included: with
    passes that often (interval_s 1 s against the default 2 s) the thread never samples."""
    coll, store = make_collector(host, tmp_path, sample_interval_s=0.5, lifecycle_events=False)
    tail = TailTasks(coll, clock=host.clock)
    assert (await coll.run_pass()).committed
    async with trio.open_nursery() as nursery:
        await nursery.start(tail.run)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 2.0:  # four sample intervals of passes every 0.1 s
            await trio.sleep(0.1)
            assert (await coll.run_pass()).committed
        assert tail.samples_total == 0
        last_pass_s = time.monotonic()
        await wait_real(lambda: tail.samples_total >= 2)  # no more passes: samples again
        assert time.monotonic() - last_pass_s >= 2 * 0.5 - 0.05
        nursery.cancel_scope.cancel()
    assert tail.sample_errors == 0
    store.close()


async def test_targets_are_made_again_only_when_a_pass_brings_new_anchors(
        host: Host, tmp_path: Path) -> None:
    coll, store = make_collector(host, tmp_path)
    tail = TailTasks(coll, clock=host.clock)
    assert (await coll.run_pass()).committed
    first = tail._targets_now(None, dict(coll.tails))
    assert len(first) == len(coll.tails) > 0
    host.move_to_t1()
    assert await tail.sample(None) == len(first)  # light readings replace Tails, not anchors
    assert tail._targets_now(None, dict(coll.tails)) is first
    assert (await coll.run_pass()).committed
    again = tail._targets_now(None, dict(coll.tails))
    assert again is not first and again == first  # same cgroups and taps: equal targets
    store.close()


def _add_events_files(host: Host) -> None:
    """A populated `cgroup.events` beside every `cpu.stat` of the recorded trees (they have
    none)."""
    for tree in ("t0", "t1"):
        for cpu_stat in (host.src / tree).rglob("cpu.stat"):
            (cpu_stat.parent / "cgroup.events").write_text("populated 1\nfrozen 0\n")


def _events_files(host: Host, coll: Any, tree: str) -> dict[str, Path]:
    """The `cgroup.events` of each domain's VM cgroup in recorded tree `tree`, by uuid."""
    return {uuid: host.src / tree / t.anchor.facts.cgroup.cpu.path.lstrip("/") / "cgroup.events"
            for (uuid, _), t in coll.tails.items()}


def _noted_samples(tail: TailTasks) -> list[dict[str, Any]]:
    """The light samples `tail`'s thread takes from now on, each as it returned it."""
    taken: list[dict[str, Any]] = []
    real_sample = tail.sampler.sample

    def noted(targets: Any, **kw: Any) -> Any:
        got = real_sample(targets, **kw)
        taken.append(got)
        return got

    tail.sampler = types.SimpleNamespace(sample=noted)  # type: ignore[assignment]
    return taken


async def test_a_watched_end_is_sampled_at_once_and_periodic_samples_slow_down(
        tmp_path: Path) -> None:
    """With the stop watch on every domain, the thread samples every
    watched_sample_interval_s (an hour here: never) instead of sample_interval_s, and a domain
    whose cgroup empties is sampled at once, alone; the pass closes it out at that reading."""
    host = editable_host(tmp_path, "systemd-v2")
    _add_events_files(host)
    coll, store = make_collector(host, tmp_path, sample_interval_s=0.02,
                                 watched_sample_interval_s=3600, lifecycle_events=False)
    tail = TailTasks(coll, clock=host.clock)
    # A recorded tree has no netlink: its own watch follows the cgroups only, and its taps'
    # ends would go unheard. This one listens to the host's link notifications (none concern
    # the recorded ifindexes), so every domain's end counts as watched.
    tail.watch = StopWatch()
    taken = _noted_samples(tail)
    async with trio.open_nursery() as nursery:
        await nursery.start(tail.run)
        first = await coll.run_pass()  # the first tails: the thread is woken to watch them
        assert first.committed
        ends_t0 = _events_files(host, coll, "t0")
        ends_t1 = _events_files(host, coll, "t1")
        await wait_real(lambda: tail.watch is not None and tail._watched_all)
        n = len(taken)
        await trio.sleep(0.3)  # fifteen sample intervals: no periodic sample is due
        assert len(taken) == n
        host.move_to_t1()
        gone = next(iter(ends_t0))
        ends_t1[gone].write_text("populated 0\nfrozen 0\n")
        ends_t0[gone].write_text("populated 0\nfrozen 0\n")  # the watched inode
        await wait_real(lambda: tail.stops_seen == 1)
        await wait_real(lambda: len(taken) == n + 1)
        drop_first_uuid(host, gone)
        host.clock.advance(5.0)
        report = await coll.run_pass()
        nursery.cancel_scope.cancel()
    assert len(taken) == n + 1  # the pass's close-out asks no read of an end already sampled
    assert set(taken[-1]) == {gone}  # that domain alone
    health = tail.health()
    assert health["vm_ends_seen"] == 1 and health["light_samples"] == len(taken)
    assert health["closeouts"] == {"GONE": 1}
    captured = taken[-1][gone]
    assert report.committed, report.error
    (u,) = [u for u in report.usages if u.uuid == gone]
    assert u.period_end_ns == captured.t_wall_ns
    # the t1 tree's counter
    assert u.cpu_ns == captured.cpu_ns - host.cgroup_cpu_ns("t0", gone) > 0
    assert tail.sample_errors == 0
    store.close()


async def test_a_pass_that_adds_domains_has_their_end_watched_at_once(tmp_path: Path) -> None:
    """No sample is due for an hour: only the pass's wake-up makes the thread watch the new
    domains (a VM destroyed right after its first pass is caught too)."""
    host = editable_host(tmp_path, "lab-hybrid")
    _add_events_files(host)
    coll, store = make_collector(host, tmp_path, sample_interval_s=3600,
                                 watched_sample_interval_s=3600, lifecycle_events=False)
    tail = TailTasks(coll, clock=host.clock)
    async with trio.open_nursery() as nursery:
        await nursery.start(tail.run)
        await trio.sleep(0.1)
        assert tail.watch is not None and not tail.watch.follows_links
        assert tail.watch.watched == frozenset()
        assert (await coll.run_pass()).committed
        await wait_real(lambda: tail.watch is not None and len(tail.watch.watched) == len(
            coll.tails) > 0)
        assert tail.samples_total == 0
        # Its taps' ends are not heard here (no netlink on a recorded tree): the periodic
        # samples keep sample_interval_s.
        assert any(t.nics for t in tail._targets_now(None, dict(coll.tails)))
        assert not tail._watched_all and tail.health()["vm_ends_watched"] is False
        nursery.cancel_scope.cancel()
    store.close()


class _BrokenWatch(StopWatch):
    """A watch whose wait fails the way a broken descriptor would."""

    def wait(self, timeout_s: float | None) -> Any:
        raise OSError(9, "Bad file descriptor")


async def test_a_broken_stop_watch_leaves_the_samples_on_the_timer(
        host: Host, tmp_path: Path) -> None:
    _, store, tail, _ = await after_a_pass(host, tmp_path, watched_sample_interval_s=3600)
    tail.watch = _BrokenWatch(links=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(tail.run)
        await wait_real(lambda: tail.samples_total >= 3)  # every 0.02 s, not every hour
        nursery.cancel_scope.cancel()
    assert tail.sample_errors == 0
    store.close()


async def test_a_changed_xml_is_read_at_the_next_pass_and_heard_changes_stretch_the_backstop(
        tmp_path: Path) -> None:
    """What the lifecycle watcher tells (Collector.xml_changes, its hooks) reaches the pass: a
    domain libvirt says changed has its XML read again by the next pass, the others not; while the
    changes are heard the periodic re-read is hourly, and every domain is read once then."""
    from hostagent.accounting import inventory

    host = Host(tmp_path, "lab-hybrid")
    coll, store = make_collector(host, tmp_path)
    tail = TailTasks(coll, clock=host.clock)
    assert (await coll.run_pass()).committed
    n = len(host.bulk("t0"))
    assert host.conn.xml_calls == n
    changed = host.conn._domains()[0][0].UUIDString()
    coll.xml_changes.tell(changed.upper())  # libvirt's UUIDString() case never matters
    assert (await coll.run_pass()).committed
    assert host.conn.xml_calls == n + 1
    assert (await coll.run_pass()).committed
    assert host.conn.xml_calls == n + 1
    interval_s = coll.cfg.collector.interval_s
    coll.xml_changes.hear(True)  # what the watcher calls when subscribed
    assert (await coll.run_pass()).committed
    assert host.conn.xml_calls == 2 * n + 1
    assert coll.inventory.refresh_every_passes == inventory.refresh_passes(interval_s, 3600)
    h = tail.health()
    assert h["xml_changes_heard"] is True
    assert h["domain_xml_reads"] == {"new": n, "changed": n + 1}
    coll.xml_changes.hear(False)
    assert tail.health()["xml_changes_heard"] is False
    assert (await coll.run_pass()).committed
    assert coll.inventory.refresh_every_passes == inventory.refresh_passes(interval_s, 600)
    # a reloaded interval (SIGHUP: the daemon swaps collector.cfg) keeps it a time
    coll.cfg = dataclasses.replace(coll.cfg, collector=dataclasses.replace(
        coll.cfg.collector, interval_s=interval_s * 4))
    assert (await coll.run_pass()).committed
    assert coll.inventory.refresh_every_passes == inventory.refresh_passes(interval_s * 4, 600)
    store.close()


class _RecordedTapEnds(StopWatch):
    """The host's link notifications, plus the end of a recorded tap (a recorded tree has no
    netlink): `delete()` hands the watch what an RTM_DELLINK of that tap would have carried."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._ends: dict[int, tuple[int, int]] = {}

    def delete(self, ifindex: int, host_rx: int, host_tx: int) -> None:
        with self._lock:
            self._ends[ifindex] = (host_rx, host_tx)
        self.wake()

    def _drain_wake(self) -> None:
        super()._drain_wake()
        with self._lock:
            ends, self._ends = self._ends, {}
        for ifindex, counters in ends.items():  # as _drain_links does for a followed tap
            if ifindex in self._taps:
                self.deleted[ifindex] = counters
                self._unplugged.add(self._taps[ifindex])


def _tap_ends_recorded(tmp_path: Path) -> tuple[Host, Any, Any, TailTasks, _RecordedTapEnds,
                                                 list[dict[str, Any]]]:
    """The systemd-v2 recording with `cgroup.events` files, a collector whose periodic light
    samples are an hour apart, its light-samples thread watching through `_RecordedTapEnds`
    (tap deletions told by the test), and the samples it takes."""
    host = editable_host(tmp_path, "systemd-v2")
    _add_events_files(host)
    coll, store = make_collector(host, tmp_path, sample_interval_s=3600,
                                 watched_sample_interval_s=3600, lifecycle_events=False)
    tail = TailTasks(coll, clock=host.clock)
    watch = _RecordedTapEnds()
    tail.watch = watch
    return host, coll, store, tail, watch, _noted_samples(tail)


async def test_a_hot_unplugged_nic_is_sampled_at_its_end_and_billed_to_its_final_counters(
        tmp_path: Path) -> None:
    """A tap deleted while its VM runs (a NIC detached) wakes the light-samples thread, which
    samples that domain alone with the tap's final counters; the next pass reads the domain
    without the tap and bills the NIC up to those counters (accounting/unplug.py)."""
    host, coll, store, tail, watch, taken = _tap_ends_recorded(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(tail.run)
        assert (await coll.run_pass()).committed
        await wait_real(lambda: tail._watched_all)
        (uuid, _), anchor = next((k, t.anchor) for k, t in coll.tails.items()
                                     if t.anchor.netlink_nics)
        tap = next(iter(anchor.netlink_nics.values()))
        _t1_without_tap(host, uuid, tap)
        host.clock.advance(1.0)
        n_taken = len(taken)
        # The tap's end: the guest received 1,000 bytes and sent 2,000 more since the pass.
        watch.delete(tap.ifindex, tap.guest_tx_bytes + 2_000, tap.guest_rx_bytes + 1_000)
        await wait_real(lambda: len(taken) == n_taken + 1)
        assert set(taken[-1]) == {uuid}  # that domain alone, at once
        host.move_to_t1()
        report = await coll.run_pass()
        nursery.cancel_scope.cancel()
    assert report.committed, report.error
    (u,) = [u for u in report.usages if u.uuid == uuid]
    (s,) = [s for s in report.samples if s.uuid == uuid]
    assert tap.mac not in {n.mac for n in s.nics}  # read without it
    others = [(n, anchor.netlink_nics[n.mac]) for n in s.nics if n.mac in anchor.netlink_nics]
    assert u.net_ingress_bytes == 1_000 + sum(n.guest_rx_bytes - o.guest_rx_bytes
                                              for n, o in others)
    assert u.net_egress_bytes == 2_000 + sum(n.guest_tx_bytes - o.guest_tx_bytes
                                             for n, o in others)
    assert f"net:{tap.mac}" not in u.missing
    assert tail.sample_errors == 0 and tail.stops_seen == 0
    store.close()


def _t1_without_tap(host: Host, uuid: str, tap: NicCounters) -> None:
    """The t1 tree without `tap` of domain `uuid`: neither a link nor libvirt counters."""
    assert tap.ifindex is not None and tap.ifname is not None
    shutil.rmtree(host.src / "t1" / "sys" / "class" / "net" / tap.ifname)
    bulk = host.src / "t1" / "libvirt" / "bulk_stats.json"
    entries = orjson.loads(bulk.read_bytes())
    for e in entries:
        if e["uuid"] == uuid:
            n = next(k.split(".")[1] for k, v in e["stats"].items()
                     if k.endswith(".name") and v == tap.ifname)
            e["stats"] = {k: v for k, v in e["stats"].items()
                          if not k.startswith(f"net.{n}.")}
    bulk.write_bytes(orjson.dumps(entries))


async def test_a_tap_deleted_while_a_pass_reads_the_host_is_billed_to_its_final_counters(
        tmp_path: Path) -> None:
    """A tap deleted after the pass's link dump and before it stamps its reading: the stop
    watch's sample of that end is not newer than the pass's anchor, so the tail drops it, and
    no light sample comes before the next pass (the lab lost one datagram that way,
    tests/test_lab_sweep_nic_plug.py). The next pass reads the domain without the tap, asks
    for its final sample (`tails.taps_gone`) and bills the tap up to the final counters the
    watch kept."""
    host, coll, store, tail, watch, taken = _tap_ends_recorded(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(tail.run)
        assert (await coll.run_pass()).committed
        await wait_real(lambda: tail._watched_all)
        (uuid, domid), anchor = next((k, t.anchor) for k, t in coll.tails.items()
                                     if t.anchor.netlink_nics)
        tap = next(iter(anchor.netlink_nics.values()))
        _t1_without_tap(host, uuid, tap)
        n_taken = len(taken)
        # The clock stands still: the watch's sample of the end is as old as the anchor.
        assert tap.ifindex is not None
        watch.delete(tap.ifindex, tap.guest_tx_bytes + 2_000, tap.guest_rx_bytes + 1_000)
        await wait_real(lambda: len(taken) == n_taken + 1)
        await coll.merge_light()
        assert coll.tails[(uuid, domid)].latest is None  # dropped: not after the anchor
        host.move_to_t1()
        host.clock.advance(5.0)
        report = await coll.run_pass()
        nursery.cancel_scope.cancel()
    assert report.committed, report.error
    assert set(taken[-1]) == {uuid}  # the pass's final sample: that domain alone
    (u,) = [u for u in report.usages if u.uuid == uuid]
    (s,) = [s for s in report.samples if s.uuid == uuid]
    assert tap.mac not in {n.mac for n in s.nics}
    others = [(n, anchor.netlink_nics[n.mac]) for n in s.nics if n.mac in anchor.netlink_nics]
    assert u.net_ingress_bytes == 1_000 + sum(n.guest_rx_bytes - o.guest_rx_bytes
                                              for n, o in others)
    assert u.net_egress_bytes == 2_000 + sum(n.guest_tx_bytes - o.guest_tx_bytes
                                             for n, o in others)
    assert tail.sample_errors == 0
    store.close()


async def test_a_device_added_has_the_tail_follow_the_domains_new_tap(tmp_path: Path) -> None:
    """libvirt's DEVICE_ADDED (`DeviceAdded`): one read of that domain, and its tail follows
    the taps it reads from then on (the light samples' targets), while what the next pass
    bills from (the anchor's time and Sample) stays. A NIC plugged and unplugged again before
    the next pass is billed that way (tests/test_lab_sweep_nic_plug.py, on the lab)."""
    host = editable_host(tmp_path, "systemd-v2")
    coll, store = make_collector(host, tmp_path, lifecycle_events=False)
    tail = TailTasks(coll, clock=host.clock)
    assert (await coll.run_pass()).committed
    key, before = next((k, t) for k, t in coll.tails.items() if t.anchor.netlink_nics)
    assert before.anchor.netlink_nics is not None
    tap = next(iter(before.anchor.netlink_nics.values()))
    assert tap.ifindex is not None
    # the NIC unplugged and plugged again: its tap under the same name, a new ifindex
    (host.src / "t0" / "sys" / "class" / "net" / str(tap.ifname) / "ifindex").write_text(
        f"{tap.ifindex + 1000}\n")
    host.clock.advance(1.0)
    others = {k: t for k, t in coll.tails.items() if k != key}
    await tail.on_events([DeviceAdded(key[0], "net1", host.clock.now().wall_ns)])
    after = coll.tails[key]
    assert after.anchor.netlink_nics is not None
    assert [n.ifindex for n in after.anchor.netlink_nics.values()] == [tap.ifindex + 1000]
    assert after.sample is before.sample and after.anchor.t_wall_ns == before.anchor.t_wall_ns
    assert all(coll.tails[k] is t for k, t in others.items())  # only that domain was read
    target = next(t for t in tail._targets_now(None, coll.tails) if (t.uuid, t.domid) == key)
    assert [n.ifindex for n in target.nics] == [tap.ifindex + 1000]
    assert tail.events_total["DEVICE_ADDED"] == 1
    store.close()
