"""A write-ahead log of ANOTHER database left beside an intact store.

SQLite cannot tell whose a -wal is: any well-formed log (its own header's checksum, frames
salted like its header), whatever its page size, is read as the file's latest commits, and
the first writer checkpoints those pages into the file (checked below with plain sqlite3). So
the store cannot be opened through it; but the verdict was the store's ("not a hostagent state
store (no meta table)", "the file was replaced"), whose way out, `hostagent store reset`, set
the intact store aside. Now the log is named as the culprit, with the fix: move it aside."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from hostagent.cli.main import main
from hostagent.store import guard
from tests.clocks import FakeClock
from tests.store.test_guard import config, used_store
from tests.store.test_refusals import refusal


def sqlite_log(tmp: Path, page_size: int) -> Path:
    """The -wal of another SQLite database, holding commits (a copy, as a crash leaves it)."""
    other = tmp / "other"
    other.mkdir()
    with contextlib.closing(sqlite3.connect(other / "x.db", isolation_level=None)) as c:
        c.execute(f"PRAGMA page_size={page_size}")
        c.execute("PRAGMA journal_mode=WAL")
        c.execute("PRAGMA wal_autocheckpoint=0")
        c.execute("CREATE TABLE t(a)")
        c.execute("INSERT INTO t VALUES(1)")
        shutil.copy(other / "x.db-wal", tmp / "wal.copy")
    return tmp / "wal.copy"


def hostagent_log(tmp: Path) -> Path:
    """The -wal of another hostagent store (another created_ns), holding commits."""
    other = tmp / "other"
    other.mkdir()
    clock = FakeClock()
    clock.advance(3600)
    used_store(other / "state.db", clock)
    with contextlib.closing(sqlite3.connect(other / "state.db", isolation_level=None)) as c:
        c.execute("PRAGMA wal_autocheckpoint=0")
        c.execute("UPDATE meta SET value = value WHERE key = 'app'")
        c.execute("UPDATE meta SET value = 'x' WHERE key = 'host'")
        shutil.copy(other / "state.db-wal", tmp / "wal.copy")
    return tmp / "wal.copy"


LOGS = {
    "another database": lambda tmp: sqlite_log(tmp, 4096),
    "another page size": lambda tmp: sqlite_log(tmp, 1024),
    "another hostagent store": hostagent_log,
}


def pending(path: Path) -> int:
    found = guard.inspect(path)
    assert found.error is None and found.pending_deliveries is not None, found
    return found.pending_deliveries


@pytest.mark.parametrize("make_log", LOGS.values(), ids=LOGS.keys())
def test_a_foreign_log_beside_an_intact_store_is_named_and_moving_it_aside_opens_the_store(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], make_log: object) -> None:
    path = tmp_path / "state.db"
    used_store(path, FakeClock())
    owed = pending(path)
    before = path.read_bytes()
    wal = Path(f"{path}-wal")
    shutil.copy(make_log(tmp_path), wal)  # type: ignore[operator]
    cfg = str(config(tmp_path))
    assert main(["run", "--once", "--config", cfg]) == 2
    line = refusal(capsys)
    assert f"{path}: the write-ahead log beside the store, state.db-wal, is not this " \
           "store's" in line, line
    assert "read without it the store is intact" in line, line
    assert f"mv {wal} {wal}.foreign" in line, line
    assert "not `hostagent store reset`" in line, line
    assert path.read_bytes() == before  # nothing was written into the store
    # the read-only look (the -shm index is there now) says the same
    for command in (["store", "check", "--config", cfg], ["check-config", cfg]):
        assert main(command) == 2, command
        assert "is not this store's" in refusal(capsys), command
    os.rename(wal, f"{wal}.foreign")  # the fix the message gives
    os.rename(f"{path}-shm", f"{path}-shm.foreign")
    assert main(["run", "--once", "--config", cfg]) == 0, capsys.readouterr().err
    # nothing owed was lost: the store's pending events went out to its sink
    assert len((tmp_path / "events.jsonl").read_bytes().splitlines()) >= owed
    assert Path(f"{wal}.foreign").stat().st_size > 0  # the log kept, not deleted


def test_sqlite_itself_applies_a_foreign_log_so_the_store_cannot_open_through_it(
        tmp_path: Path) -> None:
    # Why the log is refused rather than opened through: a plain writer reads the other
    # database and, closing, checkpoints it over the store.
    path = tmp_path / "state.db"
    used_store(path, FakeClock())
    shutil.copy(sqlite_log(tmp_path, 4096), f"{path}-wal")
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as c:
        assert [r[0] for r in c.execute("SELECT name FROM sqlite_master")] == ["t"]
    with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro&immutable=1",
                                            uri=True)) as c:
        assert [r[0] for r in c.execute("SELECT name FROM sqlite_master")] == ["t"]


def test_a_damaged_store_with_a_foreign_log_keeps_the_damage_verdict(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "state.db"
    used_store(path, FakeClock())
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as c:
        c.execute("DROP TABLE baselines")
    shutil.copy(sqlite_log(tmp_path, 4096), f"{path}-wal")
    assert main(["run", "--once", "--config", str(config(tmp_path))]) == 2
    line = refusal(capsys)
    assert "not this store's" not in line and "hostagent store reset" in line, line


def test_store_reset_refuses_to_set_an_intact_store_aside_for_a_foreign_log(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "state.db"
    used_store(path, FakeClock())
    before = path.read_bytes()
    shutil.copy(sqlite_log(tmp_path, 4096), f"{path}-wal")
    cfg = str(config(tmp_path))
    assert main(["run", "--once", "--config", cfg]) == 2  # the daemon refused it first
    refusal(capsys)
    assert main(["store", "reset", "--config", cfg]) == 2
    line = refusal(capsys)
    assert "is not this store's" in line and "refusing to reset" in line, line
    assert "--force" in line, line
    assert path.read_bytes() == before and not list(tmp_path.glob("state.db.broken-*"))
    # --force is the operator's word: set aside, as for any damaged store
    assert main(["store", "reset", "--force", "--config", cfg]) == 0
    assert "is not this store's" in capsys.readouterr().out
    assert list(tmp_path.glob("state.db.broken-*"))



def test_the_stores_own_log_whose_commits_damaged_it_is_not_called_foreign(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The file alone is intact and, read through its log, it is not: but the log is the
    # store's own (same app, same created_ns). Moving it aside would lose its commits: the
    # damage verdict stands, and its way out (`store reset`, which keeps everything aside).
    path = tmp_path / "state.db"
    used_store(path, FakeClock())
    c = sqlite3.connect(path, isolation_level=None)
    try:
        c.execute("PRAGMA wal_autocheckpoint=0")
        c.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
        with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro&immutable=1",
                                                uri=True)) as alone:  # the file alone: fine
            assert alone.execute("SELECT value FROM meta WHERE key = 'schema_version'"
                                 ).fetchone()[0] != "99"
        cfg = str(config(tmp_path))
        assert main(["run", "--once", "--config", cfg]) == 2
        line = refusal(capsys)
        assert "schema version 99" in line and "not this store's" not in line, line
        assert main(["store", "reset", "--config", cfg]) == 0
        assert list(tmp_path.glob("state.db.broken-*"))
    finally:
        c.close()
