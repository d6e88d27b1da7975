"""A state path that cannot be looked up (a symlink loop on the way, a file where a directory
should be) is an error naming the path and why, never "no store here": `store reset` must not
say "nothing to reset", `store check` not "no state store yet", and no command may send the
operator to `store reset` for it or print a traceback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hostagent.cli.main import main
from hostagent.errors import StateCorrupt, StateError
from hostagent.store import opening
from tests.clocks import FakeClock
from tests.store.test_guard import open_store
from tests.store.test_read_only import as_nobody, needs_root, readable_dir

COMMANDS = (["store", "reset"], ["store", "reset", "--force"], ["store", "check"],
            ["outbox", "status"], ["outbox", "status", "--json"], ["outbox", "dead-letters"],
            ["outbox", "replay"])


def config(tmp: Path, state_path: Path) -> Path:
    cfg = tmp / "hostagent.toml"
    cfg.write_text(f'[host]\nnode_id = "h"\n[collector]\nstate_path = "{state_path}"\n'
                   f'[libvirt]\nuri = "test:///default"\n'
                   f'[[sinks]]\ntype = "jsonl"\nname = "q"\npath = "{tmp}/events.jsonl"\n')
    return cfg


def listing(d: Path) -> list[str]:
    return sorted(os.listdir(d))


def one_error(capsys: pytest.CaptureFixture[str]) -> tuple[str, str]:
    """stdout, and the one `hostagent:` line on stderr (no traceback)."""
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("hostagent:")]
    assert len(lines) == 1, err
    return out, lines[0]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_a_state_dir_that_is_a_symlink_to_itself_is_a_clear_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]) -> None:
    loop = tmp_path / "state"
    loop.symlink_to(loop)
    path = loop / "state.db"
    cfg = config(tmp_path, path)
    before = listing(tmp_path)
    assert main([*command, "--config", str(cfg)]) == 2  # the config's mistake, as in `run`
    out, err = one_error(capsys)
    assert "nothing to reset" not in out and "no state store" not in out + err
    assert str(path) in err
    assert f"{loop} is a symbolic link loop" in err
    assert "store reset" not in err.split("; not resetting")[0]  # reset cannot fix a loop
    assert listing(tmp_path) == before


def test_a_loop_of_two_links_names_the_first_one_on_the_way(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    path = tmp_path / "a" / "hostagent" / "state.db"
    assert main(["store", "reset", "--config", str(config(tmp_path, path))]) == 2
    _, err = one_error(capsys)
    assert "[collector.state_path]" in err and str(path) in err
    assert f"{tmp_path / 'a'} is a symbolic link loop (-> {tmp_path / 'b'})" in err


def test_a_store_file_that_is_a_symlink_to_itself_is_a_clear_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "state.db"
    path.symlink_to(path)
    for command in (["store", "reset"], ["store", "check"], ["outbox", "status"]):
        assert main([*command, "--config", str(config(tmp_path, path))]) == 2, command
        _, err = one_error(capsys)
        assert f"{path} is a symbolic link loop" in err, command
    assert path.is_symlink() and listing(tmp_path) == ["hostagent.toml", "state.db"]


def test_a_store_under_a_regular_file_is_a_clear_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "plain").write_text("not a directory\n")
    path = tmp_path / "plain" / "state.db"
    for command in (["store", "reset"], ["store", "check"], ["outbox", "status"]):
        assert main([*command, "--config", str(config(tmp_path, path))]) == 2, command
        _, err = one_error(capsys)
        assert str(path) in err and "Not a directory" in err, command
        assert "[collector.state_path]" in err and "is a regular file" in err, command


def test_opening_refuses_a_looped_path_as_state_error_not_as_damage(tmp_path: Path) -> None:
    loop = tmp_path / "state"
    loop.symlink_to(loop)
    path = loop / "state.db"
    for attempt in (lambda: opening.peek(path),
                    lambda: open_store(path, FakeClock()),  # the daemon's open, create=True
                    lambda: opening.check_reachable(path)):
        with pytest.raises(StateError, match="symbolic link loop") as caught:
            attempt()
        assert not isinstance(caught.value, StateCorrupt)


def test_a_missing_store_in_a_real_directory_still_has_nothing_to_reset(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")  # links without a loop are fine
    path = tmp_path / "link" / "state.db"
    cfg = str(config(tmp_path, path))
    assert main(["store", "reset", "--config", cfg]) == 0
    assert "nothing to reset" in capsys.readouterr().out
    assert main(["store", "check", "--config", cfg]) == 0
    assert "no state store yet" in capsys.readouterr().out
    opening.check_reachable(path)
    open_store(path, FakeClock()).close()
    assert main(["store", "check", "--config", cfg]) == 0
    assert "state store OK" in capsys.readouterr().out


@needs_root
def test_a_directory_the_user_may_not_search_is_a_clear_error() -> None:
    with readable_dir() as d:
        (d / "private").mkdir(mode=0o700)
        path = d / "private" / "state.db"
        cfg = config(d, path)
        cfg.chmod(0o644)
        for command in (["store", "reset"], ["store", "check"], ["outbox", "status"]):
            done = as_nobody([*command, "--config", str(cfg)])
            assert done.returncode == 1, (command, done.stderr)
            assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1, command
            assert f"{path}: cannot reach the state store: Permission denied" in done.stderr
            assert "service user" in done.stderr and "nothing to reset" not in done.stdout
