"""The state store is never silently replaced by an empty one.

A store holds the baselines every event is computed from: a daemon that starts on an empty
store re-bills (or skips) everything the lost baselines covered. So at start:

* an existing file that is empty (0 bytes), truncated, not a hostagent store, from a newer
  schema or failing ``PRAGMA quick_check`` is refused (`StateCorrupt`), never overwritten;
* a missing store is created only when none was ever there: creating one writes a marker,
  ``state.db.id`` next to it, holding the store's ``created_ns``. A marker without its store
  means the store was deleted behind the daemon's back: refused too. A marker naming another
  ``created_ns`` than the store's means the file was replaced: refused.

The way out is explicit: ``hostagent store reset`` (`hostagent.cli.store`) moves the store,
its WAL and the marker aside (``state.db.broken-<UTC time>``), reports what was in it when
it can still be read, and the next start creates a fresh store.

This module does the checks that need no SQLite connection and the marker I/O; the checks
of the file's contents are in `Store.open`.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from hostagent.errors import StateCorrupt, StateError

MARKER_SUFFIX = ".id"
SIDE_FILES = ("-wal", "-shm", "-journal", MARKER_SUFFIX)
WAY_OUT = ("refusing to start with empty billing state; stop the daemon and run "
           "`hostagent store reset` to move it aside and start afresh")


def marker_path(path: Path) -> Path:
    """The marker next to the store: ``state.db`` → ``state.db.id``."""
    return path.with_name(path.name + MARKER_SUFFIX)


def _iso(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_marker(path: Path) -> int | None:
    """The created_ns the marker holds; None when there is no marker."""
    marker = marker_path(path)
    try:
        text = marker.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise StateCorrupt(f"{marker}: unreadable store marker ({err}); {WAY_OUT}") from err
    try:
        return int(text)
    except ValueError as err:
        raise StateCorrupt(f"{marker}: store marker holds {text[:40]!r}, not a created_ns; "
                           f"{WAY_OUT}") from err


def before_open(path: Path) -> bool:
    """Refuse what must not be opened; True when a store file is there to open."""
    try:
        if path.exists():
            if not path.is_file():
                raise StateCorrupt(f"{path}: the state store path is not a regular file")
            if path.stat().st_size == 0:
                raise StateCorrupt(f"{path}: the state store is empty (0 bytes): its "
                                   f"baselines and pending events are gone; {WAY_OUT}")
            return True
    except OSError as err:
        raise StateError(f"{path}: cannot inspect the state store: {err}") from err
    created_ns = read_marker(path)
    if created_ns is not None:
        raise StateCorrupt(f"{path}: the state store created at {_iso(created_ns)} is gone "
                           f"({marker_path(path)} remains); {WAY_OUT}")
    return False


def after_open(path: Path, created_ns: int) -> None:
    """Check the marker against the opened store; write it when there is none yet."""
    marked = read_marker(path)
    if marked == created_ns:
        return
    if marked is not None:
        raise StateCorrupt(f"{path}: this store was created at {_iso(created_ns)}, but the "
                           f"store kept here was created at {_iso(marked)}: the file was "
                           f"replaced; {WAY_OUT} (or, if you restored this store on purpose, "
                           f"delete {marker_path(path)})")
    marker = marker_path(path)
    tmp = marker.with_name(marker.name + ".tmp")
    try:
        with open(tmp, "w", encoding="ascii") as f:
            f.write(f"{created_ns}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, marker)
    except OSError as err:
        raise StateError(f"{marker}: cannot write the store marker: {err}") from err


def peek(path: Path, app: str, schema_version: int,
         upgradable: Collection[int] = frozenset()) -> None:
    """The checks start-up makes of an existing store, read through SQLite's `immutable`
    mode: no lock taken, no -wal/-shm file created (so `check-config` run as root never
    leaves root-owned side files). StateCorrupt for what start-up would refuse; a store of an
    `upgradable` version passes (start-up upgrades it). The full
    ``PRAGMA quick_check`` is left to start-up and `hostagent store check`."""
    if not before_open(path):
        return
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro&immutable=1", uri=True)
    except (sqlite3.Error, OSError, ValueError) as err:
        raise StateError(f"{path}: cannot read the state store: {err}") from err
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall()) \
            if "meta" in tables else {}
    except sqlite3.Error as err:
        raise StateCorrupt(f"{path}: not a usable hostagent state store ({err}); "
                           f"{WAY_OUT}") from err
    finally:
        conn.close()
    if meta.get("app") != app:
        raise StateCorrupt(f"{path}: not a hostagent state store; {WAY_OUT}")
    if meta.get("schema_version") not in {str(v) for v in (schema_version, *upgradable)}:
        raise StateCorrupt(f"{path}: schema version {meta.get('schema_version')} is not "
                           f"{schema_version}: this hostagent cannot use it (upgrade hostagent, "
                           "or `hostagent store reset` to start afresh)")
    created_ns = int(meta.get("created_ns", "0"))
    marked = read_marker(path)
    if marked is not None and marked != created_ns:
        raise StateCorrupt(f"{path}: this store was created at {_iso(created_ns)}, but the "
                           f"store kept here was created at {_iso(marked)}: the file was "
                           f"replaced; {WAY_OUT}")


@dataclass(frozen=True, slots=True)
class Salvage:
    """What a store held, as far as it could be read (None: unreadable)."""

    created_ns: int | None
    baselines: int | None
    pending_deliveries: int | None
    pending_events: int | None
    error: str | None


def inspect(path: Path) -> Salvage:
    """Count what a (maybe broken) store holds, read-only and without changing it."""
    counts: dict[str, int | None] = {"created": None, "baselines": None, "deliveries": None,
                                     "events": None}
    queries = {
        "created": "SELECT value FROM meta WHERE key = 'created_ns'",
        "baselines": "SELECT count(*) FROM baselines",
        "deliveries": "SELECT count(*) FROM deliveries WHERE status = 'pending'",
        "events": "SELECT count(DISTINCT event_id) FROM deliveries WHERE status = 'pending'",
    }
    error: str | None = None
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except (sqlite3.Error, OSError, ValueError) as err:
        return Salvage(None, None, None, None, str(err))
    try:
        for name, sql in queries.items():
            try:
                row = conn.execute(sql).fetchone()
                counts[name] = int(row[0]) if row is not None else None
            except (sqlite3.Error, ValueError, TypeError) as err:
                error = error or str(err)
    finally:
        conn.close()
    return Salvage(counts["created"], counts["baselines"], counts["deliveries"],
                   counts["events"], error)


def move_aside(path: Path, now_ns: int) -> list[Path]:
    """Rename the store and its side files to ``<name>.broken-<UTC time>…``; the new names."""
    stamp = datetime.fromtimestamp(now_ns / 1e9, tz=UTC).strftime("%Y%m%dT%H%M%SZ")
    base = path.with_name(f"{path.name}.broken-{stamp}")
    moved: list[Path] = []
    for suffix in ("", *SIDE_FILES):
        src = path.with_name(path.name + suffix)
        if not src.exists() and not src.is_symlink():
            continue
        dst = base.with_name(base.name + suffix)
        if dst.exists():
            raise StateError(f"{dst}: already there; not overwriting it")
        os.replace(src, dst)
        moved.append(dst)
    with contextlib.suppress(OSError):
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return moved
