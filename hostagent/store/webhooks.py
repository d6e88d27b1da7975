"""Webhook registrations and per-endpoint delivery rows, in their own tables of the state file.

Tables (created if absent; the outbox's schema is untouched)::

    webhooks(id, url, event_types JSON, secret, created_ns, active)
    webhook_deliveries(webhook_id, event_id, event_type, body, status pending|delivered|dead,
                       attempts, next_attempt_ns, last_error, created_ns, done_ns, seq_ns)

Order: an endpoint gets its rows oldest event first (`seq_ns`: the event's period end); with
`endpoint_concurrency = 1` (the default) they are sent one at a time in that order, except
that a row waiting out a backoff lets later rows pass (events carry their own timestamps and
alert state, so a consumer can order them).

Own connection to the same SQLite file (WAL lets it write alongside the outbox's connection;
the busy timeout, sqlite_tx.BUSY_TIMEOUT_S, serialises writers). `fan_out` commits every
delivery row of one event in ONE transaction before the outbox acknowledges the event: a crash
in between repeats the fan-out, which `INSERT OR IGNORE` makes idempotent.

Event types follow upstream: a registration for `metrics` gets `resource_usage` events, one for
`threshold_violation` the alerts (Notify alerts only when the registration's id, "webhook" or
"api_callback" is among the rule's notification_channels).
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
import sqlite3
import threading
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from hostagent.clock import Clock
from hostagent.errors import ConfigError, StateCorrupt, StateError
from hostagent.model import OutEvent
from hostagent.store import schema, sqlite_tx
from hostagent.store.guard import WAY_OUT

EVENT_TYPES = {"metrics": "resource_usage", "threshold_violation": "threshold_violation"}
KIND_TO_TYPE = {v: k for k, v in EVENT_TYPES.items()}
ALL_WEBHOOKS_CHANNELS = frozenset({"webhook", "webhooks", "api_callback"})
WHSEC_PREFIX = "whsec_"
_RAW_SECRET = re.compile(r"[\x21-\x7e]{1,256}")
_WHERE = "<webhook registration>"


def signing_key(secret: str) -> bytes:
    """The HMAC key of a secret: `whsec_<base64>` decoded (24-64 bytes), else its bytes.

    ConfigError when a `whsec_` secret is not canonical base64 of 24-64 bytes, or a raw secret
    is not 1-256 printable ASCII characters: a malformed secret is never used as raw bytes.
    """
    if secret.startswith(WHSEC_PREFIX):
        b64 = secret[len(WHSEC_PREFIX):]
        try:
            key = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            key = b""
        if not 24 <= len(key) <= 64 or base64.b64encode(key).decode() != b64:
            raise ConfigError(_WHERE, "secret", "whsec_ followed by the standard base64 of "
                              "24-64 random bytes", f"{secret[:10]}… ({len(secret)} chars)",
                              "generate one with: echo whsec_$(head -c 32 /dev/urandom | base64)")
        return key
    if not _RAW_SECRET.fullmatch(secret):
        raise ConfigError(_WHERE, "secret", "1-256 printable ASCII characters without spaces, "
                          "or whsec_<base64>", f"{len(secret)} chars")
    return secret.encode()

_SCHEMA = """
CREATE TABLE IF NOT EXISTS webhooks(
  id TEXT PRIMARY KEY, url TEXT NOT NULL, event_types TEXT NOT NULL, secret TEXT,
  created_ns INTEGER NOT NULL, active INTEGER NOT NULL DEFAULT 1) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS webhook_deliveries(
  webhook_id TEXT NOT NULL, event_id TEXT NOT NULL, event_type TEXT NOT NULL,
  body BLOB NOT NULL, status TEXT NOT NULL CHECK (status IN ('pending','delivered','dead')),
  attempts INTEGER NOT NULL DEFAULT 0, next_attempt_ns INTEGER NOT NULL DEFAULT 0,
  last_error TEXT, created_ns INTEGER NOT NULL, done_ns INTEGER, seq_ns INTEGER NOT NULL,
  PRIMARY KEY (webhook_id, event_id)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS webhook_deliveries_due
  ON webhook_deliveries(webhook_id, status, seq_ns, next_attempt_ns);
"""


def check_tables(c: sqlite3.Connection, path: Path, tables: set[str]) -> None:
    """StateCorrupt when the webhook tables are there but damaged: one of them or a column
    missing (`CREATE TABLE IF NOT EXISTS` silently re-created a dropped table empty, losing
    what endpoints were owed), or a registration whose event types do not parse. Neither
    table there is fine: no webhook sink was configured yet. Reads only."""
    want = schema.ddl_layout(_SCHEMA).tables  # its index is re-created when missing
    if not tables & want.keys():
        return
    missing = schema.lacking(c, schema.Layout(want, frozenset()), tables)
    if missing:
        raise StateCorrupt(f"{path}: the webhook tables lack {', '.join(missing[:6])}: the "
                           f"store is damaged; {WAY_OUT}")
    for wid, raw in c.execute("SELECT id, event_types FROM webhooks"):
        _event_types(path, wid, raw)


def _event_types(path: Path, wid: object, raw: object) -> tuple[str, ...]:
    """A registration's stored event types (a JSON list of names); StateCorrupt if not."""
    try:
        types = orjson.loads(raw) if isinstance(raw, (str, bytes)) else None
    except orjson.JSONDecodeError:
        types = None
    if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
        raise StateCorrupt(f"{path}: webhook registration {str(wid)[:40]!r} has event types "
                           f"{str(raw)[:40]!r}, not a list of names: the store is damaged; "
                           f"{WAY_OUT}")
    return tuple(types)


def _registration(path: Path, r: Sequence[Any]) -> Registration:
    return Registration(r[0], r[1], _event_types(path, r[0], r[2]), r[3], r[4])


def _delivery(path: Path, r: Sequence[Any]) -> Delivery:
    if not isinstance(r[3], bytes) or not isinstance(r[4], int):
        raise StateCorrupt(f"{path}: webhook delivery {str(r[1])[:40]!r} for {str(r[0])[:40]!r} "
                           f"holds a body of type {type(r[3]).__name__} and attempts "
                           f"{str(r[4])[:20]!r}: the store is damaged; {WAY_OUT}")
    return Delivery(r[0], r[1], r[2], r[3], r[4])


@dataclass(frozen=True, slots=True)
class Registration:
    """One registered webhook."""

    id: str
    url: str
    event_types: tuple[str, ...]
    secret: str | None
    created_ns: int

    def public(self) -> dict[str, Any]:
        """As the API shows it (the secret is never shown)."""
        return {"id": self.id, "url": self.url, "event_types": list(self.event_types),
                "secret": None, "created_ns": self.created_ns}


@dataclass(frozen=True, slots=True)
class Delivery:
    """One event owed to one endpoint."""

    webhook_id: str
    event_id: str
    event_type: str
    body: bytes
    attempts: int


def wants(reg: Registration, event: OutEvent, payload: dict[str, Any]) -> bool:
    """Does this registration receive this event?"""
    etype = KIND_TO_TYPE.get(event.kind)
    if etype is None or etype not in reg.event_types:
        return False
    if event.kind == "threshold_violation" and payload.get("action") == "notify":
        chans = set(payload.get("channels") or ())
        return reg.id in chans or bool(chans & ALL_WEBHOOKS_CHANNELS)
    return True


def body_of(event: OutEvent, payload: dict[str, Any]) -> bytes:
    """Upstream's body `{"event_type", "timestamp", "data"}`; deterministic per event."""
    etype = KIND_TO_TYPE.get(event.kind, event.kind)
    return orjson.dumps({"event_type": etype, "timestamp": event.period_end_ns // 1_000_000_000,
                         "data": payload})


class WebhookStore:
    """Registrations and delivery rows; synchronous (call through hostagent.handoff.run_sync)."""

    def __init__(self, path: str | Path, clock: Clock) -> None:
        self.path = Path(path)
        self.clock = clock
        self._lock = threading.Lock()
        try:
            self._conn = sqlite_tx.connect(self.path)
            tables = {r[0] for r in self._conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "meta" not in tables:
                self._conn.close()
                raise StateError(f"{self.path}: no hostagent state store here; open the outbox "
                                 "Store first (it creates the file)")
            try:
                check_tables(self._conn, self.path, tables)
            except StateCorrupt:
                self._conn.close()
                raise
            self._conn.execute("PRAGMA synchronous=FULL")
            with self._tx("create webhook tables") as c:
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        c.execute(stmt)
        except sqlite3.Error as err:
            raise sqlite_tx.no_space(self.path, err, "cannot open webhook tables") or StateError(
                f"{self.path}: cannot open webhook tables: {err}") from err

    def close(self) -> None:
        """Close this connection."""
        with self._lock:
            self._conn.close()

    def _tx(self, what: str) -> AbstractContextManager[sqlite3.Connection]:
        return sqlite_tx.transaction(self._conn, self._lock, self.path, what)

    def register(self, url: str, event_types: Sequence[str], secret: str | None = None,
                 ) -> Registration:
        """Add a registration (id `webhook_<8 hex>`); ConfigError for a bad type list or secret.

        The URL's SSRF check (hostagent.delivery.ssrf.Guard) is the caller's: it needs the
        webhook sink's allow-list and, for names, DNS."""
        types = tuple(dict.fromkeys(event_types))
        bad = [t for t in types if t not in EVENT_TYPES]
        if not types or bad:
            raise ConfigError(_WHERE, "event_types",
                              f"a non-empty subset of {sorted(EVENT_TYPES)}", list(event_types))
        if not url.lower().startswith(("http://", "https://")):
            raise ConfigError(_WHERE, "url", "an http(s) URL", url[:200])
        if secret is not None:  # "" is no secret: refused, never an unsigned registration
            signing_key(secret)
        reg = Registration(f"webhook_{secrets.token_hex(4)}", url, types, secret or None,
                           self.clock.now().wall_ns)
        with self._tx("register webhook") as c:
            c.execute("INSERT INTO webhooks(id, url, event_types, secret, created_ns) "
                      "VALUES(?, ?, ?, ?, ?)", (reg.id, reg.url, orjson.dumps(list(types)),
                                                reg.secret, reg.created_ns))
        return reg

    def delete(self, webhook_id: str) -> bool:
        """Remove a registration and what it was still owed; False when unknown."""
        with self._tx("delete webhook") as c:
            n = c.execute("DELETE FROM webhooks WHERE id = ?", (webhook_id,)).rowcount
            c.execute("DELETE FROM webhook_deliveries WHERE webhook_id = ? AND "
                      "status = 'pending'", (webhook_id,))
        return n == 1

    def registrations(self) -> list[Registration]:
        """Every active registration, oldest first."""
        with self._lock:
            rows = self._conn.execute("SELECT id, url, event_types, secret, created_ns FROM "
                                      "webhooks WHERE active = 1 ORDER BY created_ns, id")
            return [_registration(self.path, r) for r in rows]

    # --- fan-out and delivery -----------------------------------------------------------

    def fan_out(self, event: OutEvent) -> int:
        """ONE transaction: a pending row per interested registration; returns how many."""
        payload = orjson.loads(event.payload)
        now = self.clock.now().wall_ns
        body = body_of(event, payload)
        etype = KIND_TO_TYPE.get(event.kind, event.kind)
        with self._tx("fan out event") as c:
            regs = [_registration(self.path, r) for r in c.execute(
                "SELECT id, url, event_types, secret, created_ns FROM webhooks WHERE active = 1")]
            rows = [(r.id, event.event_id, etype, body, now, event.period_end_ns) for r in regs
                    if wants(r, event, payload)]
            c.executemany("INSERT OR IGNORE INTO webhook_deliveries(webhook_id, event_id, "
                          "event_type, body, status, created_ns, seq_ns) "
                          "VALUES(?, ?, ?, ?, 'pending', ?, ?)", rows)
        return len(rows)

    def due(self, webhook_id: str, limit: int, now_ns: int) -> list[Delivery]:
        """Pending deliveries of one endpoint whose time has come, oldest first."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT webhook_id, event_id, event_type, body, attempts FROM webhook_deliveries "
                "WHERE webhook_id = ? AND status = 'pending' AND next_attempt_ns <= ? "
                "ORDER BY seq_ns, created_ns, event_id LIMIT ?",
                (webhook_id, now_ns, limit)).fetchall()
        return [_delivery(self.path, r) for r in rows]

    def next_due_ns(self, webhook_id: str) -> int | None:
        """When the earliest pending delivery of an endpoint is due (None: nothing pending)."""
        with self._lock:
            row = self._conn.execute(
                "SELECT MIN(next_attempt_ns) FROM webhook_deliveries WHERE webhook_id = ? AND "
                "status = 'pending'", (webhook_id,)).fetchone()
        return None if row[0] is None else int(row[0])

    def delivered(self, d: Delivery) -> None:
        """The endpoint answered 2xx."""
        with self._tx("record delivery") as c:
            c.execute("UPDATE webhook_deliveries SET status = 'delivered', attempts = attempts "
                      "+ 1, done_ns = ?, last_error = NULL WHERE webhook_id = ? AND event_id = ?",
                      (self.clock.now().wall_ns, d.webhook_id, d.event_id))

    def failed(self, d: Delivery, error: str, next_attempt_ns: int, *, weight: int,
               dead_after: int) -> bool:
        """A failed attempt (`weight` attempts' worth); True when the row is now dead."""
        attempts = d.attempts + weight
        dead = attempts >= dead_after
        with self._tx("record failed delivery") as c:
            c.execute("UPDATE webhook_deliveries SET attempts = ?, next_attempt_ns = ?, "
                      "last_error = ?, status = ?, done_ns = ? WHERE webhook_id = ? AND "
                      "event_id = ?", (attempts, next_attempt_ns, error,
                                       "dead" if dead else "pending",
                                       self.clock.now().wall_ns if dead else None,
                                       d.webhook_id, d.event_id))
        return dead

    def counts(self) -> dict[str, dict[str, int]]:
        """Rows per endpoint and status (for metrics and `outbox status`)."""
        out: dict[str, dict[str, int]] = {}
        with self._lock:
            for wid, status, n in self._conn.execute(
                    "SELECT webhook_id, status, COUNT(*) FROM webhook_deliveries "
                    "GROUP BY webhook_id, status"):
                out.setdefault(wid, {})[status] = n
        return out

    def prune(self, retention_s: float) -> int:
        """Drop delivered/dead rows older than `retention_s`."""
        cutoff = self.clock.now().wall_ns - int(retention_s * 1e9)
        with self._tx("prune webhook deliveries") as c:
            return c.execute("DELETE FROM webhook_deliveries WHERE status != 'pending' AND "
                             "done_ns < ?", (cutoff,)).rowcount
