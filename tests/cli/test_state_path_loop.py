"""A symbolic link loop at `collector.state_path` (ln -s a b; ln -s b a) is the config's
mistake in every command: exit 2, one line naming the config file, the key, the looping link
and a fix. `store` and `outbox` said exit 1 (a runtime failure) where `run` said 2."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hostagent.cli.main import main

COMMANDS = (["run", "--once"], ["check-config"], ["store", "check"], ["store", "reset"],
            ["store", "reset", "--force"], ["outbox", "status"], ["outbox", "status", "--json"],
            ["outbox", "dead-letters"], ["outbox", "replay"])


def config(tmp: Path, state_path: Path) -> Path:
    cfg = tmp / "hostagent.toml"
    cfg.write_text(f'[collector]\nstate_path = "{state_path}"\n'
                   f'[libvirt]\nuri = "test:///default"\n'
                   f'[[sinks]]\ntype = "jsonl"\npath = "{tmp}/events.jsonl"\n')
    return cfg


def argv(command: list[str], cfg: Path) -> list[str]:
    return [*command, str(cfg)] if command == ["check-config"] else [*command, "-c", str(cfg)]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
@pytest.mark.parametrize("where", ["file", "directory"])
def test_a_symlink_loop_at_the_state_path_is_exit_2_naming_the_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str],
        where: str) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.symlink_to(b)
    b.symlink_to(a)
    path = a if where == "file" else a / "state.db"
    cfg = config(tmp_path, path)
    before = sorted(os.listdir(tmp_path))
    assert main(argv(command, cfg)) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in err and out == ""
    (line,) = [x for x in err.splitlines() if x.startswith("hostagent:")]
    assert line.startswith(f"hostagent: config error: {cfg}: [collector.state_path] expected "
                           f"a path without a symbolic link loop, found '{path}'; fix: "
                           f"{a} is a symbolic link loop (-> {b}): ")
    assert "repoint or remove the link" in line
    assert sorted(os.listdir(tmp_path)) == before  # nothing created, moved or reset


def test_check_config_json_says_so_too(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    loop = tmp_path / "state.db"
    loop.symlink_to(loop)
    assert main(["check-config", str(config(tmp_path, loop)), "--json"]) == 2
    assert '"ok": false' in capsys.readouterr().out
