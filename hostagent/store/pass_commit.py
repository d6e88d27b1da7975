"""The pass's ONE transaction (`Store.commit_pass`) and the room it keeps for the next one:
PassCommit, mixed into hostagent.store.outbox.Store.

`commit_pass` writes the pass's new baselines, its events with a pending delivery row for
every sink that takes them (hostagent.alerts.routing), and its alert state changes in one
transaction; an event stored by an earlier try of the same pass is not inserted again. The rows
of the sinks in `claim_at_commit` are inserted claimed and returned, for the pass to write at
once (hostagent.delivery.local_round). Refused for room under the size cap, the commit has the
store make room (`Store._make_room`, hostagent.store.upkeep) and tries once more.

A commit measures what it adds to the pages in use (near the cap, and every
MEASURE_EVERY_COMMITS commits): the most of the last RESERVE_PASSES is the room kept for the
next pass (`reserve_bytes`), which `near_cap` counts with the pages in use.
"""

from __future__ import annotations

import sqlite3
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager

import orjson

from hostagent.alerts import routing
from hostagent.clock import Clock
from hostagent.errors import StoreFull
from hostagent.model import Baseline, OutEvent
from hostagent.store import bulk, upkeep
from hostagent.store.inspect import Pending, StoreReader

# The room kept for the next pass (`Store.reserve_bytes`): the most any of this many of the
# last pass commits added to the pages in use.
RESERVE_PASSES = 4
# A commit measures what it adds (two PRAGMAs before, two after: ~0.04 ms of an 8-event
# commit's 0.25) only when the store was last seen at half its cap or more, and every this
# many commits whatever it was seen at: far from the cap the reserve cannot matter (a pass
# bigger than the room left is the refused commit's to handle, `_make_room`).
MEASURE_EVERY_COMMITS = 16


class PassCommit(StoreReader):
    """The pass commit of store.outbox.Store, which sets the state below (in its `__init__`)
    and supplies `transaction` and `_make_room`."""

    clock: Clock
    max_bytes: int | None
    reserve_bytes: int
    _routes: dict[str, routing.Route]
    _claimed_at_commit: frozenset[str]
    _growth: tuple[int, ...]
    _used_seen: int | None
    _commits: int

    @abstractmethod
    def transaction(self, what: str) -> AbstractContextManager[sqlite3.Connection]:
        """One write transaction under the store's lock (errors mapped to StateError)."""

    log_lost: bool  # the -wal was deleted or replaced: checkpoint every pass commit

    @abstractmethod
    def checkpoint(self) -> bool:
        """Copy the write-ahead log into the store file (never raises; True: all of it)."""

    @abstractmethod
    def _make_room(self, new: Sequence[tuple[OutEvent, Sequence[str]]], full: StoreFull) -> bool:
        """Make room for a pass whose commit was refused; True when something was freed."""

    @property
    def claimed_at_commit(self) -> frozenset[str]:
        """The sinks whose new rows the pass commit claims (`claim_at_commit`)."""
        return self._claimed_at_commit

    def claim_at_commit(self, sink: str, on: bool) -> None:
        """Have the pass commit insert `sink`'s new delivery rows already claimed (or stop).

        For a local sink that writes each pass's events right after the commit (the JSONL
        file, while its breaker is closed): its next claim then changes no page, and the
        round skips a synced commit of its own. Claimed means "maybe sent", so these rows are
        never merged, as if claimed a moment later; a sink in trouble turns it off, and its
        new rows stay mergeable through the outage."""
        current = self._claimed_at_commit
        if (sink in current) != on:
            self._claimed_at_commit = current | {sink} if on else current - {sink}

    def near_cap(self, used_bytes: int) -> bool:
        """Whether `used_bytes` plus the next pass's reserve reach MERGE_AT of the cap: time
        for the near-cap upkeep (prune acked early, merge pending)."""
        self._used_seen = used_bytes
        return upkeep.near_cap(used_bytes, self.max_bytes, self.reserve_bytes)

    def _measure_commit(self) -> bool:
        """Whether this commit measures what it adds to the pages in use (MEASURE_EVERY_COMMITS)."""
        self._commits += 1
        seen, cap = self._used_seen, self.max_bytes
        return cap is not None and (seen is None or 2 * seen >= cap
                                    or self._commits % MEASURE_EVERY_COMMITS == 0)

    def _reserve(self, pass_bytes: int) -> None:
        self._growth = (*self._growth, max(pass_bytes, 0))[-RESERVE_PASSES:]
        self.reserve_bytes = max(self._growth)

    def commit_pass(self, baselines: Sequence[Baseline], events: Sequence[OutEvent], *,
                    removed_instances: Sequence[str] = (),
                    alert_state: Mapping[str, bytes | None] | None = None
                    ) -> dict[str, list[Pending]]:
        """ONE transaction: baselines, events (+ pending deliveries), alert state (None deletes).

        Refused for room (StoreFull) under a size cap: the near-cap upkeep runs at once
        (`upkeep.make_room`: prune acknowledged events, merge never-sent ones; never an
        unacknowledged row) and, if it freed anything, the same transaction is tried once more;
        refused again, StoreFull is raised and nothing of the pass is stored.

        The deliveries of the sinks in `claim_at_commit` are inserted claimed, and returned:
        those sinks' new rows, in commit order (the pass may write them at once,
        hostagent.delivery.local_round)."""
        now = self.clock.now().wall_ns
        claimed_at_commit = self._claimed_at_commit
        base_rows = [(b.instance_id, orjson.dumps(b.to_dict()).decode()) for b in baselines]
        by_route = {(ev.kind, ev.channels): routing.sinks_for(self._routes, ev.kind, ev.channels)
                    for ev in {(e.kind, e.channels): e for e in events}.values()}
        routed = [(ev, sinks) for ev in events if (sinks := by_route[(ev.kind, ev.channels)])]
        new = list({ev.event_id: (ev, sinks) for ev, sinks in reversed(routed)}  # the first
                   .values())[::-1]  # of an id wins

        def commit() -> list[tuple[int, OutEvent, Sequence[str]]]:
            inserted, grew = self._commit_pass(base_rows, removed_instances, new, alert_state,
                                               now, claimed_at_commit, self._measure_commit())
            if grew is not None:
                self._reserve(grew)
            return inserted

        try:
            inserted = commit()
        except StoreFull as full:
            if not self._make_room(new, full):
                raise
            inserted = commit()  # refused again: StoreFull, the pass fails as before
        if self.log_lost:  # before anything of the pass is sent: in the store file for good
            self.checkpoint()
        claimed: dict[str, list[Pending]] = {}
        if claimed_at_commit:
            for seq, ev, to in inserted:
                for sink in to:
                    if sink in claimed_at_commit:
                        claimed.setdefault(sink, []).append(Pending(ev, 0, 0, seq))
        return claimed

    def _commit_pass(self, base_rows: Sequence[tuple[str, str]], removed: Sequence[str],
                     new: Sequence[tuple[OutEvent, Sequence[str]]],
                     alert_state: Mapping[str, bytes | None] | None, now: int,
                     claimed_at_commit: frozenset[str], measure: bool
                     ) -> tuple[list[tuple[int, OutEvent, Sequence[str]]], int | None]:
        """The pass's transaction; what it inserted and (`measure`) the bytes it added to the
        pages in use."""
        with self.transaction("commit pass") as c:
            used = self._used_bytes(c) if measure else 0
            c.executemany("INSERT INTO baselines(instance_id, state) VALUES(?, ?) "
                          "ON CONFLICT(instance_id) DO UPDATE SET state = excluded.state",
                          base_rows)
            if removed:
                c.executemany("DELETE FROM baselines WHERE instance_id = ?",
                              [(i,) for i in removed])
            inserted = self._insert_events(c, new, now, claimed_at_commit) if new else []
            for fp, state in (alert_state or {}).items():
                if state is None:
                    c.execute("DELETE FROM alert_state WHERE fingerprint = ?", (fp,))
                else:
                    c.execute("INSERT INTO alert_state(fingerprint, state) VALUES(?, ?) "
                              "ON CONFLICT(fingerprint) DO UPDATE SET state = excluded.state",
                              (fp, state))
            if not measure:
                return inserted, None
            after = self._used_bytes(c)
        self._used_seen = after
        return inserted, after - used

    @staticmethod
    def _insert_events(c: sqlite3.Connection, new: Sequence[tuple[OutEvent, Sequence[str]]],
                       now: int, claimed_at_commit: frozenset[str]
                       ) -> list[tuple[int, OutEvent, Sequence[str]]]:
        """Insert the pass's events and their pending deliveries; (seq, event, sinks) of each
        inserted. An event already here (by its key, period start and id) was committed by an
        earlier try of this pass: it is not inserted and its rows are left alone."""
        # seq: commit order (schema.py), so these rows go on the last pages of each key.
        first = c.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM events").fetchone()[0]
        span = range(first, first + len(new))
        cur = c.executemany(
            "INSERT INTO events(seq, event_id, kind, instance_id, period_start_ns, "
            "period_end_ns, payload, created_ns) VALUES(?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(period_start_ns, event_id) DO NOTHING",
            [(seq, ev.event_id, ev.kind, ev.instance_id, ev.period_start_ns,
              ev.period_end_ns, ev.payload, now) for seq, (ev, _) in zip(span, new, strict=True)])
        inserted = [(seq, ev, sinks) for seq, (ev, sinks) in zip(span, new, strict=True)]
        if cur.rowcount != len(new):  # some stored by an earlier try: which seqs are new
            here = {r[0] for r in c.execute("SELECT seq FROM events WHERE seq BETWEEN ? AND ?",
                                            (span.start, span.stop - 1))}
            inserted = [row for row in inserted if row[0] in here]
        by_sink: dict[str, list[int]] = {}
        for seq, _, sinks in inserted:
            for s in sinks:
                by_sink.setdefault(s, []).append(seq)
        for s, seqs in by_sink.items():
            bulk.insert_deliveries(c, s, seqs, span, now, s in claimed_at_commit)
        return inserted
