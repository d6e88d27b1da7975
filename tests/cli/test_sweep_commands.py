"""Commands found by a second adversarial sweep: each hung, printed a traceback or quietly
ignored what it was told. The product rule: every command error is one line on stderr, exit 2
for a usage or config error, never a Python traceback. Real files and real processes: a FIFO,
a closed pipe, a directory this user may not search."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostagent.cli.main import main
from hostagent.errors import ConfigError
from tests.api.test_server import self_signed
from tests.cli.test_config_errors import base, one_error_line, write
from tests.store.test_read_only import nobody_can_run_hostagent

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "hostagent.cli"]
# A command that waits on a FIFO never ends: this bounds the wait, then the child is killed.
HANG_S = 30


def cli(*args: str, timeout_s: float = HANG_S, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout_s, check=False, **kw)  # type: ignore[call-overload]


# --- a FIFO at a TLS file ----------------------------------------------------------------------


@pytest.mark.parametrize("command", ["check-config", "run"])
@pytest.mark.parametrize("fifo_at", ["tls_cert_file", "tls_key_file"])
def test_a_fifo_at_a_tls_file_is_refused_not_waited_on(tmp_path: Path, fifo_at: str,
                                                       command: str) -> None:
    cert, key = self_signed(tmp_path)
    os.mkfifo(tmp_path / "fifo")
    files = {"tls_cert_file": cert, "tls_key_file": key, fifo_at: tmp_path / "fifo"}
    path = write(tmp_path, base(tmp_path, extra=(
        "[api]\nenabled = true\nport = 0\n"
        + "".join(f'{k} = "{v}"\n' for k, v in files.items()))))
    argv = ["check-config", str(path)] if command == "check-config" else \
        ["run", "--once", "--config", str(path)]
    got = cli(*argv)  # before: waited for a writer forever, Ctrl-C did not stop it
    assert got.returncode == 2, got.stderr
    line = one_error_line(got.stderr)
    assert line.startswith(f"hostagent: config error: {path}: [api.{fifo_at}] expected a "
                           "regular PEM file"), line
    assert "fix:" in line and not (tmp_path / "events.jsonl").exists()


def test_good_tls_files_still_pass(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cert, key = self_signed(tmp_path)
    path = write(tmp_path, base(tmp_path, extra=(
        f'[api]\nenabled = true\nport = 0\ntls_cert_file = "{cert}"\ntls_key_file = "{key}"')))
    assert main(["check-config", str(path)]) == 0, capsys.readouterr().err


# --- top, with a state store it cannot reach ---------------------------------------------------


def test_top_shows_a_state_path_too_long_to_look_up(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, base(tmp_path).replace("state/state.db", "x" * 300 + "/state.db"))
    assert main(["-c", str(path), "top", "--json"]) == 0  # before: ENAMETOOLONG traceback
    assert '"reason": "cannot reach the state store: File name too long"' in \
        capsys.readouterr().out


@pytest.mark.parametrize("form", [["--once"], ["--json"]])
def test_top_shows_a_state_directory_it_may_not_search(tmp_path: Path, form: list[str]) -> None:
    # The shipped unit's StateDirectoryMode=0750: an operator outside the group cannot search
    # it. Root can: as root the command runs as nobody (setpriv), from a directory nobody may
    # enter (pytest's own tmp_path is under a mode-0700 directory).
    if os.geteuid() == 0 and not nobody_can_run_hostagent():
        pytest.skip("needs a checkout user nobody may read (a `mktemp -d` clone is 0700)")
    with tempfile.TemporaryDirectory(prefix="hostagent-top-") as scratch:
        tmp = Path(scratch)
        tmp.chmod(0o755)
        (tmp / "state").mkdir(mode=0o700)
        path = write(tmp, base(tmp))
        path.chmod(0o644)
        argv = [*CLI, "-c", str(path), "top", *form]
        if os.geteuid() == 0:
            argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv]
        else:
            (tmp / "state").chmod(0)
        got = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=HANG_S,
                             check=False)
        (tmp / "state").chmod(0o700)
    assert got.returncode == 0, got.stderr  # before: a PermissionError traceback, exit 1
    assert "Traceback" not in got.stderr
    assert "cannot reach the state store: Permission denied" in got.stdout


# --- an integer past float's range at a float key ---------------------------------------------

HUGE = "1" + "0" * 309  # 1e309 written out: TOML keeps it an exact integer


@pytest.mark.parametrize("command", ["check-config", "run"])
@pytest.mark.parametrize(("where", "key", "bound"), [
    ("collector", "collector.interval_s", "<= 3600"),
    ("collector-", "collector.interval_s", ">= "),
    ("retry", "sinks[0].retry.multiplier", "<= "),
    ("thresholds", "thresholds.approaching_fraction", "<= "),
])
def test_an_integer_past_float_range_is_out_of_range_not_a_traceback(
        tmp_path: Path, where: str, key: str, bound: str, command: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    text = {"collector": base(tmp_path, collector=f"interval_s = {HUGE}"),
            "collector-": base(tmp_path, collector=f"interval_s = -{HUGE}"),
            "retry": base(tmp_path) + f"[sinks.retry]\nmultiplier = {HUGE}\n",
            "thresholds": base(tmp_path, extra=f"[thresholds]\napproaching_fraction = {HUGE}"),
            }[where]
    path = write(tmp_path, text)
    argv = ["check-config", str(path)] if command == "check-config" else \
        ["run", "--once", "--config", str(path)]
    assert main(argv) == 2  # before: OverflowError: int too large to convert to float, exit 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"hostagent: config error: {path}: [{key}] expected a value {bound}")


def test_an_unbounded_float_key_refuses_an_integer_past_float_range() -> None:
    from hostagent.config.walk import _coerce  # no float key of the schema lacks a bound

    with pytest.raises(ConfigError, match=r"\[x.y\] expected a finite number"):
        _coerce(float, 10**309, "t.toml", "x.y", {})
    with pytest.raises(ConfigError, match=r"\[x.y\] expected a finite number"):
        _coerce(float, -(10**309), "t.toml", "x.y", {})
    assert _coerce(float, 10**308, "t.toml", "x.y", {}) == 1e308


# --- stdout's reader gone (`| head`) -----------------------------------------------------------


@pytest.mark.parametrize("unbuffered", ["1", ""])  # print raises at once / at the last flush
@pytest.mark.parametrize("command", [["check-config", "{path}"],
                                     ["-c", "{path}", "dump", "--all", "--interval", "0.1"],
                                     ["-c", "{path}", "dump", "--json", "test", "--interval",
                                      "0.1"],
                                     ["-c", "{path}", "top", "--json", "--interval", "0.1"],
                                     ["-c", "{path}", "store", "check"]])
def test_a_closed_stdout_ends_the_command_quietly(tmp_path: Path, command: list[str],
                                                  unbuffered: str) -> None:
    path = write(tmp_path, base(tmp_path))
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first byte: every write is EPIPE
    env = {**os.environ, "PYTHONUNBUFFERED": unbuffered}
    try:
        got = subprocess.run([*CLI, *(a.format(path=path) for a in command)], cwd=REPO,
                             stdout=write_end, stderr=subprocess.PIPE, text=True, env=env,
                             timeout=HANG_S, check=False)
    finally:
        os.close(write_end)
    # before: a BrokenPipeError traceback, exit 1 (or "Exception ignored", exit 120)
    assert got.returncode == 141, got.stderr
    assert "Traceback" not in got.stderr and "Exception ignored" not in got.stderr
    assert "BrokenPipe" not in got.stderr and "Broken pipe" not in got.stderr


# --- the common options ------------------------------------------------------------------------


@pytest.fixture
def root_logging() -> Iterator[None]:
    """The root logger's handlers as they were: `--log-format` pins the format it sets."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)


@pytest.mark.usefixtures("root_logging")
def test_check_config_takes_log_format_after_the_subcommand(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, base(tmp_path))
    # before: "unrecognized arguments: --log-format json", exit 2
    assert main(["check-config", str(path), "--log-format", "text"]) == 0
    assert main(["check-config", str(path), "--log-format", "json"]) == 0
    capsys.readouterr()
    logging.getLogger("hostagent.probe").warning("after check-config")
    (line,) = capsys.readouterr().err.splitlines()
    assert json.loads(line)["msg"] == "after check-config"  # its logs are in the format asked


@pytest.mark.parametrize("where", ["before", "after"])
def test_check_config_refuses_a_config_option_naming_another_file(
        tmp_path: Path, where: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, base(tmp_path))
    other = write(tmp_path, "x = = 1\n", name="other.toml")
    argv = (["-c", str(other), "check-config", str(path)] if where == "before"
            else ["check-config", str(path), "--config", str(other)])
    assert main(argv) == 2  # before: --config was ignored, FILE checked, exit 0
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"hostagent check-config: checks FILE ({path}), not --config "
                           f"({other})")
    assert main(["-c", str(path), "check-config", str(path)]) == 0  # the same file: no doubt


def test_run_once_and_passes_together_is_a_usage_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, base(tmp_path))
    with pytest.raises(SystemExit) as info:  # before: --passes ignored, one pass ran
        main(["run", "--once", "--passes", "3", "-c", str(path)])
    assert info.value.code == 2
    assert "argument --passes: not allowed with argument --once" in capsys.readouterr().err
    assert not (tmp_path / "events.jsonl").exists() and not (tmp_path / "state").exists()


# --- NOTIFY_SOCKET with bytes that are not UTF-8 ------------------------------------------------


def test_run_tells_a_manager_whose_socket_name_is_not_utf8(tmp_path: Path) -> None:
    name = f"hostagent-\xff-{os.getpid()}".encode("latin-1")
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(b"\0" + name)
    manager.settimeout(HANG_S)
    try:
        path = write(tmp_path, base(tmp_path))
        env = {**os.environ, "NOTIFY_SOCKET": "@" + os.fsdecode(name)}
        got = cli("run", "--once", "-c", str(path), env=env)
        assert got.returncode == 0, got.stderr  # before: a UnicodeEncodeError traceback, exit 1
        assert "Traceback" not in got.stderr
        assert b"READY=1" in manager.recv(4096)
    finally:
        manager.close()
