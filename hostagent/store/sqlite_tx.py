"""The state file's connections and transactions, shared by the outbox and the webhook store:
one connection behind a lock, BEGIN IMMEDIATE … COMMIT, and SQLite errors mapped onto the
error tree; and the read-only connection the start-up checks and the inspecting commands use
(`connect_read_only`), which never changes, creates or deletes a file."""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hostagent.errors import StateCorrupt, StateError, StoreFull

log = logging.getLogger(__name__)

SQLITE_IOERR = 10
SQLITE_CORRUPT = 11
SQLITE_FULL = 13
SQLITE_CANTOPEN = 14
SQLITE_NOTADB = 26
# Errors that say this user may not read (or lock) the file: run as the service user.
SQLITE_READONLY = 8
SQLITE_ACCESS = frozenset({3, SQLITE_READONLY, 14, 23})  # PERM, READONLY, CANTOPEN, AUTH
WAL_MAGIC = (0x377F0682, 0x377F0683)  # checksums little-endian, big-endian
WAL_VERSION = 3007000
# How long a connection waits for another writer of the state file (the collector's commit,
# a delivery batch, the webhook store, `hostagent outbox`) before SQLITE_BUSY.
BUSY_TIMEOUT_S = 30.0
# Below this much free room (or with no free inode) the file system holding the store counts
# as full: SQLite's -shm index alone takes 32 KiB, a WAL frame a page, a checkpoint pages more.
ROOM_MIN_BYTES = 1 << 20
_NO_ROOM_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# SQLite reports a full disk as SQLITE_FULL only where it wrote through its pager; creating or
# growing the -shm index (SQLITE_IOERR_SHMSIZE), a write or fsync of the log, or creating a
# file (SQLITE_CANTOPEN) on a full file system read "disk I/O error" / "unable to open".
_MAYBE_NO_ROOM = frozenset({SQLITE_FULL, SQLITE_IOERR, SQLITE_CANTOPEN})


def connect(path: Path) -> sqlite3.Connection:
    """A connection to the state file as every part of the daemon opens it: autocommit (we
    write BEGIN IMMEDIATE ourselves), usable from worker threads, BUSY_TIMEOUT_S."""
    return sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                           timeout=BUSY_TIMEOUT_S)


def wal_holds_commits(wal: Path) -> bool:
    """Whether the write-ahead log `wal` has a valid header and room for a frame: SQLite would
    read commits from it. A missing, short or garbage log holds none (SQLite ignores it); one
    that cannot be read is assumed to hold some."""
    try:
        with open(wal, "rb") as f:
            head = f.read(32)
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        return False
    except OSError:
        return True
    if len(head) < 32:
        return False
    magic, version, page, _, _, _, sum0, sum1 = struct.unpack(">8I", head)
    if magic not in WAL_MAGIC or version != WAL_VERSION or page < 512 or page > 65536 \
            or page & (page - 1):
        return False
    words = struct.unpack((">" if magic & 1 else "<") + "6I", head[:24])
    s0 = s1 = 0
    for i in range(0, 6, 2):
        s0 = (s0 + words[i] + s1) & 0xFFFFFFFF
        s1 = (s1 + words[i + 1] + s0) & 0xFFFFFFFF
    return (s0, s1) == (sum0, sum1) and size >= 32 + 24 + page


def connect_read_only(path: Path, *, may_create_index: bool = False) -> sqlite3.Connection:
    """A connection that cannot change the state file, nor create or delete a file beside it.

    With a -wal and its -shm index both there (a daemon runs, or crashed): plain ``mode=ro``
    reads through them. Without them, even ``mode=ro`` would create both (as root: files the
    service user cannot open), so a store whose log holds no commits (none, or garbage that
    SQLite ignores) is read as it is on disk (``immutable=1``). A log holding commits but no
    -shm can only be read by creating one: StateError, unless `may_create_index` (the daemon's
    own start, which creates it anyway). A rollback journal left beside the file: ``mode=ro``
    (SQLite refuses to read past a hot journal it may not roll back)."""
    wal, shm, journal = (Path(f"{path}{s}") for s in ("-wal", "-shm", "-journal"))
    if (wal.exists() and shm.exists()) or journal.exists():
        mode = "mode=ro"
    elif wal_holds_commits(wal):
        if not may_create_index:
            raise StateError(f"{path}: cannot read the state store without writing: "
                             f"{wal.name} holds commits and {shm.name} is missing (the daemon "
                             "recovers the log when it next starts, or refuses it naming "
                             "it if it is not this store's)")
        mode = "mode=ro"
    else:
        mode = "mode=ro&immutable=1"
    try:
        return sqlite3.connect(f"{path.resolve().as_uri()}?{mode}", uri=True,
                               isolation_level=None, check_same_thread=False,
                               timeout=BUSY_TIMEOUT_S)
    except (sqlite3.Error, OSError, ValueError) as err:
        raise StateError(f"{path}: cannot read the state store: {err}") from err


def _room(directory: Path) -> tuple[int, bool] | None:
    """(bytes free to this user, no inode left) on the file system holding `directory` (or
    its nearest existing parent); None when that cannot be read."""
    for at in (directory, *directory.parents):
        try:
            st = os.statvfs(at)
        except FileNotFoundError:
            continue
        except OSError:
            return None
        root = os.geteuid() == 0  # root may use the blocks reserved for it
        blocks, inodes = (st.f_bfree, st.f_ffree) if root else (st.f_bavail, st.f_favail)
        return blocks * st.f_frsize, st.f_files > 0 and inodes == 0
    return None


def out_of_room(path: Path) -> bool:
    """Whether the file system holding `path` is full: less than ROOM_MIN_BYTES free to this
    user, or no inode left."""
    return _full(_room(path.parent))


def _full(room: tuple[int, bool] | None) -> bool:
    return room is not None and (room[0] < ROOM_MIN_BYTES or room[1])


def no_space(path: Path, err: BaseException, what: str) -> StoreFull | None:
    """StoreFull naming the file system, "no space left" and the fix, when `err` comes of the
    store's file system being full: ENOSPC or EDQUOT, or a SQLite error a full disk causes
    (SQLITE_FULL, SQLITE_IOERR_*, SQLITE_CANTOPEN) while `out_of_room`. None otherwise: a
    store that hit its own size cap (`outbox.max_bytes`) on a disk with room, or an I/O error
    that is not about room."""
    if isinstance(err, OSError):
        if err.errno not in _NO_ROOM_ERRNOS:
            return None
        said, room = err.strerror or str(err), _room(path.parent)
    elif isinstance(err, sqlite3.Error):
        code = getattr(err, "sqlite_errorcode", 0) & 0xFF
        if code not in _MAYBE_NO_ROOM:
            return None
        room = _room(path.parent)  # once: the verdict and the message
        if not _full(room):
            return None
        said = f"SQLite: {err}"
    else:
        return None
    left = ("free room unreadable" if room is None else "no inode left" if room[1]
            else f"{room[0] // 1024} KiB free")
    return StoreFull(f"{path}: {what}: no space left on the file system holding it "
                     f"({path.parent}: {left}; {said}); free space there, or set "
                     "collector.state_path to a file system with room")


def translate(err: sqlite3.Error, path: Path, what: str) -> StateError:
    """The StateError for a SQLite error: disk full and damage get their own classes."""
    code = getattr(err, "sqlite_errorcode", None)
    full = no_space(path, err, what)
    if full is not None:
        return full
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

