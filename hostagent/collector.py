"""One pass: read the host (one `DomainReading` per domain) → account (pure) → ONE commit.

The pass commits the new baselines and the events they produced in one SQLite transaction. A
crash before the commit repeats the pass from the old baselines; a crash after it resends from
the outbox. A failed commit (disk full) leaves the in-memory baselines untouched too, so the next
successful pass covers the whole gap.

One domain's failed read costs only its readings (marked missing, or the domain withheld with
its baseline kept; see `read_errors`); only host-wide failures fail a pass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable

import trio

from hostagent import handoff, pass_reads
from hostagent.accounting import inventory, ledger, tails, unattributed
from hostagent.accounting.readings import (
    Accounting,
    HostFacts,
    PassReport,
)
from hostagent.alerts import state as threshold_state
from hostagent.alerts import violations as alerts
from hostagent.alerts.rules_source import RulesSource
from hostagent.alerts.violations import StormControl
from hostagent.clock import Clock
from hostagent.config.load import Config
from hostagent.errors import SourceError, StateError
from hostagent.host_reads import HostReads
from hostagent.instance_ids import InstanceIds
from hostagent.light_inbox import LightInbox, merge_into
from hostagent.model import Baseline
from hostagent.owners.resolver import Owners
from hostagent.pass_ports import AfterCommit, PassStore
from hostagent.read_errors import ReadErrorLog
from hostagent.sources.cgroup_read import CgroupReader
from hostagent.sources.domain_files import DomainFiles, LinkReader
from hostagent.sources.fdcache import FdCache
from hostagent.sources.files import HostRoot
from hostagent.sources.gpu import GpuSource
from hostagent.sources.libvirt import LibvirtSource
from hostagent.sources.unattributed import parent_cpu_stat
from hostagent.tick import TickWait, WaitInterrupted
from hostagent.xml_changes import XmlChanges

log = logging.getLogger(__name__)

# Owner-cache entries of instances no longer running are dropped every this many passes.
OWNER_RETAIN_EVERY_PASSES = 20
HUNG_STATS = pass_reads.HUNG_STATS
OnRead = Callable[[], Awaitable[None]]  # awaited once a timed pass has read the host


class Collector(HostReads):
    """Owns the sources, the inventory and the in-memory baselines; `run_pass()` does one pass."""

    def __init__(
        self,
        cfg: Config,
        *,
        clock: Clock,
        store: PassStore | None,
        owners: Owners,
        libvirt_source: LibvirtSource,
        link_reader: LinkReader,
        gpu_source: GpuSource | None,
        limiter: trio.CapacityLimiter,
        rules: RulesSource | None = None,
        storm: StormControl | None = None,
    ) -> None:
        self.cfg = cfg
        self.clock = clock
        self.store = store
        self.owners = owners
        self.libvirt = libvirt_source
        self.gpu = gpu_source
        self.limiter = limiter
        # Disk bytes come from libvirt (v1 blkio stays 0 on kernel 6.x); a v2 `io.stat` is
        # read only to anchor the tails: a VM that ends before the next pass is billed the
        # io.stat growth since this reading (accounting/closeout.io_growth), none lost
        # before its first light sample.
        # Nothing uses a cgroup's memory limit (events carry libvirt's allocation): not read.
        # Kept-open cgroup files, across passes; whoever owns the collector calls close().
        self.fds = FdCache()  # shared with the light sampler (hostagent/tailing.py)
        self.cgroups = CgroupReader(HostRoot(cfg.paths.root), io="v2", limit=False,
                                    pressure=cfg.collector.pressure, fds=self.fds)
        self.files = DomainFiles(HostRoot(cfg.paths.root), cgroup_root=cfg.paths.cgroup_root,
                                 pressure=cfg.collector.pressure, cgroups=self.cgroups,
                                 links=link_reader,
                                 monotonic_s=lambda: clock.now().monotonic_ns / 1e9)
        self.inventory = inventory.Inventory(inventory.refresh_passes(cfg.collector.interval_s))
        # What libvirt's XML change events told (the lifecycle watcher; hostagent/xml_changes.py)
        self.xml_changes = XmlChanges()
        self.baselines: dict[str, Baseline] = store.load_baselines() if store is not None else {}
        self.rules = rules
        self.storm = storm
        raw_states = store.load_alert_state() if store is not None and rules is not None else {}
        self.alert_states: dict[str, threshold_state.AlertState] = threshold_state.load_states(
            {k: v for k, v in raw_states.items() if k != alerts.STORM_KEY})
        if storm is not None:  # the buckets survive a restart
            storm.restore(raw_states.get(alerts.STORM_KEY))
        # A pass has looked for the open alerts of VMs gone while the daemon was down.
        self.unseen_checked = False
        self._facts: dict[tuple[str, int], HostFacts] = {}
        c = cfg.collector
        self._instance_ids = InstanceIds(c.instance_id, cfg.host.node_id, c.instance_id_xpath)
        self.read_errors = ReadErrorLog()
        self.last: PassReport | None = None
        self._passes = 0
        self.last_ok_wall_ns: int | None = None
        # The billing tail (docs/billing-tail.md): one reader at a time (pass, lifecycle read,
        # light sample); per incarnation the last readings since the pass, closed out by it.
        self.reading = trio.Lock()
        self.tails: dict[tails.Key, tails.Tail] = {}
        # The periodic light samples' readings (taken in a thread), merged when tails are used.
        self.light_inbox = LightInbox()
        # Called when a pass adds tails (new domains) or changes the taps of one (a NIC
        # hot-plugged or re-plugged: `tails.watch_moved`): the light-samples thread watches
        # their end (hostagent/tailing.py). Thread-safe; called in trio.
        self.on_new_tails: Callable[[], None] | None = None
        # Called by a pass that finds incarnations gone, before it closes them out: their
        # final counters, read now (hostagent/light_samples.py, `final_samples`).
        self.final_samples: Callable[[list[tails.Key]], Awaitable[None]] | None = None
        # Whether the stop watch saw an incarnation's cgroup empty (its end, before libvirt
        # says so: `ended_in_memory`). Thread-safe; set by hostagent/tailing.py.
        self.ended_seen: Callable[[tails.Key], bool] | None = None
        self.closeouts_total: Counter[str] = Counter()
        self.unattributed: unattributed.UnattributedCpu | None = None
        self._root = HostRoot(cfg.paths.root)
        self._parent_cpu: str | None = parent_cpu_stat(self._root, cfg.paths.cgroup_root)
        self._early: pass_reads.EarlyReads | None = None
        # When the last pass read the host (time.monotonic()): the light-samples thread
        # counts its interval from the freshest reading, a pass's or its own.
        self.read_monotonic_s: float | None = None
        # Delivery: a caught-up JSONL sink's rows written in the commit's worker call
        self.after_commit: AfterCommit | None = None
        # What a pass waiting for its tick in a worker sleeps on (run_pass_at, interrupt_wait).
        self._tick = threading.Event()

    # --- the pass ---------------------------------------------------------------------------

    async def run_pass(self) -> PassReport:
        """One pass, now; never raises for source or sink trouble (it is reported and counted)."""
        report = await self._run(None)
        assert report is not None  # only a wait for a tick is ever cut short
        return report

    async def run_pass_at(self, due_s: float, *, stop: Callable[[], bool],
                          on_read: OnRead | None = None) -> PassReport | None:
        """The daemon's pass: one pass at `due_s` (time.monotonic()), whose wait for that tick
        is done by the worker that then reads the host (hostagent/tick.py); None when `stop()`
        came first, unless a VM ended since the last pass (`ended_in_memory`): then one pass
        at once, which commits its close-out before the daemon stops.

        `on_read()` is awaited on trio's side once the host is read (the daemon shields the
        rest of the pass there, closes the API's pass gate and lets requests in flight
        finish). A wait cut short by a reader (`exclusive`) lets the readers queued for
        `reading` go first, then waits again for what is left of the interval.
        """
        try:
            while not stop():
                report = await self._run(TickWait(due_s, self._tick), on_read, stop)
                if report is not None:
                    return report
            if self.ended_in_memory():
                # A stop between two passes: the close-outs of the VMs that ended since the
                # last one live in memory only (their final counters, read when their cgroup
                # emptied). Commit them now, in one pass more, or a restart loses them.
                return await self._run(None, on_read)
            return None
        except BaseException:
            self.interrupt_wait()  # cancelled while waiting: that worker stops sleeping
            raise

    def ended_in_memory(self) -> bool:
        """Some VM ended since the last pass (libvirt's STOPPED, CRASHED or UNDEFINED put a
        close reason on its tail, or, ~1.5 s before libvirt's event, the stop watch saw its
        cgroup empty: `ended_seen`): what it used since that pass is billed only by a pass.

        Before, a daemon stopped (SIGTERM) between two passes lost those close-outs, as a kill
        -9 does: on the lab a guest destroyed 2 s after a pass and the daemon stopped 0.3 s
        later was billed 3,263.9 of its 3,429.8 ms of CPU and 532 of its 770 bytes of egress,
        though the daemon held the final counters (up to `interval_s` of a VM's usage)."""
        seen = self.ended_seen
        return any(t.reason is not None or (seen is not None and seen(k))
                   for k, t in self.tails.items())

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """The collector to oneself, for a read outside the pass (a lifecycle read, a light
        sample): a pass waiting for its tick holds `reading`, and gives way when asked."""
        self.interrupt_wait()
        async with pass_reads.held(self.reading):
            yield

    def interrupt_wait(self) -> None:
        """Someone needs the collector now (a lifecycle read, a light sample, a stop): a pass
        waiting for its tick stops waiting and gives way. Thread-safe; harmless otherwise."""
        self._tick.set()

    async def _run(self, wait: TickWait | None, on_read: OnRead | None = None,
                   stop: Callable[[], bool] | None = None) -> PassReport | None:
        """One pass (after `wait`, in its first worker call); None: the wait was cut short."""
        start = self.clock.now()
        cpu0 = time.process_time()
        report = PassReport(started_wall_ns=start.wall_ns)
        timeout_s = self.cfg.collector.pass_timeout_s
        drained_s = 0.0
        try:
            # The deadline counts from the tick: the wait is not the pass's time.
            with trio.fail_after(timeout_s + (wait.remaining_s() if wait is not None
                                              else 0.0)) as deadline:
                async with pass_reads.held(self.reading):
                    if wait is not None:
                        if self.reading.statistics().tasks_waiting:
                            return None  # readers queued behind this pass: theirs first
                        self._tick.clear()  # any later reader or stop sets it again
                        if stop is not None and stop():
                            return None
                    drained_s = await self._pass_locked(report, wait, on_read, deadline)
        except WaitInterrupted:
            return None
        except SourceError as err:
            # Nothing is committed: baselines stay, and the next good pass covers this one.
            report.error = f"source unavailable: {err}"
        except trio.TooSlowError:
            report.error = f"pass exceeded pass_timeout_s={timeout_s}"
            log.warning("pass timed out", extra={"timeout_s": timeout_s})
        except StateError as err:
            report.error = f"commit failed: {err}"
            log.error("pass not committed; baselines kept", extra={"error": str(err)})
        waited_ns = int(wait.waited_s * 1e9) if wait is not None else 0
        report.started_wall_ns = start.wall_ns + waited_ns
        report.duration_s = (self.clock.now().monotonic_ns - start.monotonic_ns
                             - waited_ns) / 1e9 - drained_s
        if wait is not None and wait.cpu_at_wake_s is not None:
            cpu0 = wait.cpu_at_wake_s
        report.cpu_s = time.process_time() - cpu0
        report.read_errors_total = dict(self.read_errors.total)
        if report.committed:
            self.last_ok_wall_ns = report.started_wall_ns
        self.last = report
        return report

    async def merge_light(self) -> None:
        """Merge the periodic light samples into the tails; a sample in flight is waited for
        (bounded by `libvirt.call_timeout_s`), so every sample taken before now is in."""
        inbox = self.light_inbox
        if inbox.busy:
            await handoff.run_sync(inbox.wait_idle, self.cfg.libvirt.call_timeout_s,
                                   limiter=self.limiter, abandon_on_cancel=True)
        merge_into(self.tails, inbox.take())

    def settings(self) -> ledger.Settings:
        """The accounting settings of this collector's configuration and store."""
        c = self.cfg.collector
        return ledger.Settings(
            node_id=self.cfg.host.node_id, time_format=c.time_format,
            store_created_ns=self.store.created_ns if self.store is not None else 0,
            count_preexisting=c.count_preexisting,
            baseline_retention_ns=int(c.baseline_retention_s * 1e9),
            unassigned=self.cfg.owners.unassigned, name_is_build_id=c.instance_id == "formation")

    async def _pass_locked(self, report: PassReport, wait: TickWait | None,
                           on_read: OnRead | None, deadline: trio.CancelScope) -> float:
        """The pass, its reading lock held; the seconds `on_read` took (not the pass's)."""
        host = await self.read_host(wait=wait)
        self.read_monotonic_s = time.monotonic()
        host, ended = tails.ended_while_listed(self.tails, self.baselines, host)
        if ended:
            log.info("VM process ended while libvirt still listed it (its cgroup removed): "
                     "closed out at its last reading", extra={"uuids": list(ended)})
        drained_s = 0.0
        if on_read is not None:
            # The API requests it lets finish (the daemon's drain, bounded) are not the pass's
            # time: the deadline stands still meanwhile.
            t0, due = trio.current_time(), deadline.deadline
            deadline.deadline = math.inf
            try:
                await on_read()
            finally:
                drained_s = trio.current_time() - t0
                deadline.deadline = due + drained_s
        parent_ns = await self._read_parent_cpu()
        gone = tails.gone_keys(self.tails, host)
        if self.final_samples is not None:
            # A VM that ended just before the host reading may not have been sampled at its
            # end yet (the kernel's notification still queued, its thread not yet run); a
            # tap deleted (a NIC unplugged) while the last pass read the host left only a
            # light reading older than its anchor (`tails.taps_gone`).
            unplugged = tails.taps_gone(self.tails, host)
            if gone or unplugged:
                await self.final_samples(gone + unplugged)
        await self.merge_light()
        closing = tails.closings(self.tails, gone)
        self.read_errors.note(host.errors, {r.uuid for r in host.domains})
        report.libvirt_path, report.timed_out = host.path, host.timed_out
        report.read_errors = host.errors
        # Until a pass has read every running domain since the start, the open alerts of VMs
        # that went away while the daemon was down are looked for (once: while the daemon
        # runs, every VM that stops is closed out, which resolves its alerts).
        unseen_due = (not self.unseen_checked and bool(self.alert_states)
                      and pass_reads.read_every_running(host))
        acc, samples = ledger.account(
            self.baselines, host.domains, owners=self.owners, settings=self.settings(),
            now_ns=host.t_wall_ns, rules=self.rules.index if self.rules is not None else None,
            alert_states=self.alert_states, gate=self.storm,
            retired=self.rules.retired if self.rules is not None else None, closing=closing,
            live=self.tails, gpu_changes=self.xml_changes.hostdev_changes,
            complete=unseen_due)
        if self.storm is not None and self.storm.dirty:  # buckets go in the same transaction
            acc = dataclasses.replace(acc, alert_changes={
                **acc.alert_changes, alerts.STORM_KEY: self.storm.to_bytes()})
        store = self.store
        if store is None:
            raise StateError("no state store: a pass cannot commit")
        # Shielded: once the commit starts, the pass deadline must not cancel it, or the store
        # would hold new baselines while memory keeps the old ones and re-bills the period.
        with trio.CancelScope(shield=True):
            written = await handoff.run_sync(self._commit, store, acc, self.after_commit,
                                             limiter=self.limiter)
            for b in acc.baselines:
                self.baselines[b.instance_id] = b
            for iid in acc.removed:
                self.baselines.pop(iid, None)
            if (ask := pass_reads.libvirt_cpu_wanted(host.domains, self.baselines)) is not None:
                self.libvirt.ask_cpu = ask  # the next pass's stats call
            self.alert_states = dict(acc.alert_states)
            self.unseen_checked = self.unseen_checked or unseen_due or (
                not self.alert_states and not host.errors)
            if self.rules is not None:  # their resolved notices are committed now
                self.rules.forget_retired(acc.retired)
            if self.xml_changes.hostdev_changes:  # billed: those of unread domains stay
                self.xml_changes.settled({e.uuid for e in host.errors})
            before = self.tails
            self.tails = tails.after_pass(self.tails, host, [c.key for c in closing], samples)
            if self.on_new_tails is not None and tails.watch_moved(before, self.tails):
                self.on_new_tails()  # new tails, or taps of a tail hot-plugged or re-plugged
            if written is not None:
                written()
        for c in closing:
            self.closeouts_total[c.reason] += 1
            last_ns = max(c.reading.t_wall_ns, c.light.t_wall_ns if c.light is not None else 0)
            log.info("incarnation closed out", extra={
                "uuid": c.reading.uuid, "domid": c.reading.info.domid, "reason": c.reason,
                "reading_age_s": round((host.t_wall_ns - last_ns) / 1e9, 3),
                "light": c.light is not None})
        self.unattributed = unattributed.advance(
            self.unattributed, parent_ns, host.t_wall_ns, acc.usages,
            settled=unattributed.settled(acc.usages, host.errors))
        report.unattributed = self.unattributed
        report.committed = True
        report.domains = len(samples)
        report.events = len(acc.events)
        report.missing = sum(len(s.missing) for s in samples)
        report.usages, report.samples = tuple(acc.usages), tuple(samples)
        report.owners = acc.owners
        self._passes += 1
        if self._passes % OWNER_RETAIN_EVERY_PASSES == 0:
            self.owners.retain({s.instance_id for s in samples})
        return drained_s

    async def _read_parent_cpu(self) -> int | None:
        """The VMs' parent cgroup's CPU (v2), None without one or when unreadable: read in the
        bulk call's worker call, or (that did not run) in a call of its own."""
        early, self._early = self._early, None
        if early is not None and early.parent_read:  # read in the bulk call's worker call
            return early.parent_ns
        if self._parent_cpu is None:
            return None
        return await handoff.run_sync(pass_reads.parent_cpu_ns, self._root,
                                      self._parent_cpu, self.fds, limiter=self.limiter)

    @staticmethod
    def _commit(store: PassStore, acc: Accounting,
                after: AfterCommit | None) -> Callable[[], None] | None:
        """In a worker: the commit, then (committed: nothing may fail the pass now) what
        `after` writes at once."""
        claimed = store.commit_pass(acc.baselines, acc.events, removed_instances=acc.removed,
                                    alert_state=acc.alert_changes or None)
        if after is None:  # (nothing claimed: the outbox upkeep may still be due)
            return None
        try:
            return after.write_committed(claimed)
        except Exception:  # a defect: the rows stay claimed and due, the drain sends them
            log.exception("writing at the commit failed; left to the delivery")
            return None
