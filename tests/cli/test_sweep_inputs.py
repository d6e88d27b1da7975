"""Command-line inputs found by an adversarial sweep: each was a traceback, an error of more
than one line (or with terminal escapes in it), or a command that never returned."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from hostagent.cli.main import main
from hostagent.cli.top import daemon_state
from hostagent.config.load import from_mapping


def base(tmp: Path) -> str:
    """A config on libvirt's test driver, files under `tmp`."""
    return (f'[collector]\nstate_path = "{tmp}/state.db"\n'
            f'[libvirt]\nuri = "test:///default"\n'
            f'[[sinks]]\ntype = "jsonl"\npath = "{tmp}/events.jsonl"\n')


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("argv", [["check-config", "{path}"], ["run", "--once", "-c", "{path}"],
                                  ["outbox", "status", "-c", "{path}"]])
def test_an_integer_of_thousands_of_digits_is_exit_2(tmp_path: Path, argv: list[str],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "hostagent.toml"
    path.write_text(base(tmp_path).replace("[collector]\n",
                                           "[collector]\ninterval_s = " + "1" * 5000 + "\n"))
    assert main([a.format(path=path) for a in argv]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"hostagent: config error: {path}: [-]") and "fix:" in line


@pytest.mark.parametrize(("name", "shown"), [("a\nb.toml", "a\\nb.toml"),
                                             ("a\x1b[31mb.toml", "a\\x1b[31mb.toml")])
def test_a_config_path_with_control_characters_is_one_escaped_line(
        tmp_path: Path, name: str, shown: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / name
    path.write_text("x = = 1\n")
    assert main(["check-config", str(path)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{tmp_path}/{shown}: [-] expected valid TOML" in line and "\x1b" not in line


def test_a_rules_path_with_a_newline_is_one_line(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-rules", f"{tmp_path}/a\nb.json"]) == 2
    assert "a\\nb.json" in one_error_line(capsys.readouterr().err)


def test_check_config_json_keeps_the_path_as_it_is(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "a\nb.toml"
    path.write_text("x = = 1\n")
    assert main(["check-config", str(path), "--json"]) == 2
    assert '"file": "' + str(path).replace("\n", "\\n") + '"' in capsys.readouterr().out


def test_an_empty_libvirt_uri_is_exit_2(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "hostagent.toml"
    path.write_text(base(tmp_path).replace('uri = "test:///default"', 'uri = ""'))
    assert main(["check-config", str(path)]) == 2  # never `run`: "" would reach qemu:///system
    assert f"{path}: [libvirt.uri]" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("which", ["", "-wal", "-shm"])
def test_top_does_not_wait_on_a_fifo_store(tmp_path: Path, which: str) -> None:
    store = tmp_path / "state.db"
    store.write_bytes(b"")
    if which:
        (tmp_path / f"state.db{'-shm' if which == '-wal' else '-wal'}").write_bytes(b"")
    else:
        store.unlink()
    os.mkfifo(f"{store}{which}")
    cfg = from_mapping({"collector": {"state_path": str(store)}})
    found: list[object] = []
    reader = threading.Thread(target=lambda: found.append(daemon_state(cfg, 0)), daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():  # let the stuck open return (a writer appears, then goes)
        os.close(os.open(f"{store}{which}", os.O_WRONLY | os.O_NONBLOCK))
        reader.join(10)
        pytest.fail("top waited on a FIFO at the state store's path")
    (state,) = found
    assert not state.available and "not a regular file" in (state.reason or "")
