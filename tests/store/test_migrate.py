"""Upgrading a state store of schema version 1 (event-id keys) to version 2 (keys by arrival).

The fixture is a store the version-1 code wrote (fixtures/store-v1/make_v1.py, at 344e865):
acknowledged, claimed, backing-off, dead-lettered and merged rows for two sinks, baselines and
alert state. Every test works on a copy."""

from __future__ import annotations

import shutil
import socket
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from hostagent.cli import main as cli
from hostagent.config.load import load
from hostagent.daemon import Daemon
from hostagent.errors import StateCorrupt
from hostagent.store import opening
from hostagent.store.outbox import Outcome, Store
from hostagent.store.schema import SCHEMA_VERSION, UPGRADABLE, upgrade_budget_s
from tests.clocks import FakeClock
from tests.standins.queue import PERIOD_NS, T0_NS, usage_event

V1 = Path(__file__).resolve().parents[2] / "fixtures" / "store-v1" / "state.db"
FAR_NS = 2**62

# Every column that must survive, keyed by event id (v1 has no seq).
DELIVERY_COLS = ("sink, event_id, instance_id, period_start_ns, created_ns, status, claimed, "
                 "attempts, rejections, next_attempt_ns, last_error, done_ns")
EVENT_COLS = "event_id, kind, instance_id, period_start_ns, period_end_ns, payload, created_ns"


def snapshot(path: Path) -> dict[str, Any]:
    with sqlite3.connect(path) as c:
        return {
            "events": sorted(c.execute(f"SELECT {EVENT_COLS} FROM events").fetchall()),
            "deliveries": sorted(c.execute(f"SELECT {DELIVERY_COLS} FROM deliveries")),
            "dead_letters": sorted(c.execute("SELECT sink, event_id, reason, attempts, dead_ns "
                                             "FROM dead_letters")),
            "merges": sorted(c.execute("SELECT merged_event_id, sink, source_ids, created_ns "
                                       "FROM merges")),
            "baselines": sorted(c.execute("SELECT * FROM baselines")),
            "alert_state": sorted(c.execute("SELECT * FROM alert_state")),
            "sinks": sorted(c.execute("SELECT * FROM sinks")),
            "meta": dict(c.execute("SELECT key, value FROM meta")),
        }


@pytest.fixture
def v1(tmp_path: Path) -> Path:
    path = tmp_path / "state" / "state.db"
    path.parent.mkdir()
    shutil.copy(V1, path)
    return path


def open_store(path: Path, clock: FakeClock | None = None) -> Store:
    return Store.open(path, clock=clock or FakeClock(), node_id="host-a",
                      sink_names=["q", "jsonl"])


def test_the_fixture_is_a_version_1_store_with_every_kind_of_row(v1: Path) -> None:
    before = snapshot(v1)
    assert before["meta"]["schema_version"] == "1" and 1 in UPGRADABLE
    statuses = {(d[0], d[5], d[6]) for d in before["deliveries"]}
    assert {("jsonl", "acked", 1), ("jsonl", "pending", 1), ("q", "acked", 1),
            ("q", "dead", 1), ("q", "pending", 0), ("q", "pending", 1)} <= statuses
    assert before["dead_letters"] and before["merges"] and before["baselines"]
    assert any(d[9] > 0 for d in before["deliveries"])  # one backing off


def test_opening_upgrades_and_keeps_every_row(v1: Path) -> None:
    before = snapshot(v1)
    open_store(v1).close()
    after = snapshot(v1)
    assert after["meta"]["schema_version"] == str(SCHEMA_VERSION) == "2"
    for table in ("events", "deliveries", "dead_letters", "merges", "baselines",
                  "alert_state", "sinks"):
        assert after[table] == before[table], table
    with sqlite3.connect(v1) as c:
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        names = {r[0] for r in c.execute("SELECT name FROM sqlite_master")}
        assert not {n for n in names if n.endswith("_v1")}
        assert {"deliveries_pending", "deliveries_retry", "deliveries_dead",
                "deliveries_acked", "events_key"} <= names and "deliveries_queue" not in names
        # seq follows the order the version-1 code committed the events in
        old = [r[0] for r in sqlite3.connect(V1).execute("SELECT event_id FROM events "
                                                         "ORDER BY rowid")]
        assert [r[0] for r in c.execute("SELECT event_id FROM events ORDER BY seq")] == old
        # every delivery row, dead letter and merge record points at its own event
        for table, n, id_col in (("deliveries", len(before["deliveries"]), "event_id"),
                                 ("dead_letters", 1, "event_id"),
                                 ("merges", 3, "merged_event_id")):
            assert c.execute(f"SELECT COUNT(*) FROM {table} x JOIN events e ON e.seq = x.seq "
                             f"AND e.event_id = x.{id_col}").fetchone()[0] == n, table


def test_the_upgraded_store_delivers_as_the_old_one_would_have(v1: Path) -> None:
    clock = FakeClock()
    clock.wall_ns = T0_NS + 10 * PERIOD_NS
    s = open_store(v1, clock)
    try:
        # jsonl: the three claimed period-4 rows; q: the merged runs and vm-c's period 2 ...
        jsonl = s.pending("jsonl", 100, FAR_NS)
        assert sorted(p.event.instance_id for p in jsonl) == ["vm-a", "vm-b", "vm-c"]
        assert {p.event.period_start_ns for p in jsonl} == {T0_NS + 4 * PERIOD_NS}
        q_ids = [p.event.event_id for p in s.pending("q", 100, FAR_NS)]
        merged = {m for m, sink, _ in s.merge_records() if sink == "q"}
        assert merged <= set(q_ids)
        # ... and not vm-a's later periods before its backing-off period 2 is due
        assert all(p.event.instance_id != "vm-a" for p in s.pending("q", 100, T0_NS))
        got = s.record_and_take("q", [], 100, FAR_NS, dead_letter_after=3).batch
        assert [p.event.event_id for p in got] == q_ids
        s.record("q", [Outcome.of(p, "acked") for p in got], dead_letter_after=3)
        assert s.pending("q", 100, FAR_NS) == []
        assert s.stats()["q"].pending == 0
        # the dead letter is listed with its event and can be replayed
        (dead,) = s.dead_letters("q")
        assert dead.reason == "schema rejected" and dead.instance_id == "vm-b"
        assert s.replay("q", dead.event_id) == 1
        assert [p.event.event_id for p in s.pending("q", 10, FAR_NS)] == [dead.event_id]
        # a new pass's events queue behind the old ones, keyed after them
        new = [usage_event(i, 5) for i in ("vm-a", "vm-b", "vm-c")]
        s.commit_pass([], new)
        with s.reading("test") as c:
            top = c.execute("SELECT event_id FROM events ORDER BY seq DESC LIMIT 3").fetchall()
        assert {r[0] for r in top} == {e.event_id for e in new}
        assert [p.event.event_id for p in s.pending("jsonl", 100, FAR_NS)][-3:] == \
            [e.event_id for e in new]
        # pruning past retention removes acked rows and their events, nothing pending
        clock.advance(10 * 86400)
        pruned = s.maintain(retention_s=86400).pruned
        assert pruned >= 12 + 6
        assert len(s.pending("jsonl", 100, FAR_NS)) == 6
    finally:
        s.close()


def test_a_store_that_cannot_be_carried_over_is_refused_and_left_as_it_was(v1: Path) -> None:
    with sqlite3.connect(v1) as c:  # a delivery row whose event is gone (damage)
        c.execute("DELETE FROM events WHERE event_id = (SELECT event_id FROM deliveries "
                  "WHERE status = 'pending' LIMIT 1)")
    before = snapshot(v1)
    with pytest.raises(StateCorrupt, match=r"cannot upgrade .* schema version 1: rows before"):
        open_store(v1)
    assert snapshot(v1) == before  # still version 1, every row where it was


def test_a_damaged_store_is_refused_before_any_upgrade(v1: Path) -> None:
    with sqlite3.connect(v1) as c:
        page = c.execute("PRAGMA page_size").fetchone()[0]
        root = c.execute("SELECT rootpage FROM sqlite_master WHERE name = "
                         "'deliveries_queue'").fetchone()[0]
    with open(v1, "r+b") as f:  # scribble over an index page
        f.seek((root - 1) * page + 8)
        f.write(b"\xff" * 64)
    with pytest.raises(StateCorrupt):
        open_store(v1)
    with sqlite3.connect(v1) as c:
        assert dict(c.execute("SELECT key, value FROM meta"))["schema_version"] == "1"


def test_the_commands_beside_the_daemon_check_a_version_1_store_but_leave_it_to_the_daemon(
        v1: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Between installing the new package and restarting the daemon, the old daemon still
    # writes version-1 rows: only the daemon's own start upgrades the store
    opening.peek(v1)  # what check-config does: no error
    with pytest.raises(StateCorrupt, match="schema version 1 is not 2"):
        opening.peek(v1, upgradable=False)
    cfg = tmp_path / "hostagent.toml"
    cfg.write_text(f'[host]\nnode_id = "host-a"\n[collector]\nstate_path = "{v1}"\n')
    before = snapshot(v1)
    assert cli.main(["--config", str(cfg), "store", "check"]) == 0
    assert ("state store OK (schema version 1: the daemon upgrades it to 2 when it next "
            "starts)") in capsys.readouterr().out
    assert cli.main(["--config", str(cfg), "outbox", "status"]) == 1
    err = capsys.readouterr().err
    assert "still schema version 1: the daemon upgrades it to 2 when it next starts" in err
    assert snapshot(v1) == before  # untouched
    open_store(v1).close()  # the daemon's start
    assert cli.main(["--config", str(cfg), "store", "check"]) == 0
    assert capsys.readouterr().out.strip().endswith("state store OK")
    assert cli.main(["--config", str(cfg), "outbox", "status"]) == 0


def test_the_daemon_asks_systemd_for_time_while_it_upgrades(
        v1: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # TimeoutStartSec is 120 s; a day of a large host's events takes longer to carry over, and
    # a start killed mid-upgrade would roll back and start over, forever
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(str(tmp_path / "notify"))
    manager.settimeout(0.5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    cfg = tmp_path / "hostagent.toml"
    cfg.write_text(f'[host]\nnode_id = "host-a"\n[libvirt]\nuri = "test:///default"\n'
                   f'[collector]\nstate_path = "{v1}"\n[[sinks]]\ntype = "jsonl"\n'
                   f'path = "{tmp_path}/events.jsonl"\n')
    size = v1.stat().st_size
    try:
        Daemon.build(load(str(cfg))).store.close()
        fields = dict(line.split("=", 1) for line in manager.recv(4096).decode().split("\n"))
        assert fields == {"EXTEND_TIMEOUT_USEC": str(int(upgrade_budget_s(size) * 1e6)),
                          "STATUS": "upgrading the state store from schema version 1"}
        assert upgrade_budget_s(size) >= 60 and upgrade_budget_s(3 << 30) > 700
        assert snapshot(v1)["meta"]["schema_version"] == "2"
        Daemon.build(load(str(cfg))).store.close()  # upgraded: nothing to ask for
        with pytest.raises(TimeoutError):
            manager.recv(4096)
    finally:
        manager.close()
