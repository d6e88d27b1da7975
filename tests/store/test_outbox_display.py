"""What `outbox status` and `outbox dead-letters` print comes from the store, which is only
as trustworthy as the disk and whoever edited it: a host or sink name holding an ESC or a
newline redrew the terminal or forged a line (`dead-letters` already escaped its fields), and
one text value that is not UTF-8 failed the whole command (exit 1, "Could not decode to UTF-8
column"). Run as the operator runs them: real subprocesses on real store files."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from tests.clocks import FakeClock
from tests.store.test_dead_letter_cli import dead_store
from tests.store.test_guard import config, used_store

REPO = Path(__file__).resolve().parents[2]


def hostagent(cfg: Path, *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hostagent.cli", "--config", str(cfg),
                           *command], cwd=REPO, capture_output=True, text=True, check=False,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})


def edit(path: Path, *sql: str) -> None:
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as c:
        for statement in sql:
            c.execute(statement)


def test_status_escapes_the_host_and_sink_names_it_reads_from_the_store(
        tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    used_store(path, FakeClock())
    edit(path, "UPDATE meta SET value = char(27) || '[31mRED' || char(10) || 'FAKE LINE' "
               "WHERE key = 'host'",
         "INSERT INTO sinks VALUES(char(27) || '[2Jevil' || char(10) || 'x', 1, 1, "
         "char(27) || '[5m', NULL, NULL)")
    out = hostagent(config(tmp_path), "outbox", "status")
    assert out.returncode == 0, out.stderr
    assert "\x1b" not in out.stdout
    assert not any(line.startswith("FAKE LINE") for line in out.stdout.splitlines())
    assert r"(host \x1b[31mRED\nFAKE LINE," in out.stdout
    assert r"\x1b[2Jevil\nx (not configured)" in out.stdout
    assert len(out.stdout.splitlines()) == 6  # 3 header lines, the column titles, 2 sinks


def test_text_that_is_not_utf8_is_shown_not_a_failed_command(tmp_path: Path) -> None:
    path, _ = dead_store(tmp_path)
    edit(path, "UPDATE dead_letters SET reason = CAST(x'72ff' AS TEXT)",
         "UPDATE deliveries SET sink = CAST(x'71ff' AS TEXT)",
         "INSERT OR REPLACE INTO meta VALUES('delivery_heartbeat_ns', CAST(x'31ff32' AS TEXT))")
    cfg = config(tmp_path)
    for command in (["outbox", "status"], ["outbox", "status", "--json"],
                    ["outbox", "dead-letters"], ["outbox", "dead-letters", "--json"]):
        out = hostagent(cfg, *command)
        assert out.returncode == 0, (command, out.stderr)
        assert "Traceback" not in out.stderr and "decode" not in out.stderr
    assert "r\ufffd" in hostagent(cfg, "outbox", "dead-letters").stdout
    shown = hostagent(cfg, "outbox", "status").stdout
    assert "delivery heartbeat: never" in shown and "q\ufffd (not configured)" in shown
