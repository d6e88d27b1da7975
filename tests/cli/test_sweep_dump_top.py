"""`dump` and `top` inputs found by an adversarial sweep (names, ids, --all, unreachable
libvirt) that gave a wrong exit status, a 100 kB error line, or a table with no figures."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from hostagent.cli.main import main
from tests.cli.test_dump import LONG_NAME, driver_node, dump_config


def config(tmp: Path, uri: str) -> str:
    path = tmp / "hostagent.toml"
    path.write_text(f'[libvirt]\nuri = "{uri}"\n[collector]\nstate_path = "{tmp}/state.db"\n'
                    f'[[sinks]]\ntype = "jsonl"\npath = "{tmp}/events.jsonl"\n')
    return str(path)


def our_line(err: str) -> str:
    assert "Traceback" not in err, err
    (line,) = [x for x in err.splitlines() if x.startswith("hostagent")]
    return line


def test_a_very_long_domain_argument_is_cut_short_in_the_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # the whole argument was quoted: one error line of 100 kB
    cfg = config(tmp_path, "test:///default")
    assert main(["dump", "x" * 100_000, "--interval", "0.05", "--config", cfg]) == 2
    line = our_line(capsys.readouterr().err)
    assert line.startswith("hostagent: no running domain named 'xxx")
    assert "x...' or with that UUID or id; running: 'test'" in line and len(line) < 300


@pytest.mark.parametrize("domain", ["nope", "test"])
def test_dump_all_with_a_domain_is_a_usage_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], domain: str) -> None:
    # the DOMAINs were ignored: a misspelt one exited 0 with every domain dumped
    cfg = config(tmp_path, "test:///default")
    assert main(["dump", "--all", domain, "--json", "--interval", "0.05", "--config", cfg]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert our_line(err) == ("hostagent dump: --all dumps every running domain: name DOMAINs "
                             "or pass --all, not both")


@pytest.mark.parametrize("flags", [["--json"], ["--once"], ["--once", "--json"]])
def test_top_once_exits_1_when_libvirt_cannot_be_read(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str]) -> None:
    # it printed "0 domains" and exited 0: a script could not tell an empty host from none read
    sock = tmp_path / "no-such.sock"
    cfg = config(tmp_path, f"qemu+unix:///system?socket={sock}")
    assert main(["top", *flags, "--interval", "0.05", "--config", cfg]) == 1
    out, err = capsys.readouterr()
    line = our_line(err)
    assert line.startswith("hostagent: libvirt qemu+unix:///system?socket=") and str(sock) in line
    if "--json" in flags:
        doc = orjson.loads(out)
        assert doc["domains"] == [] and str(sock) in doc["errors"][0]
    else:
        assert "error: libvirt" in out


def test_top_once_on_a_readable_host_still_exits_0(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = config(tmp_path, "test:///default")
    assert main(["top", "--json", "--interval", "0.05", "--config", cfg]) == 0
    doc = orjson.loads(capsys.readouterr().out)
    assert doc["errors"] == [] and [d["name"] for d in doc["domains"]] == ["test"]


def test_a_long_domain_name_leaves_the_other_columns_their_figures(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # a 10,000-character name took the whole width: every cell of every row showed "…"
    cfg = str(dump_config(tmp_path, driver_node(tmp_path)))
    assert main(["top", "--once", "--interval", "0.05", "--config", cfg]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("healthy", "xxx"))]
    assert len(rows) == 2, out
    for row in rows:
        assert row.split()[1:4] == ["unassigned", "1", "-"], row
        assert "1.0G" in row and len(row) < 200, row
    assert LONG_NAME[:31] + "…" in out


def test_a_domain_gone_before_the_first_sample_is_named_escaped(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # the one error line printed the DOMAIN argument raw: an ESC reached the terminal
    from hostagent.cli import dump

    async def gone(*_args: object, **_kw: object) -> list[object]:
        return []  # listed, then stopped before the first sample

    monkeypatch.setattr(dump, "collect_dump", gone)
    cfg = config(tmp_path, "test:///default")
    assert main(["dump", "vm\x1b[2J", "y" * 500, "--config", cfg]) == 1
    line = our_line(capsys.readouterr().err)
    assert line == f"hostagent dump: vm\\x1b[2J, {'y' * 77}...: stopped during the dump"
