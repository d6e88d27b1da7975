"""Ctrl-C in the operator commands: no traceback, exit 130 (the shell's convention), the
terminal as it was (interactive `top`: cbreak undone, the alternate screen left)."""

from __future__ import annotations

import contextlib
import os
import pty
import select
import signal
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli.test_json_forms import config

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "hostagent.cli"]


@pytest.mark.parametrize("command", [["dump", "test", "--interval", "30"],
                                     ["top", "--once", "--interval", "30"],
                                     ["top", "--json", "--interval", "30"]])
def test_ctrl_c_while_sampling_exits_130_without_a_traceback(
        tmp_path: Path, command: list[str]) -> None:
    cfg = str(config(tmp_path))
    with default_sigint():
        p = subprocess.Popen([*CLI, "--config", cfg, *command], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stderr is not None
        assert "libvirt connected" in p.stderr.readline()  # the first sample is being taken
        time.sleep(0.5)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=20)
    finally:
        p.kill()
    assert p.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "Warning" not in err and out == ""


@contextlib.contextmanager
def default_sigint() -> Iterator[None]:
    """SIGINT as a terminal's Ctrl-C finds it, for the children started inside: a shell's
    background job (a CI runner's too) starts with SIGINT ignored, a child inherits that, and
    Python then installs no KeyboardInterrupt handler. (The default disposition is inherited;
    this test's own handler is not.)"""
    old = signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def read_until(fd: int, needle: bytes, timeout_s: float) -> bytes:
    got = b""
    end = time.monotonic() + timeout_s
    while needle not in got and time.monotonic() < end:
        if select.select([fd], [], [], 0.1)[0]:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the child is gone
                break
            if not chunk:
                break
            got += chunk
    return got


def test_ctrl_c_in_interactive_top_restores_the_terminal(tmp_path: Path) -> None:
    # cbreak keeps ISIG: Ctrl-C is SIGINT, not a key; it gave an ExceptionGroup traceback
    cfg = str(config(tmp_path))
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # as default_sigint, after the fork
        os.chdir(REPO)
        os.execve(sys.executable, [*CLI, "--config", cfg, "top", "--interval", "0.5"],
                  os.environ | {"COLUMNS": "160", "LINES": "40"})
    try:
        before = termios.tcgetattr(fd)
        out = read_until(fd, b"NAME", 20)
        assert b"NAME" in out, out
        os.write(fd, b"\x03")
        out += read_until(fd, b"\x1b[?1049l", 10)
        deadline = time.monotonic() + 10
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            out += read_until(fd, b"\0", 0.1)
        assert done[0] == pid, "top did not exit"
        assert os.waitstatus_to_exitcode(done[1]) == 130
        assert b"Traceback" not in out and b"Warning" not in out
        assert out.rstrip().endswith(b"\x1b[?1049l")  # the alternate screen left, last
        after = termios.tcgetattr(fd)
        assert after[3] & (termios.ICANON | termios.ECHO) == termios.ICANON | termios.ECHO
        assert after[3] == before[3]
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)
