"""The commands that inspect the store (`store check`, `outbox status | dead-letters`, and
`store reset` before it moves anything) open it read-only: they write, create and delete no
file, so any user who may read the store may run them, next to a running daemon or not. And
`store reset` that cannot rename a file says so in one line (exit 1), moving nothing."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from hostagent.cli.main import main
from hostagent.store import guard
from hostagent.store.outbox import Store
from tests.clocks import FakeClock
from tests.standins.queue import usage_event
from tests.store.test_guard import HOST, config, used_store
from tests.store.test_refusals import files

INSPECTING = (["store", "check"], ["outbox", "status"], ["outbox", "dead-letters"])


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_inspecting_a_stopped_daemons_store_creates_and_deletes_nothing(
        tmp_path: Path, clock: FakeClock, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "state.db"
    used_store(path, clock)
    (tmp_path / "state.db-wal").write_bytes(os.urandom(5000))  # stale garbage: SQLite ignores it
    cfg = str(config(tmp_path))
    before = files(tmp_path)
    for command in (*INSPECTING, ["check-config"]):
        args = [*command, cfg] if command == ["check-config"] else [*command, "--config", cfg]
        assert main(args) == 0, command
        assert files(tmp_path) == before, command  # no -shm created, the -wal kept as it was
    assert main(["store", "reset", "--config", cfg]) == 2  # healthy: refused
    assert files(tmp_path) == before
    assert "state store OK" in capsys.readouterr().out


def test_inspecting_reads_a_running_daemons_log(
        tmp_path: Path, clock: FakeClock, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "state.db"
    daemon = Store.open(path, clock=clock, node_id=HOST, sink_names=("q",))
    try:
        daemon.commit_pass([], [usage_event(f"i{i}", 0) for i in range(4)])  # in the WAL only
        db = path.read_bytes()
        assert main(["outbox", "status", "--json", "--config", str(config(tmp_path))]) == 0
        doc = orjson.loads(capsys.readouterr().out)
        assert [(s["sink"], s["pending"]) for s in doc["sinks"]] == [("q", 4)]
        assert path.read_bytes() == db  # not checkpointed by the reader
        daemon.commit_pass([], [usage_event("i9", 0)])  # the daemon still writes
    finally:
        daemon.close()


def test_a_log_without_its_index_is_not_read_by_creating_one(
        tmp_path: Path, clock: FakeClock, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "state.db"
    daemon = Store.open(path, clock=clock, node_id=HOST, sink_names=("q",))
    daemon.commit_pass([], [usage_event("i", 0)])
    wal = (tmp_path / "state.db-wal").read_bytes()
    daemon.close()  # checkpointed; the log and its index removed
    (tmp_path / "state.db-wal").write_bytes(wal)  # as a copy without the -shm leaves it
    cfg = str(config(tmp_path))
    before = files(tmp_path)
    assert main(["store", "check", "--config", cfg]) == 1
    err = capsys.readouterr().err
    assert "state.db-wal holds commits and state.db-shm is missing" in err
    assert files(tmp_path) == before
    assert main(["run", "--once", "--config", cfg]) == 0  # the daemon's start recovers it


@contextlib.contextmanager
def readable_dir() -> Iterator[Path]:
    """A directory another user may read (pytest's tmp_path is private to its user)."""
    d = Path(tempfile.mkdtemp(prefix="hostagent-ro-"))
    try:
        d.chmod(0o755)
        yield d
    finally:
        shutil.rmtree(d)


def as_nobody(args: list[str]) -> subprocess.CompletedProcess[str]:
    """`hostagent ARGS` run as user nobody (the tests run as root here)."""
    return subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                           sys.executable, "-m", "hostagent.cli", *args],
                          capture_output=True, text=True, timeout=60, check=False,
                          cwd=Path(__file__).parents[2])


@functools.cache
def nobody_can_run_hostagent() -> bool:
    """User nobody can run this checkout's hostagent: not so when the checkout or its venv is
    under a directory only root may enter (a `mktemp -d` clone is 0700)."""
    return as_nobody(["--version"]).returncode == 0


needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None or not nobody_can_run_hostagent(),
    reason="needs root, setpriv, and a checkout user nobody may read, to run as another user")


@needs_root
@pytest.mark.parametrize("daemon_running", [False, True], ids=["stopped", "running"])
def test_inspecting_works_for_a_user_who_may_only_read(clock: FakeClock,
                                                        daemon_running: bool) -> None:
    with readable_dir() as d:
        path = d / "state.db"
        used_store(path, clock)
        daemon = Store.open(path, clock=clock, node_id=HOST, sink_names=("q",)) \
            if daemon_running else None
        try:
            for f in d.iterdir():
                f.chmod(0o644)
            cfg = str(config(d))
            before = files(d)
            for command in INSPECTING:
                done = as_nobody([*command, "--config", cfg])
                assert done.returncode == 0, (command, done.stderr)
                assert "Traceback" not in done.stderr
                assert files(d) == before or daemon_running, command
        finally:
            if daemon is not None:
                daemon.close()


@needs_root
def test_store_reset_by_a_user_who_may_not_rename_says_what_to_do(clock: FakeClock) -> None:
    with readable_dir() as d:
        path = d / "state.db"
        path.write_bytes(os.urandom(8192))  # garbage: refused, so reset needs no --force
        path.chmod(0o644)
        cfg = str(config(d))
        done = as_nobody(["store", "reset", "--config", cfg])
        assert done.returncode == 1 and not done.stdout
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
        assert f"{path}: cannot move it aside" in done.stderr
        assert "Permission denied" in done.stderr and "service user" in done.stderr
        assert "nothing was moved" in done.stderr and path.exists()


@pytest.mark.parametrize("fail_at", [0, 1], ids=["the store", "its marker"])
def test_store_reset_moves_all_or_nothing(
        tmp_path: Path, clock: FakeClock, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, fail_at: int) -> None:
    path = tmp_path / "state.db"
    used_store(path, clock)
    cfg = str(config(tmp_path))
    before = files(tmp_path)
    real = os.replace
    calls: list[object] = []

    def replace(src: object, dst: object) -> None:
        calls.append(src)
        if len(calls) == fail_at + 1:
            raise PermissionError(errno.EACCES, "Permission denied", str(src))
        real(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "replace", replace)
    assert main(["store", "reset", "--force", "--config", cfg]) == 1
    out, err = capsys.readouterr()
    assert not out and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("hostagent: ")
    assert "cannot move it aside" in err and "Permission denied" in err
    assert "nothing was moved" in err and "`hostagent store reset` as the service user" in err
    assert files(tmp_path) == before  # what was moved first is back
    assert not list(tmp_path.glob("*.broken-*"))


def test_store_reset_that_cannot_inspect_answers_on_stderr(
        tmp_path: Path, clock: FakeClock, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "state.db"
    daemon = Store.open(path, clock=clock, node_id=HOST, sink_names=("q",))
    daemon.commit_pass([], [usage_event("i", 0)])
    wal = (tmp_path / "state.db-wal").read_bytes()
    daemon.close()
    (tmp_path / "state.db-wal").write_bytes(wal)  # unreadable without creating its -shm
    assert main(["store", "reset", "--config", str(config(tmp_path))]) == 1
    out, err = capsys.readouterr()
    assert not out and "not resetting a store that cannot be inspected" in err
    assert guard.marker_path(path).exists() and path.exists()
