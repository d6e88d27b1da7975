"""The billing tail's tasks in the daemon's nursery: lifecycle events and light samples.

::

    LifecycleWatcher ──► channel ──► action_for(event)
                          ├ READ_NOW:         read_host(only={uuid}) → a new tail's anchor
                          ├ READ_BEFORE_GONE: light sample of that domain → tail.latest
                          ├ CLOSE:            the close reason on its tails
                          ├ DeviceAdded:      read_host(only={uuid}) → the tail follows its
                          │                   new taps (tails.with_taps: a NIC hot-plugged)
                          └ Reconnected:      nothing (events may be lost: polling finds
                                              every domain anyway)
    light-samples thread, asleep on the stop watch (sources/stop_watch.py):
      a VM cgroup empties ──► LightSampler.sample(that domain, deleted taps' final counters)
      a tap is deleted ─────► the same, for its domain (a NIC hot-unplugged, or the VM's end)
      every watched_sample_interval_s (sample_interval_s where an end is not watched):
      LightSampler.sample(targets)
          ──► Collector.light_inbox ──► (merged by trio) tail.latest

Everything lands in `Collector.tails` (accounting/tails.py), in memory only; the next pass
closes out the tails whose domain is gone in its one transaction. The lifecycle reads hold
`Collector.reading`, so they never interleave with a pass's read → commit (a pass holds it
from its wait for the tick on, and gives way when they ask: `Collector.exclusive`). The
periodic light samples run in a thread of their own, without trio (a sample through trio cost
a timer wake-up, a thread hand-off and a wake-up for its result, several times its reads): they
read the tails' targets from a copy and leave their readings in the inbox
(hostagent/light_inbox.py), which a pass merges before it closes anything out. Events are
hints: a lost one costs what polling costs.

The light-samples thread and the targets every light sample reads are in
hostagent/light_samples.py (LightSamples, mixed into TailTasks).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import trio

from hostagent import handoff
from hostagent.accounting import tails
from hostagent.accounting.closeout import LightReading
from hostagent.accounting.lifecycle import (
    Action,
    DeviceAdded,
    LifecycleEvent,
    action_for,
    close_reason,
)
from hostagent.accounting.readings import DomainReading
from hostagent.clock import Clock
from hostagent.collector import Collector
from hostagent.errors import SourceError
from hostagent.light_inbox import merge_into
from hostagent.light_samples import LightSamples
from hostagent.sources.files import HostRoot
from hostagent.sources.lifecycle import LifecycleWatcher, Message
from hostagent.sources.light import LightSampler, LightTarget
from hostagent.sources.netstats import LinkStats64Reader
from hostagent.sources.stop_watch import StopWatch

log = logging.getLogger(__name__)
CHANNEL_SIZE = 1000
# A STARTED/RESUMED read that fails (libvirt reconnecting) is tried this often, 1 s, 2 s apart.
READ_NOW_TRIES = 3
READ_NOW_RETRY_S = 1.0


class TailTasks(LightSamples):
    """Lifecycle consumer and light-sample loop feeding a collector's tails."""

    def __init__(self, collector: Collector, *, clock: Clock, watch_stops: bool = True
                 ) -> None:
        self.collector = collector
        self.clock = clock
        cfg = collector.cfg
        # Tap bytes by one RTM_GETSTATS dump on a real host; a recorded tree has no netlink.
        self.links = LinkStats64Reader() if cfg.paths.root in ("/", "") else None
        self._root = HostRoot(cfg.paths.root)
        self.sampler = LightSampler(self._root, fds=collector.fds, links=self.links,
                                    clock=clock)
        # The end of each VM, seen by the kernel (sources/stop_watch.py), made by run(): the
        # cgroups wherever they are read from, the taps' deletion on a real host only (the
        # link reader's condition). Where neither can be watched, the timer alone.
        self._watch_stops = watch_stops
        self.watch: StopWatch | None = None
        self._synced: Sequence[LightTarget] | None = None
        self._watched_all = False
        self._resync = False
        self.stops_seen = 0  # VM cgroups seen emptying (each sampled at once)
        self.watcher: LifecycleWatcher | None = None
        self.events_total: Counter[str] = Counter()
        self.samples_total = 0
        self.sample_errors = 0
        self._targets = {}
        self._last: tuple[list[DomainReading], list[LightTarget]] = ([], [])
        # One sample at a time: the thread's and an event's share the sampler (its netlink
        # socket) and the targets cache.
        self._sampling = threading.Lock()
        self._final_cond = threading.Condition()
        self._final_keys = set()
        self._final_asked = self._final_served = 0
        self._serving = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Until cancelled; started once the first subscription attempt finished."""
        c = self.collector.cfg.collector
        thread: threading.Thread | None = None
        try:
            async with trio.open_nursery() as nursery:
                if c.lifecycle_events:
                    send, recv = trio.open_memory_channel[Message](CHANNEL_SIZE)
                    self.watcher = LifecycleWatcher(
                        self.collector.cfg.libvirt.uri, clock=self.clock,
                        source=self.collector.libvirt,  # one connection: one to ping
                        keepalive_interval_s=c.lifecycle_keepalive_interval_s,
                        keepalive_count=c.lifecycle_keepalive_count,
                        reconnect_max_s=self.collector.cfg.libvirt.reconnect_max_s,
                        connect_timeout_s=self.collector.cfg.libvirt.call_timeout_s,
                        on_xml_change=self.collector.xml_changes.tell,
                        on_xml_heard=self.collector.xml_changes.hear)
                    await nursery.start(self.watcher.run, send)
                    nursery.start_soon(self._consume, recv)
                if self._watch_stops and self.watch is None:
                    try:
                        self.watch = StopWatch(links=self.links is not None)
                    except OSError as err:
                        log.warning("VM ends not watched: light samples on the timer alone",
                                    extra={"error": str(err)})
                stop = threading.Event()
                thread = threading.Thread(target=self._light_thread, args=(stop,),
                                          name="light-samples", daemon=True)
                thread.start()
                self.collector.on_new_tails = self.new_tails
                self.collector.final_samples = self.final_samples
                self.collector.ended_seen = self.ended_seen
                try:
                    task_status.started()
                    await trio.sleep_forever()
                finally:
                    self.collector.on_new_tails = None
                    self.collector.final_samples = None
                    self.collector.ended_seen = None
                    stop.set()
                    if self.watch is not None:
                        self.watch.wake()
                    with trio.CancelScope(shield=True), trio.move_on_after(2):
                        await handoff.run_sync(thread.join, abandon_on_cancel=True)
        finally:
            # Not under a sample still blocked in the kernel (the process is ending anyway).
            if thread is None or not thread.is_alive():
                if self.links is not None:
                    self.links.close()
                if self.watch is not None:
                    self.watch.close()
                    self.watch = None

    def ended_seen(self, key: tails.Key) -> bool:
        """Whether the stop watch saw `key`'s cgroup empty (and no process in it since)."""
        watch = self.watch
        return watch is not None and watch.has_ended(key)

    def health(self) -> dict[str, Any]:
        """The billing tail's counters, for /metrics: samples, VM ends seen at once, whether
        every VM's end is watched now, close-outs by reason; whether libvirt's XML change
        events are heard, and the domain XML reads by why."""
        coll = self.collector
        return {"light_samples": self.samples_total, "light_sample_errors": self.sample_errors,
                "vm_ends_seen": self.stops_seen,
                "vm_ends_watched": self.watch is not None and self._watched_all,
                "closeouts": dict(coll.closeouts_total),
                "xml_changes_heard": coll.xml_changes.heard,
                "domain_xml_reads": dict(coll.inventory.reads)}

    # --- lifecycle events -------------------------------------------------------------------

    async def _consume(self, recv: trio.MemoryReceiveChannel[Message]) -> None:
        async for msg in recv:
            batch = [msg]
            while len(batch) < CHANNEL_SIZE:  # whatever else is already queued
                try:
                    batch.append(recv.receive_nowait())
                except trio.WouldBlock:
                    break
            await self.on_events(batch)

    async def on_event(self, ev: LifecycleEvent) -> None:
        """Apply one lifecycle event to the tails (accounting/lifecycle.action_for)."""
        await self.on_events([ev])

    async def on_events(self, msgs: Sequence[Message]) -> None:
        """Apply queued events together: close reasons first (no I/O), then ONE light sample of
        the domains about to go (urgent: QEMU may exit any moment), then ONE read of the
        domains that started (a burst of starts costs one libvirt bulk call, not one each)."""
        starts: dict[str, LifecycleEvent] = {}
        going: set[str] = set()
        added: set[str] = set()
        coll = self.collector
        for msg in msgs:
            if isinstance(msg, DeviceAdded):
                self.events_total["DEVICE_ADDED"] += 1
                added.add(msg.uuid)
                continue
            if not isinstance(msg, LifecycleEvent):
                log.info("lifecycle events subscribed", extra={"reconnects": msg.reconnects})
                continue
            act = action_for(msg)
            self.events_total[msg.kind.name] += 1
            log.debug("lifecycle event", extra={"domain": msg.name, "uuid": msg.uuid,
                                                "kind": msg.kind.name, "detail": msg.detail,
                                                "action": act.value})
            if act is Action.READ_NOW:
                starts.setdefault(msg.uuid, msg)
            elif act is Action.READ_BEFORE_GONE:
                going.add(msg.uuid)
            elif act is Action.CLOSE:
                # Before the reads: a domain restarted within the batch keeps the reason on
                # its old tail only.
                coll.tails = tails.with_reason(coll.tails, msg.uuid, close_reason(msg))
        if going:
            await self.sample(going)
        if starts:
            await self._read_now(starts)
        added.difference_update(starts)  # read just now, as new tails or not
        if added:
            await self._read_taps(added)

    async def _read_taps(self, uuids: set[str]) -> None:
        """A device was hot-plugged into these running domains: one full read of them, and
        each tail follows the taps it reads from now on (`tails.with_taps`). A NIC plugged and
        unplugged again before the next pass is then still billed: the stop watch hears its
        tap's end, and the next pass bills that tap from zero (accounting/unplug.py). A failed
        read costs what polling alone costs (the NIC, if it stays, is read by the next pass)."""
        coll = self.collector
        async with coll.exclusive():
            try:
                host = await coll.read_host(only=uuids)
            except SourceError as err:
                log.info("device-added read failed", extra={
                    "domains": len(uuids), "error": str(err)})
                return
            moved = False
            for r in host.domains:
                key = (r.uuid, r.info.domid)
                had = coll.tails.get(key)
                if had is None:
                    continue
                now = tails.with_taps(had, r)
                if now is not had:
                    coll.tails[key] = now
                    moved = True
            if moved:
                self.new_tails()

    async def _read_now(self, starts: Mapping[str, LifecycleEvent]) -> None:
        """A full read of the (new) domains: each the anchor of its tail, unless it has one."""
        coll = self.collector
        for attempt in range(READ_NOW_TRIES):
            if attempt:
                # The pass's connection may be the one a libvirtd restart just broke: it
                # reconnects with backoff (the first retry is due after about 1 s).
                await trio.sleep(READ_NOW_RETRY_S * attempt)
            async with coll.exclusive():
                try:
                    host = await coll.read_host(only=set(starts))
                except SourceError as err:
                    log.info("lifecycle read failed", extra={
                        "domains": len(starts), "error": str(err), "attempt": attempt + 1})
                    continue
                self._anchor(starts, host.domains)
                return

    def _anchor(self, starts: Mapping[str, LifecycleEvent],
                readings: Sequence[DomainReading]) -> None:
        """Each reading the anchor of a new tail, unless its (uuid, domid) has one."""
        for got in readings:
            r = got
            ev = starts.get(r.uuid)
            if ev is not None and r.facts.started_wall_ns is None:
                # The process started no later than the event: a VM that lives less than a
                # pass must not look pre-existing (it would not be billed).
                r = dataclasses.replace(r, facts=dataclasses.replace(
                    r.facts, started_wall_ns=ev.t_wall_ns))
            key = (r.uuid, r.info.domid)
            if key not in self.collector.tails:
                self.collector.tails[key] = tails.Tail.of(r)
                self.new_tails()

    # --- an event's light sample (the thread's: hostagent/light_samples.py) ----------------

    async def sample(self, only: set[str] | None) -> int:
        """One light sample of the domains with a tail (or `only` those), now; how many were
        read. The periodic samples are merged first (they are older)."""
        coll = self.collector
        async with coll.exclusive():
            await coll.merge_light()
            current = coll.tails

            def take() -> dict[str, LightReading]:
                with self._sampling:
                    targets = self._targets_now(only, current)
                    return self.sampler.sample(targets) if targets else {}

            got = await handoff.run_sync(take, limiter=coll.limiter)
            if got:
                self.samples_total += 1
            merge_into(coll.tails, got.values())
            return len(got)
