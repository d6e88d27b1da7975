"""Email sink: alert transitions mailed over SMTP (stdlib smtplib in a worker thread).

::

    send(event) ──► recipients (email_message.recipients) minus those the journal has done
                ├─► over `digest_after` for one recipient in this batch: held for flush's digest
                └─► one SMTP transaction per recipient (one connection per send)
    flush()     ──► the digests, then the batch counters reset

Outcomes per recipient: 250 → journaled `sent`; 5xx (RCPT, DATA, MAIL), an address this
server cannot take (SMTPUTF8 not offered) or a message that cannot be built for it (a control
character in an ``email:<address>`` channel) → journaled `refused`;
connection refused, timeout, dropped connection, 4xx → not journaled (transient). Then: any
transient → SinkUnavailable (the engine retries; journaled recipients are skipped, so each
recipient gets a transition once); otherwise any refused → Undeliverable (dead-lettered, with
the server's reply); otherwise delivered. A refused digest fails `flush`: the batch is resent,
and each event the digest carried is then dead-lettered by `send`. The journal (SQLite,
`journal_path`) is written before `send` returns, so a kill -9 after the server took a mail
but before the outbox acked the event resends to nobody who was journaled; a crash between
the server's 250 and the journal write can repeat one mail (same Message-ID).

TLS: "starttls" (STARTTLS, required) or "implicit" (SMTPS), verified against the system's CAs
or `ca_file`; "none" only for a server on loopback. AUTH: `username` and the password read
from `password_file`, which must not be readable by group or others.
"""

from __future__ import annotations

import logging
import smtplib
import sqlite3
import ssl
import stat
import time
from collections.abc import Sequence
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import orjson
import trio

from hostagent import handoff
from hostagent.config.sinks import EmailSinkConfig
from hostagent.delivery.sinks import email_message
from hostagent.delivery.sinks.base import ConfiguredSink, Undeliverable
from hostagent.errors import SinkUnavailable
from hostagent.model import OutEvent

log = logging.getLogger(__name__)
JOURNAL_KEEP_S = 14 * 86400


class _Transient(Exception):
    pass


class _Refused(Exception):
    pass


class Journal:
    """(event_id, recipient) → sent | refused, in a small SQLite file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db: sqlite3.Connection | None = None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("CREATE TABLE IF NOT EXISTS sent(event_id TEXT, recipient TEXT, "
                       "status TEXT NOT NULL, detail TEXT, at_s REAL NOT NULL, "
                       "PRIMARY KEY(event_id, recipient)) WITHOUT ROWID")
            db.execute("DELETE FROM sent WHERE at_s < ?", (time.time() - JOURNAL_KEEP_S,))
            self._db = db
        return self._db

    def done(self, event_id: str) -> dict[str, tuple[str, str]]:
        """recipient → (status, detail) for one event."""
        rows = self._conn().execute("SELECT recipient, status, detail FROM sent "
                                    "WHERE event_id = ?", (event_id,)).fetchall()
        return {r: (s, d or "") for r, s, d in rows}

    def record(self, event_ids: Sequence[str], recipient: str, status: str,
               detail: str = "") -> None:
        """Journal an outcome (committed, fsynced) for every event of one message."""
        self._conn().executemany(
            "INSERT OR REPLACE INTO sent VALUES(?, ?, ?, ?, ?)",
            [(e, recipient, status, detail, time.time()) for e in event_ids])

    def close(self) -> None:
        """Close the file."""
        if self._db is not None:
            self._db.close()
            self._db = None


def _password(path: str) -> str:
    p = Path(path)
    st = p.stat()
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise _Transient(f"{p}: password file readable by group/others (chmod 600 it)")
    return p.read_text(encoding="utf-8").strip()


def _classify(err: BaseException) -> type[Exception]:
    """_Refused: the server refuses this message or recipient for good (5xx); _Transient:
    anything else, including AUTH, HELO and TLS failures (the server or our config, not the
    event: retried, and counted by the breaker)."""
    if isinstance(err, (smtplib.SMTPAuthenticationError, smtplib.SMTPHeloError,
                        smtplib.SMTPNotSupportedError)):
        return _Transient
    code = getattr(err, "smtp_code", None)
    if isinstance(err, smtplib.SMTPRecipientsRefused):
        codes = [c for c, _ in err.recipients.values()]
        code = max(codes) if codes else None
    return _Refused if isinstance(code, int) and 500 <= code < 600 else _Transient


class EmailSink(ConfiguredSink[EmailSinkConfig]):
    """Mails `threshold_violation` events; see the module doc for outcomes and exactly-once."""

    max_in_flight = 1

    def __init__(self, cfg: EmailSinkConfig) -> None:
        self.cfg = cfg
        self.channels: frozenset[str] | None = frozenset({cfg.channel})
        self.journal = Journal(cfg.journal_path)
        self._limiter = trio.CapacityLimiter(1)
        self._batch: dict[str, int] = {}  # recipient → mails this batch
        self._digest: dict[str, list[OutEvent]] = {}
        self.mails_sent = 0

    # --- SMTP (worker thread) ---------------------------------------------------------

    def _connect(self) -> smtplib.SMTP:
        c = self.cfg
        ctx = ssl.create_default_context(cafile=c.ca_file or None)
        smtp: smtplib.SMTP
        if c.tls == "implicit":
            smtp = smtplib.SMTP_SSL(c.host, c.port, timeout=c.timeout_s, context=ctx)
        else:
            smtp = smtplib.SMTP(c.host, c.port, timeout=c.timeout_s)
            if c.tls == "starttls":
                smtp.starttls(context=ctx)
        if c.username:
            smtp.login(c.username, _password(c.password_file))
        return smtp

    def _build(self, ids: list[str], payloads: Sequence[bytes], rcpt: str,
               now_s: float) -> EmailMessage | None:
        """The message for `rcpt`; None (journaled `refused`) when it cannot be built for
        that recipient: refused for good, like a 5xx, never retried nor raised out of the
        sink (where it would end the delivery task)."""
        try:
            return email_message.build(self.cfg, payloads, rcpt, now_s)
        except email_message.Unmailable as err:
            self.journal.record(ids, rcpt, "refused", f"{rcpt!r}: {err}")
            return None

    def _mail(self, messages: Sequence[tuple[list[str], str, EmailMessage]]
              ) -> tuple[list[str], list[str]]:
        """Send (event ids, recipient, message) in order on one connection; journal each.

        Returns the transient errors and the refusals (those are journaled too).
        """
        errors: list[str] = []
        refused: list[str] = []
        smtp: smtplib.SMTP | None = None
        try:
            for ids, rcpt, msg in messages:
                try:
                    if smtp is None:
                        smtp = self._connect()
                    try:
                        smtp.send_message(msg, self.cfg.sender, [rcpt])
                    except smtplib.SMTPNotSupportedError as err:
                        # An address that needs SMTPUTF8, which this server does not offer:
                        # refused before anything was sent (the connection is still good).
                        detail = f"{rcpt}: {err}"
                        self.journal.record(ids, rcpt, "refused", detail)
                        refused.append(detail)
                        continue
                except (smtplib.SMTPException, OSError, _Transient) as err:
                    kind = _classify(err)
                    detail = f"{rcpt}: {type(err).__name__}: {err}"
                    if kind is _Refused and not isinstance(err, smtplib.SMTPServerDisconnected):
                        self.journal.record(ids, rcpt, "refused", detail)
                        refused.append(detail)
                        continue
                    errors.append(detail)
                    if isinstance(err, (OSError, smtplib.SMTPServerDisconnected, _Transient)):
                        if smtp is not None:
                            smtp.close()
                        smtp = None  # reconnect for the next recipient
                    continue
                self.journal.record(ids, rcpt, "sent")
                self.mails_sent += 1
        finally:
            if smtp is not None:
                try:
                    smtp.quit()
                except (smtplib.SMTPException, OSError):
                    smtp.close()
        return errors, refused

    def _send_sync(self, event: OutEvent) -> tuple[list[str], list[str], list[str]]:
        """→ (transient errors, refusals, recipients held for the digest)."""
        doc: dict[str, Any] = orjson.loads(event.payload)
        done = self.journal.done(event.event_id)
        todo = [r for r in email_message.recipients(self.cfg, doc) if r not in done]
        now_s = time.time()
        held: list[str] = []
        messages = []
        for rcpt in todo:
            n = self._batch.get(rcpt, 0)
            if n >= self.cfg.digest_after:
                held.append(rcpt)
                continue
            self._batch[rcpt] = n + 1
            msg = self._build([event.event_id], [event.payload], rcpt, now_s)
            if msg is not None:
                messages.append(([event.event_id], rcpt, msg))
        errors, _ = self._mail(messages)
        refused = [d for s, d in self.journal.done(event.event_id).values() if s == "refused"]
        return errors, refused, held

    # --- the Sink protocol ------------------------------------------------------------

    async def send(self, event: OutEvent) -> None:
        """Mail one transition to each of its recipients not yet journaled for it."""
        try:
            errors, refused, held = await handoff.run_sync(
                self._send_sync, event, limiter=self._limiter)
        except (sqlite3.Error, OSError, orjson.JSONDecodeError) as err:
            raise SinkUnavailable(f"email: {err}") from err
        if errors:
            raise SinkUnavailable("email: " + "; ".join(errors))
        for rcpt in held:
            self._digest.setdefault(rcpt, []).append(event)
        if refused and not held:
            raise Undeliverable("email refused: " + "; ".join(refused))

    def _flush_sync(self) -> tuple[list[str], list[str]]:
        now_s = time.time()
        messages = []
        refused = []
        for rcpt, events in self._digest.items():
            ids = [e.event_id for e in events]
            msg = self._build(ids, [e.payload for e in events], rcpt, now_s)
            if msg is None:
                refused.append(rcpt)
            else:
                messages.append((ids, rcpt, msg))
        errors, refusals = self._mail(messages)
        return errors, refused + refusals

    async def flush(self) -> None:
        """Send the digests of this batch; SinkUnavailable (everything resent, journaled
        recipients skipped) when one could not be sent, or was refused: resent, an event a
        recipient refused is then dead-lettered by `send` (the journal says so), where
        acknowledging the batch would have dropped it for that recipient unseen."""
        try:
            errors, refused = await handoff.run_sync(self._flush_sync, limiter=self._limiter)
        except (sqlite3.Error, OSError) as err:
            raise SinkUnavailable(f"email digest: {err}") from err
        finally:
            self._digest.clear()
            self._batch.clear()
        if errors or refused:
            raise SinkUnavailable("email digest: " + "; ".join(
                errors + [f"refused (dead-lettered when resent): {r}" for r in refused]))

    async def aclose(self) -> None:
        """Close the journal."""
        await handoff.run_sync(self.journal.close, limiter=self._limiter)
