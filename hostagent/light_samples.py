"""The light samples' thread and the targets every light sample reads: LightSamples, mixed
into hostagent.tailing.TailTasks.

The thread ("light-samples", started and stopped by `TailTasks.run`) never runs trio: it sleeps
on the stop watch (sources/stop_watch.py), or on the timer where a VM's end is not watched,
samples a domain the moment its cgroup empties or one of its taps is deleted, and every domain
`sample_interval_s` after the freshest reading of it (`watched_sample_interval_s` while every
end is watched); its readings go to `Collector.light_inbox` (hostagent/light_inbox.py).

A light sample reads one target per domain, its newest tail's (`target_of` its anchor), reused
while the anchor's DomainInfo, cgroup and taps stay the same. The thread's samples and an
event's (`TailTasks.sample`, in trio) share the sampler and that cache under `_sampling`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

from hostagent import handoff
from hostagent.accounting import tails
from hostagent.accounting.closeout import LightReading
from hostagent.accounting.readings import DomainReading
from hostagent.collector import Collector
from hostagent.light_inbox import merge_into
from hostagent.sources.files import HostRoot
from hostagent.sources.light import LightSampler, LightTarget, light_nics, target_for
from hostagent.sources.stop_watch import StopWatch, Woken

log = logging.getLogger(__name__)

# With light samples off, how often the loop looks whether the config turned them on.
IDLE_CHECK_S = 5.0


# A light target with what it was made from: the anchor's DomainInfo and cgroup paths (compared
# by identity) and its taps' (mac, ifname, ifindex).
_Target = tuple[object, object, tuple[tuple[str, str | None, int | None], ...] | None,
                LightTarget | None]


def target_of(anchor: DomainReading) -> LightTarget | None:
    """What a light sample reads for the process of `anchor` (None: its cgroup is unknown)."""
    cg = anchor.facts.cgroup
    if cg is None:
        return None
    found = anchor.netlink_nics.values() if anchor.netlink_nics is not None else ()
    return target_for(anchor.uuid, anchor.info.domid, cg,
                      light_nics(anchor.info.nics, tuple(found)))


class LightSamples:
    """The light-samples thread and the targets of every light sample, for TailTasks, which
    sets the state below (in its `__init__`)."""

    collector: Collector
    sampler: LightSampler
    watch: StopWatch | None
    stops_seen: int
    samples_total: int
    sample_errors: int
    _root: HostRoot
    _synced: Sequence[LightTarget] | None
    _watched_all: bool
    _resync: bool
    _targets: dict[tails.Key, _Target]
    _last: tuple[list[DomainReading], list[LightTarget]]
    _sampling: threading.Lock
    # Final samples a pass asked the thread for (`final_samples`), under `_final_cond`.
    _final_cond: threading.Condition
    _final_keys: set[tails.Key]
    _final_asked: int
    _final_served: int
    _serving: bool  # the thread sleeps on the stop watch and takes final samples

    def _light_thread(self, stop: threading.Event) -> None:
        """The periodic light samples, until `stop` (`_light_loop`); a pass waiting for its
        final samples is told when the thread ends."""
        try:
            self._light_loop(stop)
        finally:
            self._stop_serving()

    def _light_loop(self, stop: threading.Event) -> None:
        """The periodic light samples, until `stop`: in this thread, never in trio's.

        A sample is due `sample_interval_s` after the freshest reading of every domain, this
        thread's last sample or the last pass's read: with passes that often (interval_s at or
        below it) no sample is taken at all, and the bound on what a destroyed VM leaves
        unbilled is the same. Where the stop watch sees the end of every domain
        (sources/stop_watch.py), the thread sleeps on it, samples a domain the moment its
        cgroup empties, and the periodic samples only back that up, every
        `watched_sample_interval_s`."""
        sampled_s = time.monotonic()
        watch = self.watch
        while True:
            c = self.collector.cfg.collector  # live-changeable
            interval_s = c.sample_interval_s
            if interval_s <= 0:
                self._stop_serving()  # light samples off: no final samples either
                if stop.wait(IDLE_CHECK_S):
                    return
                continue
            if watch is not None and self._watched_all:
                interval_s = max(interval_s, c.watched_sample_interval_s)
            pass_s = self.collector.read_monotonic_s
            freshest_s = sampled_s if pass_s is None else max(sampled_s, pass_s)
            wait_s = max(0.0, freshest_s + interval_s - time.monotonic())
            if watch is None:
                self._stop_serving()  # the pass reads the final samples itself
                if stop.wait(wait_s):
                    return
            else:
                self._serving = True
                try:
                    woken = watch.wait(0.0 if self._final_keys else wait_s)
                except Exception as err:  # a defect or a broken descriptor: never the samples
                    log.warning("VM ends no longer watched: light samples on the timer alone",
                                extra={"error": str(err)})
                    watch, self._watched_all = None, False  # run() closes it at the end
                    self._stop_serving()
                    continue
                if stop.is_set():
                    return
                asked, final = self._take_final()
                if final:  # an end already sampled when its cgroup emptied: read already
                    final = frozenset(k for k in final if not watch.has_ended(k))
                if woken is not None or final:
                    self._light_sample(watch, woken, final)
                    self._served(asked)
                    continue
                self._served(asked)  # nothing left to read for the asks taken
                if self._resync:  # new tails: watch them before their domains can end
                    self._resync = False
                    with self._sampling:
                        self._watch_targets(watch)
                if time.monotonic() < freshest_s + interval_s:
                    continue  # woken early: the wait starts again (the interval may differ)
            if self.collector.read_monotonic_s != pass_s:
                continue  # a pass read every domain meanwhile: due interval_s after it
            sampled_s = time.monotonic()
            self._light_sample(watch, None)

    def _watch_targets(self, watch: StopWatch | None) -> list[LightTarget]:
        """The current targets (`_targets_now`), their ends watched; `_sampling` held."""
        # a copy: trio replaces and updates the dict (a dict copy holds the GIL)
        targets = self._targets_now(None, dict(self.collector.tails))
        if watch is not None:
            try:
                self._sync_watch(watch, targets)
            except Exception as err:  # the samples go on, on the timer
                self._watched_all = False
                log.warning("VM ends not watched", extra={"error": str(err)})
        return targets

    def _light_sample(self, watch: StopWatch | None, woken: Woken | None,
                      final: frozenset[tails.Key] = frozenset()) -> None:
        """One sample of every domain (`woken` None, nothing `final`), or of the domains whose
        cgroup emptied or one of whose taps was deleted and the incarnations a pass found gone
        (`final`), with the final counters of the taps deleted before (a NIC's bytes up to its
        hot-unplug); the readings go to the inbox."""
        inbox = self.collector.light_inbox
        inbox.begin()
        got: dict[str, LightReading] = {}
        try:
            with self._sampling:
                targets = self._watch_targets(watch)
                deleted = None
                if watch is not None and watch.follows_links:
                    watch.collect_links()  # a tap deleted just before the cgroup emptied
                    deleted = watch.deleted or None
                if woken is not None or final:
                    if woken is None or not woken.overflow:
                        woke: set[object] = set(final)
                        if woken is not None:
                            woke |= woken.emptied | woken.unplugged
                        targets = [t for t in targets if (t.uuid, t.domid) in woke]
                    if woken is not None:
                        self.stops_seen += len(woken.emptied)
                if targets:
                    got = (self.sampler.sample(targets) if deleted is None
                           else self.sampler.sample(targets, deleted_links=deleted))
                    self.samples_total += 1
                if woken is not None or final:  # rare: a VM's end, or a pass's close-out
                    _log_ends(woken, final, got)
        except Exception as err:  # the next tick tries again; the pass is the truth
            self.sample_errors += 1
            log.warning("light sample failed", extra={"error": str(err)})
        finally:
            inbox.put(got)

    # --- the final samples of a pass's close-outs --------------------------------------------

    async def final_samples(self, keys: list[tails.Key]) -> None:
        """The last counters of incarnations the pass found gone, or read without a tap their
        tail follows (`tails.taps_gone`: the tap's final counters the watch kept), in the
        inbox before the pass merges them (`Collector.final_samples`).

        The stop watch reads a VM's final counters when its cgroup empties; an end it has not
        read yet (an event still queued, a cgroup it could not watch, a domain gone from the
        listing while its cgroup stays: a machined host) is read here. The thread that owns
        the watch samples these domains at once, with the deleted taps' final counters, unless
        it sampled their emptying already; the pass waits for it (bounded by
        `libvirt.call_timeout_s`). Without that thread (the timer alone), or when it did not
        answer, the pass reads them itself. A reading without CPU (the cgroup removed: on the
        lab libvirt removes it before the domain leaves the listing) never replaces the last
        good one. Light samples off: nothing."""
        coll = self.collector
        if coll.cfg.collector.sample_interval_s <= 0:
            return
        timeout_s = coll.cfg.libvirt.call_timeout_s
        watch = self.watch
        if watch is not None and self._serving:
            with self._final_cond:
                self._final_keys |= set(keys)
                self._final_asked += 1
                asked = self._final_asked
            watch.wake()
            if await handoff.run_sync(self._wait_served, asked, timeout_s,
                                      limiter=coll.limiter, abandon_on_cancel=True):
                return
        want = set(keys)

        def take() -> dict[str, LightReading]:
            with self._sampling:
                targets = [t for t in self._targets_now(None, dict(coll.tails))
                           if (t.uuid, t.domid) in want]
                return self.sampler.sample(targets) if targets else {}

        try:
            got = await handoff.run_sync(take, limiter=coll.limiter)
        except Exception as err:  # the close-out bills the last good reading
            self.sample_errors += 1
            log.warning("final light sample failed", extra={"error": str(err)})
            return
        self.samples_total += 1
        merge_into(coll.tails, got.values())

    def _take_final(self) -> tuple[int, frozenset[tails.Key]]:
        """The final samples asked for since the last take (in the thread): (the last ask's
        number, their keys)."""
        with self._final_cond:
            keys, self._final_keys = frozenset(self._final_keys), set()
            return self._final_asked, keys

    def _served(self, asked: int) -> None:
        """The asks up to `asked` are in the inbox (in the thread)."""
        if asked <= self._final_served:
            return  # nothing asked since: no lock round trip each wake-up
        with self._final_cond:
            self._final_served = max(self._final_served, asked)
            self._final_cond.notify_all()

    def _stop_serving(self) -> None:
        """The thread takes no final samples now: a pass waiting for one takes it itself."""
        if self._serving:
            with self._final_cond:
                self._serving = False
                self._final_cond.notify_all()

    def _wait_served(self, asked: int, timeout_s: float) -> bool:
        """Block until the thread answered ask `asked` (False: it stopped serving, or the
        time ran out)."""
        with self._final_cond:
            self._final_cond.wait_for(
                lambda: self._final_served >= asked or not self._serving, timeout_s)
            return self._final_served >= asked

    def _sync_watch(self, watch: StopWatch, targets: Sequence[LightTarget]) -> None:
        """Watch the v2 cgroups of `targets` (only when they changed: the list is cached)."""
        if targets is self._synced:
            return
        cgroups: dict[object, str] = {}
        taps: dict[int, object] = {}
        watchable = True
        for t in targets:
            if t.cpu_file is not None and t.cpu_file.endswith("/cpu.stat"):
                cgroups[(t.uuid, t.domid)] = self._root.abspath(t.cpu_file[:-len("/cpu.stat")])
            else:
                watchable = False  # v1 cpuacct: no cgroup.events, the timer alone
            if t.nics:
                if not watch.follows_links:
                    watchable = False  # taps whose deletion nobody hears of
                key = (t.uuid, t.domid)
                taps.update((n.ifindex, key) for n in t.nics)
        watch.sync(cgroups, taps)
        self._synced = targets
        self._watched_all = watchable and not watch.failed

    def new_tails(self) -> None:
        """Tails were added (a pass, a lifecycle read): the thread watches their domains' end
        now, not at its next sample. Thread-safe."""
        if self.watch is not None:
            self._resync = True
            self.watch.wake()

    def _targets_now(self, only: set[str] | None,
                     current: dict[tails.Key, tails.Tail]) -> list[LightTarget]:
        """One target per domain: its newest incarnation's (an older one's cgroup is gone)."""
        anchors: list[DomainReading] = []
        if only is None:
            # Between two passes the anchors stay the same objects (a light reading replaces
            # a Tail, not its anchor): the last answer holds (3 to 15 samples a pass at 30 s).
            anchors = [t.anchor for t in current.values()]
            last_anchors, last_out = self._last
            if len(anchors) == len(last_anchors) and all(
                    a is b for a, b in zip(anchors, last_anchors, strict=True)):
                return last_out
        newest: dict[str, tails.Tail] = {}
        for t in current.values():
            if only is not None and t.anchor.uuid not in only:
                continue
            best = newest.get(t.anchor.uuid)
            if best is None or t.anchor.t_wall_ns > best.anchor.t_wall_ns:
                newest[t.anchor.uuid] = t
        cache: dict[tails.Key, _Target] = {}
        out = []
        for t in newest.values():
            # Every pass brings a new anchor, but its target only changes with the domain's
            # XML (the inventory keeps the same DomainInfo until it re-reads it), its cgroup
            # (the facts are kept per incarnation) or where its taps are: reused otherwise.
            a = t.anchor
            nics = None if a.netlink_nics is None else tuple(
                (c.mac, c.ifname, c.ifindex) for c in a.netlink_nics.values())
            hit = self._targets.get(t.key)
            if hit is None or hit[0] is not a.info or hit[1] is not a.facts.cgroup \
                    or hit[2] != nics:
                hit = (a.info, a.facts.cgroup, nics, target_of(a))
            cache[t.key] = hit
            if hit[3] is not None:
                out.append(hit[3])
        if only is None:
            self._targets = cache
            self._last = (anchors, out)
        return out


def _log_ends(woken: Woken | None, final: frozenset[tails.Key],
              got: dict[str, LightReading]) -> None:
    """Debug: what a sample of VM ends read, and which ends it found no target for (how a
    close-out came to bill what it did)."""
    if not log.isEnabledFor(logging.DEBUG):
        return
    emptied = woken.emptied if woken is not None else frozenset()
    unplugged = woken.unplugged if woken is not None else frozenset()
    for key in sorted({*emptied, *unplugged, *final}, key=str):
        uuid, domid = key if isinstance(key, tuple) else (str(key), -1)
        light = got.get(uuid)
        read = light is not None and light.domid == domid
        log.debug("VM end sampled" if read else "VM end not sampled: no target", extra={
            "uuid": uuid, "domid": domid, "cpu_ns": light.cpu_ns if read and light else None,
            "emptied": key in emptied, "unplugged": key in unplugged,
            "asked_by_pass": key in final,
            "missing": (dict(light.missing) or None) if read and light else None})
