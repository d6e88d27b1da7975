"""The state store: ONE SQLite file (WAL, synchronous=FULL) with baselines, outbox and alert state.

Tables: ``meta`` (schema version, ``created_ns``, ``host``), ``baselines`` (JSON per instance),
``events`` (the outbox: exact payload bytes per ``event_id``), ``sinks`` (registered sinks and the
breaker state the daemon last recorded), ``deliveries`` (one row per event and sink: pending,
acked or dead, attempts, rejections, ``next_attempt_ns``, last error), ``dead_letters`` (reason),
``merges`` (which events a merged event replaced) and ``alert_state``.

Threads: the store is synchronous. Trio code calls it through ``hostagent.handoff.run_sync`` (not
abandoned on cancel: a commit's outcome must be known). There is ONE connection, opened with
``check_same_thread=False`` and guarded by a lock, so calls from any worker thread are
serialised; every call is short (one transaction of one pass or one delivery batch). Other
processes (``hostagent outbox``) open their own connection; WAL lets them read while we write.

Routing (hostagent.alerts.routing): an event gets a pending delivery row for every active sink whose
kinds include its kind and, for a Notify alert, that answers to one of its channels; no row
means the sink never sees the event. A sink registered later gets only events committed after
it was added; an event that no sink takes is not stored. Rows of a sink removed from the config
stay (never dropped) and are shown by ``hostagent outbox status``. Pending alert rows written
by an older hostagent, which gave every sink of the kind a row and let the queue sink skip
Notify alerts at send time, are re-routed when the daemon configures the channels
(``upkeep.drop_unrouted``), before any of them can be sent.

Modules: this one holds the opening and every write but the pass's (claim, record, replay);
the pass's one transaction and the room it reserves are in hostagent.store.pass_commit
(PassCommit), the schema in .schema, the opening and its checks (before anything writes) in
.opening, the read-only queries (loads, due events, stats, dead letters, size) in .inspect
(StoreReader), pruning and merging in .upkeep.
"""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
import threading
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from hostagent.alerts import routing
from hostagent.clock import Clock
from hostagent.errors import StateError, StoreFull
from hostagent.model import OutEvent
from hostagent.store import bulk, opening, sqlite_tx, upkeep
from hostagent.store.inspect import Pending
from hostagent.store.pass_commit import PassCommit
from hostagent.store.schema import SCHEMA_VERSION

log = logging.getLogger(__name__)

MERGE_AT = upkeep.MERGE_AT  # of max_bytes: prune acked early, then merge pending


Result = Literal["acked", "failed", "rejected", "dead", "skipped"]


def lenient_text(raw: bytes) -> str:
    """The text factory of a store opened read-only (the inspecting commands, which only
    show what they read): a value that is not UTF-8 (a sink name, a dead letter's reason
    damaged on disk) is shown with U+FFFD where SQLite's decoding failed the whole command
    (exit 1, "Could not decode to UTF-8 column"). The daemon's connection keeps strict
    decoding: what it writes back must be what it read."""
    return raw.decode("utf-8", "replace")


@dataclass(slots=True)
class Outcome:
    """What one delivery round did to one event (`skipped`: never sent this round), for the
    delivery row `seq` (the Pending's key), checked against `event_id`. Made once per event
    and round, never changed (not frozen: a frozen dataclass costs 3x to build)."""

    seq: int
    event_id: str
    result: Result
    error: str | None = None
    next_attempt_ns: int = 0

    @classmethod
    def of(cls, p: Pending, result: Result, error: str | None = None,
           next_attempt_ns: int = 0) -> Outcome:
        """The outcome for a claimed row."""
        return cls(p.seq, p.event.event_id, result, error, next_attempt_ns)


@dataclass(frozen=True, slots=True)
class Claimed:
    """`record_and_take`'s answer (`next_due_ns` only when the batch is empty)."""

    batch: list[Pending]
    dead_lettered: int
    next_due_ns: int | None
    used_bytes: int


@dataclass(frozen=True, slots=True)
class Maintenance:
    """What one maintenance run did."""

    pruned: int
    merged: Mapping[str, int]
    merges: int
    used_bytes: int


class Store(PassCommit):
    """Baselines, the event outbox with per-sink delivery state, and alert state."""

    def __init__(self, conn: sqlite3.Connection, path: Path, clock: Clock) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self.path = path
        self.clock = clock
        self.created_ns = 0
        self.host = ""
        self.schema_version = SCHEMA_VERSION
        self.max_bytes: int | None = None
        self._routes: dict[str, routing.Route] = {}
        # Sinks whose new rows the pass commit claims (`claim_at_commit`); replaced, never
        # changed in place: the commit reads it in a worker thread.
        self._claimed_at_commit: frozenset[str] = frozenset()
        # What the last RESERVE_PASSES pass commits added to the pages in use (or, refused,
        # would have), and their maximum: the room upkeep keeps for the next pass. Replaced,
        # never changed in place (read by other worker threads).
        self._growth: tuple[int, ...] = ()
        self.reserve_bytes = 0
        # What the commits' own `make_room` did, reported by the next `maintain`.
        self._room_made: list[Maintenance] = []
        self._used_seen: int | None = None  # the pages in use, as last seen (near_cap, commits)
        self._commits = 0
        self._room_lock = threading.Lock()
        # Set by the daemon when the -wal was deleted or replaced under it: every pass commit
        # is then checkpointed into the store file at once (`checkpoint`), so that what the
        # store holds never lives only in a log no later start can see.
        self.log_lost = False

    # --- opening ----------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, *, clock: Clock, node_id: str, sink_names: Sequence[str],
             sink_kinds: Mapping[str, Collection[str]] | None = None,
             sink_channels: Mapping[str, Collection[str] | None] | None = None,
             max_bytes: int | None = None, create: bool = True,
             register_sinks: bool = True, upgrade: bool = True, read_only: bool = False,
             on_upgrade: Callable[[int, int], None] | None = None) -> Store:
        """Open (or create) the store; StateCorrupt if the file is foreign or damaged, found
        before anything is written (hostagent.store.opening, which also says what
        `upgrade`, `on_upgrade` and `read_only` do; `upgrade=False` leaves an older schema as
        it is: `schema_version` says which, and only `close` may follow)."""
        opened = opening.open_file(Path(path), clock=clock, node_id=node_id,
                                   create=create and not read_only, read_only=read_only,
                                   upgrade=upgrade and not read_only, on_upgrade=on_upgrade)
        if read_only:  # only shown: a text value not UTF-8 (damage) must not fail the command
            opened.conn.text_factory = lenient_text
        store = cls(opened.conn, Path(path), clock)
        meta = opened.meta
        store.created_ns, store.host, store.schema_version = (meta.created_ns, meta.host,
                                                              meta.schema_version)
        try:
            if register_sinks and not read_only:
                store._register(sink_names)
            store.configure(sink_kinds=sink_kinds, sink_channels=sink_channels,
                            max_bytes=max_bytes)
        except BaseException:
            store.close()
            raise
        return store

    def _register(self, names: Sequence[str]) -> None:
        now = self.clock.now().wall_ns
        with self.transaction("register sinks") as c:
            c.execute("UPDATE sinks SET active = 0")
            for name in names:
                c.execute("INSERT INTO sinks(name, added_ns, active) VALUES(?, ?, 1) "
                          "ON CONFLICT(name) DO UPDATE SET active = 1", (name, now))
        self._routes = dict.fromkeys(names, routing.EVERYTHING)

    def configure(self, *, sink_kinds: Mapping[str, Collection[str]] | None = None,
                  sink_channels: Mapping[str, Collection[str] | None] | None = None,
                  max_bytes: int | None = None) -> None:
        """Set which kinds and channels each sink takes (hostagent.alerts.routing; not given: all)
        and the size cap (SQLite max_page_count). Setting channels re-routes pending alert
        rows an older hostagent wrote for every sink (`upkeep.drop_unrouted`)."""
        for n, k in (sink_kinds or {}).items():
            if n in self._routes:
                self._routes[n] = dataclasses.replace(self._routes[n], kinds=frozenset(k))
        for n, ch in (sink_channels or {}).items():
            if n in self._routes:
                self._routes[n] = dataclasses.replace(
                    self._routes[n], channels=None if ch is None else frozenset(ch))
        if sink_channels is not None:
            upkeep.drop_unrouted(self, self._routes)
        if max_bytes is not None:
            self.max_bytes = max_bytes
            with self._lock:
                page = self._conn.execute("PRAGMA page_size").fetchone()[0]
                self._conn.execute(f"PRAGMA max_page_count={max(max_bytes // page, 16)}")

    def close(self) -> None:
        """Close the connection (checkpointing the WAL)."""
        with self._lock:
            self._conn.close()

    def transaction(self, what: str) -> AbstractContextManager[sqlite3.Connection]:
        """One write transaction under the store's lock (errors mapped to StateError)."""
        return sqlite_tx.transaction(self._conn, self._lock, self.path, what)

    def checkpoint(self) -> bool:
        """Copy every commit of the write-ahead log into the store file and sync it (SQLite's
        TRUNCATE checkpoint, through the open log: it reads a deleted one too); True when it
        copied all of it. Never raises: it comes after a commit that must stand (logged)."""
        try:
            with self._lock:
                busy, _, _ = self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.Error as err:
            log.error("checkpoint failed", extra={"path": str(self.path), "error": str(err)})
            return False
        if busy:  # another connection read or wrote for longer than the busy timeout
            log.warning("checkpoint incomplete: another connection was busy",
                        extra={"path": str(self.path)})
        return not busy

    @contextmanager
    def reading(self, what: str) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                yield self._conn
            except sqlite3.Error as err:
                raise sqlite_tx.translate(err, self.path, what) from err

    # --- the delivery side ------------------------------------------------------------------

    def take(self, sink: str, limit: int, now_ns: int) -> list[Pending]:
        """Like `pending`, and mark them claimed (maybe sent) so they are never merged."""
        with self.transaction("claim batch") as c:
            return self._claim(c, sink, limit, now_ns)

    def record(self, sink: str, outcomes: Sequence[Outcome], *, dead_letter_after: int) -> int:
        """Apply a round's outcomes in one transaction; returns how many were dead-lettered."""
        with self.transaction("record outcomes") as c:
            return self._record(c, sink, outcomes, dead_letter_after)

    def record_and_take(self, sink: str, outcomes: Sequence[Outcome], limit: int, now_ns: int,
                        *, dead_letter_after: int, durable: bool = True) -> Claimed:
        """ONE transaction: record a round's outcomes, claim the next batch (else: next due).
        With nothing to record or claim it changes no page: SQLite then writes and syncs
        nothing at COMMIT (reading first would cost more locking on the common busy path).
        `durable=False` (only acknowledgements, `limit` 0): committed without syncing the WAL
        (sqlite_tx.transaction); losing it to a power cut only means sending them again."""
        if not durable and (limit or any(o.result != "acked" for o in outcomes)):
            raise ValueError("only acknowledgements may be recorded without a sync")
        with (self.transaction("record and claim") if durable else sqlite_tx.transaction(
                self._conn, self._lock, self.path, "record acknowledgements", durable=False)) as c:
            dead = self._record(c, sink, outcomes, dead_letter_after)
            batch = self._claim(c, sink, limit, now_ns) if limit > 0 else []
            due = None if batch else self._next_due(c, sink, now_ns)
            return Claimed(batch, dead, due, self._used_bytes(c))

    def _claim(self, c: sqlite3.Connection, sink: str, limit: int, now_ns: int) -> list[Pending]:
        unclaimed: list[int] = []  # a row claimed already (by the pass commit) is not touched
        batch = self._load(c, sink, self._due_seqs(c, sink, limit, now_ns), unclaimed)
        c.executemany("UPDATE deliveries SET claimed = 1 WHERE sink = ? AND seq = ?",
                      [(sink, q) for q in unclaimed])
        return batch

    def _record(self, c: sqlite3.Connection, sink: str, outcomes: Sequence[Outcome],
                dead_letter_after: int) -> int:
        now = self.clock.now().wall_ns
        dead = 0
        # Each row by its key, (sink, seq); the event id checks it is that event's row. Only
        # acknowledgements (the common round): one range statement where its check allows.
        acked = [(o.seq, o.event_id) for o in outcomes if o.result == "acked"]
        if acked and not (len(acked) == len(outcomes) and bulk.ack_range(c, sink, acked, now)):
            bulk.ack_rows(c, sink, acked, now)
        for o in outcomes:
            key = (sink, o.seq, o.event_id)
            if o.result == "failed":
                c.execute("UPDATE deliveries SET attempts = attempts + 1, next_attempt_ns = ?, "
                          "last_error = ? WHERE sink = ? AND seq = ? AND event_id = ? AND "
                          "status = 'pending'", (o.next_attempt_ns, o.error, *key))
            elif o.result == "skipped":
                c.execute("UPDATE deliveries SET claimed = (attempts > 0) WHERE sink = ? AND "
                          "seq = ? AND event_id = ? AND status = 'pending'", key)
            elif o.result != "acked":  # rejected or dead
                row = c.execute(
                    "UPDATE deliveries SET attempts = attempts + 1, rejections = rejections "
                    "+ 1, next_attempt_ns = ?, last_error = ? WHERE sink = ? AND seq = ? AND "
                    "event_id = ? AND status = 'pending' RETURNING rejections, attempts",
                    (o.next_attempt_ns, o.error, *key)).fetchone()
                if row and (o.result == "dead" or row[0] >= dead_letter_after):
                    dead += 1
                    c.execute("UPDATE deliveries SET status = 'dead', done_ns = ? WHERE "
                              "sink = ? AND seq = ? AND event_id = ?", (now, *key))
                    c.execute("INSERT OR REPLACE INTO dead_letters(sink, event_id, seq, reason, "
                              "attempts, dead_ns) VALUES(?, ?, ?, ?, ?, ?)",
                              (sink, o.event_id, o.seq, o.error or "rejected", row[1], now))
        return dead

    def release_backoff(self, sink: str, now_ns: int) -> int:
        """The sink is back: events waiting out a transient backoff become due now."""
        with self.transaction("release backoff") as c:
            return c.execute(
                "UPDATE deliveries INDEXED BY deliveries_retry SET next_attempt_ns = 0 WHERE "
                "sink = ? AND status = 'pending' AND claimed = 1 AND next_attempt_ns > 0 AND "
                "next_attempt_ns > ? AND rejections = 0",
                (sink, now_ns)).rowcount

    def set_breaker(self, sink: str, state: str, since_ns: int) -> None:
        """Record a sink's breaker state for `hostagent outbox status`."""
        now = self.clock.now().wall_ns
        with self.transaction("record breaker state") as c:
            c.execute("UPDATE sinks SET breaker_state = ?, breaker_since_ns = ?, "
                      "breaker_updated_ns = ? WHERE name = ?", (state, since_ns, now, sink))

    def heartbeat(self) -> None:
        """Say the daemon's delivery is alive (read by `outbox status`); a liveness stamp, not
        billing data: its commit does not sync the WAL."""
        now = self.clock.now().wall_ns
        with sqlite_tx.transaction(self._conn, self._lock, self.path, "heartbeat",
                                   durable=False) as c:
            c.execute("INSERT INTO meta(key, value) VALUES('delivery_heartbeat_ns', ?) "
                      "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (str(now),))

    # --- dead letters ---------------------------------------------------------------------

    def replay(self, sink: str | None = None, event_id: str | None = None) -> int:
        """Re-queue dead letters (optionally one sink / one event); returns how many. A dead
        letter whose delivery row (or event) is gone cannot be: it is kept, and not counted."""
        with self.transaction("replay dead letters") as c:
            keys = c.execute("SELECT sink, seq, event_id FROM dead_letters WHERE (? IS NULL "
                             "OR sink = ?) AND (? IS NULL OR event_id = ?)",
                             (sink, sink, event_id, event_id)).fetchall()
            done = [key for key in keys if c.execute(
                "UPDATE deliveries SET status = 'pending', rejections = 0, next_attempt_ns = 0, "
                "done_ns = NULL, last_error = 'replayed' WHERE sink = ? AND seq = ? AND "
                "event_id = ? AND status = 'dead' AND seq IN (SELECT seq FROM events)",
                key).rowcount]
            c.executemany("DELETE FROM dead_letters WHERE sink = ? AND event_id = ?",
                          [(s, eid) for s, _, eid in done])
        for s, _, eid in keys:
            log.info("dead letter replayed" if (s, _, eid) in done else
                     "dead letter not replayed: its event is gone",
                     extra={"sink": s, "event_id": eid})
        return len(done)

    # --- upkeep (hostagent.store.upkeep) ----------------------------------------------------

    def _make_room(self, new: Sequence[tuple[OutEvent, Sequence[str]]], full: StoreFull) -> bool:
        """A pass's commit was refused for room: run the near-cap upkeep with that pass's size
        reserved; True when it freed something (the commit is worth another try)."""
        if self.max_bytes is None:
            return False  # the disk, not the cap: the operator's to free
        need = upkeep.pass_bytes([len(ev.payload) for ev, _ in new],
                                 sum(len(sinks) for _, sinks in new))
        self._reserve(need)
        try:
            rep = upkeep.make_room(self)
        except StateError as err:
            log.error("pass commit refused for room, and making room failed",
                      extra={"error": str(err), "refused": str(full)})
            return False
        with self._room_lock:
            self._room_made.append(rep)
        made = bool(rep.pruned or rep.merges)
        fields = {"pass_bytes": need, "pruned": rep.pruned, "merged": dict(rep.merged),
                  "used_bytes": rep.used_bytes, "max_bytes": self.max_bytes}
        if made:
            log.warning("pass commit refused for room: pruned acked events, merged pending "
                        "ones; committing again", extra=fields)
        else:
            log.error("pass commit refused for room and none could be made: what the outbox "
                      "holds is unacknowledged (claimed, not mergeable, or dead letters), or "
                      "the disk is full", extra=fields)
        return made

    def maintain(self, retention_s: float) -> Maintenance:
        """Prune acked events past retention; near the size cap prune early, then merge. Also
        reports what refused pass commits pruned and merged since the last call."""
        rep = upkeep.maintain(self, retention_s)
        with self._room_lock:
            made, self._room_made = self._room_made, []
        merged = Counter(rep.merged)
        for m in made:
            merged.update(m.merged)
        return Maintenance(rep.pruned + sum(m.pruned for m in made), dict(merged),
                           rep.merges + sum(m.merges for m in made), rep.used_bytes)
