"""`top` and the state store: what it says of a store the daemon would refuse or upgrade, a
damaged value in it, and that it never writes a file next to it (not even a -shm)."""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
from pathlib import Path

import orjson
import pytest

from hostagent.cli.main import main
from hostagent.cli.top import daemon_state
from hostagent.config.load import load
from hostagent.store.outbox import Store
from tests.cli.test_json_forms import config, make_store
from tests.clocks import FakeClock


def files(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.glob("state.db*"))}


def set_meta(path: Path, key: str, value: str) -> None:
    with sqlite3.connect(path) as c:
        c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES(?, ?)", (key, value))
    c.close()


def test_a_newer_store_is_refused_not_upgraded(tmp_path: Path) -> None:
    set_meta(make_store(tmp_path), "schema_version", "3")
    before = files(tmp_path)
    d = daemon_state(load(config(tmp_path)), FakeClock().wall_ns)
    assert not d.available and d.reason is not None
    assert "schema version 3" in d.reason and "refuses" in d.reason
    assert "hostagent store reset" in d.reason and "upgrades" not in d.reason
    assert files(tmp_path) == before


@pytest.mark.parametrize(("damage", "what"), [
    # was: "schema version None: the daemon upgrades it to 2"
    ("DELETE FROM meta WHERE key = 'schema_version'", "state store with no schema version"),
    ("UPDATE meta SET value = 'other-app' WHERE key = 'app'", "not a hostagent state store"),
    ("DROP TABLE meta", "not a hostagent state store"),     # was: "no such table: meta"
])
def test_a_foreign_store_is_called_foreign(tmp_path: Path, damage: str, what: str) -> None:
    path = make_store(tmp_path)
    with sqlite3.connect(path) as c:
        c.execute(damage)
    c.close()
    d = daemon_state(load(config(tmp_path)), FakeClock().wall_ns)
    assert d.reason == (f"{what}: the daemon refuses to start on it "
                        "(`hostagent store reset` moves it aside)")


def test_a_non_integer_heartbeat_reports_the_store_unreadable(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # `top --json` raised ValueError from int(meta["delivery_heartbeat_ns"])
    set_meta(make_store(tmp_path), "delivery_heartbeat_ns", "soon")
    cfg = config(tmp_path)
    assert main(["--config", str(cfg), "top", "--json", "--interval", "0.05"]) == 0
    daemon = orjson.loads(capsys.readouterr().out)["daemon"]
    assert daemon["available"] is False
    assert daemon["reason"] == ("cannot read the state store: meta.delivery_heartbeat_ns is "
                                "'soon', not an integer")


def test_a_damaged_pass_time_reports_the_store_unreadable(tmp_path: Path) -> None:
    path = make_store(tmp_path)
    with sqlite3.connect(path) as c:
        c.execute("INSERT INTO baselines(instance_id, state) VALUES('x', '{\"t_wall_ns\": \"z\"}')")
    c.close()
    d = daemon_state(load(config(tmp_path)), FakeClock().wall_ns)
    assert not d.available and d.reason is not None and "last pass time" in d.reason


def test_a_wal_without_its_shm_is_reported_not_written(tmp_path: Path) -> None:
    # mode=ro would create state.db-shm (root-owned when top runs as root)
    live = tmp_path / "live"
    live.mkdir()
    path = make_store(live)
    c = sqlite3.connect(path)
    c.execute("PRAGMA wal_autocheckpoint=0")
    c.execute("UPDATE meta SET value = value WHERE key = 'host'")
    c.commit()
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("state.db", "state.db-wal", "state.db.id"):
        shutil.copy(live / name, copy / name)
    c.close()
    before = files(copy)
    d = daemon_state(load(config(copy)), FakeClock().wall_ns)
    assert files(copy) == before and not (copy / "state.db-shm").exists()
    assert not d.available and d.reason is not None
    assert "state.db-wal has no state.db-shm" in d.reason


def test_a_running_daemons_store_is_read(tmp_path: Path) -> None:
    path = make_store(tmp_path)
    s = Store.open(path, clock=FakeClock(), node_id="host-a", sink_names=("file",))
    try:
        assert (tmp_path / "state.db-wal").exists() and (tmp_path / "state.db-shm").exists()
        d = daemon_state(load(config(tmp_path)), FakeClock().wall_ns)
        assert d.available, d.reason
        assert [x.name for x in d.sinks] == ["file"]
    finally:
        s.close()
