"""The state store is never silently replaced by an empty one.

A store holds the baselines every event is computed from: a daemon that starts on an empty
store re-bills (or skips) everything the lost baselines covered. So at start:

* an existing file that is empty (0 bytes), truncated, not a hostagent store, from a newer
  schema, with a meta value that does not parse or a table, column or index missing, or
  failing ``PRAGMA quick_check`` is refused (`StateCorrupt`), never overwritten nor changed
  (`hostagent.store.opening` checks all that read-only, before anything writes);
* a missing store is created only when none was ever there: creating one writes a marker,
  ``state.db.id`` next to it, holding the store's ``created_ns``. A marker without its store
  means the store was deleted behind the daemon's back: refused too. A marker naming another
  ``created_ns`` than the store's means the file was replaced: refused.

One daemon per store: `hold` takes an exclusive lock (flock) on ``state.db.lock`` next to
the store, which the daemon keeps until it has closed the store (the kernel drops it when the
process dies, kill -9 included). A second daemon on the same store (a copy started by hand
beside the service, two units naming one state_path) is refused, naming the process that
holds it: two would each bill every period from the same baselines. The lock sits next to the
file the path resolves to (`lock_path`: symbolic links followed), not next to the path as
given: a second config whose state_path is a symbolic link to the first one's store took its
own lock next to the link, and both daemons committed into one file, every period billed
twice under different event ids.

The marker stays next to the path as given (`marker_path`): it records what store this name
held, so a link deleted or repointed at another store is refused as a store gone or replaced,
where a marker next to the target would follow the link and let the name change stores
silently.

The way out is explicit: ``hostagent store reset`` (`hostagent.cli.store`) moves the store,
its WAL and the marker aside (``state.db.broken-<UTC time>``), reports what was in it when
it can still be read, and the next start creates a fresh store.

This module does the checks that need no SQLite connection, the marker I/O and the moving
aside; the checks of the file's contents are `hostagent.store.opening`'s.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import sqlite3
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from hostagent.errors import StateCorrupt, StateError
from hostagent.store import sqlite_tx

log = logging.getLogger(__name__)

MARKER_SUFFIX = ".id"
LOCK_SUFFIX = ".lock"
SIDE_FILES = ("-wal", "-shm", "-journal", MARKER_SUFFIX)
WAY_OUT = ("refusing to start with empty billing state; stop the daemon and run "
           "`hostagent store reset` to move it aside and start afresh")
# For a file that is not a hostagent store at all.
FOREIGN_WAY_OUT = ("refusing to touch it: point collector.state_path elsewhere, or "
                   "`hostagent store reset` moves it aside")


def marker_path(path: Path) -> Path:
    """The marker next to the store: ``state.db`` → ``state.db.id``."""
    return path.with_name(path.name + MARKER_SUFFIX)


def lock_path(path: Path) -> Path:
    """The lock next to the store file itself: ``state.db`` → ``state.db.lock``, after every
    symbolic link on the way and at the end is followed (a dangling one: where it points, where
    the store will be created). Every path to one store file so names one lock (the module
    doc): the lock of a path as given was one per link. A link loop is left unresolved (its
    lock cannot be opened: `hold` says so)."""
    real = Path(os.path.realpath(path))
    return real.with_name(real.name + LOCK_SUFFIX)


# This process's locks, by the lock file's (device, inode): the daemon and a test's second
# Daemon on one store share one descriptor (flock conflicts between descriptors, also within
# a process), counted, so the lock stays until the last holder lets go.
_HELD: dict[tuple[int, int], list[int]] = {}  # (dev, ino) -> [fd, holders]
_HELD_LOCK = threading.RLock()  # re-entrant: __del__ may run inside `hold`


class StoreLock:
    """This process's hold on a store (`hold`); `release` (or garbage collection) lets go."""

    def __init__(self, key: tuple[int, int] | None, created: Path | None) -> None:
        self._key: tuple[int, int] | None = key
        self._created = created  # the lock file, when `hold` created it

    def release(self, *, discard: bool = False) -> None:
        """Let go of the store (the lock itself when this was its last holder here);
        `discard`: start-up failed, so a lock file `hold` created goes too (a refused store's
        directory is left as it was found)."""
        key, self._key = self._key, None
        if key is None:
            return
        with _HELD_LOCK:
            held = _HELD[key]
            held[1] -= 1
            if held[1] == 0:
                del _HELD[key]
                if discard and self._created is not None:
                    with contextlib.suppress(OSError):
                        os.unlink(self._created)  # while still locked
                os.close(held[0])  # drops the flock

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit the process lets go anyway
            self.release()


def hold(path: Path) -> StoreLock:
    """Lock the store for this process (creating its directory and lock file as needed);
    StateError naming the holder when another process holds it. Where no lock can be had at
    all (a directory this user may not write, a file system without flock) the store is
    used unlocked, as before there was a lock, with a warning."""
    lock = lock_path(path)
    flags = os.O_CLOEXEC | os.O_NOFOLLOW
    created: Path | None = None
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL | flags, 0o640)
            created = lock
        except FileExistsError:
            try:
                fd = os.open(lock, os.O_RDWR | flags)
            except PermissionError:  # left by another user: flock needs no write access
                fd = os.open(lock, os.O_RDONLY | flags)
        st = os.fstat(fd)
    except OSError as err:
        if err.errno in _NO_LOCK_HERE:
            return _unlocked(lock, err)
        raise sqlite_tx.no_space(path, err, "cannot create its lock file") or StateError(
            f"{lock}: cannot lock the state store: {err.strerror or err}") from err
    key = (st.st_dev, st.st_ino)
    with _HELD_LOCK:
        if key in _HELD:  # held by this process already
            os.close(fd)
            _HELD[key][1] += 1
            return StoreLock(key, None)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _holder(fd)
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise StateError(
                    f"{path}: another hostagent{holder} is using this state store; stop it "
                    "first: two daemons on one store would each bill every period") from err
            return _unlocked(lock, err)
        with contextlib.suppress(OSError):  # who holds it, for the one refused next
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _HELD[key] = [fd, 1]
        return StoreLock(key, created)


_NO_LOCK_HERE = (errno.EACCES, errno.EPERM, errno.EROFS)


def held_by(path: Path) -> str | None:
    """Whether a process holds the store's lock right now: `another hostagent (pid N)` or
    None (no lock file, free, or not checkable). Takes nothing: a shared lock tried and let go
    at once, read-only (an inspecting command must not create the lock file). Through a
    symbolic link it also asks the lock next to the link, where a daemon started before the
    lock followed links still holds it."""
    locks = dict.fromkeys((lock_path(path), path.with_name(path.name + LOCK_SUFFIX)))
    return next((who for lock in locks if (who := _held(lock)) is not None), None)


def _held(lock: Path) -> str | None:
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return f"another hostagent{_holder(fd)}"
        return None
    finally:
        os.close(fd)  # also drops the shared lock, if taken
    return None


def _unlocked(lock: Path, err: OSError) -> StoreLock:
    log.warning("state store not locked: a second daemon on it would not be refused",
                extra={"lock": str(lock), "error": err.strerror or str(err)})
    return StoreLock(None, None)


def _holder(fd: int) -> str:
    """` (pid N)` as the lock file says, or nothing."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return f" (pid {text})" if text.isdigit() else ""


def iso(ns: int) -> str:
    """`ns` as an ISO 8601 UTC time to the second."""
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
            if path.is_dir():  # never a store to move aside: the config names the wrong path
                raise StateError(f"{path}: the state store path is a directory; set "
                                 "collector.state_path to the store file in it")
            if not path.is_file():
                raise StateCorrupt(f"{path}: the state store path is not a regular file; "
                                   f"{FOREIGN_WAY_OUT}")
            if path.stat().st_size == 0:
                raise StateCorrupt(f"{path}: the state store is empty (0 bytes): its "
                                   f"baselines and pending events are gone; {WAY_OUT}")
            return True
    except OSError as err:
        raise StateError(f"{path}: cannot inspect the state store: {err}") from err
    created_ns = read_marker(path)
    if created_ns is not None:
        raise StateCorrupt(f"{path}: the state store created at {iso(created_ns)} is gone "
                           f"({marker_path(path)} remains); {WAY_OUT}")
    return False


def check_marker(path: Path, created_ns: int) -> bool:
    """Check the marker against the store's `created_ns` (StateCorrupt: the file was
    replaced); True when a marker matches, False when there is none. Writes nothing."""
    marked = read_marker(path)
    if marked is not None and marked != created_ns:
        raise StateCorrupt(f"{path}: this store was created at {iso(created_ns)}, but the "
                           f"store kept here was created at {iso(marked)}: the file was "
                           f"replaced; {WAY_OUT} (or, if you restored this store on purpose, "
                           f"delete {marker_path(path)})")
    return marked is not None


def write_marker(path: Path, created_ns: int) -> None:
    """Write the marker holding the store's `created_ns` (atomically: a temporary and a
    rename)."""
    marker = marker_path(path)
    tmp = marker.with_name(marker.name + ".tmp")
    try:
        with open(tmp, "w", encoding="ascii") as f:
            f.write(f"{created_ns}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, marker)
    except OSError as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise sqlite_tx.no_space(marker, err, "cannot write the store marker") or StateError(
            f"{marker}: cannot write the store marker: {err}") from err


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
        conn = sqlite_tx.connect_read_only(path)
    except StateError as err:
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
    """Rename the store and its side files to ``<name>.broken-<UTC time>…``; the new names.
    A directory among them is refused (StateError), whatever the caller checked.

    All or nothing: when one cannot be moved (StateError: which, why, and what to do), those
    already moved are put back."""
    stamp = datetime.fromtimestamp(now_ns / 1e9, tz=UTC).strftime("%Y%m%dT%H%M%SZ")
    base = path.with_name(f"{path.name}.broken-{stamp}")
    moves = [(src, base.with_name(base.name + suffix))
             for suffix in ("", *SIDE_FILES)
             if (src := path.with_name(path.name + suffix)).exists() or src.is_symlink()]
    for src, _ in moves:  # a directory is never a store: renaming one took a daemon's away
        if src.is_dir() and not src.is_symlink():
            raise StateError(f"{src}: a directory, not a store file; not moving it aside "
                             "(nothing was moved): set collector.state_path to the store file")
    for _, dst in moves:
        if dst.exists() or dst.is_symlink():
            raise StateError(f"{dst}: already there; not overwriting it (nothing was moved)")
    moved: list[tuple[Path, Path]] = []
    for src, dst in moves:
        try:
            os.replace(src, dst)
        except OSError as err:
            kept = _put_back(moved)
            raise StateError(
                f"{src}: cannot move it aside to {dst.name}: {err.strerror or err}; "
                + ("nothing was moved" if kept else "some files stay moved aside: "
                   + ", ".join(str(d) for _, d in moved if d.exists()))
                + f"; run `hostagent store reset` as the service user or root, or check the "
                f"permissions of {path.parent}") from err
        moved.append((src, dst))
    sync_directory(path.parent)
    return [dst for _, dst in moved]


def sync_directory(directory: Path) -> None:
    """fsync a directory, so that names made or moved in it survive a power loss (best
    effort: a file system that cannot is left as it is)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _put_back(moved: list[tuple[Path, Path]]) -> bool:
    """Undo `move_aside`'s renames; False when one could not be undone."""
    ok = True
    for src, dst in reversed(moved):
        try:
            os.replace(dst, src)
        except OSError:
            ok = False
    return ok
