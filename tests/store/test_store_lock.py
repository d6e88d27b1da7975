"""One daemon per store: `guard.hold`'s lock, within a process and across processes."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hostagent.errors import StateError
from hostagent.store import guard

REPO = Path(__file__).resolve().parents[2]
HOLD = ("import sys\nfrom pathlib import Path\nfrom hostagent.errors import StateError\n"
        "from hostagent.store import guard\n"
        "try:\n    guard.hold(Path(sys.argv[1]))\nexcept StateError as err:\n"
        "    print(err)\n    sys.exit(3)\n")


def _other_process_holds(path: Path) -> tuple[int, str]:
    out = subprocess.run([sys.executable, "-c", HOLD, str(path)], capture_output=True,
                         text=True, check=False, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    return out.returncode, out.stdout


def test_holders_in_one_process_share_it_and_another_process_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state" / "state.db"
    first = guard.hold(path)
    second = guard.hold(path)  # a test's second Daemon on the store: shared, not refused
    rc, said = _other_process_holds(path)
    assert rc == 3
    assert f"another hostagent (pid {os.getpid()}) is using this state store" in said
    first.release()
    assert _other_process_holds(path)[0] == 3  # still held by `second`
    second.release()
    second.release()  # twice: no effect
    assert _other_process_holds(path)[0] == 0


def test_a_symlink_to_a_held_store_is_refused_both_ways(tmp_path: Path) -> None:
    """Two state paths, one a symbolic link to the other's store, are one store: each took
    the lock next to its own name and two daemons billed every period into one file."""
    real = tmp_path / "a" / "state.db"
    link = tmp_path / "b" / "state.db"
    real.parent.mkdir()
    link.parent.mkdir()
    real.write_bytes(b"")  # what is in it does not matter to the lock
    link.symlink_to(real)
    for mine, theirs in ((real, link), (link, real)):
        held = guard.hold(mine)
        rc, said = _other_process_holds(theirs)
        assert rc == 3, said
        assert f"{theirs}: another hostagent (pid {os.getpid()})" in said
        assert guard.held_by(theirs) == f"another hostagent (pid {os.getpid()})"
        held.release()
        assert _other_process_holds(theirs)[0] == 0
    assert guard.lock_path(link) == guard.lock_path(real) == real.with_name("state.db.lock")
    assert not link.with_name("state.db.lock").exists()


def test_a_dangling_link_locks_where_the_store_will_be(tmp_path: Path) -> None:
    real = tmp_path / "data" / "real.db"  # its directory not there yet either
    link = tmp_path / "state.db"
    link.symlink_to(real)
    guard.hold(link).release()
    assert real.with_name("real.db.lock").is_file()
    assert not (tmp_path / "state.db.lock").exists()


HOLD_AT = ("import fcntl, os, sys, time\n"
           "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
           "fcntl.flock(fd, fcntl.LOCK_EX)\nos.write(fd, b'%d\\n' % os.getpid())\n"
           "print('held', flush=True)\ntime.sleep(60)\n")


def test_held_by_also_sees_a_lock_left_next_to_the_link(tmp_path: Path) -> None:
    """A daemon started before the lock followed links holds ``state.db.lock`` next to the
    link: `store reset` through that link must still see it running."""
    real = tmp_path / "a" / "state.db"
    real.parent.mkdir()
    real.write_bytes(b"")
    link = tmp_path / "state.db"
    link.symlink_to(real)
    old = subprocess.Popen([sys.executable, "-c", HOLD_AT, str(tmp_path / "state.db.lock")],
                           text=True, stdout=subprocess.PIPE)
    try:
        assert old.stdout is not None and old.stdout.readline() == "held\n"
        assert guard.held_by(link) == f"another hostagent (pid {old.pid})"
        assert guard.held_by(real) is None  # the real store's own lock is free
    finally:
        old.kill()
        old.wait()
    assert guard.held_by(link) is None


def test_a_failed_start_removes_the_lock_file_it_created(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    guard.hold(path).release(discard=True)
    assert not guard.lock_path(path).exists()  # a refused store's directory as it was found
    guard.hold(path).release()
    assert guard.lock_path(path).exists()
    guard.hold(path).release(discard=True)  # not created by this hold: kept
    assert guard.lock_path(path).exists()


def test_no_lock_to_be_had_is_a_warning_not_a_refusal(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    def denied(*_a: object, **_kw: object) -> int:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(guard.os, "open", denied)
    with caplog.at_level(logging.WARNING):
        guard.hold(tmp_path / "state.db").release()
    assert "state store not locked" in caplog.text


def test_an_unreachable_lock_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(StateError, match="cannot lock the state store"):
        guard.hold(tmp_path / "loop" / "state.db")


RESET_HELD = ("import sys, time\nfrom pathlib import Path\nfrom hostagent.store import guard\n"
              "lock = guard.hold(Path(sys.argv[1]))\nprint('held', flush=True)\ntime.sleep(60)\n")


def test_store_reset_refuses_a_store_a_running_daemon_holds_even_with_force(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`store reset --force` moved a store aside under a running daemon, which went on
    committing to the moved file (its later passes lost to the next start). The lock says a
    daemon runs, whatever its heartbeat: refused, nothing moved; free again, reset works."""
    from hostagent.cli.main import main
    from tests.clocks import FakeClock
    from tests.store.test_guard import open_store
    from tests.store.test_unreachable import config

    path = tmp_path / "state" / "state.db"
    open_store(path, FakeClock()).close()
    cfg = str(config(tmp_path, path))
    assert guard.held_by(path) is None
    holder = subprocess.Popen([sys.executable, "-c", RESET_HELD, str(path)], text=True,
                              stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        assert guard.held_by(path) == f"another hostagent (pid {holder.pid})"
        for args in (["store", "reset"], ["store", "reset", "--force"]):
            assert main([*args, "--config", cfg]) != 0
            err = capsys.readouterr().err
            assert f"another hostagent (pid {holder.pid}) is running on this store" in err
            assert path.exists()  # nothing moved
    finally:
        holder.kill()
        holder.wait()
    assert guard.held_by(path) is None  # the kernel let go with the process
    assert main(["store", "reset", "--force", "--config", cfg]) == 0
    assert not path.exists()
