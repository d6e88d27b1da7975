"""`hostagent outbox dead-letters | replay` through the CLI: a sink's error text cannot drive
the terminal, and replay counts only what it re-queued."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import pytest

from hostagent.cli.main import main
from hostagent.store.outbox import Outcome, Store
from tests.clocks import FakeClock
from tests.standins.queue import usage_event
from tests.store.test_guard import HOST, config

REASON = "\x1b[2J\x1b[31mboom\nhostagent: all good\r"


def dead_store(tmp_path: Path) -> tuple[Path, list[str]]:
    """A store whose sink q dead-lettered two events (the first with REASON); their ids."""
    clock = FakeClock()
    store = Store.open(tmp_path / "state.db", clock=clock, node_id=HOST, sink_names=("q",))
    store.commit_pass([], [usage_event("a", 0), usage_event("b", 0)])
    taken = store.take("q", 10, clock.wall_ns)
    store.record("q", [Outcome.of(taken[0], "dead", REASON), Outcome.of(taken[1], "dead", "no")],
                 dead_letter_after=3)
    store.close()
    return tmp_path / "state.db", [p.event.event_id for p in taken]


def test_dead_letter_reasons_are_printed_with_control_characters_escaped(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dead_store(tmp_path)
    assert main(["outbox", "dead-letters", "--config", str(config(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\r" not in out
    assert len(out.splitlines()) == 3  # two letters and the summary: no forged line
    assert r"reason: \x1b[2J\x1b[31mboom\nhostagent: all good\r" in out
    assert main(["outbox", "dead-letters", "--json", "--config", str(config(tmp_path))]) == 0
    assert '"reason": "\\u001b[2J\\u001b[31mboom\\nhostagent: all good\\r"' in \
        capsys.readouterr().out  # JSON keeps the text, escaped by JSON itself


def test_replay_does_not_count_a_dead_letter_whose_event_is_gone(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, ids = dead_store(tmp_path)
    with contextlib.closing(sqlite3.connect(path)) as c:
        c.execute("DELETE FROM events WHERE event_id = ?", (ids[0],))
        c.commit()
    cfg = str(config(tmp_path))
    assert main(["outbox", "replay", "--id", ids[0], "--config", cfg]) == 1
    out, err = capsys.readouterr()
    assert "re-queued 0 dead letter(s)" in out and "no dead letter matched" in err
    assert main(["outbox", "replay", "--config", cfg]) == 0
    assert "re-queued 1 dead letter(s)" in capsys.readouterr().out
