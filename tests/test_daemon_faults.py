"""Fault injection on the real daemon (a subprocess): signals at odd moments, a second daemon
on the same store, a store whose creation is cut short. No lab needed: libvirt is a socket
that accepts and never answers (start-up then waits `call_timeout_s` for its first
connection, a window that is seconds long on a real host too) or the in-process test driver.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


class SilentLibvirt:
    """A unix socket that accepts connections and never answers: libvirt hung."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(16)
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self) -> None:
        self.listener.close()
        for conn in self.accepted:
            conn.close()


@pytest.fixture
def silent(tmp_path: Path) -> Iterator[SilentLibvirt]:
    s = SilentLibvirt(tmp_path / "libvirt.sock")
    try:
        yield s
    finally:
        s.close()


def write_config(tmp: Path, uri: str, *, call_timeout_s: float = 3.0,
                 state_path: Path | None = None, events: Path | None = None) -> Path:
    cfg = tmp / "hostagent.toml"
    cfg.write_text(f"""
[host]
node_id = "faults"
[libvirt]
uri = "{uri}"
call_timeout_s = {call_timeout_s}
[collector]
interval_s = 1
align = false
state_path = "{state_path or tmp / 'state.db'}"
[log]
level = "info"
format = "json"
[[sinks]]
type = "jsonl"
path = "{events or tmp / 'events.jsonl'}"
""")
    return cfg


class Proc:
    """`hostagent run` as a real subprocess, its stderr in a file."""

    def __init__(self, cfg: Path, log: Path) -> None:
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hostagent.cli", "--config", str(cfg), "run"],
                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONPATH": str(REPO)})

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, needle: str, timeout_s: float = 30.0, count: int = 1) -> None:
        deadline = time.monotonic() + timeout_s
        while self.text().count(needle) < count:
            if self.proc.poll() is not None:
                raise AssertionError(f"exited {self.proc.returncode} before {needle!r}:\n"
                                     + self.text()[-3000:])
            if time.monotonic() > deadline:
                raise AssertionError(f"no {needle!r} in {timeout_s}s:\n" + self.text()[-3000:])
            time.sleep(0.02)

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout_s: float = 30.0) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("the daemon hung:\n" + self.text()[-3000:]) from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in started:
        p.kill()


def _start(procs: list[Proc], cfg: Path, log: Path) -> Proc:
    p = Proc(cfg, log)
    procs.append(p)
    return p


# --- signals at odd moments ----------------------------------------------------------------


def test_a_reload_and_a_stop_during_start_up_are_acted_on_not_fatal(
        tmp_path: Path, silent: SilentLibvirt, procs: list[Proc]) -> None:
    """SIGHUP while start-up waits for libvirt's first answer killed the daemon (the default
    action: systemd's Restart=on-failure does not restart a death by SIGHUP); now it is held
    and the config reloaded once the daemon listens, and the SIGTERM after it a clean stop."""
    cfg = write_config(tmp_path, f"qemu:///system?socket={silent.path}", call_timeout_s=4)
    p = _start(procs, cfg, tmp_path / "log")
    p.wait_for('"threshold rules loaded"')  # Daemon.build: the config is read, start-up goes on
    for _ in range(20):  # a storm of them
        p.signal(signal.SIGHUP)
    time.sleep(0.3)
    assert p.proc.poll() is None, p.text()[-2000:]
    p.signal(signal.SIGTERM)
    assert p.wait() == 0, p.text()[-3000:]
    text = p.text()
    assert '"config reloaded"' in text
    assert '"stop requested; finishing the pass in progress"' in text
    assert "Traceback" not in text


def test_sigusr1_and_sigusr2_are_logged_and_ignored(
        tmp_path: Path, silent: SilentLibvirt, procs: list[Proc]) -> None:
    """A logrotate postrotate's `kill -USR1` ended the daemon (killed by SIGUSR1, mid-pass)."""
    cfg = write_config(tmp_path, f"qemu:///system?socket={silent.path}", call_timeout_s=0.5)
    p = _start(procs, cfg, tmp_path / "log")
    p.wait_for('"pass failed"')  # running: libvirt does not answer, the loop goes on
    p.signal(signal.SIGUSR1)
    p.signal(signal.SIGUSR2)
    p.wait_for('"signal ignored', count=2, timeout_s=10)
    assert p.proc.poll() is None
    p.signal(signal.SIGTERM)
    assert p.wait() == 0, p.text()[-3000:]


def test_a_second_sigterm_while_shutting_down_is_not_a_kill(
        tmp_path: Path, procs: list[Proc]) -> None:
    """After the first SIGTERM the daemon's receiver closes before the store does; a second
    SIGTERM then met the default action (exit -15 while closing). Sent in a tight loop from
    the first one until the process is gone, every one of them must be held."""
    node = tmp_path / "node.xml"
    node.write_text("<node>" + "".join(
        f"<domain type='test'><name>d{i}</name><uuid>00000000-0000-4000-8000-{i:012d}</uuid>"
        "<memory>1048576</memory><vcpu>1</vcpu><os><type>hvm</type></os></domain>"
        for i in range(200)) + "</node>\n")
    cfg = write_config(tmp_path, f"test://{node}")
    for attempt in range(3):
        log = tmp_path / f"log{attempt}"
        p = _start(procs, cfg, log)
        p.wait_for('"pass committed"')
        p.signal(signal.SIGTERM)
        while p.proc.poll() is None:
            try:
                p.signal(signal.SIGTERM)
            except ProcessLookupError:
                break
            time.sleep(0.002)
        assert p.wait() == 0, p.text()[-3000:]


# --- one daemon per store --------------------------------------------------------------------


def _node(tmp: Path, n: int = 20) -> Path:
    node = tmp / "node.xml"
    node.write_text("<node>" + "".join(
        f"<domain type='test'><name>d{i}</name><uuid>00000000-0000-4000-8000-{i:012d}</uuid>"
        "<memory>1048576</memory><vcpu>1</vcpu><os><type>hvm</type></os></domain>"
        for i in range(n)) + "</node>\n")
    return node


def test_a_second_daemon_on_the_same_store_is_refused(
        tmp_path: Path, procs: list[Proc]) -> None:
    """Both ran, each committing passes from the same baselines: every period billed twice
    (352 events where 176 tile, on the lab's 8 guests in 22 s). The second is now refused,
    naming the first, and the first goes on; once it is gone (kill -9 too) a new one starts."""
    cfg = write_config(tmp_path, f"test://{_node(tmp_path)}")
    first = _start(procs, cfg, tmp_path / "log1")
    first.wait_for('"pass committed"')
    second = _start(procs, cfg, tmp_path / "log2")
    assert second.wait(timeout_s=30) == 1
    said = second.text()
    assert (f"{tmp_path}/state.db: another hostagent (pid {first.proc.pid}) is using this "
            "state store") in said, said
    assert "Traceback" not in said
    n = first.text().count('"pass committed"')
    first.wait_for('"pass committed"', count=n + 1)  # the first one was not disturbed
    first.proc.kill()
    first.proc.wait()
    third = _start(procs, cfg, tmp_path / "log3")
    third.wait_for('"pass committed"')
    third.signal(signal.SIGTERM)
    assert third.wait() == 0


def test_a_second_daemon_reaching_the_store_through_a_symlink_is_refused(
        tmp_path: Path, procs: list[Proc]) -> None:
    """A second config whose state_path is a symbolic link to the first one's store: the
    second daemon took its own lock next to the link and both committed into one file, every
    period billed twice under different event ids. The lock is the store file's now: refused,
    naming the first, and nothing of the second's beside the link but its marker."""
    node = _node(tmp_path)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    cfg_a = write_config(a, f"test://{node}")
    cfg_b = write_config(b, f"test://{node}")
    first = _start(procs, cfg_a, tmp_path / "log1")
    first.wait_for('"pass committed"')
    (b / "state.db").symlink_to(a / "state.db")
    second = _start(procs, cfg_b, tmp_path / "log2")
    assert second.wait(timeout_s=30) == 1
    said = second.text()
    assert (f"{b}/state.db: another hostagent (pid {first.proc.pid}) is using this "
            "state store") in said, said
    assert "Traceback" not in said
    assert not (b / "state.db.lock").exists()
    assert not (b / "events.jsonl").exists()  # it billed nothing
    first.signal(signal.SIGTERM)
    assert first.wait() == 0
    third = _start(procs, cfg_b, tmp_path / "log3")  # alone, through the link: it runs
    third.wait_for('"pass committed"')
    third.signal(signal.SIGTERM)
    assert third.wait() == 0


# --- a first start cut short -----------------------------------------------------------------

_KILLED_CREATING = """
import os, signal, sys
from hostagent.clock import SystemClock
from hostagent.store import schema, sqlite_tx
from hostagent.store.outbox import Store

def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)

if sys.argv[2] == "after-connect":
    real = sqlite_tx.connect
    def connect(path):
        conn = real(path)
        conn.execute("PRAGMA journal_mode=WAL")  # the file exists, its header written or not
        die()
    sqlite_tx.connect = connect
else:
    real_statements = schema.statements
    def statements(ddl):
        for i, statement in enumerate(real_statements(ddl)):
            if i == 3:
                die()
            yield statement
    schema.statements = statements
Store.open(sys.argv[1], clock=SystemClock(), node_id="faults", sink_names=["jsonl"])
"""


@pytest.mark.parametrize("moment", ["after-connect", "mid-schema"])
def test_a_kill_while_the_first_start_creates_the_store_leaves_no_stub(
        tmp_path: Path, moment: str) -> None:
    """kill -9 (or a stop, an OOM, a power cut) while the very first start created the store
    left a 0-byte or table-less state.db that every later start refused as lost billing state
    (`hostagent store reset` by hand): 51 of 60 starts killed in the first 10 ms of the file's
    life. The store is now made whole under a temporary name and linked into place."""
    from hostagent.clock import SystemClock
    from hostagent.store.outbox import Store

    state = tmp_path / "state" / "state.db"
    out = subprocess.run([sys.executable, "-c", _KILLED_CREATING, str(state), moment],
                         check=False, cwd=REPO, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == -signal.SIGKILL, out.stderr
    store = Store.open(state, clock=SystemClock(), node_id="faults", sink_names=["jsonl"])
    try:
        assert store.created_ns > 0
    finally:
        store.close()
    assert sorted(p.name for p in state.parent.iterdir()
                  if not p.name.endswith(("-wal", "-shm"))) == ["state.db", "state.db.id"]


# --- the store deleted under a running daemon ------------------------------------------------


def _deleted_under_the_daemon(tmp: Path, procs: list[Proc], name: str) -> tuple[Proc, Path]:
    """A daemon on a test-driver node whose store file `name` is deleted after its first pass,
    once it has reported that twice; (the daemon, its config)."""
    cfg = write_config(tmp, f"test://{_node(tmp)}")
    p = _start(procs, cfg, tmp / "log")
    p.wait_for('"pass committed"')
    (tmp / name).unlink()
    p.wait_for('"state store deleted or replaced while the daemon runs"', count=2)
    return p, cfg


def test_a_store_deleted_under_the_running_daemon_is_reported_every_pass(
        tmp_path: Path, procs: list[Proc]) -> None:
    """`rm state.db` under a running daemon: it went on committing to the deleted file without
    a word, for as long as it ran, and only the next start (days later: an upgrade) refused the
    state. Every pass now logs it as an error (and says it in STATUS) while the daemon goes on
    delivering from the file it has open."""
    p, _ = _deleted_under_the_daemon(tmp_path, procs, "state.db")
    assert '"what":"store deleted"' in p.text()
    n = p.text().count('"pass committed"')
    p.wait_for('"pass committed"', count=n + 1)
    p.signal(signal.SIGTERM)
    assert p.wait() == 0


def test_a_write_ahead_log_deleted_under_the_running_daemon_is_reported(
        tmp_path: Path, procs: list[Proc]) -> None:
    """`rm state.db-wal` under a running daemon: SQLite goes on in the deleted log, so a kill -9
    then took the store back to its last checkpoint without a word (on the lab: baselines
    gone, 0.43 s of every guest's usage never billed; with a later checkpoint, periods billed
    twice under event ids already sent). Every pass now says so, until a clean stop writes the
    log into the store; the restart after that one bills on, tiled."""
    p, cfg = _deleted_under_the_daemon(tmp_path, procs, "state.db-wal")
    assert '"what":"write-ahead log deleted"' in p.text()
    p.signal(signal.SIGTERM)
    assert p.wait() == 0
    again = _start(procs, cfg, tmp_path / "log2")
    again.wait_for('"pass committed"', count=2)
    again.signal(signal.SIGTERM)
    assert again.wait() == 0
    assert "state store deleted or replaced" not in again.text()


def test_a_write_ahead_log_deleted_then_a_kill_9_loses_nothing(
        tmp_path: Path, procs: list[Proc]) -> None:
    """`rm state.db-wal`, then kill -9 before any clean stop: the commits since the last
    checkpoint lived only in the deleted log, so the restart took the store back in time (its
    baselines and outbox as at creation: periods billed again). Now the daemon checkpoints the
    log into the store as soon as it sees it gone, and every pass commit after: the restart
    goes on from the last pass, each instance's periods tiling, no event id reused."""
    p, cfg = _deleted_under_the_daemon(tmp_path, procs, "state.db-wal")
    assert "its commits were copied into the store file" in p.text()
    n = p.text().count('"pass committed"')
    p.wait_for('"pass committed"', count=n + 2)
    p.proc.kill()
    p.proc.wait()
    again = _start(procs, cfg, tmp_path / "log2")
    again.wait_for('"pass committed"', count=2)
    again.signal(signal.SIGTERM)
    assert again.wait() == 0
    by_id: dict[str, dict[str, object]] = {}
    by_instance: dict[str, list[tuple[int, int]]] = {}
    for line in (tmp_path / "events.jsonl").read_bytes().splitlines():
        e = json.loads(line)
        if e.get("event_type") != "resource_usage":
            continue
        assert by_id.setdefault(e["event_id"], e) == e, "an event id reused for another event"
    for e in by_id.values():
        period = e["period_ns"]
        assert isinstance(period, dict)
        by_instance.setdefault(str(e["instance_id"]), []).append(
            (period["start"], period["end"]))
    assert len(by_instance) == 20
    for instance, periods in by_instance.items():
        periods.sort()
        for (_, end), (start, _) in itertools.pairwise(periods):
            assert start == end, (instance, periods)  # no period billed twice, none skipped
