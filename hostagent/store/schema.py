"""The state file's outbox tables: its application id, schema version, DDL and upgrades.

`store.outbox` creates them in a new file, and has an older file upgraded here when the daemon
opens it (`upgrade`: one transaction, `migrate` per version); `store.guard` refuses a file
whose application id or schema version is not these (a foreign or newer store).

Version 2 keys the outbox by arrival: every event gets ``seq`` (its rowid, in commit order)
and a delivery row is keyed ``(sink, seq)``; the event id (a hash) is unique together with the
period start (``events_key``: the id is derived from it, so it is as unique as before). A pass's
new rows, their claims and their acknowledgements then land on the last pages of each B-tree
instead of one random page per event and index (version 1 keyed both tables, and the events'
unique index, by the event id alone): at 1,000 events a pass the commit and the
acknowledgements write a few dozen pages instead of ~3,000. A delivery claimed for a sink
carries its ``seq``, and so does each outcome, dead letter and merge record; the event id is
kept in each delivery row and checked with the key. Each index of ``deliveries`` holds only
the rows its queries look for (partial): the due queue only what is pending, the retry index
only what waits out a backoff, and a day of acknowledged rows only ``deliveries_acked`` (for
pruning). A commit so adds each row to two B-trees, an acknowledgement moves it in three
(version 1: three and five, the queue index growing with every acknowledged row kept).
"""

from __future__ import annotations

import functools
import logging
import sqlite3
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from hostagent.errors import StateCorrupt
from hostagent.store import sqlite_tx
from hostagent.store.guard import WAY_OUT

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
UPGRADABLE = frozenset({1})  # older versions `migrate` brings to SCHEMA_VERSION
APP = "hostagent-state"

EVENTS_DDL = """
CREATE TABLE events(
  seq INTEGER PRIMARY KEY, event_id TEXT NOT NULL, kind TEXT NOT NULL,
  instance_id TEXT NOT NULL, period_start_ns INTEGER NOT NULL, period_end_ns INTEGER NOT NULL,
  payload BLOB NOT NULL, created_ns INTEGER NOT NULL);
CREATE UNIQUE INDEX events_key ON events(period_start_ns, event_id);
"""

DELIVERIES_DDL = """
CREATE TABLE deliveries(
  sink TEXT NOT NULL, seq INTEGER NOT NULL, event_id TEXT NOT NULL, instance_id TEXT NOT NULL,
  period_start_ns INTEGER NOT NULL, created_ns INTEGER NOT NULL,
  status TEXT NOT NULL CHECK (status IN ('pending', 'acked', 'dead')),
  claimed INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0,
  rejections INTEGER NOT NULL DEFAULT 0, next_attempt_ns INTEGER NOT NULL DEFAULT 0,
  last_error TEXT, done_ns INTEGER,
  PRIMARY KEY (sink, seq)) WITHOUT ROWID;
CREATE INDEX deliveries_pending
  ON deliveries(sink, period_start_ns, instance_id, next_attempt_ns) WHERE status = 'pending';
CREATE INDEX deliveries_retry ON deliveries(sink, instance_id, period_start_ns, next_attempt_ns)
  WHERE status = 'pending' AND claimed = 1 AND next_attempt_ns > 0;
CREATE INDEX deliveries_dead ON deliveries(sink, created_ns) WHERE status = 'dead';
CREATE INDEX deliveries_acked ON deliveries(done_ns) WHERE status = 'acked';
"""

# seq: the dead event's; the merged event's (NULL once it is gone: the record outlives it).
RECORDS_DDL = """
CREATE TABLE dead_letters(
  sink TEXT NOT NULL, event_id TEXT NOT NULL, seq INTEGER NOT NULL, reason TEXT NOT NULL,
  attempts INTEGER NOT NULL, dead_ns INTEGER NOT NULL,
  PRIMARY KEY (sink, event_id)) WITHOUT ROWID;
CREATE TABLE merges(
  merged_event_id TEXT NOT NULL, sink TEXT NOT NULL, seq INTEGER, source_ids TEXT NOT NULL,
  created_ns INTEGER NOT NULL, PRIMARY KEY (merged_event_id, sink)) WITHOUT ROWID;
"""

OUTBOX_DDL = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE baselines(instance_id TEXT PRIMARY KEY, state TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE sinks(
  name TEXT PRIMARY KEY, added_ns INTEGER NOT NULL, active INTEGER NOT NULL,
  breaker_state TEXT, breaker_since_ns INTEGER, breaker_updated_ns INTEGER) WITHOUT ROWID;
CREATE TABLE alert_state(fingerprint TEXT PRIMARY KEY, state BLOB NOT NULL) WITHOUT ROWID;
""" + EVENTS_DDL + DELIVERIES_DDL + RECORDS_DDL


# What a version-1 store must hold for `migrate` to carry it over: every column it reads.
V1_TABLES: Mapping[str, frozenset[str]] = {
    "meta": frozenset({"key", "value"}),
    "baselines": frozenset({"instance_id", "state"}),
    "sinks": frozenset({"name", "added_ns", "active", "breaker_state", "breaker_since_ns",
                        "breaker_updated_ns"}),
    "alert_state": frozenset({"fingerprint", "state"}),
    "events": frozenset({"event_id", "kind", "instance_id", "period_start_ns", "period_end_ns",
                         "payload", "created_ns"}),
    "deliveries": frozenset({"sink", "event_id", "instance_id", "period_start_ns", "created_ns",
                             "status", "claimed", "attempts", "rejections", "next_attempt_ns",
                             "last_error", "done_ns"}),
    "dead_letters": frozenset({"sink", "event_id", "reason", "attempts", "dead_ns"}),
    "merges": frozenset({"merged_event_id", "sink", "source_ids", "created_ns"}),
}


@dataclass(frozen=True, slots=True)
class Layout:
    """The tables (name → columns) and indexes a store of one schema version must have; a
    store may hold more (the webhook store's tables live in the same file)."""

    tables: Mapping[str, frozenset[str]]
    indexes: frozenset[str]


@functools.cache
def layout(version: int) -> Layout:
    """What a store of `version` (SCHEMA_VERSION or UPGRADABLE) holds: the current one read
    from OUTBOX_DDL itself, so the check cannot drift from what `Store.open` creates."""
    if version == 1:
        return Layout(V1_TABLES, frozenset())  # its indexes are dropped by `migrate`
    if version != SCHEMA_VERSION:
        raise ValueError(f"no layout of schema version {version}")
    return ddl_layout(OUTBOX_DDL)


@functools.cache
def ddl_layout(ddl: str) -> Layout:
    """The tables (with their columns) and indexes `ddl` creates, read by running it on an
    in-memory database (the outbox's DDL, the webhook store's)."""
    c = sqlite3.connect(":memory:")
    try:
        for statement in statements(ddl):
            c.execute(statement)
        names = c.execute("SELECT type, name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"
                          ).fetchall()
        tables = {n: frozenset(r[1] for r in c.execute("SELECT * FROM pragma_table_info(?)",
                                                       (n,)))
                  for t, n in names if t == "table"}
    finally:
        c.close()
    return Layout(tables, frozenset(n for t, n in names if t == "index"))


def lacking(c: sqlite3.Connection, want: Layout, tables: set[str]) -> list[str]:
    """What of `want` the database on `c` (holding `tables`) lacks: table names,
    ``table.column``s and ``index name``s."""
    missing = [t for t in want.tables if t not in tables]
    for table, columns in want.tables.items():
        if table in tables:
            have = {r[1] for r in c.execute("SELECT * FROM pragma_table_info(?)", (table,))}
            missing += [f"{table}.{col}" for col in sorted(columns - have)]
    if want.indexes:
        have = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        missing += [f"index {i}" for i in sorted(want.indexes - have)]
    return missing


# Seconds an upgrade may take: generous against the ~30 MB/s measured on a slow 2-core VM.
UPGRADE_BASE_S = 60.0
UPGRADE_BYTES_PER_S = 4 << 20


def upgrade_budget_s(file_bytes: int) -> float:
    """How long start-up may take while a store of `file_bytes` is upgraded."""
    return UPGRADE_BASE_S + file_bytes / UPGRADE_BYTES_PER_S


class MigrationError(Exception):
    """An upgrade found rows it could not carry over; nothing was changed."""


def statements(ddl: str) -> list[str]:
    """The DDL's statements, one per `execute`."""
    return [s for s in ddl.split(";") if s.strip()]


def upgrade(c: sqlite3.Connection, path: Path, version: int,
            on_upgrade: Callable[[int, int], None] | None) -> None:
    """Bring the store at `path` from `version` to SCHEMA_VERSION in one transaction, all or
    nothing (StateCorrupt, nothing changed, when rows cannot be carried over); logged first,
    and `on_upgrade(version, file_bytes)` told (to extend systemd's start timeout)."""
    size = path.stat().st_size
    log.warning("upgrading the state store: start-up waits for it",
                extra={"path": str(path), "from_version": version,
                       "to_version": SCHEMA_VERSION, "file_bytes": size})
    if on_upgrade is not None:
        on_upgrade(version, size)
    c.execute("BEGIN IMMEDIATE")
    try:
        migrate(c, version)
    except MigrationError as err:
        sqlite_tx.rollback(c)
        raise StateCorrupt(f"{path}: cannot upgrade the state store from schema version "
                           f"{version}: {err}; nothing was changed. {WAY_OUT}") from err
    except BaseException:
        sqlite_tx.rollback(c)
        raise
    c.execute("COMMIT")


def migrate(c: sqlite3.Connection, version: int) -> None:
    """Bring an outbox of `version` (in UPGRADABLE) to SCHEMA_VERSION, inside the caller's
    transaction: every row is carried over (counted before and after: MigrationError, and the
    caller rolls back, if one is not), then meta's schema_version is set."""
    if version == 1:
        _v1_to_v2(c)
    c.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))


_CARRIED = ("events", "deliveries", "dead_letters", "merges")


def _v1_to_v2(c: sqlite3.Connection) -> None:
    counts = {t: c.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]  # noqa: S608
              for t in _CARRIED}
    for name in ("deliveries_queue", "deliveries_retry", "deliveries_acked"):
        c.execute(f"DROP INDEX IF EXISTS {name}")
    for table in _CARRIED:
        c.execute(f"ALTER TABLE {table} RENAME TO {table}_v1")
    for s in statements(EVENTS_DDL + DELIVERIES_DDL + RECORDS_DDL):
        c.execute(s)
    # seq in the order the events were committed (their v1 rowid); each old row finds its
    # event's seq through the old table's key (event_id) and the new one (period start, id).
    c.execute("INSERT INTO events(event_id, kind, instance_id, period_start_ns, period_end_ns, "
              "payload, created_ns) SELECT event_id, kind, instance_id, period_start_ns, "
              "period_end_ns, payload, created_ns FROM events_v1 ORDER BY rowid")
    c.execute("INSERT INTO deliveries(sink, seq, event_id, instance_id, period_start_ns, "
              "created_ns, status, claimed, attempts, rejections, next_attempt_ns, last_error, "
              "done_ns) SELECT d.sink, e.seq, d.event_id, d.instance_id, d.period_start_ns, "
              "d.created_ns, d.status, d.claimed, d.attempts, d.rejections, d.next_attempt_ns, "
              "d.last_error, d.done_ns FROM deliveries_v1 d JOIN events_v1 o ON o.event_id = "
              "d.event_id JOIN events e ON e.period_start_ns = o.period_start_ns AND "
              "e.event_id = o.event_id")
    c.execute("INSERT INTO dead_letters(sink, event_id, seq, reason, attempts, dead_ns) "
              "SELECT x.sink, x.event_id, e.seq, x.reason, x.attempts, x.dead_ns "
              "FROM dead_letters_v1 x JOIN events_v1 o ON o.event_id = x.event_id JOIN events e "
              "ON e.period_start_ns = o.period_start_ns AND e.event_id = o.event_id")
    # a merge record outlives its event (pruned): its seq is then NULL
    c.execute("INSERT INTO merges(merged_event_id, sink, seq, source_ids, created_ns) "
              "SELECT m.merged_event_id, m.sink, e.seq, m.source_ids, m.created_ns "
              "FROM merges_v1 m LEFT JOIN events_v1 o ON o.event_id = m.merged_event_id "
              "LEFT JOIN events e ON e.period_start_ns = o.period_start_ns "
              "AND e.event_id = o.event_id")
    after = {t: c.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]  # noqa: S608
             for t in _CARRIED}
    if after != counts:
        raise MigrationError(f"rows before {counts}, after {after} (a delivery row or a dead "
                             "letter without its event?)")
    for table in _CARRIED[::-1]:
        c.execute(f"DROP TABLE {table}_v1")
    log.info("state store upgraded", extra={"from_version": 1, "to_version": 2, **after})
