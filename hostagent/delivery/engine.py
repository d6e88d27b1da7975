"""Delivery: the outbox drained to every sink by the drain engine, plus upkeep and metrics.

One `drain.Drain` per sink runs the engine's loop over that sink's rows of the outbox
(`sink_queue.SinkQueue`: take, send, record; retries, circuit breaker, dead letters): sinks
never wait on each other, and the collector never waits on them.

Construction writes nothing. `prepare()` (called by `run()` if nobody did earlier) tells the
store which kinds and channels each sink takes and the size cap: that may re-route rows an
older hostagent wrote (hostagent.store.upkeep.drop_unrouted), so it is an explicit step.

Upkeep prunes acknowledged events past `retention_s`, merges pending events near `max_bytes`
(counting the room the next pass needs; see hostagent.store.upkeep), refreshes the depth
gauges and writes a heartbeat and the breaker states for `hostagent outbox status`, every
`maintenance_interval_s`. While passes commit, it rides on a pass commit's worker call
(`write_committed`) once half an interval has passed since the last: no wake-up of its own,
the store's pages still warm from the commit. A commit the cap refuses makes room itself
(`Store.commit_pass`). The maintenance task runs it on its own only when 1.5 intervals pass
without one (passes that fail or come slower), and for the size check a commit asks for. Each
upkeep on its own woke trio twice (its timer, its worker call's answer), ~1.6 ms of process
CPU on the lab VM beside 8 TCG guests: at the default 30 s pass interval three of them cost a
quarter of the daemon.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import trio

from hostagent import handoff
from hostagent.clock import Clock
from hostagent.config.load import Config
from hostagent.config.schema import OutboxConfig
from hostagent.delivery import metrics as em
from hostagent.delivery.drain import Drain, all_quiet
from hostagent.delivery.sink_queue import SinkQueue
from hostagent.delivery.sinks.base import Sink
from hostagent.errors import StateError
from hostagent.store.inspect import Pending, SinkStats, StoreSize
from hostagent.store.outbox import Maintenance, Store

log = logging.getLogger(__name__)
T = TypeVar("T")
SINK_CLOSE_GRACE_S = 5.0  # at shutdown: recording the last outcomes and closing the sinks
# Upkeep rides on a pass commit once this share of maintenance_interval_s has passed since the
# last one; the maintenance task runs it alone once ALONE_AFTER intervals passed without one.
RIDE_AFTER = 0.5
ALONE_AFTER = 1.5


class Delivery:
    """Drains the outbox to every sink; `wake()` after each commit."""

    def __init__(self, store: Store, sinks: Sequence[Sink], clock: Clock,
                 cfg: Config | OutboxConfig, *, rng: random.Random | None = None) -> None:
        self.store = store
        self.clock = clock
        self.cfg = cfg.outbox if isinstance(cfg, Config) else cfg
        rng = rng or random.Random()
        self._sinks = list(sinks)
        self._queues = [SinkQueue(s, store, self.cfg, clock, rng, self._saw_used_bytes)
                        for s in sinks]
        self._drains: list[Drain[Pending]] = [Drain(q, clock) for q in self._queues]
        self._maint_wake = trio.Event()
        self._stats: dict[str, SinkStats] = {}
        self._size = StoreSize(0, 0, 0)
        self._merges = 0
        self._prepared = False
        self._upkeep_s = -math.inf  # self.clock's monotonic seconds of the last upkeep
        self._alone: trio.CancelScope | None = None  # the maintenance task's wait
        # The sinks whose rows the last pass commit wrote and settled itself (write_committed)
        self._settled_at_commit: frozenset[str] = frozenset()

    def prepare(self) -> None:
        """Configure the store for these sinks (routing, size cap); writes. Synchronous."""
        self.store.configure(sink_kinds={s.name: s.kinds for s in self._sinks},
                             sink_channels={s.name: s.channels for s in self._sinks},
                             max_bytes=self.cfg.max_bytes)
        self._prepared = True

    async def _db(self, fn: Callable[..., T], *args: Any) -> T:
        # Not abandoned on cancel: the caller must know whether a transaction committed.
        return await handoff.run_sync(fn, *args)

    # --- the tasks ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run every sink's drain and the maintenance loop until cancelled."""
        try:
            if not self._prepared:
                await self._db(self.prepare)
            await self._refresh()
            async with trio.open_nursery() as nursery:
                for d in self._drains:
                    nursery.start_soon(d.run)
                nursery.start_soon(self._maintenance_loop)
                task_status.started()
        finally:
            with trio.move_on_after(SINK_CLOSE_GRACE_S) as scope:
                scope.shield = True
                for q in self._queues:
                    try:
                        await q.settle()
                    except StateError as err:
                        q.store_failed(err)
                for s in self._sinks:
                    await s.aclose()

    def wake(self, *, after_commit: bool = False) -> None:
        """New events were committed (`after_commit`: by the pass) or may be due: every sink
        looks for work now, except, after a pass, those whose rows that commit's worker call
        wrote and settled (`write_committed`). An idle sink whose breaker is closed takes at
        once and its take reads the store's size, as does a write at the commit: maintenance
        then only runs if the cap is near (`_saw_used_bytes`); otherwise it checks the size
        now."""
        settled = self._settled_at_commit if after_commit else frozenset()
        self._settled_at_commit = frozenset()
        if not settled and not any(d.idle and q.breaker.state == "closed"
                                   for d, q in zip(self._drains, self._queues, strict=True)):
            self._maint_wake.set()
        for d, q in zip(self._drains, self._queues, strict=True):
            if q.name not in settled:
                d.wake()

    def write_committed(self, claimed: Mapping[str, Sequence[Pending]]) -> Callable[[], None]:
        """In the pass commit's worker call, right after the commit: the local sinks that are
        caught up write the rows it claimed for them (hostagent.delivery.local_round), and the
        upkeep runs if half an interval passed since the last. Returns what trio then applies
        (counters, breaker, gauges, the next `wake(after_commit=True)`)."""
        now_ns = self.clock.now().wall_ns
        done = [(q, r) for q in self._queues if (rows := claimed.get(q.name))
                and (r := q.write_at_commit(rows, now_ns)) is not None]
        upkept = None
        now_s = self._now_s()
        ride_s = RIDE_AFTER * self.cfg.maintenance_interval_s
        if self._prepared and now_s - self._upkeep_s >= ride_s:
            try:
                upkept = self._upkeep(True)
            except StateError as err:  # the maintenance task tries again on its own
                log.error("outbox maintenance failed", extra={"error": str(err)})

        def apply() -> None:
            self._settled_at_commit = frozenset(q.name for q, r in done
                                                if q.written_at_commit(r))
            if upkept is not None:
                self._upkept(now_s, upkept)
        return apply

    def _saw_used_bytes(self, used_bytes: int) -> None:
        if self.store.near_cap(used_bytes):  # the next pass's reserve counted
            self._maint_wake.set()

    async def drained(self) -> None:
        """Return once every sink has found nothing it can send right now (`drain.all_quiet`;
        through store errors: its unrecorded acknowledgements wait for its next take)."""
        await all_quiet(lambda: self._drains)

    def _now_s(self) -> float:
        return self.clock.now().monotonic_ns / 1e9

    async def _maintenance_loop(self) -> None:
        interval_s = self.cfg.maintenance_interval_s
        while True:
            failed = False
            try:
                now_s = self._now_s()
                # After a commit only the cheap size check runs, unless the cap is near. One
                # worker call either way (a thread hand-off and a wake-up per step cost more
                # than the steps, every maintenance interval, on an idle host too).
                done = await self._db(self._upkeep, now_s - self._upkeep_s >= interval_s)
                if done is not None:
                    self._upkept(now_s, done)
            except StateError as err:
                log.error("outbox maintenance failed", extra={"error": str(err)})
                failed = True
            # A pass commit that runs the upkeep moves this deadline (`_upkept`): while passes
            # commit, this task wakes only when a commit asks for a size check.
            wait_s = max(0.0, self._upkeep_s + ALONE_AFTER * interval_s - self._now_s())
            if failed:  # a store that cannot be upkept (disk full): again in an interval, not
                wait_s = max(wait_s, interval_s)  # at once (that spun a core, forever)
            with trio.CancelScope(deadline=trio.current_time() + wait_s) as self._alone:
                await self._maint_wake.wait()
            self._alone = None
            self._maint_wake = trio.Event()

    def _upkept(self, at_s: float,
                done: tuple[Maintenance, dict[str, SinkStats], StoreSize]) -> None:
        """An upkeep ran (at `at_s`, self.clock's monotonic seconds): its figures, and the
        maintenance task's next run alone moved to ALONE_AFTER intervals after it."""
        if at_s > self._upkeep_s:
            self._upkeep_s = at_s
            if self._alone is not None:
                self._alone.deadline = trio.current_time() + max(
                    0.0, at_s + ALONE_AFTER * self.cfg.maintenance_interval_s - self._now_s())
        self._after_upkeep(*done)

    def _upkeep(self, due: bool) -> tuple[Maintenance, dict[str, SinkStats], StoreSize] | None:
        """In a worker: the size check; if `due` or the cap is near (the next pass's reserve
        counted: `Store.near_cap`), prune/merge, heartbeat and the gauges' figures (None: not
        run)."""
        if not due and not self.store.near_cap(self.store.size().used_bytes):
            return None
        rep = self.store.maintain(self.cfg.retention_s)
        self.store.heartbeat()
        return rep, *self._gauge_figures()

    def _gauge_figures(self) -> tuple[dict[str, SinkStats], StoreSize]:
        """In a worker: the depth gauges' figures and the store's size."""
        return self.store.stats(acked=False), self.store.size()

    def _after_upkeep(self, rep: Maintenance, stats: dict[str, SinkStats],
                      size: StoreSize) -> None:
        self._merges += rep.merges
        for q in self._queues:
            q.counters.merged += rep.merged.get(q.name, 0)
        self._stats, self._size = stats, size
        if rep.merges:
            self.wake()

    async def _refresh(self) -> None:
        self._stats, self._size = await self._db(self._gauge_figures)

    async def refresh_metrics(self) -> None:
        """Re-read the depth gauges now (tests and `hostagent outbox status`)."""
        await self._refresh()

    # --- reading ------------------------------------------------------------------------

    def metrics(self) -> em.EmissionMetrics:
        """A snapshot of counters and gauges (gauges as of the last maintenance run)."""
        now = self.clock.now().wall_ns
        sinks = {}
        for q in self._queues:
            st = self._stats.get(q.name)
            oldest = st.oldest_pending_ns if st else None
            sinks[q.name] = em.snapshot(
                q.name, q.counters, depth=st.pending if st else 0,
                oldest_pending_age_s=None if oldest is None else max(now - oldest, 0) / 1e9,
                dead_letters=st.dead if st else 0, breaker_state=q.breaker.state,
                breaker_opened=q.breaker.opened_count)
        return em.EmissionMetrics(sinks=sinks, store_used_bytes=self._size.used_bytes,
                                  store_file_bytes=self._size.file_bytes,
                                  store_max_bytes=self.cfg.max_bytes, merges=self._merges)

    def health(self) -> dict[str, Any]:
        """Per-sink breaker, depth, oldest pending age; "degraded" when a sink is not healthy."""
        m = self.metrics()
        sinks = {name: {"breaker": s.breaker_state, "depth": s.depth,
                        "oldest_pending_age_s": s.oldest_pending_age_s,
                        "dead_letters": s.dead_letters, "published": s.published,
                        "failed": s.failed, "last_error": s.last_error,
                        "last_error_at": _iso(s.last_error_wall_ns)}
                 for name, s in m.sinks.items()}
        degraded = [n for n, s in m.sinks.items() if s.breaker_state != "closed"]
        full = self.store.near_cap(m.store_used_bytes)
        return {"status": "degraded" if degraded or full else "ok", "sinks": sinks,
                "degraded_sinks": degraded, "store_used_bytes": m.store_used_bytes,
                "store_max_bytes": m.store_max_bytes, "store_near_cap": full}


def _iso(ns: int | None) -> str | None:
    """RFC 3339 UTC, milliseconds (as the API's times)."""
    if ns is None:
        return None
    return datetime.fromtimestamp(ns / 1e9, tz=UTC).isoformat(timespec="milliseconds") \
        .replace("+00:00", "Z")
