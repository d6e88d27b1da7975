"""`hostagent outbox status | dead-letters | replay`: look into and repair the event outbox.

These commands open the state store next to a running daemon (SQLite WAL lets them), after
every check start-up makes (a store it refuses is refused here too, exit 2); they never create
a store and never change sink registration. `status` and `dead-letters` open it read-only:
they write, create and delete no file, so any user who may read the store may run them.
`replay` re-queues dead letters: the daemon picks them up at its next delivery round (at the
latest after the next pass).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from hostagent.cli.terminal import one_line
from hostagent.clock import SystemClock
from hostagent.config import preflight
from hostagent.config.load import Config
from hostagent.errors import StateError
from hostagent.store import opening
from hostagent.store.inspect import SinkStats
from hostagent.store.outbox import Store
from hostagent.store.schema import SCHEMA_VERSION

MIB = 1024 * 1024


def add_parser(subparsers: Any, parents: Sequence[Any] = ()) -> None:
    """Add `outbox` and its subcommands to the main parser's subparsers."""
    p = subparsers.add_parser("outbox", parents=list(parents),
                              help="inspect the event outbox, list and replay dead letters")
    sub = p.add_subparsers(dest="outbox_command", required=True)
    st = sub.add_parser("status", parents=list(parents),
                        help="depth and oldest pending age per sink, dead letters, "
                             "breaker state, store size")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    dl = sub.add_parser("dead-letters", parents=list(parents),
                        help="list events a sink refused for good")
    dl.add_argument("--sink", help="only this sink")
    dl.add_argument("--json", action="store_true", help="machine-readable output")
    rp = sub.add_parser("replay", parents=list(parents), help="re-queue dead letters for delivery")
    rp.add_argument("--sink", help="only this sink's dead letters")
    rp.add_argument("--id", dest="event_id", help="only this event_id")


def _age(ns: int | None, now_ns: int) -> str:
    if ns is None:
        return "-"
    s = max(now_ns - ns, 0) // 1_000_000_000
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _iso(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def breaker_text(st: SinkStats, heartbeat_ns: int | None, now_ns: int, stale_s: float) -> str:
    """The breaker state as the daemon last recorded it, or why it is unknown."""
    alive = heartbeat_ns is not None and now_ns - heartbeat_ns <= stale_s * 1e9
    if alive and st.breaker_state:
        return st.breaker_state + (f" (since {_iso(st.breaker_since_ns)})"
                                   if st.breaker_since_ns and st.breaker_state != "closed"
                                   else "")
    last = f"; last recorded: {st.breaker_state}" if st.breaker_state else ""
    return f"unknown (daemon not running{last})"


def _status(store: Store, cfg: Config, as_json: bool) -> int:
    now = SystemClock().now().wall_ns
    stats = store.stats()
    size = store.size()
    hb = opening.heartbeat_ns(store.path, store.meta())
    stale_s = 3 * cfg.outbox.maintenance_interval_s + 5
    configured = {s.name for s in cfg.sinks}
    rows = []
    for st in stats.values():
        rows.append({
            "sink": st.name, "configured": st.name in configured, "pending": st.pending,
            "oldest_pending_age_s": None if st.oldest_pending_ns is None
            else max(now - st.oldest_pending_ns, 0) / 1e9,
            "acked": st.acked, "dead_letters": st.dead,
            "breaker": breaker_text(st, hb, now, stale_s)})
    doc = {"path": str(store.path), "used_bytes": size.used_bytes, "file_bytes": size.file_bytes,
           "wal_bytes": size.wal_bytes, "max_bytes": cfg.outbox.max_bytes,
           "created": _iso(store.created_ns), "host": store.host,
           "delivery_heartbeat_age_s": None if hb is None else (now - hb) / 1e9, "sinks": rows}
    if as_json:
        sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    # Every name read from the store through one_line: a host or sink name holding an ESC or a
    # newline redrew the terminal or forged a line (as `dead-letters` already escaped them).
    print(f"state store {one_line(store.path)} (host {one_line(store.host)}, created "
          f"{_iso(store.created_ns)})")
    print(f"size: {size.used_bytes / MIB:.1f} MiB used of the {cfg.outbox.max_bytes / MIB:.0f} "
          f"MiB cap (file {size.file_bytes / MIB:.1f} MiB, WAL {size.wal_bytes / MIB:.1f} MiB)")
    print("delivery heartbeat: " + ("never" if hb is None else _age(hb, now) + " ago"))
    print(f"{'SINK':<24} {'PENDING':>8} {'OLDEST':>8} {'ACKED':>8} {'DEAD':>6}  BREAKER")
    for st, row in zip(stats.values(), rows, strict=True):
        name = one_line(st.name) + ("" if row["configured"] else " (not configured)")
        print(f"{name:<24} {st.pending:>8} {_age(st.oldest_pending_ns, now):>8} {st.acked:>8} "
              f"{st.dead:>6}  {one_line(row['breaker'])}")
    return 0


def _dead_letters(store: Store, sink: str | None, as_json: bool) -> int:
    letters = store.dead_letters(sink)
    if as_json:
        docs = [{"sink": d.sink, "event_id": d.event_id, "kind": d.kind,
                 "instance_id": d.instance_id, "period_start_ns": d.period_start_ns,
                 "period_end_ns": d.period_end_ns, "attempts": d.attempts, "reason": d.reason,
                 "dead_at": _iso(d.dead_ns)} for d in letters]
        sys.stdout.write(orjson.dumps(docs, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    if not letters:
        print("no dead letters")
        return 0
    for d in letters:
        print(f"{_iso(d.dead_ns)}  {one_line(d.sink)}  {one_line(d.event_id)}  {one_line(d.kind)}  "
              f"{one_line(d.instance_id)}  period {_iso(d.period_start_ns)}.."
              f"{_iso(d.period_end_ns)}  attempts {d.attempts}  reason: {one_line(d.reason)}")
    print(f"{len(letters)} dead letter(s); `hostagent outbox replay` re-queues them")
    return 0


def _replay(store: Store, sink: str | None, event_id: str | None) -> int:
    n = store.replay(sink, event_id)
    print(f"re-queued {n} dead letter(s)")
    if n == 0 and (sink or event_id):
        print("hostagent: no dead letter matched (with its event still there to send)",
              file=sys.stderr)
        return 1
    return 0


def run(args: argparse.Namespace, cfg: Config) -> int:
    """Run one `outbox` subcommand; StateError propagates (the CLI prints it: exit 2 for a
    store start-up refuses, else 1). `status` and `dead-letters` open the store read-only. A
    symbolic link loop at `collector.state_path` is a ConfigError (exit 2), as in `run`."""
    preflight.check_store_reachable(cfg.source, cfg.collector.state_path)
    store = Store.open(cfg.collector.state_path, clock=SystemClock(), node_id=cfg.host.node_id,
                       sink_names=(), create=False, register_sinks=False, upgrade=False,
                       read_only=args.outbox_command != "replay")
    try:
        if store.schema_version != SCHEMA_VERSION:
            raise StateError(f"{store.path}: the state store is still schema version "
                             f"{store.schema_version}: the daemon upgrades it to "
                             f"{SCHEMA_VERSION} when it next starts (systemctl restart "
                             "hostagent), then try again")
        if args.outbox_command == "status":
            return _status(store, cfg, args.json)
        if args.outbox_command == "dead-letters":
            return _dead_letters(store, args.sink, args.json)
        return _replay(store, args.sink, args.event_id)
    finally:
        store.close()
