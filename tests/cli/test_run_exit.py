"""`hostagent run --once` / `--passes N`: a pass that did not commit is exit 1 with one
`hostagent:` line naming why (scripts and systemd timers read the status); clean passes are 0.
Before, every one of these exited 0."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from hostagent.cli.main import main
from hostagent.collector import Collector
from hostagent.errors import StoreFull


def config(tmp: Path, uri: str = "test:///default", extra: str = "") -> str:
    path = tmp / "hostagent.toml"
    path.write_text(f"""
[libvirt]
uri = "{uri}"
[collector]
state_path = "{tmp / 'state.db'}"
interval_s = 1
align = false
{extra}
[log]
format = "json"
[[sinks]]
type = "jsonl"
path = "{tmp / 'events.jsonl'}"
""")
    return str(path)


def our_lines(err: str) -> list[str]:
    """The CLI's own lines on stderr (the rest are JSON log lines)."""
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("hostagent:")]


def test_a_clean_pass_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--once", "--config", config(tmp_path)]) == 0
    assert our_lines(capsys.readouterr().err) == []
    assert main(["run", "--passes", "2", "--config", config(tmp_path)]) == 0
    assert our_lines(capsys.readouterr().err) == []


def test_once_with_libvirt_unavailable_exits_1_naming_why(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sock = tmp_path / "no-such.sock"
    cfg = config(tmp_path, f"qemu+unix:///system?socket={sock}")
    assert main(["run", "--once", "--config", cfg]) == 1
    (line,) = our_lines(capsys.readouterr().err)
    assert line.startswith("hostagent: pass failed: source unavailable: ")
    assert str(sock) in line


def test_passes_n_counts_the_failed_passes(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    cfg = config(tmp_path, f"qemu+unix:///system?socket={tmp_path / 'none.sock'}")
    assert main(["run", "--passes", "2", "--config", cfg]) == 1
    (line,) = our_lines(capsys.readouterr().err)
    assert line.startswith("hostagent: 2 of 2 passes failed; the last failed: source "
                           "unavailable: ")


def test_a_failed_commit_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*_args: object, **_kw: object) -> None:
        raise StoreFull("disk full (injected)")

    monkeypatch.setattr(Collector, "_commit", full)
    assert main(["run", "--once", "--config", config(tmp_path)]) == 1
    (line,) = our_lines(capsys.readouterr().err)
    assert line == "hostagent: pass failed: commit failed: disk full (injected)"


def test_a_pass_past_its_timeout_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    async def stuck(*_args: object, **_kw: object) -> None:
        await trio.sleep(30)

    monkeypatch.setattr(Collector, "read_host", stuck)
    cfg = config(tmp_path, extra="pass_timeout_s = 0.5")
    assert main(["run", "--once", "--config", cfg]) == 1
    (line,) = our_lines(capsys.readouterr().err)
    assert line == "hostagent: pass failed: pass exceeded pass_timeout_s=0.5"
