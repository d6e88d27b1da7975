"""A rollback journal left beside the store (another program switched the file to
rollback-journal mode and died mid-transaction): the daemon's start has SQLite roll it back and
opens the store; the read-only commands say what is wrong instead of blaming permissions.

Before, every start and every command failed with "attempt to write a readonly database; run
it as the service user", and `store reset` refused a store it could not inspect: no way out."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from hostagent.cli.main import main
from hostagent.errors import StateError
from tests.clocks import FakeClock
from tests.store.test_guard import config, open_store, used_store

# Switch the store to rollback-journal mode, change it with the journal synced and the changed
# pages already written into the file (a cache of one page spills them), then die unfinished.
_DIE_MID_TRANSACTION = """
import os, signal, sqlite3, sys
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute("PRAGMA journal_mode=DELETE").fetchone()
c.execute("PRAGMA cache_size=1")
c.execute("BEGIN")
c.execute("UPDATE baselines SET state = 'unfinished'")
c.executemany("INSERT INTO meta(key, value) VALUES(?, ?)",
              [(f"junk{i}", "x" * 3000) for i in range(200)])
os.kill(os.getpid(), signal.SIGKILL)
"""


def _die_mid_transaction(path: Path) -> None:
    p = subprocess.run([sys.executable, "-c", _DIE_MID_TRANSACTION, str(path)], check=False)
    assert p.returncode == -signal.SIGKILL
    journal = Path(f"{path}-journal")
    assert journal.exists() and journal.stat().st_size > 0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_a_hot_journal_is_rolled_back_by_the_start_and_the_store_opens(
        tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "state.db"
    used_store(path, clock)
    before = _rows(path)
    _die_mid_transaction(path)
    open_store(path, clock).close()  # the daemon's start: rolled back, checked, opened
    after = _rows(path)
    assert not any(str(k).startswith("junk") for k, _ in after["meta"])
    assert all(v != "unfinished" for _, v in after["baselines"])
    assert not Path(f"{path}-journal").exists()
    assert _rows(path) == before  # its last committed state, nothing else


def test_a_garbage_journal_is_removed_by_the_start_and_the_store_kept(
        tmp_path: Path, clock: FakeClock, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "state.db"
    created = used_store(path, clock)
    Path(f"{path}-journal").write_bytes(os.urandom(600))
    assert main(["run", "--once", "--config", str(config(tmp_path))]) == 0
    assert "Traceback" not in capsys.readouterr().err
    assert not Path(f"{path}-journal").exists()
    assert ("created_ns", str(created)) in _rows(path)["meta"]  # the same store, kept
    assert not [p.name for p in tmp_path.iterdir() if "broken" in p.name]  # never moved aside


def test_the_read_only_commands_name_the_journal_and_leave_it(
        tmp_path: Path, clock: FakeClock, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "state.db"
    used_store(path, clock)
    _die_mid_transaction(path)
    journal = Path(f"{path}-journal").read_bytes()
    with pytest.raises(StateError) as err:
        open_store(path, clock, read_only=True)
    assert "rollback journal" in str(err.value) and "service user" not in str(err.value)
    assert main(["store", "check", "--config", str(config(tmp_path))]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "rollback journal" in line and "next start rolls it back" in line
    assert Path(f"{path}-journal").read_bytes() == journal  # a look changes nothing


def _rows(path: Path) -> dict[str, list[tuple[object, ...]]]:
    c = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return {t: sorted(c.execute(f"SELECT * FROM {t}")) for t in ("meta", "baselines")}
    finally:
        c.close()
