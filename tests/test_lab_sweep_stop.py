"""A daemon stopped (SIGTERM) between two passes, after a VM ended (found by the billing sweep
of 2026-12-07).

The close-out of a VM that ended since the last pass lives in memory only (its tail: the final
counters the stop watch read when its cgroup emptied) until a pass commits it. A stop between
two passes ended the daemon without one, so a restart lost the VM's usage since its last pass,
as a kill -9 does: on the lab a guest destroyed 2 s after a 5 s pass and the daemon stopped
0.3 s later was billed 3,263.9 of its 3,429.8 ms of CPU and 532 of its 770 bytes of egress.
Now a stop that finds such a close-out (a tail with libvirt's STOPPED/CRASHED/UNDEFINED
reason) runs one pass more at once (`Collector.ended_in_memory`, `run_pass_at`).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostagent.accounting.closeout import LightReading
from hostagent.accounting.lifecycle import LifecycleEvent, LifecycleKind
from hostagent.collector import Collector
from hostagent.store.outbox import Store
from hostagent.tailing import TailTasks
from tests import lab_support
from tests.replay import Host
from tests.test_collector import make_collector
from tests.test_lab import DaemonProc, assert_tiles, events_for, write_config

SLOT = 98  # tap hatap98; no other test uses it


async def _one_vm_gone(tmp_path: Path) -> tuple[Host, Collector, Store, TailTasks, str,
                                                  LightReading]:
    """The recorded lab host after a pass and a light sample, one VM then gone from libvirt's
    list; (host, collector, store, tail tasks, the VM's uuid, its last light reading)."""
    host = Host(tmp_path, "lab-hybrid")
    coll, store = make_collector(host, tmp_path)
    tail = TailTasks(coll, clock=host.clock)
    assert (await coll.run_pass()).committed
    host.move_to_t1()
    assert await tail.sample(None) == len(host.bulk("t0"))
    gone = host.conn._domains()[0][0].UUIDString()
    last = next(t.latest for k, t in coll.tails.items() if k[0] == gone)
    assert last is not None and last.cpu_ns is not None
    real = host.conn._domains
    host.conn._domains = lambda: [(d, s) for d, s in real()  # type: ignore[method-assign]
                                  if d.UUIDString() != gone]
    host.clock.advance(1.0)
    return host, coll, store, tail, gone, last


async def _stop_commits_its_close_out(coll: Collector, gone: str, last: LightReading,
                                      start_cpu_ns: int) -> None:
    """A stop while the pass waits for its tick runs one pass, which bills the VM up to its
    last light reading; then, nothing ended, a stop runs none."""
    due_s = time.monotonic() + 3600
    assert coll.ended_in_memory()
    report = await coll.run_pass_at(due_s, stop=lambda: True)
    assert report is not None and report.committed, report
    (u,) = [u for u in report.usages if u.uuid == gone]
    assert u.period_end_ns == last.t_wall_ns
    assert last.cpu_ns is not None and u.cpu_ns == last.cpu_ns - start_cpu_ns
    assert not coll.ended_in_memory()  # closed out: its tail is gone, whatever the watch says
    assert await coll.run_pass_at(due_s, stop=lambda: True) is None


async def test_a_stop_between_passes_commits_the_close_out_of_a_vm_that_ended(
        tmp_path: Path) -> None:
    """Not a lab test: the recorded lab host. A stop while the pass waits for its tick runs
    no pass (None), unless a VM ended since the last one: then one pass commits its
    close-out (before: None, and the close-out was lost with the daemon)."""
    host, coll, store, tail, gone, last = await _one_vm_gone(tmp_path)
    try:
        assert not coll.ended_in_memory()  # nothing heard: a stop runs no pass
        assert await coll.run_pass_at(time.monotonic() + 3600, stop=lambda: True) is None
        await tail.on_event(LifecycleEvent(gone, "x", -1, LifecycleKind.STOPPED, "DESTROYED",
                                           host.clock.now().wall_ns, 0))
        await _stop_commits_its_close_out(coll, gone, last, host.cgroup_cpu_ns("t0", gone))
    finally:
        store.close()


async def test_a_stop_after_the_watch_saw_a_vm_end_but_before_libvirt_said_so_commits_it(
        tmp_path: Path) -> None:
    """Not a lab test. Libvirt's STOPPED comes ~1.5 s after a destroy; the stop watch sees
    the cgroup empty within ~50 ms (and takes the final counters). A stop in between found no
    close reason on the tail and ran no pass: the VM's usage since the last pass was lost.
    The watch's word now counts too (`Collector.ended_seen`)."""
    host, coll, store, _, gone, last = await _one_vm_gone(tmp_path)
    try:
        assert not coll.ended_in_memory()  # no close reason: libvirt has said nothing yet
        coll.ended_seen = lambda key: key[0] == gone  # the watch saw its cgroup empty
        await _stop_commits_its_close_out(coll, gone, last, host.cgroup_cpu_ns("t0", gone))
    finally:
        store.close()


@pytest.fixture
def guest(lab_guests: list[str]) -> Iterator[str]:
    name = f"hastop-{os.getpid() % 1000}"
    lab_support.define_extra_guest(name, SLOT)
    try:
        yield name
    finally:
        lab_support.remove_guest(name)


def _passes(log: Path) -> int:
    try:
        return log.read_text(errors="replace").count('"msg":"pass committed"')
    except OSError:
        return 0


def _wait_for(what: str, ok: object, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not ok():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _daemon_with_the_guest(tmp_path: Path, guest: str) -> tuple[Path, Path, DaemonProc]:
    """A daemon passing every 5 s, the guest started after its first pass (billed from zero)
    and read by a pass, ~1 s after it; (config, log, daemon)."""
    log = tmp_path / "daemon.log"
    cfg = write_config(tmp_path, interval_s=5.0)
    d = DaemonProc(cfg, log)
    _wait_for("first pass", lambda: _passes(log) >= 1)
    time.sleep(2)  # the guest starts clearly after the store existed: billed from zero
    lab_support.start_guest(guest)
    n = _passes(log)
    _wait_for("a pass of the guest", lambda: _passes(log) > n)
    time.sleep(1.0)
    return cfg, log, d


def _stopped_and_restarted(cfg: Path, log: Path, d: DaemonProc) -> DaemonProc:
    """`d` stopped (SIGTERM, exit 0), and a new daemon on its store once it made two passes."""
    assert d.stop(signal.SIGTERM) == 0
    d = DaemonProc(cfg, log)
    n = _passes(log)
    _wait_for("two passes after the restart", lambda: _passes(log) >= n + 2)
    return d


def _billed(tmp_path: Path, guest: str) -> tuple[int, int, int]:
    """The guest's events, checked (each once, tiling): CPU ns, egress and ingress bytes."""
    evs = events_for(tmp_path / "events.jsonl", guest)
    assert evs and len({e["event_id"] for e in evs}) == len(evs)
    assert_tiles(evs)
    return (sum(e["metrics"]["cpu_ns"] for e in evs),
            sum(round(e["metrics"]["network_egress_mb"] * 2**20) for e in evs),
            sum(round(e["metrics"]["network_ingress_mb"] * 2**20) for e in evs))


@pytest.mark.lab
def test_a_daemon_stopped_after_a_destroy_bills_the_vm_to_its_final_counters(
        tmp_path: Path, guest: str) -> None:
    """Passes every 5 s; the guest destroyed ~1 s after one, the daemon stopped once libvirt's
    STOPPED is in (before the next pass), then restarted for two passes: the guest is billed
    its final cgroup CPU (read by this test until the cgroup goes) and its tap's final bytes."""
    from tests.test_lab_billing_tail import TapEnd

    cfg, log, d = _daemon_with_the_guest(tmp_path, guest)
    try:
        fd = os.open(lab_support.vm_cgroup_v2_dir(guest) / "cpu.stat", os.O_RDONLY)
        final_usec = [0]

        def read_to_the_end() -> None:  # the cgroup's last counter, until libvirt removes it
            while True:
                try:
                    text = os.pread(fd, 4096, 0).decode()
                except OSError:
                    return
                final_usec[0] = int(text.split("usage_usec ", 1)[1].split()[0])
                time.sleep(0.005)

        reader = threading.Thread(target=read_to_the_end)
        reader.start()
        end = TapEnd(f"{lab_support.TAP_PREFIX}{SLOT}")
        n = _passes(log)
        lab_support.destroy_guest(guest)
        reader.join(30)
        os.close(fd)
        rx, tx = end.wait()
        _wait_for("STOPPED heard", lambda: '"kind":"STOPPED"' in log.read_text(errors="replace"))
        assert _passes(log) == n, "a pass came between the destroy and the stop: timing"
        d = _stopped_and_restarted(cfg, log, d)
    finally:
        assert d.stop() == 0
    cpu, egress, ingress = _billed(tmp_path, guest)
    print(f"cpu billed {cpu / 1e6:.3f} of {final_usec[0] / 1e3:.3f} ms; egress {egress} of {rx}; "
          f"ingress {ingress} of {tx}")
    assert final_usec[0] > 0 and not reader.is_alive()
    assert cpu == final_usec[0] * 1000
    assert (egress, ingress) == (rx, tx)


@pytest.mark.lab
def test_a_daemon_stopped_after_qemu_died_before_libvirt_said_so_bills_it_all(
        tmp_path: Path, guest: str) -> None:
    """QEMU killed (SIGKILL: a crash, the OOM killer), the daemon stopped ~0.2 s later, before
    libvirt's STOPPED/CRASHED is in: the stop watch has seen the cgroup empty and read the
    final counters, so the stop runs one pass more (`ended_seen`), and the restart bills on,
    tiled. Before, only a close reason from libvirt counted, and this stop lost the tail."""
    from tests.test_lab_billing_tail import TapEnd

    cfg, log, d = _daemon_with_the_guest(tmp_path, guest)
    try:
        fd = os.open(lab_support.vm_cgroup_v2_dir(guest) / "cpu.stat", os.O_RDONLY)
        end = TapEnd(f"{lab_support.TAP_PREFIX}{SLOT}")
        pid = lab_support.qemu_pid(guest)
        assert pid is not None
        n = _passes(log)
        os.kill(pid, signal.SIGKILL)
        _wait_for("the tap deleted", lambda: end.final is not None, timeout_s=10)
        time.sleep(0.2)  # the watch's wake-up (~50 ms) and its final sample
        final_usec = int(os.pread(fd, 4096, 0).decode().split("usage_usec ", 1)[1].split()[0])
        os.close(fd)
        heard = log.read_text(errors="replace")
        if '"kind":"STOPPED"' in heard or '"kind":"CRASHED"' in heard or _passes(log) != n:
            pytest.skip("libvirt's event or a pass came before the stop: not this window")
        d = _stopped_and_restarted(cfg, log, d)
        rx, tx = end.wait()
    finally:
        assert d.stop() == 0
    cpu, egress, ingress = _billed(tmp_path, guest)
    print(f"cpu billed {cpu / 1e6:.3f} of {final_usec / 1e3:.3f} ms; egress {egress} of {rx}; "
          f"ingress {ingress} of {tx}")
    assert cpu == final_usec * 1000
    assert (egress, ingress) == (rx, tx)
