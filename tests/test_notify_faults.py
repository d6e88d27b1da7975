"""sd_notify when the manager's socket is gone: one warning per run of failures, not one a pass."""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

import pytest

from hostagent.notify import Notifier


def test_a_missing_socket_warns_once_per_run_of_failures(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """NOTIFY_SOCKET naming a socket that is gone logged a warning at every pass, for good
    (2,880 a day at the default interval)."""
    path = tmp_path / "notify"
    n = Notifier({"NOTIFY_SOCKET": str(path)})
    with caplog.at_level(logging.DEBUG, logger="hostagent.notify"):
        for i in range(5):
            assert not n.pass_done(f"pass {i}")
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert "No such file or directory" in str(warnings[0].__dict__["error"])
        manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        manager.bind(str(path))
        try:
            assert n.pass_done("pass 5")
            assert manager.recv(4096).startswith(b"READY=1\n")
        finally:
            manager.close()
        assert "sd_notify works again" in caplog.text
        path.unlink()
        assert not n.pass_done("pass 6")  # a new run of failures: warned again
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2


def test_a_manager_that_does_not_read_never_blocks_the_caller(tmp_path: Path) -> None:
    """Past ~10 unread datagrams each send waited out a 1 s timeout, on the daemon's event
    loop thread: every pass stalled the API and delivery for a second."""
    path = tmp_path / "notify"
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(str(path))
    try:
        n = Notifier({"NOTIFY_SOCKET": str(path)})
        t0 = time.monotonic()
        sent = [n.pass_done(f"pass {i}") for i in range(40)]
        assert time.monotonic() - t0 < 0.5
        assert sent[0] and not sent[-1]  # the queue filled: later ones dropped, not waited on
        while True:  # the manager reads again: the next one gets through
            try:
                manager.recv(4096, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
        assert n.pass_done("after")
    finally:
        manager.close()
