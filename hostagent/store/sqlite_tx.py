"""The state file's connections and transactions, shared by the outbox and the webhook store:
one connection behind a lock, BEGIN IMMEDIATE … COMMIT, and SQLite errors mapped onto the
error tree."""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hostagent.errors import StateCorrupt, StateError, StoreFull

log = logging.getLogger(__name__)

SQLITE_CORRUPT = 11
SQLITE_FULL = 13
SQLITE_NOTADB = 26
# How long a connection waits for another writer of the state file (the collector's commit,
# a delivery batch, the webhook store, `hostagent outbox`) before SQLITE_BUSY.
BUSY_TIMEOUT_S = 30.0


def connect(path: Path) -> sqlite3.Connection:
    """A connection to the state file as every part of the daemon opens it: autocommit (we
    write BEGIN IMMEDIATE ourselves), usable from worker threads, BUSY_TIMEOUT_S."""
    return sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                           timeout=BUSY_TIMEOUT_S)


def translate(err: sqlite3.Error, path: Path, what: str) -> StateError:
    """The StateError for a SQLite error: disk full and damage get their own classes."""
    code = getattr(err, "sqlite_errorcode", None)
    if code is not None and code & 0xFF == SQLITE_FULL:
        return StoreFull(f"{path}: {what}: store or disk full ({err})")
    if code is not None and code & 0xFF in (SQLITE_CORRUPT, SQLITE_NOTADB):
        return StateCorrupt(f"{path}: {what}: database damaged ({err})")
    return StateError(f"{path}: {what}: {err}")


def rollback(conn: sqlite3.Connection) -> None:
    """Roll back if a transaction is open; SQLite may already have (e.g. on SQLITE_FULL)."""
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error as err:
            log.debug("rollback failed", extra={"error": str(err)})


@contextmanager
def transaction(conn: sqlite3.Connection, lock: threading.Lock, path: Path, what: str, *,
                durable: bool = True) -> Iterator[sqlite3.Connection]:
    """One write transaction under `lock`; SQLite errors are raised as StateError subclasses.

    `durable=False`: this one commit under synchronous=NORMAL (the WAL is not synced; a crash
    of the process loses nothing, a power loss may lose this commit, never corrupts the file,
    and the next synchronous=FULL commit makes it durable too). Only for what may be lost."""
    with lock:
        try:
            if not durable:
                conn.execute("PRAGMA synchronous=NORMAL")
            try:
                conn.execute("BEGIN IMMEDIATE")
                yield conn
                conn.execute("COMMIT")
            finally:
                if not durable:
                    rollback(conn)  # (only if still open) before the setting can change
                    conn.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error as err:
            rollback(conn)
            raise translate(err, path, what) from err
        except BaseException:
            rollback(conn)
            raise

