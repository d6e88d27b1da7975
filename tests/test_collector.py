"""The pass on recorded host trees, with libvirt replaced by a connection replaying recorded stats.

The root is a symlink swung from the t0 tree to the t1 tree between passes, so cgroup files,
pid files and tap counters all move together as they did on the recorded host.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio

from hostagent.collector import Collector
from hostagent.config.load import from_mapping
from hostagent.model import Baseline
from hostagent.owners.resolver import Owners
from hostagent.sources.files import HostRoot
from hostagent.sources.libvirt import LibvirtSource
from hostagent.sources.net import SysfsLinkReader
from hostagent.store.outbox import Store
from tests.replay import FakeDomain, Host


def make_collector(host: Host, tmp: Path, **collector: Any) -> tuple[Collector, Store]:
    cfg = from_mapping({
        "host": {"node_id": "fixture-host"},
        "libvirt": {"uri": "replay:///", "call_timeout_s": 1.0},
        "paths": {"root": str(host.root)},
        "collector": {"state_path": str(tmp / "state.db"), **collector},
        "sinks": [{"type": "jsonl", "path": str(tmp / "events.jsonl")}],
    })
    store = Store.open(cfg.collector.state_path, clock=host.clock, node_id="fixture-host",
                       sink_names=["jsonl"])
    limiter = trio.CapacityLimiter(4)
    lv = LibvirtSource(cfg.libvirt, clock=host.clock, limiter=limiter,
                       connector=lambda uri, ro: host.conn)
    coll = Collector(cfg, clock=host.clock, store=store,
                     owners=Owners(cfg.owners, host.clock, None), libvirt_source=lv,
                     link_reader=SysfsLinkReader(HostRoot(str(host.root))), gpu_source=None,
                     limiter=limiter)
    return coll, store


@pytest.fixture(params=["lab-hybrid", "systemd-v2"])
def host(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Host]:
    return Host(tmp_path, request.param)


async def test_two_passes_bill_exactly_the_recorded_growth(host: Host, tmp_path: Path) -> None:
    coll, store = make_collector(host, tmp_path, count_preexisting=False)
    first = await coll.run_pass()
    assert first.committed, first.error
    assert first.domains == len(host.bulk("t0"))
    assert first.events == 0  # domains older than the store: baselines only, nothing billed
    host.move_to_t1()
    second = await coll.run_pass()
    assert second.committed, second.error
    assert second.events == second.domains
    t0, t1 = host.bulk("t0"), host.bulk("t1")
    for u in second.usages:
        assert u.period_end_ns - u.period_start_ns == int(host.meta["interval_s"] * 1e9)
        assert u.cpu_ns == t1[u.uuid]["cpu.time"] - t0[u.uuid]["cpu.time"]
        assert u.cpu_seconds == u.cpu_ns // 10**9
    assert host.conn.xml_calls == len(t0)  # XML read once per domain, not every pass
    payloads = [orjson.loads(p) for p in store_payloads(store)]
    assert {p["instance_id"] for p in payloads} == {u.instance_id for u in second.usages}
    store.close()


async def test_network_bytes_come_from_the_tap_in_guest_direction(tmp_path: Path) -> None:
    host = Host(tmp_path, "lab-hybrid")
    coll, store = make_collector(host, tmp_path)
    await coll.run_pass()
    links0 = {x["name"]: x for x in json.loads((host.src / "t0/net/links.json").read_text())}
    host.move_to_t1()
    report = await coll.run_pass()
    links1 = {x["name"]: x for x in json.loads((host.src / "t1/net/links.json").read_text())}
    by_name = {u.name: u for u in report.usages}
    for guest in host.meta["guests"]:
        u = by_name[guest["name"]]
        tap = guest["tap"]
        assert u.net_egress_bytes == links1[tap]["rx_bytes"] - links0[tap]["rx_bytes"]
        assert u.net_ingress_bytes == links1[tap]["tx_bytes"] - links0[tap]["tx_bytes"]
    store.close()


async def test_cgroup_files_are_read_afresh_when_the_root_moves(tmp_path: Path) -> None:
    """The cgroup reader lives across passes; a file kept open from the t0 tree must never
    answer for t1 (plain files are not kept: only cgroupfs says ENODEV when its file goes)."""
    host = Host(tmp_path, "lab-hybrid")
    coll, store = make_collector(host, tmp_path)
    await coll.run_pass()
    host.move_to_t1()
    report = await coll.run_pass()
    assert report.samples
    for s in report.samples:
        vm = host.src / "t1/sys/fs/cgroup/unified/machine" / f"qemu-{s.domid}-{s.name}.libvirt-qemu"
        psi = (vm / "cpu.pressure").read_text().split()[1]
        assert s.pressure is not None
        assert s.pressure.cpu_some_avg10 == float(psi.removeprefix("avg10="))
    coll.cgroups.close()
    store.close()


async def test_restart_resumes_from_persisted_baselines(tmp_path: Path) -> None:
    host = Host(tmp_path, "lab-hybrid")
    coll, store = make_collector(host, tmp_path)
    await coll.run_pass()
    store.close()
    host.move_to_t1()
    coll2, store2 = make_collector(host, tmp_path)  # a new daemon process on the same state
    report = await coll2.run_pass()
    assert report.events == report.domains > 0
    start = host.clock.wall_ns - int(host.meta["interval_s"] * 1e9)
    assert all(u.period_start_ns == start for u in report.usages)
    store2.close()


async def test_hung_bulk_call_is_abandoned_and_the_pass_completes(tmp_path: Path) -> None:
    host = Host(tmp_path, "lab-hybrid")
    coll, store = make_collector(host, tmp_path)
    await coll.run_pass()
    host.move_to_t1()
    host.conn.hang_bulk.set()
    try:
        t0 = time.monotonic()
        report = await coll.run_pass()
        elapsed = time.monotonic() - t0
    finally:
        host.conn.release.set()
    assert report.committed, report.error
    assert report.libvirt_path == "per-domain"
    assert report.events == report.domains > 0
    assert elapsed < 5  # call_timeout_s = 1 plus the per-domain calls
    store.close()


async def test_libvirt_down_commits_nothing_and_recovers(tmp_path: Path) -> None:
    host = Host(tmp_path, "lab-hybrid")
    calls = {"n": 0}

    def flaky(uri: str, ro: bool) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError("libvirtd is not running")
        return host.conn

    coll, store = make_collector(host, tmp_path)
    coll.libvirt._connector = flaky
    down = await coll.run_pass()
    assert not down.committed
    assert down.error is not None
    assert "libvirtd is not running" in down.error
    assert coll.libvirt.state == "down"
    host.clock.advance(1.0)  # past the first backoff
    up = await coll.run_pass()
    assert up.committed, up.error
    assert coll.libvirt.state == "connected"
    store.close()


async def test_a_domain_destroyed_mid_listing_is_not_billed_again(tmp_path: Path) -> None:
    """libvirt can return a domain being destroyed with id -1 and its old counters."""
    host = Host(tmp_path, "lab-hybrid")
    coll, store = make_collector(host, tmp_path)
    await coll.run_pass()
    host.move_to_t1()
    real = host.conn._domains

    def dying() -> list[tuple[FakeDomain, dict[str, Any]]]:
        out = real()
        dom, stats = out[0]
        entry = {**dom.entry, "id": -1}
        out[0] = (FakeDomain(entry, dom.xml), {**stats, "state.state": 5})
        return out

    host.conn._domains = dying  # type: ignore[method-assign]
    report = await coll.run_pass()
    assert report.committed, report.error
    assert report.domains == len(host.bulk("t1")) - 1
    assert all(u.cpu_ns < 10**9 * 5 for u in report.usages)
    store.close()


async def test_a_commit_past_the_pass_deadline_keeps_memory_and_store_in_step(
        tmp_path: Path) -> None:
    """The deadline must not cancel a started commit: that would re-bill the period."""
    host = Host(tmp_path, "lab-hybrid")
    coll, store = make_collector(host, tmp_path, pass_timeout_s=0.5)
    await coll.run_pass()
    host.move_to_t1()
    real_commit = store.commit_pass

    def slow_commit(*args: Any, **kw: Any) -> None:
        time.sleep(1.0)  # the pass deadline passes while this runs
        real_commit(*args, **kw)

    store.commit_pass = slow_commit  # type: ignore[method-assign]
    report = await coll.run_pass()
    assert report.committed, report.error
    assert coll.baselines == store.load_baselines()
    store.close()


async def test_baselines_of_long_gone_instances_are_pruned(tmp_path: Path) -> None:
    host = Host(tmp_path, "lab-hybrid")
    coll, store = make_collector(host, tmp_path, baseline_retention_s=3600)
    ghost = Baseline(instance_id="ghost", incarnation="9:9",
                     t_wall_ns=host.clock.wall_ns - 7200 * 10**9, cpu_ns=5)
    recent = Baseline(instance_id="recent", incarnation="8:8",
                      t_wall_ns=host.clock.wall_ns - 60 * 10**9, cpu_ns=5)
    store.commit_pass([ghost, recent], [])
    coll.baselines = store.load_baselines()
    report = await coll.run_pass()
    assert report.committed, report.error
    assert "ghost" not in coll.baselines
    assert "ghost" not in store.load_baselines()
    assert "recent" in store.load_baselines()
    store.close()


def store_payloads(store: Store) -> list[bytes]:
    import sqlite3

    db = sqlite3.connect(store.path)
    try:
        return [row[0] for row in db.execute("SELECT payload FROM events ORDER BY created_ns")]
    finally:
        db.close()
