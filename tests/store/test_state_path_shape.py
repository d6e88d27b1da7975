"""A `collector.state_path` that `check-config` refuses (not absolute, a directory, empty) is
refused by the `store` and `outbox` commands too, as a config error (exit 2, one line naming
the key), before anything is looked at or moved: `store reset` renamed a whole directory (a
running daemon's store, its -wal, marker and lock inside) when state_path named it, renamed
./data for a relative `data`, and crashed with a traceback on an empty path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hostagent.errors import StateCorrupt, StateError
from hostagent.store import guard
from tests.clocks import FakeClock
from tests.store.test_guard import open_store

REPO = Path(__file__).resolve().parents[2]
COMMANDS = (["store", "reset", "--force"], ["store", "check"], ["outbox", "status"])


def cli(cwd: Path, state_path: str, *command: str) -> subprocess.CompletedProcess[str]:
    cfg = cwd / "mistake.toml"
    cfg.write_text(f'[host]\nnode_id = "h"\n[collector]\nstate_path = "{state_path}"\n'
                   '[libvirt]\nuri = "test:///default"\n'
                   f'[[sinks]]\ntype = "jsonl"\nname = "q"\npath = "{cwd}/events.jsonl"\n')
    return subprocess.run([sys.executable, "-m", "hostagent.cli", "-c", str(cfg), *command],
                          cwd=cwd, capture_output=True, text=True, check=False, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def tree(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
@pytest.mark.parametrize("state_path", ["{d}/varlib", "varlib", "varlib/state.db", "",
                                        "{d}/varlib/"])
def test_a_state_path_check_config_refuses_is_a_config_error_and_nothing_moves(
        tmp_path: Path, state_path: str, command: list[str]) -> None:
    store = tmp_path / "varlib" / "state.db"
    open_store(store, FakeClock()).close()
    lock = guard.hold(store)  # a daemon runs on the store inside the directory
    try:
        before = tree(tmp_path)
        out = cli(tmp_path, state_path.format(d=tmp_path), *command)
        assert out.returncode == 2, out
        assert out.stdout == ""
        assert "Traceback" not in out.stderr
        (line,) = out.stderr.splitlines()
        assert line.startswith("hostagent: config error:")
        assert "[collector.state_path]" in line
        assert tree(tmp_path) == sorted([*before, "mistake.toml"])
    finally:
        lock.release()


def test_a_directory_is_never_moved_aside(tmp_path: Path) -> None:
    d = tmp_path / "varlib"
    d.mkdir()
    (d / "state.db").write_bytes(b"x")
    with pytest.raises(StateError, match="a directory, not a store file") as caught:
        guard.move_aside(d, 0)
    assert not isinstance(caught.value, StateCorrupt)
    assert tree(tmp_path) == ["varlib", "varlib/state.db"]
    with pytest.raises(StateError, match="is a directory") as caught:
        guard.before_open(d)  # not "damaged: store reset moves it aside"
    assert not isinstance(caught.value, StateCorrupt)
