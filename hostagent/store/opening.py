"""Opening the state file: every check of an existing store, made before anything writes.

A store start-up would refuse must be left exactly as it was, so `open_file` first reads an
existing file through a read-only connection (`sqlite_tx.connect_read_only`: no -wal or -shm
created, none deleted) and checks, in this order:

* its path can be looked up (`check_reachable`: no symlink loop, no file where a directory
  should be); `Path.exists` reads those as "no store here", which must never pass for absent;
* it is a SQLite database (else SQLITE_NOTADB / SQLITE_CORRUPT) with tables;
* it has a ``meta(key, value)`` table whose ``app`` is ours (else: foreign);
* every meta value it reads parses (read as bytes: one that is not UTF-8 is damage, not a
  failed read): ``schema_version`` (ours, or one `schema.migrate` upgrades),
  ``created_ns`` (a positive integer, present), ``host`` (text); ``delivery_heartbeat_ns``, a
  liveness stamp the daemon rewrites, is read as absent when damaged (never a refusal);
* the tables and columns of that version (`schema.layout`), and its indexes, are all there;
* every baseline parses (`inspect.parse_baselines`, what start-up loads next);
* ``PRAGMA quick_check`` passes (`integrity=False` skips it: `check-config`'s quick look);
* the marker next to it names its ``created_ns`` (`guard.check_marker`).

Each refusal is StateCorrupt, one line naming ``hostagent store reset``; a store this user may
not read is StateError. `read_only` (the inspecting commands) keeps that connection: every
query works, every write fails. Otherwise the store is then reopened for writing: WAL mode,
pragmas, the marker of a new store, and an older schema upgraded (`schema.upgrade`, after
`on_upgrade(version, file_bytes)` is told, e.g. to extend systemd's start timeout) unless
`upgrade=False` (the commands next to a daemon that may still run the older hostagent).

A new store is made whole under a temporary name (``state.db.new``) and linked into place
only then (`_create`): a first start cut short (kill -9, a stop or a power cut while it
created the store) used to leave a 0-byte or table-less ``state.db`` that every later start
refused as lost billing state until ``hostagent store reset``; now it leaves at most the
temporary, which the next start deletes (it never was the store).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import reprlib
import sqlite3
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from hostagent.clock import Clock
from hostagent.errors import ForeignLog, StateCorrupt, StateError
from hostagent.file_read import loop_link
from hostagent.store import guard, inspect, schema, sqlite_tx, webhooks
from hostagent.store.guard import FOREIGN_WAY_OUT, WAY_OUT
from hostagent.store.schema import APP, OUTBOX_DDL, SCHEMA_VERSION, UPGRADABLE

log = logging.getLogger(__name__)

JOURNAL_SUFFIX = "-journal"

_QUOTE = reprlib.Repr()
_QUOTE.maxstring, _QUOTE.maxother = 40, 40
NS_MAX = 2**63 - 1  # what SQLite's INTEGER and the event schema hold
NEW_SUFFIX = ".new"  # a store being created (`_create`)


@dataclass(frozen=True, slots=True)
class StoredMeta:
    """The meta table of a store that passed the checks, each value parsed."""

    schema_version: int
    created_ns: int
    host: str
    delivery_heartbeat_ns: int | None


@dataclass(frozen=True, slots=True)
class Opened:
    """`open_file`'s answer: the connection (read-only, or the daemon's) and the store's meta
    as it now is (an upgraded store: SCHEMA_VERSION)."""

    conn: sqlite3.Connection
    meta: StoredMeta


def parse_ns(path: Path, meta: Mapping[str, object], key: str) -> int | None:
    """meta[key] as nanoseconds (None: absent); StateCorrupt when it holds anything else."""
    if key not in meta:
        return None
    value = meta[key]
    if isinstance(value, str) and value.isascii() and value.isdigit() and int(value) <= NS_MAX:
        return int(value)
    raise StateCorrupt(f"{path}: meta.{key} holds {_QUOTE.repr(value)}, not a time in "
                       f"nanoseconds: the store is damaged; {WAY_OUT}")


def heartbeat_ns(path: Path, meta: Mapping[str, object]) -> int | None:
    """meta.delivery_heartbeat_ns, or None when absent or damaged: a liveness stamp (the
    daemon rewrites it every few seconds), never a reason to refuse a store's billing state."""
    try:
        return parse_ns(path, meta, "delivery_heartbeat_ns")
    except StateCorrupt as err:
        log.warning("delivery heartbeat unreadable; read as never",
                    extra={"path": str(path), "error": str(err)})
        return None


def check_reachable(path: Path) -> None:
    """StateError naming why, when `path` cannot be looked up: a symbolic link loop on the
    way (the link is named), a file where a directory should be, a directory this user may
    not search. Absent (ENOENT, a dangling link) is fine: the store is not there."""
    try:
        os.stat(path)
    except FileNotFoundError:
        return
    except OSError as err:
        why = loop_link(path) if err.errno == errno.ELOOP else err.strerror or str(err)
        fix = ("run it as the service user (runuser -u hostagent --) or root"
               if err.errno in (errno.EACCES, errno.EPERM)
               else "fix the path on the way or collector.state_path")
        raise StateError(f"{path}: cannot reach the state store: {why}; {fix}") from err


def _refuse_sqlite(path: Path, err: sqlite3.Error) -> StateError:
    """The error for a SQLite failure while checking: damage refused, anything else not."""
    code = getattr(err, "sqlite_errorcode", 0) & 0xFF
    if code in (sqlite_tx.SQLITE_CORRUPT, sqlite_tx.SQLITE_NOTADB):
        return StateCorrupt(f"{path}: not a usable hostagent state store ({err}); {WAY_OUT}")
    full = sqlite_tx.no_space(path, err, "cannot open the state store")
    if full is not None:  # e.g. the -shm index WAL mode creates: "disk I/O error" before
        return full
    if code == sqlite_tx.SQLITE_READONLY and _journal_left(path):
        return StateError(f"{path}: cannot read the state store: a rollback journal is left "
                          f"beside it ({path.name}{JOURNAL_SUFFIX}: a transaction another "
                          "program left unfinished), which must be rolled back first and a "
                          "read-only look cannot; the daemon's next start rolls it back")
    hint = ("; run it as the service user (runuser -u hostagent --) or root"
            if code in sqlite_tx.SQLITE_ACCESS else "")
    return StateError(f"{path}: cannot read the state store: {err}{hint}")


def _journal_left(path: Path) -> bool:
    """A non-empty rollback journal beside the store (SQLite reads it as hot)."""
    try:
        return os.stat(f"{path}{JOURNAL_SUFFIX}").st_size > 0
    except OSError:
        return False


def _roll_back_journal(path: Path) -> None:
    """Have SQLite roll back a rollback journal left beside the store, before the read-only
    checks, which cannot: SQLite refuses to read past a hot journal it may not roll back, so
    every start failed ("attempt to write a readonly database") and `store reset` could not
    inspect the store either. Hostagent's store is in WAL mode and never writes such a journal;
    another program that switched the file to rollback-journal mode and stopped mid-transaction
    does. Rolling it back is SQLite's own crash recovery, which any writer of the file does
    before its first read: the file gets its last committed state back. A journal SQLite does
    not find hot (a damaged header) is removed the same way, the file left as it was. The
    checks then judge the result as always."""
    if not _journal_left(path):
        return
    try:
        conn = sqlite3.connect(path, isolation_level=None, timeout=sqlite_tx.BUSY_TIMEOUT_S)
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        finally:
            conn.close()
    except sqlite3.Error as err:
        raise _refuse_sqlite(path, err) from err
    log.warning("a rollback journal beside the state store was rolled back", extra={
        "path": f"{path}{JOURNAL_SUFFIX}", "left": _journal_left(path)})


def check(c: sqlite3.Connection, path: Path, *, integrity: bool = True) -> StoredMeta:
    """Every check of the module doc but the marker's, reading only; the parsed meta."""
    try:
        tables = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not tables:
            raise StateCorrupt(f"{path}: the state store has no tables (truncated?); {WAY_OUT}")
        if "meta" not in tables:
            raise StateCorrupt(f"{path}: not a hostagent state store (no meta table); "
                               f"{FOREIGN_WAY_OUT}")
        columns = [r[1] for r in c.execute("SELECT * FROM pragma_table_info('meta')")]
        if not {"key", "value"} <= set(columns):
            raise StateCorrupt(f"{path}: not a hostagent state store (its meta table has "
                               f"columns {', '.join(map(str, columns))}); {FOREIGN_WAY_OUT}")
        found = _meta(path, inspect.read_meta(c))
        _check_layout(c, path, found.schema_version, tables)
        webhooks.check_tables(c, path, tables)
        inspect.parse_baselines(path, c.execute(inspect.BASELINES_SQL))
        if integrity:
            result = c.execute("PRAGMA quick_check").fetchone()[0]
            if result != "ok":
                said = " ".join(str(result).split())
                raise StateCorrupt(f"{path}: integrity check failed ({said[:160]}"
                                   f"{'…' if len(said) > 160 else ''}); {WAY_OUT}")
    except sqlite3.Error as err:
        raise _refuse_sqlite(path, err) from err
    return found


def checked(c: sqlite3.Connection, path: Path, *, integrity: bool = True,
            ) -> tuple[StoredMeta, bool]:
    """`check`, then the marker's (`guard.check_marker`): the meta, and whether a marker
    matched. A refusal that the write-ahead log beside the store explains (the file alone
    passes every check) is refused as the log's (`_foreign_log`), not the store's."""
    try:
        found = check(c, path, integrity=integrity)
        return found, guard.check_marker(path, found.created_ns)
    except StateCorrupt as err:
        raise _foreign_log(path, err, integrity, c) or err from err


def _another_database(c: sqlite3.Connection, created_ns: int) -> bool:
    """Whether `c` (the store read through its -wal) reads another database than the file
    alone, created at `created_ns`: no meta table, another `app`, another `created_ns`. A
    log that reads as this same store (its own commits damaged it: a wrong schema version, a
    dropped table) is not foreign: moving it aside would lose those commits, so the damage
    verdict stands. A read that fails says nothing either way: not foreign."""
    try:
        if not c.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'"
                         ).fetchone():
            return True
        meta = dict(c.execute("SELECT key, value FROM meta WHERE key IN ('app', 'created_ns')"
                              ).fetchall())
    except sqlite3.Error:
        return False
    return meta.get("app") != APP or str(meta.get("created_ns")) != str(created_ns)


def _foreign_log(path: Path, refusal: StateCorrupt, integrity: bool,
                 c: sqlite3.Connection) -> ForeignLog | None:
    """The refusal to give when the store read without its -wal (``immutable=1``: SQLite then
    reads the file alone) passes the checks its reading through the -wal (`c`) failed, and
    that reading is another database (`_another_database`); None when not (or there is no
    log holding commits): the refusal stands.

    SQLite cannot tell whose a write-ahead log is: any well-formed log beside the file (its
    own header's checksum and salts, whatever the page size) is read as the file's latest
    commits, and the first writer checkpoints those pages into the file. Another database's
    log left or copied beside an intact store made it read as "not a hostagent state store"
    (or damaged, or replaced), and the way out offered, `store reset`, set the intact store
    aside; a daemon opening it for writing would have overwritten it."""
    wal, shm = Path(f"{path}-wal"), Path(f"{path}-shm")
    if not sqlite_tx.wal_holds_commits(wal):
        return None
    try:
        alone = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro&immutable=1", uri=True,
                                isolation_level=None, check_same_thread=False)
    except (sqlite3.Error, OSError, ValueError):
        return None
    try:
        found = check(alone, path, integrity=integrity)
        guard.check_marker(path, found.created_ns)
    except StateError:
        return None
    finally:
        alone.close()
    if not _another_database(c, found.created_ns):
        return None
    said = str(refusal).removeprefix(f"{path}: ").split("; ", 1)[0]
    return ForeignLog(
        f"{path}: the write-ahead log beside the store, {wal.name}, is not this store's: "
        f"read without it the store is intact (created at {guard.iso(found.created_ns)}), "
        f"read through it: {said} (SQLite applies any well-formed log it finds beside a "
        "file, and the first writer would copy its pages into the store); refusing to open "
        f"it: move {wal.name} and {shm.name} aside (mv {wal} {wal}.foreign; mv {shm} "
        f"{shm}.foreign) and start again; not `hostagent store reset`, which would set the "
        "intact store aside")


def _meta(path: Path, meta: Mapping[object, object]) -> StoredMeta:
    app = meta.get("app")
    if app != APP:
        raise StateCorrupt(f"{path}: not a hostagent state store (meta.app is "
                           f"{_QUOTE.repr(app)}, not {APP!r}); {FOREIGN_WAY_OUT}")
    str_meta = {k: v for k, v in meta.items() if isinstance(k, str)}
    version = meta.get("schema_version")
    known = {str(v): v for v in (SCHEMA_VERSION, *UPGRADABLE)}
    if not isinstance(version, str) or version not in known:
        shown = version if isinstance(version, str) and version.isdigit() \
            else _QUOTE.repr(version)
        raise StateCorrupt(f"{path}: schema version {shown} is not {SCHEMA_VERSION}: this "
                           "hostagent cannot use it (upgrade hostagent, or `hostagent store "
                           "reset` to start afresh)")
    created_ns = parse_ns(path, str_meta, "created_ns")
    if not created_ns:
        raise StateCorrupt(f"{path}: meta.created_ns is "
                           f"{'missing' if created_ns is None else 0}: the store is damaged; "
                           f"{WAY_OUT}")
    host = meta.get("host", "")
    if not isinstance(host, str):
        raise StateCorrupt(f"{path}: meta.host holds {_QUOTE.repr(host)}, not a node id: the "
                           f"store is damaged; {WAY_OUT}")
    return StoredMeta(known[version], created_ns, host, heartbeat_ns(path, str_meta))


def _check_layout(c: sqlite3.Connection, path: Path, version: int, tables: set[str]) -> None:
    """StateCorrupt unless every table, column and index of `version` is there."""
    missing = schema.lacking(c, schema.layout(version), tables)
    if missing:
        raise StateCorrupt(f"{path}: the state store (schema version {version}) lacks "
                           f"{', '.join(missing[:6])}{' …' if len(missing) > 6 else ''}: it is "
                           f"damaged; {WAY_OUT}")


def peek(path: Path, *, upgradable: bool = True) -> None:
    """What start-up would refuse (StateCorrupt), but ``PRAGMA quick_check``, read-only and
    creating no file: `check-config`'s look at the store. A store of an UPGRADABLE version
    passes unless not `upgradable`. StateError: this user cannot read it."""
    check_reachable(path)
    if not guard.before_open(path):
        return
    conn = sqlite_tx.connect_read_only(path)
    try:
        found, _ = checked(conn, path, integrity=False)
    finally:
        conn.close()
    if not upgradable and found.schema_version != SCHEMA_VERSION:
        raise StateCorrupt(f"{path}: schema version {found.schema_version} is not "
                           f"{SCHEMA_VERSION}: this hostagent cannot use it (upgrade hostagent, "
                           "or `hostagent store reset` to start afresh)")


def open_file(path: Path, *, clock: Clock, node_id: str, create: bool, read_only: bool,
              upgrade: bool, on_upgrade: Callable[[int, int], None] | None) -> Opened:
    """Check an existing store (the module doc), then open it: `read_only` keeps the checking
    connection; else it is reopened for writing (created, if `create` and none was ever
    there; upgraded, if `upgrade` and older)."""
    check_reachable(path)  # a symlink loop is an error, not "no store here"
    existed = guard.before_open(path)  # empty, vanished behind our back: refused
    if not existed and (read_only or not create):
        raise StateError(f"{path}: no state store here (the daemon creates it on first run)")
    if not existed:
        _create(path, clock.now().wall_ns, node_id)
        return open_file(path, clock=clock, node_id=node_id, create=create, read_only=False,
                         upgrade=upgrade, on_upgrade=on_upgrade)
    if not read_only:
        _roll_back_journal(path)
    ro = sqlite_tx.connect_read_only(path, may_create_index=not read_only)
    try:
        found, marked = checked(ro, path)
    except BaseException:
        ro.close()
        raise
    if read_only:
        _note_host(path, found, node_id)
        return Opened(ro, found)
    ro.close()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite_tx.connect(path)
    except (OSError, sqlite3.Error) as err:
        raise _not_opened(path, err, "cannot open the state store") from err
    try:
        found = _prepare(conn, path, found, clock.now().wall_ns, node_id, upgrade, on_upgrade)
        if create and not marked:
            guard.write_marker(path, found.created_ns)
    except sqlite3.Error as err:
        conn.close()
        raise _refuse_sqlite(path, err) from err
    except BaseException:
        conn.close()
        raise
    _note_host(path, found, node_id)
    return Opened(conn, found)


def _create(path: Path, now_ns: int, node_id: str) -> None:
    """A new store at `path`, whole or not at all: created, committed and closed as
    ``<name>.new`` (its log checkpointed into it), then hard-linked into place (never over a
    store that appeared meanwhile: StateError) and the temporary name removed. A dangling
    symbolic link at `path` (no store yet where it points) gets the store where it points:
    linking over the link itself failed as "appeared meanwhile" at every start."""
    target = Path(os.path.realpath(path))
    tmp = target.with_name(target.name + NEW_SUFFIX)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_new(tmp)  # a creation cut short: never a store
        conn = sqlite_tx.connect(tmp)
    except (OSError, sqlite3.Error) as err:
        raise _not_opened(path, err, "cannot create the state store") from err
    try:
        try:
            _prepare(conn, tmp, None, now_ns, node_id, False, None)
        finally:
            conn.close()  # the last connection: SQLite checkpoints the log into the file
        if sqlite_tx.wal_holds_commits(Path(f"{tmp}-wal")):
            raise _not_checkpointed(path)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, target)
    except FileExistsError as err:
        raise StateError(f"{path}: a state store appeared while this one was being created; "
                         "try again") from err
    except (OSError, sqlite3.Error) as err:
        raise _not_opened(path, err, "cannot create the state store") from err
    finally:
        _remove_new(tmp)
    guard.sync_directory(target.parent)


def _not_opened(path: Path, err: OSError | sqlite3.Error, what: str) -> StateError:
    """StoreFull saying "no space left" and the fix when the file system is full (SQLite
    said "database or disk is full" or "disk I/O error"), else StateError with the error."""
    return sqlite_tx.no_space(path, err, what) or StateError(f"{path}: {what}: {err}")


def _not_checkpointed(path: Path) -> StateError:
    """A new store's log left holding commits on close: the checkpoint grows the file, and on
    a full disk it fails unseen (StoreFull: "no space left")."""
    if sqlite_tx.out_of_room(path):
        return _not_opened(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
                           "cannot create the state store")
    return StateError(f"{path}: cannot create the state store: its write-ahead log was not "
                      "checkpointed on close")


def _remove_new(tmp: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{tmp}{suffix}")


def _prepare(c: sqlite3.Connection, path: Path, found: StoredMeta | None, now_ns: int,
             node_id: str, upgrade: bool, on_upgrade: Callable[[int, int], None] | None
             ) -> StoredMeta:
    """The writes of opening a checked store (`found`) or creating one (None)."""
    if found is None:
        if c.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            raise StateError(f"{path}: a state store appeared while this one was being "
                             "created; try again")
        c.execute("PRAGMA auto_vacuum=INCREMENTAL")
    if c.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() != "wal":
        raise StateError(f"{path}: cannot switch the store to WAL mode")
    c.execute("PRAGMA synchronous=FULL")
    c.execute("PRAGMA journal_size_limit=16777216")
    if found is None:
        c.execute("BEGIN IMMEDIATE")
        for statement in schema.statements(OUTBOX_DDL):
            c.execute(statement)
        c.executemany("INSERT INTO meta(key, value) VALUES(?, ?)",
                      [("app", APP), ("schema_version", str(SCHEMA_VERSION)),
                       ("created_ns", str(now_ns)), ("host", node_id)])
        c.execute("COMMIT")
        return StoredMeta(SCHEMA_VERSION, now_ns, node_id, None)
    if found.schema_version != SCHEMA_VERSION and upgrade:
        schema.upgrade(c, path, found.schema_version, on_upgrade)
        return StoredMeta(SCHEMA_VERSION, found.created_ns, found.host,
                          found.delivery_heartbeat_ns)
    return found


def _note_host(path: Path, found: StoredMeta, node_id: str) -> None:
    if found.host != node_id:
        log.warning("state store was created by another node_id",
                    extra={"path": str(path), "stored": found.host, "node_id": node_id})
