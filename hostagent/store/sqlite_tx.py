"""The state file's transactions, shared by the outbox and the webhook store: one connection
behind a lock, BEGIN IMMEDIATE … COMMIT, and SQLite errors mapped onto the error tree."""

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
def transaction(conn: sqlite3.Connection, lock: threading.Lock, path: Path,
                what: str) -> Iterator[sqlite3.Connection]:
    """One write transaction under `lock`; SQLite errors are raised as StateError subclasses."""
    with lock:
        try:
            conn.execute("BEGIN IMMEDIATE")
            yield conn
            conn.execute("COMMIT")
        except sqlite3.Error as err:
            rollback(conn)
            raise translate(err, path, what) from err
        except BaseException:
            rollback(conn)
            raise
