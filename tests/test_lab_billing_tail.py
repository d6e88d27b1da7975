"""The billing tail end to end: the real daemon (a subprocess, so kill -9 is real) on the lab's
libvirt with a throwaway guest of this module (slot 93, never halab-*, which are only read).

Each test compares what the daemon billed for the guest with libvirt's `cpu.time` and the tap's
host-side counters read just before a `virsh destroy`. The daemon watches the guest's end
(sources/stop_watch.py): it reads the final counters when the VM cgroup empties (the cgroup
stays ~1.5 s longer on the lab) and keeps the deleted tap's last counters, so the close-out bills
at least what was read before the destroy, and at most that plus the destroy's own CPU and a
ping. The unattributed CPU the daemon logs per pass stays near zero throughout. A NIC detached
from the running guest is billed exactly the final counters of its tap's RTM_DELLINK.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest
from pyroute2 import IPRoute

from tests import lab_support
from tests.test_lab import DaemonProc, assert_tiles, events_for, wait_for, write_config

pytestmark = pytest.mark.lab

SLOT = 93  # tap hatap93; no other test uses it
SAMPLE_S = 1.0


@pytest.fixture
def guest(lab_guests: list[str]) -> Iterator[str]:
    name = f"habill-{os.getpid() % 1000}"
    lab_support.define_extra_guest(name, SLOT)
    try:
        yield name
    finally:
        lab_support.remove_guest(name)


def config(tmp: Path, interval_s: float) -> Path:
    path = write_config(tmp, interval_s=interval_s)
    text = path.read_text().replace(
        "align = false\n", f"align = false\nsample_interval_s = {SAMPLE_S}\n")
    path.write_text(text)
    return path


def log_lines(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def passes(path: Path) -> list[dict[str, Any]]:
    return [d for d in log_lines(path) if d.get("msg") == "pass committed"]


def first_pass(path: Path) -> None:
    """The daemon's first pass, and 2 s more: the guest must start clearly after the store
    existed (its start time comes from /proc ticks and the 1 s boot time)."""
    wait_pass(path, 0)
    time.sleep(2)


def wait_pass(path: Path, after: int, timeout_s: float = 60) -> dict[str, Any]:
    """Wait for the pass after the `after`-th committed one; returns its log line."""
    wait_for(lambda: len(passes(path)) > after, timeout_s, f"pass {after + 1}")
    return passes(path)[after]


def destroy_now(name: str, at_s: float | None = None) -> tuple[int, int, int, float]:
    """(cpu.time ns, host tap rx, host tap tx, wall s) read just before `virsh destroy`; with
    `at_s`, the destroy is asked through libvirt's API at that wall time instead (virsh's own
    start takes 10–50 ms, too uneven to time a destroy against a pass)."""
    cpu = int(lab_support.virsh_domstats_raw(name)["cpu.time"])
    rx, tx = lab_support.tap_stats(f"{lab_support.TAP_PREFIX}{SLOT}")
    if at_s is not None:
        conn = libvirt.open(lab_support.URI)
        try:
            dom = conn.lookupByName(name)
            time.sleep(max(0.0, at_s - time.time()))
            t = time.time()
            dom.destroy()
        finally:
            conn.close()
        return cpu, rx, tx, t
    t = time.time()
    subprocess.run(["virsh", "-c", lab_support.URI, "destroy", name], check=True,
                   capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    return cpu, rx, tx, t


def show_tail_log(path: Path) -> None:
    """The daemon's lines about the guest's end (lifecycle events, close-outs, warnings) and
    its passes' times: printed, so a failure shows how the close-out came about."""
    for d in log_lines(path):
        msg = str(d.get("msg", ""))
        if d.get("level") != "info" or msg in ("pass committed", "incarnation closed out"):
            print(d.get("ts"), msg, {k: v for k, v in d.items()
                                     if k not in ("ts", "msg", "logger", "level")})


def check_close_out(evs: list[dict[str, Any]], cpu_ns: int, host_rx: int, host_tx: int,
                    started_s: float, destroyed_s: float) -> None:
    """Σ of the guest's events against the counters read just before the destroy."""
    print(f"destroy at {destroyed_s:.3f}")
    assert evs, "the guest was never billed"
    assert_tiles(evs)
    assert len({e["event_id"] for e in evs}) == len(evs)
    billed_cpu = sum(e["metrics"]["cpu_ns"] for e in evs)
    egress = sum(round(e["metrics"]["network_egress_mb"] * 2**20) for e in evs)
    ingress = sum(round(e["metrics"]["network_ingress_mb"] * 2**20) for e in evs)
    life_s = max(destroyed_s - started_s, 1.0)
    cpu_rate = cpu_ns / life_s
    print(f"cpu billed {billed_cpu / 1e6:.1f} ms of {cpu_ns / 1e6:.1f} ms (rate "
          f"{cpu_rate / 1e9:.2f} cpu/s); egress {egress} of {host_rx}; ingress {ingress} of "
          f"{host_tx}; events {len(evs)}")
    # The final counters, read when the cgroup emptied: at least what libvirt reported just
    # before the destroy (a light sample before it would be below), at most that plus the
    # read→destroy gap and QEMU's own CPU while it was killed (~10 ms seen) and the usec
    # rounding of cpu.stat.
    assert cpu_ns - 10**6 <= billed_cpu <= cpu_ns + cpu_rate * 0.5 + 100 * 10**6
    for billed, seen in ((egress, host_rx), (ingress, host_tx)):
        # The deleted tap's last counters: a ping (~100 bytes) may pass after the read.
        assert seen <= billed <= seen + 1500, (billed, seen)


def unattributed_s(log: Path) -> float:
    vals = [p.get("unattributed_cpu_s") for p in passes(log)]
    got = [v for v in vals if v is not None]
    assert got, "no unattributed figure (no cgroup v2 parent?)"
    print(f"unattributed CPU after the last pass: {got[-1]} s")
    return float(got[-1])


def test_destroy_at_a_random_moment_between_passes_is_billed_to_the_last_sample(
        tmp_path: Path, guest: str) -> None:
    interval_s = 12.0
    log = tmp_path / "daemon.log"
    d = DaemonProc(config(tmp_path, interval_s), log)
    try:
        first_pass(log)
        started = time.time()
        lab_support.start_guest(guest)
        n = len(passes(log))
        wait_pass(log, n)  # a pass sees the running guest
        time.sleep(random.uniform(SAMPLE_S, interval_s - 1.0))
        cpu, rx, tx, destroyed = destroy_now(guest)
        n = len(passes(log))
        wait_pass(log, n)  # the next pass commits the close-out
        wait_pass(log, n + 1)  # and one more: nothing else is billed
    finally:
        assert d.stop() == 0
    show_tail_log(log)
    check_close_out(events_for(tmp_path / "events.jsonl", guest), cpu, rx, tx,
                    started, destroyed)
    # The destroyed guest's tail after its last sample, at most: near zero.
    assert unattributed_s(log) <= SAMPLE_S * 2 + 0.5


def test_a_guest_started_after_a_pass_and_destroyed_before_the_next_is_billed(
        tmp_path: Path, guest: str) -> None:
    interval_s = 25.0
    log = tmp_path / "daemon.log"
    d = DaemonProc(config(tmp_path, interval_s), log)
    try:
        wait_pass(log, 0)
        first = passes(log)[0]
        t_pass = time.time()
        time.sleep(5)
        started = time.time()
        lab_support.start_guest(guest, wait=False)
        time.sleep(max(0.0, started + 10 - time.time()))
        cpu, rx, tx, destroyed = destroy_now(guest)
        assert len(passes(log)) == 1, "a pass ran while the guest lived: timing"
        assert destroyed - t_pass < interval_s
        wait_pass(log, 1)
    finally:
        assert d.stop() == 0
    show_tail_log(log)
    evs = events_for(tmp_path / "events.jsonl", guest)
    assert len(evs) == 1  # never seen by a pass: one close-out from its own zero
    assert evs[0]["period_ns"]["start"] >= int(started * 1e9) - 10**9
    assert first["domains"] >= 0
    check_close_out(evs, cpu, rx, tx, started, destroyed)
    assert unattributed_s(log) <= SAMPLE_S * 2 + 0.5


def test_kill_9_between_a_lifecycle_read_and_the_next_pass_bills_nothing_twice(
        tmp_path: Path, guest: str) -> None:
    interval_s = 12.0
    log = tmp_path / "daemon.log"
    cfg = config(tmp_path, interval_s)
    d = DaemonProc(cfg, log)
    first_pass(log)
    started = time.time()
    lab_support.start_guest(guest)  # READ_NOW and light samples, in memory only
    d.stop(signal.SIGKILL)
    d = DaemonProc(cfg, log)
    try:
        n = len(passes(log))
        wait_pass(log, n)
        wait_pass(log, n + 1)  # billed by two passes of the new daemon
        cpu, rx, tx, destroyed = destroy_now(guest)
        n = len(passes(log))
        wait_pass(log, n)
    finally:
        assert d.stop() == 0
    show_tail_log(log)
    # Nothing of the killed daemon's tails was committed; the guest is billed once, from its
    # own zero (it started after the store existed), to the last light sample.
    check_close_out(events_for(tmp_path / "events.jsonl", guest), cpu, rx, tx,
                    started, destroyed)
    assert unattributed_s(log) <= SAMPLE_S * 2 + 0.5



def test_a_destroy_that_a_pass_meets_is_billed_to_its_final_counters(
        tmp_path: Path, guest: str) -> None:
    """A pass whose stats call reaches libvirt just before a destroy does gets its answer only
    once the destroy is done, with the VM still running and its cgroup already removed (a /tmp
    probe: calls started 5–20 ms before the API's destroy; from its start on, the VM came back
    shut off). Passes start on whole seconds here (`align`) and each destroy is asked 4–13 ms
    after one starts: before, such destroys lost the CPU since the pass before (the stale
    reading was billed over the counters read when the cgroup emptied); the CI failure of a
    12 s pass lost 1.2 s."""
    log = tmp_path / "daemon.log"
    cfg = config(tmp_path, 1.0)
    cfg.write_text(cfg.read_text().replace("align = false\n", "align = true\n"))
    d = DaemonProc(cfg, log)
    ends = []
    try:
        first_pass(log)
        for after_s in (0.004, 0.007, 0.010, 0.013):  # the destroy this long after a pass starts
            lab_support.start_guest(guest)
            wait_pass(log, len(passes(log)))
            time.sleep(2)
            due = math.floor(time.time()) + 1.0
            if due - time.time() < 0.3:
                due += 1.0
            time.sleep(max(0.0, due + after_s - 0.25 - time.time()))
            ends.append(destroy_now(guest, at_s=due + after_s))
            time.sleep(3)
    finally:
        assert d.stop() == 0
    show_tail_log(log)
    met = sum(1 for d in log_lines(log) if str(d.get("msg", "")).startswith("VM process ended"))
    print(f"passes that met a destroy and found the VM's cgroup removed: {met}")
    by_incarnation: dict[str, list[dict[str, Any]]] = {}
    for e in events_for(tmp_path / "events.jsonl", guest):
        by_incarnation.setdefault(e["incarnation"], []).append(e)
    lives = sorted(by_incarnation.values(), key=lambda evs: evs[0]["period_ns"]["start"])
    assert len(lives) == len(ends)
    for evs, (cpu, rx, tx, destroyed) in zip(lives, ends, strict=True):
        check_close_out(evs, cpu, rx, tx, evs[0]["period_ns"]["start"] / 1e9, destroyed)


class TapEnd:
    """The RTM_DELLINK of one tap heard through pyroute2 (not the daemon's own parser): the
    tap's final host-side (rx, tx) bytes."""

    def __init__(self, tap: str) -> None:
        self.tap = tap
        self.final: tuple[int, int] | None = None
        self._listening = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()
        assert self._listening.wait(10), "no netlink listener"

    def _listen(self) -> None:
        with IPRoute() as ipr:  # pyroute2's socket works in the thread that made it
            ipr.bind()
            self._listening.set()
            while self.final is None:
                for m in ipr.get():
                    if m.get("event") == "RTM_DELLINK" and m.get_attr("IFLA_IFNAME") == self.tap:
                        stats = m.get_attr("IFLA_STATS64")
                        self.final = (stats["rx_bytes"], stats["tx_bytes"])

    def wait(self, timeout_s: float = 30) -> tuple[int, int]:
        self._thread.join(timeout_s)
        assert self.final is not None, f"{self.tap} was not deleted"
        return self.final


def test_a_nic_detached_between_passes_is_billed_to_its_final_counters(
        tmp_path: Path, guest: str) -> None:
    """`virsh detach-interface` at a random moment between two passes: the tap's end wakes
    the light samples, and the next pass bills the NIC up to the tap's final counters, exactly
    (the guest pings its tap every second, so every interval has bytes in both directions)."""
    interval_s = 12.0
    log = tmp_path / "daemon.log"
    tap = f"{lab_support.TAP_PREFIX}{SLOT}"
    d = DaemonProc(config(tmp_path, interval_s), log)
    try:
        first_pass(log)
        lab_support.start_guest(guest)  # after the store existed: billed from its zero
        n = len(passes(log))
        wait_pass(log, n)  # a pass sees the guest and its tap
        time.sleep(random.uniform(2.0, interval_s - 2.0))
        end = TapEnd(tap)
        subprocess.run(["virsh", "-c", lab_support.URI, "detach-interface", guest, "ethernet",
                        "--mac", f"52:54:00:4c:ab:{SLOT:02x}", "--live"], check=True,
                       capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
        host_rx, host_tx = end.wait()
        n = len(passes(log))
        wait_pass(log, n)  # the pass that reads the guest without its NIC
        wait_pass(log, n + 1)  # and one more: nothing else is billed for it
    finally:
        assert d.stop() == 0
    show_tail_log(log)
    evs = events_for(tmp_path / "events.jsonl", guest)
    assert_tiles(evs)
    egress = sum(round(e["metrics"]["network_egress_mb"] * 2**20) for e in evs)
    ingress = sum(round(e["metrics"]["network_ingress_mb"] * 2**20) for e in evs)
    print(f"egress {egress} of {host_rx}; ingress {ingress} of {host_tx}; events {len(evs)}")
    assert host_rx > 0 and host_tx > 0
    # The guest's transmit is the tap's receive: every byte up to the detach, once.
    assert (egress, ingress) == (host_rx, host_tx)
