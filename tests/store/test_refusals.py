"""A damaged store is refused, never silently replaced, and left exactly as it was: every value
start-up reads is checked, and so is the schema, before anything writes. Each refusal is one
line on stderr naming `hostagent store reset` (exit 2, never a traceback), and that command
moves the store aside."""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
from pathlib import Path

import pytest

from hostagent.cli.main import main
from hostagent.errors import StateCorrupt
from hostagent.store import opening
from tests.clocks import FakeClock
from tests.store.test_guard import config, used_store

# Start-up, the commands that inspect the store, and check-config (which skips the integrity
# check but reads the rest).
COMMANDS = (["store", "check"], ["outbox", "status"], ["outbox", "dead-letters"],
            ["run", "--once"])

DAMAGE = {
    "created_ns missing": "DELETE FROM meta WHERE key = 'created_ns'",
    "created_ns not a number": "UPDATE meta SET value = 'yesterday' WHERE key = 'created_ns'",
    "created_ns negative": "UPDATE meta SET value = '-5' WHERE key = 'created_ns'",
    "schema_version not a number": "UPDATE meta SET value = 'two' WHERE key = 'schema_version'",
    "schema_version newer": "UPDATE meta SET value = '3' WHERE key = 'schema_version'",
    "host not text": "UPDATE meta SET value = x'00ff' WHERE key = 'host'",
    "app foreign": "UPDATE meta SET value = 'other' WHERE key = 'app'",
    "a table dropped": "DROP TABLE sinks",
    "a column dropped": "ALTER TABLE dead_letters DROP COLUMN reason",
    "an index dropped": "DROP INDEX deliveries_pending",
    # Start-up refused these with no way out named (a baseline not JSON), or failed every
    # command with exit 1, `store reset` included ("Could not decode to UTF-8 column").
    "a baseline not JSON": "UPDATE baselines SET state = 'garbage' WHERE instance_id = 'i1'",
    "a baseline not UTF-8": "UPDATE baselines SET state = CAST(x'7bff' AS TEXT)",
    "a baseline not a baseline": "UPDATE baselines SET state = '[1]'",
    "a baseline's instance id not UTF-8": "UPDATE baselines SET instance_id = "
                                          "CAST(x'69ff' AS TEXT) WHERE instance_id = 'i1'",
    "created_ns not UTF-8": "UPDATE meta SET value = CAST(x'31ff32' AS TEXT) "
                            "WHERE key = 'created_ns'",
    "host not UTF-8": "UPDATE meta SET value = CAST(x'31ff32' AS TEXT) WHERE key = 'host'",
    "app not UTF-8": "UPDATE meta SET value = CAST(x'68ff' AS TEXT) WHERE key = 'app'",
    "schema_version not UTF-8": "UPDATE meta SET value = CAST(x'32ff' AS TEXT) "
                                "WHERE key = 'schema_version'",
}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def files(d: Path) -> dict[str, str]:
    """Every file in `d` (but the config and the sink's output) and its content's hash."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in d.iterdir()
            if p.is_file() and p.name not in ("hostagent.toml", "events.jsonl")}


def damage(tmp_path: Path, clock: FakeClock, sql: str) -> Path:
    """A used store damaged by `sql`, then left in rollback-journal mode (what `sqlite3
    .backup` or VACUUM INTO produce): opening it for writing would change its header."""
    path = tmp_path / "state.db"
    used_store(path, clock)
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as c:
        c.execute(sql)
        c.execute("PRAGMA journal_mode=DELETE")
    return path


def refusal(capsys: pytest.CaptureFixture[str]) -> str:
    """The one `hostagent:` line on stderr (log lines aside); no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("hostagent:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("sql", DAMAGE.values(), ids=DAMAGE.keys())
def test_a_damaged_store_is_refused_by_every_command_untouched_and_reset_moves_it_aside(
        tmp_path: Path, clock: FakeClock, capsys: pytest.CaptureFixture[str], sql: str) -> None:
    path = damage(tmp_path, clock, sql)
    cfg = str(config(tmp_path))
    before = files(tmp_path)
    for command in COMMANDS:
        assert main([*command, "--config", cfg]) == 2, command
        line = refusal(capsys)
        assert str(path) in line and "hostagent store reset" in line, (command, line)
        assert files(tmp_path) == before, command  # not a byte changed, no file created
    assert main(["check-config", cfg]) == 2
    assert "hostagent store reset" in refusal(capsys)
    assert not (tmp_path / "events.jsonl").exists()
    assert main(["store", "reset", "--config", cfg]) == 0  # refused: no --force needed
    out = capsys.readouterr().out
    assert "moved aside" in out and "reason: " in out
    assert not path.exists()


def test_store_reset_force_and_a_fresh_start_after_a_bad_created_ns(
        tmp_path: Path, clock: FakeClock, capsys: pytest.CaptureFixture[str]) -> None:
    path = damage(tmp_path, clock, DAMAGE["created_ns not a number"])
    cfg = str(config(tmp_path))
    assert main(["store", "reset", "--force", "--config", cfg]) == 0
    out = capsys.readouterr().out
    assert "meta.created_ns holds 'yesterday'" in out  # the reason
    assert "lost: 3 pending event(s) (3 pending deliveries), 3 baseline(s)" in out
    assert main(["run", "--once", "--config", cfg]) == 0
    assert path.exists()


@pytest.mark.parametrize("content", [b"hello, not a db\n", bytes(range(256)) * 32],
                         ids=["text", "garbage"])
def test_a_file_that_is_no_database_names_the_way_out(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(content)
    cfg = str(config(tmp_path))
    for command in COMMANDS:
        assert main([*command, "--config", cfg]) == 2
        line = refusal(capsys)
        assert "not a usable hostagent state store" in line
        assert "hostagent store reset" in line and "move the file aside" not in line
    assert path.read_bytes() == content
    assert main(["store", "reset", "--config", cfg]) == 0
    assert not path.exists()


def test_a_foreign_database_with_another_meta_table_is_refused_and_resettable(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "state.db"
    with contextlib.closing(sqlite3.connect(path)) as c:
        c.execute("CREATE TABLE meta(name, ver)")
        c.execute("INSERT INTO meta VALUES(1, 2)")
        c.commit()
    before = path.read_bytes()
    cfg = str(config(tmp_path))
    for command in COMMANDS:
        assert main([*command, "--config", cfg]) == 2
        line = refusal(capsys)
        assert "not a hostagent state store (its meta table has columns name, ver)" in line
        assert "hostagent store reset" in line
    assert path.read_bytes() == before
    assert main(["store", "reset", "--config", cfg]) == 0
    assert not path.exists()


def test_peek_checks_the_schema_but_not_the_integrity(tmp_path: Path, clock: FakeClock) -> None:
    path = damage(tmp_path, clock, DAMAGE["a column dropped"])
    with pytest.raises(StateCorrupt, match=r"\(schema version 2\) lacks dead_letters.reason"):
        opening.peek(path)


@pytest.mark.parametrize("value", ["'soon'", "CAST(x'31ff32' AS TEXT)"], ids=["text", "utf8"])
def test_a_damaged_heartbeat_is_read_as_never_and_the_daemon_rewrites_it(
        tmp_path: Path, clock: FakeClock, capsys: pytest.CaptureFixture[str],
        value: str) -> None:
    # A liveness stamp is no reason to refuse billing state (and reset it away): read as never.
    # One not UTF-8 failed every command (exit 1), `store reset` included.
    path = damage(tmp_path, clock, "INSERT OR REPLACE INTO meta "
                                   f"VALUES('delivery_heartbeat_ns', {value})")
    cfg = str(config(tmp_path))
    assert main(["outbox", "status", "--config", cfg]) == 0
    out = capsys.readouterr()
    assert "delivery heartbeat: never" in out.out and "Traceback" not in out.err
    assert main(["store", "check", "--config", cfg]) == 0
    assert "state store OK" in capsys.readouterr().out
    assert main(["store", "reset", "--config", cfg]) == 2  # healthy: not set aside unasked
    assert "refusing to reset: it is healthy" in refusal(capsys)
    assert main(["run", "--once", "--config", cfg]) == 0
    with contextlib.closing(sqlite3.connect(path)) as c:
        value = c.execute("SELECT value FROM meta WHERE key = 'delivery_heartbeat_ns'"
                          ).fetchone()
    assert value is None or value[0].isdigit()  # rewritten by the daemon, or not yet written
    assert main(["outbox", "status", "--config", cfg]) == 0


def test_a_heartbeat_damaged_while_a_command_reads_is_read_as_never(
        tmp_path: Path, clock: FakeClock, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The heartbeat is read again by `outbox status` (the daemon updates it meanwhile)
    path = tmp_path / "state.db"
    used_store(path, clock)
    cfg = str(config(tmp_path))
    monkeypatch.setattr("hostagent.store.inspect.StoreReader.meta",
                        lambda self: {"delivery_heartbeat_ns": "soon"})
    assert main(["outbox", "status", "--config", cfg]) == 0
    out = capsys.readouterr()
    assert "delivery heartbeat: never" in out.out and "Traceback" not in out.err
