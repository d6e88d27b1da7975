"""End-to-end on real libvirt + QEMU guests (the lab). Root; `make test` brings the lab up."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from hostagent.accounting import events
from hostagent.event_schema import load_schema
from tests import lab_support

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[1]


def write_config(tmp: Path, *, interval_s: float = 1.0, call_timeout_s: float = 3.0,
                 extra: str = "") -> Path:
    """A daemon config for one test; `extra` holds more tables (they go before [[sinks]])."""
    cfg = tmp / "hostagent.toml"
    cfg.write_text(f"""
[host]
node_id = "lab-test"
[libvirt]
uri = "qemu:///system"
call_timeout_s = {call_timeout_s}
[collector]
interval_s = {interval_s}
align = false
state_path = "{tmp}/state.db"
pass_timeout_s = 15
[log]
level = "debug"
{extra}
[[sinks]]
type = "jsonl"
path = "{tmp}/events.jsonl"
""")
    return cfg


def hostagent(*args: str) -> list[str]:
    return [sys.executable, "-m", "hostagent.cli", *args]


class DaemonProc:
    """The daemon as a real subprocess (so kill -9 is real)."""

    def __init__(self, cfg: Path, log_path: Path) -> None:
        self.cfg = cfg
        self.log_path = log_path
        self.log = log_path.open("ab")
        self.proc = subprocess.Popen(hostagent("--config", str(cfg), "run"), cwd=REPO,
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=timeout_s)
        self.log.close()
        # libvirt's own warning when a call runs on a freed connection (the SIGSEGV of a
        # close under an abandoned call): never acceptable, even when the process survived it.
        misuse = [line for line in self.log_path.read_text(errors="replace").splitlines()
                  if "is not a virObject" in line]
        assert not misuse, misuse
        return rc


VALIDATOR = jsonschema.Draft202012Validator(load_schema())


def read_events(path: Path) -> list[dict[str, Any]]:
    """Every event the daemon wrote, each checked against the JSON Schema and its semantics."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            doc = json.loads(line)
            VALIDATOR.validate(doc)
            assert events.semantic_errors(doc) == [], doc
            out.append(doc)
    return out


def dedupe(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for e in events:
        prev = seen.setdefault(e["event_id"], e)
        assert prev == e, "a redelivered event must be byte-for-byte the same event"
    return list(seen.values())


def wait_for(pred: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def events_for(path: Path, name_or_uuid: str) -> list[dict[str, Any]]:
    uuid = lab_support.domain_uuid(name_or_uuid)
    return sorted((e for e in dedupe(read_events(path)) if e["instance_id"] == uuid),
                  key=lambda e: e["period_ns"]["start"])


def assert_tiles(evs: list[dict[str, Any]]) -> None:
    for a, b in itertools.pairwise(evs):
        assert b["period_ns"]["start"] == a["period_ns"]["end"], (a, b)
        assert b["period"]["start"] == a["period"]["end"]
    for e in evs:
        assert e["period_ns"]["end"] > e["period_ns"]["start"]
        for key, value in e["metrics"].items():
            if isinstance(value, (int, float)):
                assert value >= 0, (key, e)


@pytest.fixture
def extra_guest(lab_guests: list[str]) -> Iterator[str]:
    """A guest of this test's own, removed afterwards (tests destroy/stop it)."""
    name = f"hatest-{os.getpid() % 1000}"
    lab_support.define_extra_guest(name, 90)
    try:
        yield name
    finally:
        lab_support.remove_guest(name)


def test_dump_agrees_with_virsh_tap_and_cgroup(lab_guests: list[str]) -> None:
    name = lab_guests[0]
    out = subprocess.run(hostagent("dump", name, "--json", "--interval", "1"), cwd=REPO,
                         capture_output=True, text=True, timeout=60, check=True)
    doc = json.loads(out.stdout)
    raw = lab_support.virsh_domstats_raw(name)
    counters = {c["name"]: c for c in doc["counters"]}
    # CPU: the same counter as libvirt's cpu.time, read within one sampling interval
    cpu_dump = counters["cpu_time"]["value"]
    cpu_virsh = int(raw["cpu.time"])
    rate = counters["cpu_time"]["rate_per_s"] or 1e9
    assert 0 <= cpu_virsh - cpu_dump <= rate * 3 + 2e8
    # cgroup v2 usage_usec is the same counter (LAB-NOTES)
    usage_ns = lab_support.cgroup_cpu_usage_ns(name)
    assert abs(usage_ns - cpu_dump) <= rate * 3 + 2e8
    # tap: guest egress == host tap rx; guest ingress == host tap tx
    nic = doc["domain"]["nics"][0]
    rx_host, tx_host = lab_support.tap_stats(nic["tap"])
    egress = counters[f"net[{nic['mac']}].guest_tx (egress)"]["value"]
    ingress = counters[f"net[{nic['mac']}].guest_rx (ingress)"]["value"]
    assert 0 <= rx_host - egress <= 20_000
    assert 0 <= tx_host - ingress <= 20_000
    assert abs(int(raw["net.0.rx.bytes"]) - tx_host) <= 20_000
    # disks from libvirt block stats
    wr = counters["disk[vda].write"]["value"]
    assert 0 <= int(raw["block.0.wr.bytes"]) - wr <= 4 * 1024 * 1024
    assert counters["disk[vda].capacity"]["value"] == int(raw["block.0.capacity"])
    # the event the daemon would emit is a valid resource_usage event over ~1 s
    ev = doc["event"]
    assert ev["event_type"] == "resource_usage"
    assert ev["version"] == "1.0"
    span_s = (ev["period_ns"]["end"] - ev["period_ns"]["start"]) / 1e9
    assert 0.9 <= span_s <= 5


def test_dump_unknown_domain_exits_2(lab_guests: list[str]) -> None:
    out = subprocess.run(hostagent("dump", "no-such-domain"), cwd=REPO, capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 2
    assert "no-such-domain" in out.stderr
    assert lab_guests[0] in out.stderr  # lists what does run


def test_cpu_seconds_sum_equals_cpu_time_growth(tmp_path: Path, extra_guest: str) -> None:
    # The guest starts after the store exists, so it is billed from its own zero.
    cfg = write_config(tmp_path)
    d = DaemonProc(cfg, tmp_path / "daemon.log")
    try:
        wait_for((tmp_path / "state.db").exists, 30, "the store")
        lab_support.start_guest(extra_guest)
        wait_for(lambda: len(events_for(tmp_path / "events.jsonl", extra_guest)) >= 6, 90,
                 "6 events of the new guest")
    finally:
        assert d.stop() == 0
    cpu_after = int(lab_support.virsh_domstats_raw(extra_guest)["cpu.time"])
    evs = events_for(tmp_path / "events.jsonl", extra_guest)
    assert_tiles(evs)
    total_ns = sum(e["metrics"]["cpu_ns"] for e in evs)
    total_s = sum(e["metrics"]["cpu_seconds"] for e in evs)
    assert total_s == total_ns // 10**9  # the fraction is carried, never truncated per event
    assert total_ns <= cpu_after
    # The guest ran on between the last pass and the read after it: well under 1 s of CPU.
    assert (cpu_after - total_ns) / 1e9 < 1.0
    assert evs[0]["period_ns"]["start"] >= lab_support.guest_start_wall_ns(extra_guest) - 10**9


def test_a_libvirtd_restart_loses_no_usage(tmp_path: Path, extra_guest: str) -> None:
    """libvirtd stops for a few passes and comes back; the guests run on. The passes in between
    fail (nothing committed), both connections are dropped and reopened, and the first event
    after it covers the outage: the events still tile and sum to the guest's whole cpu.time."""
    cfg = write_config(tmp_path)
    path = tmp_path / "events.jsonl"
    d = DaemonProc(cfg, tmp_path / "daemon.log")
    try:
        wait_for((tmp_path / "state.db").exists, 30, "the store")
        lab_support.start_guest(extra_guest)
        wait_for(lambda: len(events_for(path, extra_guest)) >= 3, 90, "events before")
        lab_support.stop_libvirtd()
        try:
            time.sleep(4)  # passes at 1 s find libvirt down
        finally:
            lab_support.start_libvirtd()
        after = len(events_for(path, extra_guest))
        wait_for(lambda: len(events_for(path, extra_guest)) >= after + 3, 90, "events after")
    finally:
        assert d.stop() == 0
    cpu_after = int(lab_support.virsh_domstats_raw(extra_guest)["cpu.time"])
    log_text = d.log_path.read_text()
    assert "libvirt down" in log_text
    assert "lifecycle events: connection lost" in log_text
    evs = events_for(path, extra_guest)
    assert_tiles(evs)
    assert len({e["incarnation"] for e in evs}) == 1  # the same QEMU: not a new incarnation
    assert max(e["period_ns"]["end"] - e["period_ns"]["start"] for e in evs) >= 3 * 10**9
    total_ns = sum(e["metrics"]["cpu_ns"] for e in evs)
    assert 0 <= cpu_after - total_ns < 10**9


def test_kill_9_leaves_no_gap_and_no_overlap(tmp_path: Path, lab_guests: list[str]) -> None:
    cfg = write_config(tmp_path)
    events_path = tmp_path / "events.jsonl"
    name = lab_guests[0]
    for round_ in range(3):
        d = DaemonProc(cfg, tmp_path / "daemon.log")
        want = 2 * (round_ + 1)
        wait_for(lambda w=want: len(events_for(events_path, name)) >= w, 60, f"{want} events")
        time.sleep(0.3 * round_)  # vary where in the cycle the kill lands
        d.stop(signal.SIGKILL)
    d = DaemonProc(cfg, tmp_path / "daemon.log")
    wait_for(lambda: len(events_for(events_path, name)) >= 8, 60, "events after restarts")
    assert d.stop() == 0
    for guest in lab_guests:
        evs = events_for(events_path, guest)
        assert len(evs) >= 6
        assert_tiles(evs)


def test_restart_of_guest_is_a_new_incarnation(tmp_path: Path, extra_guest: str) -> None:
    lab_support.start_guest(extra_guest)
    cfg = write_config(tmp_path)
    path = tmp_path / "events.jsonl"
    d = DaemonProc(cfg, tmp_path / "daemon.log")
    try:
        wait_for(lambda: len(events_for(path, extra_guest)) >= 2, 60, "first events")
        lab_support.destroy_guest(extra_guest)
        time.sleep(2)
        lab_support.start_guest(extra_guest)
        wait_for(lambda: len({e["incarnation"] for e in events_for(path, extra_guest)}) >= 2
                 and events_for(path, extra_guest)[-1]["metrics"]["cpu_ns"] > 0, 90,
                 "events of the new incarnation")
    finally:
        assert d.stop() == 0
    evs = events_for(path, extra_guest)
    assert_tiles(evs)
    incarnations = [e["incarnation"] for e in evs]
    first_new = next(i for i, inc in enumerate(incarnations) if inc != incarnations[0])
    # The new QEMU process is billed from its own zero: no negative, no huge value. A booting
    # TCG guest keeps more than one host thread busy, so the bound is the host's cores x span.
    new_cpu_s = evs[first_new]["metrics"]["cpu_ns"] / 1e9
    span_s = (evs[first_new]["period_ns"]["end"] - evs[first_new]["period_ns"]["start"]) / 1e9
    assert 0 < new_cpu_s <= span_s * (os.cpu_count() or 1) + 0.5


def test_sigterm_while_a_qemu_is_stopped_exits_cleanly(tmp_path: Path, lab_guests: list[str],
                                                       extra_guest: str) -> None:
    """The bulk call hung on the stopped QEMU is abandoned; shutdown leaves the connection to
    it (closing it under the call would free memory the call still uses) and exits 0 at once.
    """
    lab_support.start_guest(extra_guest)
    time.sleep(3)
    pid = lab_support.qemu_pid(extra_guest)
    assert pid is not None
    cfg = write_config(tmp_path, call_timeout_s=1.0)
    path = tmp_path / "events.jsonl"
    d = DaemonProc(cfg, tmp_path / "daemon.log")
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: "falling back to per-domain" in d.log_path.read_text(), 60,
                 "a bulk call hung on the stopped QEMU")
        before = len(events_for(path, lab_guests[0]))
        wait_for(lambda: len(events_for(path, lab_guests[0])) >= before + 1, 30,
                 "a pass while the bulk call is still hung")
        t0 = time.monotonic()
        assert d.stop() == 0
        assert time.monotonic() - t0 < 10
    finally:
        os.kill(pid, signal.SIGCONT)
        d.stop(signal.SIGKILL)  # failed before its stop: never a daemon left running
    assert_tiles(events_for(path, lab_guests[0]))


def test_stopped_qemu_does_not_stall_the_pass(tmp_path: Path, lab_guests: list[str],
                                              extra_guest: str) -> None:
    lab_support.start_guest(extra_guest)
    time.sleep(3)
    pid = lab_support.qemu_pid(extra_guest)
    cfg = write_config(tmp_path, call_timeout_s=2.0)
    path = tmp_path / "events.jsonl"
    d = DaemonProc(cfg, tmp_path / "daemon.log")
    try:
        wait_for(lambda: len(events_for(path, lab_guests[0])) >= 1, 60, "first event")
        os.kill(pid, signal.SIGSTOP)
        try:
            before = len(events_for(path, lab_guests[0]))
            t0 = time.monotonic()
            wait_for(lambda: len(events_for(path, lab_guests[0])) >= before + 4, 60,
                     "events for healthy guests while one QEMU is stopped")
            elapsed = time.monotonic() - t0
        finally:
            os.kill(pid, signal.SIGCONT)
    finally:
        assert d.stop() == 0
    # 4 passes at 1 s intervals with a 2 s call deadline: well under the 60 s budget
    assert elapsed < 30
    assert_tiles(events_for(path, lab_guests[0]))
    per_instance: dict[str, int] = defaultdict(int)
    for e in dedupe(read_events(path)):
        per_instance[e["instance_id"]] += 1
    assert per_instance[lab_support.domain_uuid(lab_guests[1])] >= 4
