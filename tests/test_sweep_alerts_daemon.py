"""Threshold alerts through the real daemon (`hostagent run`, a subprocess) on libvirt's test
driver, its domains in a node XML file, with a rules file and the JSONL audit sink.

The test driver reads no CPU or memory (`missing`), but each domain reports 0 bytes of network
egress: a `NetworkEgress >= 0 B` rule fires for every domain at its first pass and never
resolves by value, which makes the rule set (SIGHUP), the restart and storm control the only
things that move an alert.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.test_daemon_faults import Proc

NET_ANY = {"id": "net-any", "resource_type": "NetworkEgress",
           "threshold_type": {"Absolute": {"value": 0, "unit": "B"}}, "action": "Alert",
           "user_id": "*"}


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in started:
        p.kill()


def uuid_of(i: int) -> str:
    return f"00000000-0000-4000-8000-{i:012d}"


def node(tmp: Path, ids: list[int]) -> Path:
    path = tmp / "node.xml"
    path.write_text("<node>" + "".join(
        f"<domain type='test'><name>d{i}</name><uuid>{uuid_of(i)}</uuid>"
        "<memory>1048576</memory><vcpu>1</vcpu><os><type>hvm</type></os></domain>"
        for i in ids) + "</node>\n")
    return path


def config(tmp: Path, *, thresholds: str = "") -> Path:
    cfg = tmp / "hostagent.toml"
    cfg.write_text(f"""
[host]
node_id = "sweep"
[libvirt]
uri = "test://{tmp / 'node.xml'}"
[collector]
interval_s = 1
align = false
state_path = "{tmp / 'state.db'}"
[log]
level = "info"
format = "json"
[thresholds]
rules_path = "{tmp / 'rules.json'}"
repeat_interval_s = 0
{thresholds}
[[sinks]]
type = "jsonl"
path = "{tmp / 'events.jsonl'}"
""")
    return cfg


def alerts(tmp: Path) -> list[dict[str, Any]]:
    path = tmp / "events.jsonl"
    if not path.exists():
        return []
    docs = [orjson.loads(line) for line in path.read_bytes().splitlines() if line]
    return [d for d in docs if d.get("event_type") == "threshold_violation"]


def resource_events(tmp: Path) -> list[dict[str, Any]]:
    docs = [orjson.loads(line) for line in (tmp / "events.jsonl").read_bytes().splitlines()
            if line]
    return [d for d in docs if d.get("event_type") == "resource_usage"]


def wait_alerts(tmp: Path, p: Proc, n: int, timeout_s: float = 30.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while len(got := alerts(tmp)) < n:
        assert p.proc.poll() is None, p.text()[-3000:]
        assert time.monotonic() < deadline, (got, p.text()[-3000:])
        time.sleep(0.05)
    return got


def kinds(docs: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return sorted((d["instance_id"], d["transition"], d["reason"]) for d in docs)


def passes(p: Proc) -> int:
    return p.text().count('"pass committed"')


def test_sighup_delete_restore_and_restart_notify_each_change_once(
        tmp_path: Path, procs: list[Proc]) -> None:
    """Fire → SIGHUP with the rule deleted (a `resolved` each, "rule deleted") → SIGHUP with it
    back (fires again) → restart (nothing re-notified) → a domain gone while the daemon was down
    (its alert resolves at the first pass, "instance stopped", once)."""
    node(tmp_path, [0, 1])
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps([NET_ANY]))
    cfg = config(tmp_path)
    p = Proc(cfg, tmp_path / "log1")
    procs.append(p)
    got = wait_alerts(tmp_path, p, 2)
    assert kinds(got) == [(uuid_of(0), "exceeded", "value"), (uuid_of(1), "exceeded", "value")]
    n = passes(p)
    p.wait_for('"pass committed"', count=n + 3)
    assert len(alerts(tmp_path)) == 2  # once per crossing: no repeat (repeat_interval_s = 0)

    rules.write_text("[]")
    p.signal(signal.SIGHUP)
    got = wait_alerts(tmp_path, p, 4)
    assert kinds(got[2:]) == [(uuid_of(0), "resolved", "rule deleted"),
                              (uuid_of(1), "resolved", "rule deleted")]
    assert all(d["config"]["id"] == "net-any" for d in got[2:])

    rules.write_text(json.dumps([NET_ANY]))
    p.signal(signal.SIGHUP)
    got = wait_alerts(tmp_path, p, 6)
    assert kinds(got[4:]) == [(uuid_of(0), "exceeded", "value"), (uuid_of(1), "exceeded", "value")]

    rules.write_text(json.dumps([{**NET_ANY, "for_passes": 2}]))  # redefined while firing
    p.signal(signal.SIGHUP)
    got = wait_alerts(tmp_path, p, 10)
    assert kinds(got[6:]) == [(uuid_of(0), "exceeded", "value"), (uuid_of(0), "resolved",
                                                                 "rule changed"),
                              (uuid_of(1), "exceeded", "value"), (uuid_of(1), "resolved",
                                                                 "rule changed")]
    assert [d["config"].get("id") for d in got[6:]] == ["net-any"] * 4
    rules.write_text(json.dumps([NET_ANY]))  # and back: again a change
    p.signal(signal.SIGHUP)
    got = wait_alerts(tmp_path, p, 14)
    n = passes(p)
    p.wait_for('"pass committed"', count=n + 2)
    p.signal(signal.SIGTERM)
    assert p.wait() == 0

    q = Proc(cfg, tmp_path / "log2")
    procs.append(q)
    q.wait_for('"pass committed"', count=4)
    assert len(alerts(tmp_path)) == 14, kinds(alerts(tmp_path)[14:])  # a restart re-fires nothing
    q.signal(signal.SIGTERM)
    assert q.wait() == 0

    node(tmp_path, [0])  # d1 is gone (destroyed, undefined, migrated) while the daemon was down
    r = Proc(cfg, tmp_path / "log3")
    procs.append(r)
    r.wait_for('"pass committed"', count=4)
    r.signal(signal.SIGTERM)
    assert r.wait() == 0
    # The first pass reads every running domain and not d1: its alert resolves, once
    # ("instance stopped", at its last reading). Before, it stayed open with no notice until
    # d1's baseline expired (collector.baseline_retention_s, 30 days).
    got = alerts(tmp_path)
    assert kinds(got[14:]) == [(uuid_of(1), "resolved", "instance stopped")]
    last_period_end = max(e["period"]["end"] for e in resource_events(tmp_path)
                          if e["instance_id"] == uuid_of(1))
    assert got[14]["period"]["end"] == last_period_end  # when it was last seen running
    s = Proc(cfg, tmp_path / "log4")  # and never again
    procs.append(s)
    s.wait_for('"pass committed"', count=3)
    s.signal(signal.SIGTERM)
    assert s.wait() == 0
    assert len(alerts(tmp_path)) == 15


def test_storm_control_bounds_the_alerts_per_window(tmp_path: Path, procs: list[Proc]) -> None:
    """40 domains cross at once; channel_burst 5 and 300/min (5 a second): at most 5 in the first
    pass, then at most ~5 per 1 s pass, and every alert still arrives exactly once, with the
    count of held-back notices of its channel."""
    node(tmp_path, list(range(40)))
    (tmp_path / "rules.json").write_text(json.dumps([NET_ANY]))
    cfg = config(tmp_path, thresholds="channel_burst = 5\nchannel_per_minute = 300")
    p = Proc(cfg, tmp_path / "log")
    procs.append(p)
    got = wait_alerts(tmp_path, p, 40, timeout_s=60)
    n = passes(p)
    p.wait_for('"pass committed"', count=n + 2)
    p.signal(signal.SIGTERM)
    assert p.wait() == 0
    got = alerts(tmp_path)
    assert kinds(got) == sorted((uuid_of(i), "exceeded", "value") for i in range(40))
    stamps = sorted(int(d["timestamp"]) for d in got)  # unix seconds (the pass's end)
    first = [s for s in stamps if s == stamps[0]]
    assert len(first) == 5  # the burst
    for i, a in enumerate(stamps):  # any span of whole seconds: burst + 5 a second, no more
        for j in range(i, len(stamps)):
            assert j - i + 1 <= 5 + 5 * (stamps[j] - a + 1), stamps
    assert stamps[-1] - stamps[0] >= 5  # 35 after the burst at 5 a second
