"""Outbox upkeep: pruning acknowledged events and, near the size cap, merging pending ones.

`maintain` prunes acknowledged events `retention_s` after their acknowledgement. When the pages
in use, plus the room the next pass needs (`Store.reserve_bytes`: the most the last few pass
commits added), pass MERGE_AT (90 %) of `max_bytes`, it prunes acknowledged events early
(oldest first, until that sum is under PRUNE_TO, 80 %), then merges consecutive pending
`resource_usage` events per sink and instance. Counting the next pass matters once a pass is
more than a tenth of the cap: below 90 % there would be no room for it, and pruning would
never start. `make_room` takes the same two steps at once for a pass whose commit the cap
refused (`Store.commit_pass`, which then commits it again).

How a merged event is made (pure) is in hostagent.store.merging.

Only events never claimed for sending are merged (a claimed event may already be at the
sink); `merge_pending` applies the merge inside the store.

`drop_unrouted` brings pending alert rows an older hostagent wrote in line with the routing
by channel (hostagent.alerts.routing), once the daemon has told the store each sink's channels.
"""

from __future__ import annotations

import logging
import sqlite3
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import orjson

from hostagent.alerts import routing
from hostagent.alerts.violations import KIND as ALERT_KIND
from hostagent.alerts.violations import payload_channels
from hostagent.store.merging import compatible, merge_payloads

if TYPE_CHECKING:
    from hostagent.store.outbox import Maintenance, Store

log = logging.getLogger(__name__)

MERGE_AT = 0.9  # of max_bytes
PRUNE_TO = 0.8
# What a pass's commit adds to the store besides its payload bytes: per event (its row, the
# events_key entry, page slack) and per delivery row (the row and its pending-index entry);
# measured on 1,000-event passes: ~330 and ~115 bytes. Only for a pass the cap refused.
EVENT_ROW_BYTES = 384
DELIVERY_ROW_BYTES = 128
_CHUNK = 500  # rows per prune/merge transaction (bounds how long a commit may wait)
VACUUM_PAGES = 1024  # free pages handed back to the file system per maintenance run


# --- pruning and the size cap ------------------------------------------------------------------


def near_cap(used_bytes: int, max_bytes: int | None, reserve_bytes: int,
             fraction: float = MERGE_AT) -> bool:
    """Whether the pages in use plus the room the next pass needs reach `fraction` of the cap."""
    return max_bytes is not None and used_bytes + reserve_bytes >= fraction * max_bytes


def pass_bytes(payload_bytes: Sequence[int], deliveries: int) -> int:
    """About what a pass of events with these payload sizes and `deliveries` delivery rows in
    all adds to the store (EVENT_ROW_BYTES, DELIVERY_ROW_BYTES)."""
    return sum(payload_bytes) + EVENT_ROW_BYTES * len(payload_bytes) \
        + DELIVERY_ROW_BYTES * deliveries


def _under(store: Store, fraction: float) -> bool:
    return not near_cap(store.size().used_bytes, store.max_bytes, store.reserve_bytes, fraction)


def delete_orphans(c: sqlite3.Connection, seqs: Collection[int]) -> None:
    """Delete these events (by seq) where no sink has a delivery row for them any more."""
    c.executemany("DELETE FROM events WHERE seq = ? AND NOT EXISTS (SELECT 1 FROM "
                  "deliveries WHERE sink IN (SELECT name FROM sinks) AND "
                  "seq = events.seq)", [(q,) for q in seqs])


def drop_unrouted(store: Store, routes: Mapping[str, routing.Route]) -> dict[str, int]:
    """Delete pending rows of Notify alerts for sinks that do not answer to their channels.

    An older hostagent gave every sink that takes `threshold_violation` a row for every alert,
    and the queue sink acknowledged the Notify alerts not naming "queue" without sending them
    (the webhook fan-out found no registration for them). Sinks now send every row they get,
    so such rows go before delivery starts: they were never meant for that sink, nothing was
    ever sent for them there, and the sinks the alert is meant for keep their own rows (an
    event no sink is left owing goes too, as pruning does). Only channels are judged, never
    kinds (rows of a sink whose kinds changed stay, as ever). Runs at every daemon start, so a
    store an older hostagent wrote to in between is set right as well: one sequential scan of
    the events table (~0.13 s for 500,000 pending events, less than the `quick_check` at open),
    with a primary-key look-up per alert and only alert payloads decoded.
    """
    restricted = [n for n, r in routes.items() if r.channels is not None]
    if not restricted:
        return {}
    named = routing.claimed(routes)
    with store.transaction("re-route pending alert rows") as c:
        rows = c.execute(
            # CROSS JOIN keeps this order: the alerts first, then their rows (6x faster than
            # walking every pending row and looking up its event's kind).
            "SELECT d.sink, d.seq, d.event_id, e.payload FROM events e CROSS JOIN deliveries "
            "d ON d.seq = e.seq WHERE e.kind = ? AND d.sink IN (SELECT value FROM "
            "json_each(?)) AND d.status = 'pending'",
            (ALERT_KIND, orjson.dumps(restricted).decode())).fetchall()
        drop = [(sink, seq, eid) for sink, seq, eid, payload in rows
                if not routing.takes(routing.Route(None, routes[sink].channels), ALERT_KIND,
                                     payload_channels(ALERT_KIND, bytes(payload)), named)]
        c.executemany("DELETE FROM deliveries WHERE sink = ? AND seq = ?",
                      [(sink, seq) for sink, seq, _ in drop])
        delete_orphans(c, {seq for _, seq, _ in drop})
    counts = Counter(sink for sink, _, _ in drop)
    for sink, n in counts.items():
        log.info("pending alert rows of an older hostagent dropped: not meant for this sink",
                 extra={"sink": sink, "rows": n,
                        "event_ids": [e for s, _, e in drop if s == sink][:100]})
    return dict(counts)


def vacuum(store: Store, pages: int) -> None:
    """Hand up to `pages` free pages back to the file system (incremental auto-vacuum)."""
    with store.reading("vacuum") as c:
        c.execute(f"PRAGMA incremental_vacuum({int(pages)})").fetchall()


def prune(store: Store, before_ns: int | None) -> int:
    """Delete acked deliveries done before `before_ns` (None: all, until the pages in use and
    the next pass's reserve are under PRUNE_TO of the cap), oldest first, and the events no
    sink needs any more."""
    total = 0
    while True:
        with store.transaction("prune") as c:
            gone = c.execute(
                "DELETE FROM deliveries WHERE (sink, seq) IN (SELECT sink, seq "
                "FROM deliveries WHERE status = 'acked' AND done_ns < ? ORDER BY done_ns "
                "LIMIT ?) RETURNING seq",
                (before_ns if before_ns is not None else 2**63 - 1, _CHUNK)).fetchall()
            delete_orphans(c, {g[0] for g in gone})
        total += len(gone)
        if len(gone) < _CHUNK:
            return total
        if before_ns is None and store.max_bytes is not None and _under(store, PRUNE_TO):
            return total


def maintain(store: Store, retention_s: float) -> Maintenance:
    """Prune past retention; near the cap (counting the next pass) prune all acked (oldest
    first), then merge."""
    from hostagent.store.outbox import Maintenance

    cutoff = store.clock.now().wall_ns - int(retention_s * 1e9)
    pruned = prune(store, cutoff)
    with store.transaction("prune merge records") as c:
        c.execute("DELETE FROM merges WHERE created_ns < ? AND NOT EXISTS (SELECT 1 FROM "
                  "events WHERE seq = merges.seq AND event_id = merges.merged_event_id)",
                  (cutoff,))
    merged: dict[str, int] = {}
    merges = 0
    if not _under(store, MERGE_AT):
        more, merged, merges = _near_cap(store)
        pruned += more
        log.warning("outbox near its size cap: pruned acked events, merged pending ones",
                    extra={"pruned": pruned, "merged": merged, "max_bytes": store.max_bytes,
                           "reserve_bytes": store.reserve_bytes})
    vacuum(store, VACUUM_PAGES)
    return Maintenance(pruned, merged, merges, store.size().used_bytes)


def make_room(store: Store) -> Maintenance:
    """A pass's commit was refused for room: the near-cap steps now, whatever the size (prune
    acked events, oldest first, until the pages in use and the refused pass's reserve are under
    PRUNE_TO; merge pending ones if still not under MERGE_AT). Never an unacknowledged row.
    Nothing, when the pages in use and the reserve are under PRUNE_TO already: then the disk,
    not the cap, refused it."""
    from hostagent.store.outbox import Maintenance

    if _under(store, PRUNE_TO):
        return Maintenance(0, {}, 0, store.size().used_bytes)
    pruned, merged, merges = _near_cap(store)
    return Maintenance(pruned, merged, merges, store.size().used_bytes)


def _near_cap(store: Store) -> tuple[int, dict[str, int], int]:
    """Prune acked early, then merge if still near the cap: (pruned, merged per sink, merges)."""
    pruned = prune(store, None)
    merged: dict[str, int] = {}
    merges = 0
    if not _under(store, MERGE_AT):
        for sink in store.stats():
            n, m = merge_pending(store, sink)
            merged[sink] = n
            merges += m
    return pruned, merged, merges


# --- merging inside the store --------------------------------------------------------------


def merge_pending(store: Store, sink: str) -> tuple[int, int]:
    """Merge runs of never-sent, tiling pending events per instance; (events merged, merges)."""
    with store.reading("scan for merge") as c:
        rows = c.execute(
            "SELECT d.seq, d.instance_id, d.period_start_ns, e.period_end_ns, e.kind, "
            "d.claimed FROM deliveries d INDEXED BY deliveries_pending JOIN events e "
            "ON e.seq = d.seq WHERE d.sink = ? AND d.status = 'pending' "
            "ORDER BY d.instance_id, d.period_start_ns", (sink,)).fetchall()
    runs: list[list[int]] = []  # seqs
    run: list[int] = []
    prev: tuple[str, int] | None = None
    for seq, iid, start, end, kind, claimed in rows:
        # Claimed events may already be at the sink: merging them would bill twice.
        ok = kind == "resource_usage" and not claimed
        if ok and prev == (iid, start):
            run.append(seq)
        else:
            if len(run) > 1:
                runs.append(run)
            run = [seq] if ok else []
        prev = (iid, end) if ok else None
    if len(run) > 1:
        runs.append(run)
    events = merges = 0
    batch: list[list[int]] = []
    for i, r in enumerate(runs):
        batch.append(r)
        if sum(map(len, batch)) >= _CHUNK or i == len(runs) - 1:
            e, m = _merge_runs(store, sink, batch)
            events, merges, batch = events + e, merges + m, []
    return events, merges


def _merge_runs(store: Store, sink: str, runs: Sequence[Sequence[int]]) -> tuple[int, int]:
    now = store.clock.now().wall_ns
    events = merges = 0
    with store.transaction("merge pending events") as c:
        for run in runs:
            got = {r[0]: r for r in c.execute(
                "SELECT d.seq, e.kind, e.instance_id, e.period_start_ns, e.period_end_ns, "
                "e.payload, d.created_ns, e.event_id FROM deliveries d JOIN events e ON "
                "e.seq = d.seq WHERE d.sink = ? AND d.seq IN (SELECT value FROM json_each(?)) "
                "AND d.status = 'pending' AND d.claimed = 0",
                (sink, orjson.dumps(list(run)).decode()))}
            rows = [got[i] for i in run if i in got]  # claimed since the scan: left alone
            for part in _compatible_runs(rows):
                _merge_one(store, c, sink, part, now)
                events += len(part)
                merges += 1
    return events, merges


def _merge_one(store: Store, c: sqlite3.Connection, sink: str, rows: Sequence[Any],
               now: int) -> None:
    merged = merge_payloads([orjson.loads(r[5]) for r in rows], [r[4] - r[3] for r in rows])
    ids = [r[7] for r in rows]
    # Delete first: the freed pages take the merged event even at the hard page cap.
    c.executemany("DELETE FROM deliveries WHERE sink = ? AND seq = ?",
                  [(sink, r[0]) for r in rows])
    delete_orphans(c, [r[0] for r in rows])
    first, last = rows[0], rows[-1]
    created = min(r[6] for r in rows)
    # Another sink may have made the same merge already: the event is shared, the row is not.
    c.execute("INSERT OR IGNORE INTO events(event_id, kind, instance_id, period_start_ns, "
              "period_end_ns, payload, created_ns) VALUES(?, ?, ?, ?, ?, ?, ?)",
              (merged["event_id"], first[1], first[2], first[3], last[4], orjson.dumps(merged),
               created))
    seq = c.execute("SELECT seq FROM events WHERE period_start_ns = ? AND event_id = ?",
                    (first[3], merged["event_id"])).fetchone()[0]
    c.execute("INSERT OR IGNORE INTO deliveries(sink, seq, event_id, instance_id, "
              "period_start_ns, created_ns, status) VALUES(?, ?, ?, ?, ?, ?, 'pending')",
              (sink, seq, merged["event_id"], first[2], first[3], created))
    c.execute("INSERT OR REPLACE INTO merges(merged_event_id, sink, seq, source_ids, "
              "created_ns) VALUES(?, ?, ?, ?, ?)",
              (merged["event_id"], sink, seq, orjson.dumps(ids).decode(), now))
    log.info("merged pending events", extra={"sink": sink, "instance_id": first[2],
                                             "merged_event_id": merged["event_id"],
                                             "events": len(ids)})


def _compatible_runs(rows: Sequence[Any]) -> list[list[Any]]:
    """Split a tiling run into maximal sub-runs (≥ 2) whose payloads may be merged."""
    out: list[list[Any]] = []
    cur: list[Any] = []
    prev: dict[str, Any] | None = None
    for r in rows:
        try:
            p = orjson.loads(r[5])
        except orjson.JSONDecodeError:
            p = None
        tiles = bool(cur) and cur[-1][4] == r[3]
        if p is not None and prev is not None and tiles and compatible(prev, p):
            cur.append(r)
        else:
            if len(cur) > 1:
                out.append(cur)
            cur = [r] if p is not None else []
        prev = p
    if len(cur) > 1:
        out.append(cur)
    return out
