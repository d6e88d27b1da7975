"""The state store never silently starts empty (issue 13 §5): each broken or vanished store is
refused, left as it is, and `hostagent store reset` is the one way out."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import pytest

from hostagent.cli.main import main
from hostagent.errors import StateCorrupt, StateError
from hostagent.model import Baseline
from hostagent.store import guard
from hostagent.store.outbox import Store
from tests.clocks import FakeClock
from tests.standins.queue import T0_NS, usage_event

HOST = "host-a"


def open_store(path: Path, clock: FakeClock, **kw: object) -> Store:
    return Store.open(path, clock=clock, node_id=HOST, sink_names=("q",),  # type: ignore[arg-type]
                      **kw)


def used_store(path: Path, clock: FakeClock, n: int = 3) -> int:
    """A store after some passes: n baselines, n pending events; its created_ns."""
    s = open_store(path, clock)
    s.commit_pass([Baseline(instance_id=f"i{i}", incarnation="x", t_wall_ns=T0_NS, cpu_ns=i)
                   for i in range(n)], [usage_event(f"i{i}", 0) for i in range(n)])
    created = s.created_ns
    s.close()
    return created


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_creating_a_store_writes_the_marker(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "state.db"
    created = used_store(path, clock)
    assert guard.marker_path(path) == tmp_path / "state.db.id"
    assert (tmp_path / "state.db.id").read_text() == f"{created}\n"
    clock.advance(60)
    s = open_store(path, clock)  # reopening keeps both
    assert s.created_ns == created
    s.close()
    assert guard.read_marker(path) == created


def test_a_store_from_before_the_marker_gets_one(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "state.db"
    created = used_store(path, clock)
    (tmp_path / "state.db.id").unlink()
    open_store(path, clock).close()
    assert guard.read_marker(path) == created


def test_an_emptied_store_is_refused_and_left_alone(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "state.db"
    used_store(path, clock)
    path.write_bytes(b"")  # truncated to 0 bytes behind the daemon's back
    for wal in ("state.db-wal", "state.db-shm"):
        (tmp_path / wal).unlink(missing_ok=True)
    with pytest.raises(StateCorrupt, match=rf"{path}: the state store is empty.*store reset"):
        open_store(path, clock)
    with pytest.raises(StateCorrupt, match="empty"):
        open_store(path, clock, create=False, register_sinks=False)  # `hostagent outbox`
    assert path.read_bytes() == b""


def test_an_empty_file_is_refused_even_without_a_marker(tmp_path: Path, clock: FakeClock
                                                        ) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(b"")
    with pytest.raises(StateCorrupt, match="empty"):
        open_store(path, clock)
    assert path.read_bytes() == b""


def test_a_truncated_store_is_refused_and_left_alone(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "state.db"
    used_store(path, clock, n=300)
    half = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(half)
    with pytest.raises(StateError, match=str(path)):
        open_store(path, clock)
    assert path.read_bytes() == half


def test_a_header_only_store_is_refused(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "state.db"
    used_store(path, clock)
    path.write_bytes(path.read_bytes()[:100])  # the SQLite header and nothing else
    with pytest.raises(StateError, match=str(path)):
        open_store(path, clock)


def test_a_newer_schema_is_refused(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "state.db"
    used_store(path, clock)
    with sqlite3.connect(path) as c:
        c.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(StateCorrupt, match=r"schema version 99 .*upgrade hostagent"):
        open_store(path, clock)


def test_a_deleted_store_is_noticed(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "state.db"
    used_store(path, clock)
    for name in ("state.db", "state.db-wal", "state.db-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    with pytest.raises(StateCorrupt, match=r"is gone .*state.db.id remains.*store reset"):
        open_store(path, clock)
    assert not path.exists()  # not recreated


def test_a_replaced_store_is_noticed(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "state.db"
    used_store(path, clock)
    clock.advance(3600)
    other = tmp_path / "other" / "state.db"
    used_store(other, clock)
    for name in ("state.db", "state.db-wal", "state.db-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    path.write_bytes(other.read_bytes())
    with pytest.raises(StateCorrupt, match="the file was replaced"):
        open_store(path, clock)


def config(tmp: Path) -> Path:
    cfg = tmp / "hostagent.toml"
    cfg.write_text(f'[host]\nnode_id = "{HOST}"\n[collector]\nstate_path = "{tmp}/state.db"\n'
                   f'[libvirt]\nuri = "test:///default"\n'
                   f'[[sinks]]\ntype = "jsonl"\nname = "q"\npath = "{tmp}/events.jsonl"\n')
    return cfg


def test_run_refuses_a_broken_store_with_exit_2(tmp_path: Path, clock: FakeClock,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "state.db"
    used_store(path, clock)
    path.write_bytes(b"")
    assert main(["run", "--once", "--config", str(config(tmp_path))]) == 2
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    err = [line for line in stderr.splitlines() if line.startswith("hostagent:")]  # not logs
    assert len(err) == 1
    assert str(path) in err[0] and "hostagent store reset" in err[0]
    assert path.read_bytes() == b""
    assert not (tmp_path / "events.jsonl").exists()


def test_store_reset_moves_a_broken_store_aside_and_reports_the_loss(
        tmp_path: Path, clock: FakeClock, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "state.db"
    used_store(path, clock, n=3)
    with sqlite3.connect(path) as c:  # readable, but refused: what it held can be counted
        c.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    cfg = str(config(tmp_path))
    assert main(["run", "--once", "--config", cfg]) == 2
    capsys.readouterr()
    assert main(["store", "reset", "--config", cfg]) == 0
    out = capsys.readouterr().out
    assert "lost: 3 pending event(s) (3 pending deliveries), 3 baseline(s)" in out
    aside = sorted(p.name for p in tmp_path.glob("state.db.broken-*"))
    assert {n.rsplit("Z", 1)[1] for n in aside} >= {"", ".id"}  # the store and its marker
    assert not path.exists() and not guard.marker_path(path).exists()
    assert main(["run", "--once", "--config", cfg]) == 0  # afresh
    assert guard.read_marker(path) is not None


def test_store_reset_after_a_deletion(tmp_path: Path, clock: FakeClock,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "state.db"
    used_store(path, clock)
    path.unlink()
    cfg = str(config(tmp_path))
    assert main(["run", "--once", "--config", cfg]) == 2
    assert main(["store", "reset", "--config", cfg]) == 0
    assert "gone or empty" in capsys.readouterr().out
    assert main(["run", "--once", "--config", cfg]) == 0


def test_store_reset_refuses_a_healthy_store_without_force(
        tmp_path: Path, clock: FakeClock, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "state.db"
    used_store(path, clock)
    cfg = str(config(tmp_path))
    assert main(["store", "check", "--config", cfg]) == 0
    assert "state store OK" in capsys.readouterr().out
    before = path.read_bytes()
    assert main(["store", "reset", "--config", cfg]) == 2
    out, err = capsys.readouterr()
    assert "healthy" in err and not out  # a refusal: on stderr
    assert path.read_bytes() == before
    assert main(["store", "reset", "--force", "--config", cfg]) == 0
    assert "lost: 3 pending event(s)" in capsys.readouterr().out
    assert not path.exists()


def test_check_config_refuses_a_broken_store(tmp_path: Path, clock: FakeClock,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "state.db"
    used_store(path, clock)
    path.write_bytes(b"")
    assert main(["check-config", str(config(tmp_path))]) == 2
    assert "store reset" in capsys.readouterr().err


def test_check_config_reads_the_store_without_creating_files(
        tmp_path: Path, clock: FakeClock, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "state.db"
    used_store(path, clock)
    cfg = config(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert "state.db-shm" not in before  # closed cleanly
    assert main(["check-config", str(cfg)]) == 0
    assert "state store OK" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no root-owned -wal/-shm
    with contextlib.closing(sqlite3.connect(path)) as c:  # closed: checkpointed
        c.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
        c.commit()
    assert main(["check-config", str(cfg)]) == 2
    assert "schema version 99" in capsys.readouterr().err
