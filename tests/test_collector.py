"""The pass on recorded host trees, with libvirt replaced by a connection replaying recorded stats.

The root is a symlink swung from the t0 tree to the t1 tree between passes, so cgroup files,
pid files and tap counters all move together as they did on the recorded host.
"""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import orjson
import pytest
import trio

from hostagent import handoff
from hostagent.collector import Collector
from hostagent.config.load import from_mapping
from hostagent.model import CPU_FROM_CGROUP, Baseline
from hostagent.owners.resolver import Owners
from hostagent.sources.domain_files import PSI_EVERY_S
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


def editable_host(tmp: Path, name: str) -> Host:
    """A recorded host whose trees are a copy under `tmp/src`, for a test to change."""
    host = Host(tmp, name)
    src = tmp / "src"
    shutil.copytree(host.src, src, symlinks=True)
    host.src = src
    host.root.unlink()
    host.root.symlink_to(src / "t0")
    return host


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
    # CPU is the VM cgroup's counter wherever that is found; the first stats call asks
    # libvirt for it too (a new daemon), the second does not (tests/replay.py honours it).
    assert [bool(m & libvirt.VIR_DOMAIN_STATS_CPU_TOTAL) for m in host.conn.masks] == [
        True, False]
    t0 = host.bulk("t0")
    for u in second.usages:
        assert u.period_end_ns - u.period_start_ns == int(host.meta["interval_s"] * 1e9)
        assert u.cpu_ns == host.cgroup_cpu_ns("t1", u.uuid) - host.cgroup_cpu_ns("t0", u.uuid)
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
    host.clock.advance(PSI_EVERY_S)  # PSI files are re-read only every PSI_EVERY_S
    report = await coll.run_pass()
    assert report.samples
    for s in report.samples:
        vm = host.src / "t1/sys/fs/cgroup/unified/machine" / f"qemu-{s.domid}-{s.name}.libvirt-qemu"
        psi = (vm / "cpu.pressure").read_text().split()[1]
        assert s.pressure is not None
        assert s.pressure.cpu_some_avg10 == float(psi.removeprefix("avg10="))
    coll.cgroups.close()
    store.close()


async def test_without_libvirt_figures_the_pass_reads_cgroup_usage_but_no_limit(
        tmp_path: Path) -> None:
    """Where libvirt gives neither cpu.time nor balloon stats, CPU and memory come from the
    cgroup; the memory limit, which nothing uses, is never read (an unreadable memory.max is
    not even noticed)."""
    host = editable_host(tmp_path, "systemd-v2")
    src = host.src
    for t in ("t0", "t1"):
        bulk_path = src / t / "libvirt" / "bulk_stats.json"
        entries = json.loads(bulk_path.read_text())
        for e in entries:
            e["stats"] = {k: v for k, v in e["stats"].items()
                          if not k.startswith(("cpu.", "balloon."))}
        bulk_path.write_text(json.dumps(entries))
        limits = list((src / t / "sys/fs/cgroup").rglob("memory.max"))
        assert limits
        for f in limits:
            f.unlink()
            f.mkdir()  # reading it would fail (EISDIR) and be reported
    coll, store = make_collector(host, tmp_path)
    await coll.run_pass()
    host.move_to_t1()
    report = await coll.run_pass()
    assert report.committed, report.error
    assert report.samples
    for s in report.samples:
        assert s.cpu_ns is not None
        assert s.memory is not None
        assert s.memory.source == "cgroup"
        assert not [k for k in s.missing if "limit" in k], s.missing
    coll.cgroups.close()
    store.close()


async def test_a_cgroup_cpu_read_that_fails_defers_that_cpu_and_never_switches_counter(
        tmp_path: Path) -> None:
    """CPU is the VM cgroup's counter wherever that cgroup is found (libvirt is then not asked
    for it: its CPU group costs a QMP round trip to every QEMU). A domain whose cpu.stat cannot
    be read has no CPU that pass (never libvirt's `cpu.time` instead: another counter where
    they differ), and the next good read bills the gap: the sum is the counter's growth."""
    host = editable_host(tmp_path, "lab-hybrid")
    coll, store = make_collector(host, tmp_path, count_preexisting=False)
    assert (await coll.run_pass()).committed
    host.move_to_t1()
    broken = host.meta["guests"][0]
    vm = (host.src / "t1/sys/fs/cgroup/unified/machine"
          / f"qemu-{broken['domid']}-{broken['name']}.libvirt-qemu")
    saved = (vm / "cpu.stat").read_text()
    (vm / "cpu.stat").unlink()
    (vm / "cpu.stat").mkdir()  # reading it fails (EISDIR)
    second = await coll.run_pass()
    assert second.committed, second.error
    sample = next(s for s in second.samples if s.uuid == broken["uuid"])
    assert sample.cpu_ns is None and "cpu" in sample.missing
    assert not coll.libvirt.ask_cpu  # a failed read is not a reason to ask libvirt
    (vm / "cpu.stat").rmdir()
    (vm / "cpu.stat").write_text(saved)
    host.clock.advance(float(host.meta["interval_s"]))
    third = await coll.run_pass()
    assert third.committed, third.error
    assert [bool(m & libvirt.VIR_DOMAIN_STATS_CPU_TOTAL) for m in host.conn.masks] == [
        True, False, False]
    billed = [u for r in (second, third) for u in r.usages if u.uuid == broken["uuid"]]
    assert billed[0].period_start_ns == host.clock.wall_ns - int(
        2 * host.meta["interval_s"] * 1e9)
    assert billed[-1].period_end_ns == host.clock.wall_ns
    assert sum(u.cpu_ns for u in billed) == host.cgroup_cpu_ns(
        "t1", broken["uuid"]) - host.cgroup_cpu_ns("t0", broken["uuid"])
    store.close()


async def test_a_store_of_libvirt_figures_moves_to_the_cgroup_counter_without_a_reset(
        tmp_path: Path) -> None:
    """Baselines written before sources were recorded hold libvirt's `cpu.time`. Here the VM
    cgroup's counter reads LOWER than libvirt's (as where libvirt reads a machine scope and the
    daemon its `libvirt/` child): the first pass bills up to libvirt's figure, read beside,
    and carries on from the cgroup's. Billing the drop as a reset would bill the whole
    counter again."""
    host = editable_host(tmp_path, "lab-hybrid")
    coll, store = make_collector(host, tmp_path, count_preexisting=False)
    assert (await coll.run_pass()).committed
    store.close()
    t0 = host.bulk("t0")
    state = tmp_path / "state.db"
    with sqlite3.connect(state) as db:  # the store as an older version left it
        for iid, raw in list(db.execute("SELECT instance_id, state FROM baselines")):
            doc = json.loads(raw)
            assert doc.pop("cpu_source") == CPU_FROM_CGROUP
            uuid = next(g["uuid"] for g in host.meta["guests"] if g["uuid"] == iid)
            doc["cpu_ns"] = t0[uuid]["cpu.time"] + 10**9  # libvirt's, above the cgroup's
            db.execute("UPDATE baselines SET state = ? WHERE instance_id = ?",
                       (json.dumps(doc), iid))
    host.move_to_t1()
    for g in host.meta["guests"]:  # libvirt's counter at t1: 2 s more than at the baseline
        bulk = host.src / "t1" / "libvirt" / "bulk_stats.json"
        entries = json.loads(bulk.read_text())
        for e in entries:
            if e["uuid"] == g["uuid"]:
                e["stats"]["cpu.time"] = t0[g["uuid"]]["cpu.time"] + 3 * 10**9
        bulk.write_text(json.dumps(entries))
    coll2, store2 = make_collector(host, tmp_path, count_preexisting=False)
    report = await coll2.run_pass()
    assert report.committed, report.error
    assert report.usages
    for u in report.usages:
        assert u.cpu_ns == 2 * 10**9  # libvirt's growth, not the cgroup's whole counter
        assert coll2.baselines[u.instance_id].cpu_source == CPU_FROM_CGROUP
        assert coll2.baselines[u.instance_id].cpu_ns == host.cgroup_cpu_ns("t1", u.uuid)
    assert not coll2.libvirt.ask_cpu  # every baseline in the cgroup's counter now
    store2.close()


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


# --- one bad domain never stops the others (issue 13 §1) ----------------------------------------

# How each broken domain fails, the read step it is counted under (None: not an error, the
# process is just gone), and whether it is still billed (from libvirt's counters).
BROKEN = {
    "eacces": ("pid_file", True),   # pid file unreadable: EACCES (even for root)
    "eio": ("pid_file", True),      # pid file read fails: EIO
    "x" * 10_000: ("pid_file", True),  # the pid file's name is too long: ENAMETOOLONG
    "vanished": (None, True),       # pid file names a process whose /proc entry is gone
    "proc-eio": ("proc", True),     # /proc/<pid>/stat read fails: EIO
    "cgroup-eacces": ("cgroup", True),  # /proc/<pid>/cgroup unreadable: EACCES
    "badxml": ("xml", False),       # the domain XML does not parse
    "badnum": ("xml", False),       # the domain XML has a vCPU count that is not a number
}
WRITE_ONLY = "/sys/bus/pci/rescan"  # a write-only sysfs file: open for reading gives EACCES
EIO_FILE = "/proc/self/mem"  # reading offset 0 (unmapped) gives EIO


def broken_host(tmp: Path) -> Host:
    """The lab-hybrid recording plus eight clones of halab-2, each broken one way."""
    host = editable_host(tmp, "lab-hybrid")
    src = host.src
    model = next(g for g in host.meta["guests"] if g["name"] == "halab-2")
    for t in ("t0", "t1"):
        tree = src / t
        bulk_path = tree / "libvirt" / "bulk_stats.json"
        entries = json.loads(bulk_path.read_text())
        template = next(e for e in entries if e["name"] == "halab-2")
        xml0 = (tree / "libvirt" / "halab-2.xml").read_text()
        stat = (tree / "proc" / str(model["qemu_pid"]) / "stat").read_text()
        for i, name in enumerate(BROKEN, start=1):
            uuid = f"0badd0ma-0000-4000-8000-{i:012d}".replace("m", "0")
            domid, tap, mac = 100 + i, f"bad{i}", f"52:54:00:bb:00:{i:02x}"
            xml = (xml0.replace("halab-2", name).replace(model["uuid"], uuid)
                   .replace(f"id='{model['domid']}'", f"id='{domid}'")
                   .replace(model["guest_mac"], mac).replace(f"'{model['tap']}'", f"'{tap}'"))
            if name == "badxml":
                xml = xml[: len(xml) // 2]
            elif name == "badnum":
                xml = xml.replace("<vcpu placement='static'>1</vcpu>", "<vcpu>many</vcpu>")
                assert "<vcpu>many</vcpu>" in xml
            stats = {**template["stats"], "net.0.name": tap}
            entries.append({"uuid": uuid, "name": name, "id": domid, "stats": stats, "xml": xml})
            pid = 40_000 + i
            pid_file = tree / "run/libvirt/qemu" / f"{name}.pid"
            if name == "eacces":
                pid_file.symlink_to(WRITE_ONLY)
            elif name == "eio":
                pid_file.symlink_to(EIO_FILE)
            elif name == "vanished":
                pid_file.write_text("999999")
            elif len(name) < 255:
                pid_file.write_text(str(pid))
                proc = tree / "proc" / str(pid)
                proc.mkdir()
                if name == "proc-eio":
                    (proc / "stat").symlink_to(EIO_FILE)
                else:
                    (proc / "stat").write_text(stat.replace(str(model["qemu_pid"]), str(pid), 1))
                if name == "cgroup-eacces":
                    (proc / "cgroup").symlink_to(WRITE_ONLY)
                else:
                    (proc / "cgroup").write_text("0::/\n")
        bulk_path.write_text(json.dumps(entries))
    return host


async def test_broken_domains_cost_only_their_own_readings(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    host = broken_host(tmp_path)
    coll, store = make_collector(host, tmp_path)
    first = await coll.run_pass()
    assert first.committed, first.error
    host.move_to_t1()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hostagent.collector"):
        second = await coll.run_pass()
    assert second.committed, second.error
    t0, t1 = host.bulk("t0"), host.bulk("t1")
    by_name = {u.name: u for u in second.usages}
    missing = {s.name: s.missing for s in second.samples}
    billed = {"halab-1", "halab-2"} | {n for n, (_, ok) in BROKEN.items() if ok}
    assert set(by_name) == billed
    # Some domains' cgroups cannot be found (no process), so libvirt is still asked for CPU.
    assert all(m & libvirt.VIR_DOMAIN_STATS_CPU_TOTAL for m in host.conn.masks)
    by_uuid = {s.uuid: s for s in second.samples}
    for u in second.usages:  # the healthy and the half-read domains, exactly
        if u.name in ("halab-1", "halab-2"):  # their cgroup is found: its counter
            assert by_uuid[u.uuid].cpu_source == CPU_FROM_CGROUP
            assert u.cpu_ns == host.cgroup_cpu_ns("t1", u.uuid) - host.cgroup_cpu_ns(
                "t0", u.uuid)
        else:  # a clone whose cgroup is found is halab-2's: its process and counter
            assert u.cpu_ns in (t1[u.uuid]["cpu.time"] - t0[u.uuid]["cpu.time"],
                                host.cgroup_cpu_ns("t1", by_name["halab-2"].uuid)
                                - host.cgroup_cpu_ns("t0", by_name["halab-2"].uuid)), u.name
        assert u.period_end_ns - u.period_start_ns == int(host.meta["interval_s"] * 1e9)
    for name in ("halab-1", "halab-2"):
        assert not any(k in missing[name] for k in ("process", "cgroup")), name
    assert "pid_file" in missing["eacces"]["process"]
    assert "Permission denied" in missing["eacces"]["process"]
    assert "Input/output error" in missing["eio"]["process"]
    assert "name too long" in missing["x" * 10_000]["process"]
    assert "Input/output error" in missing["proc-eio"]["process"]
    assert "Permission denied" in missing["cgroup-eacces"]["cgroup"]
    assert missing["vanished"]["cgroup"] == "cgroup of the QEMU process not found"
    # the XML-broken ones are withheld: no usage, no baseline, counted
    assert {s.name for s in second.samples} == billed
    steps = Counter(e.step for e in second.read_errors)
    expected = Counter(step for step, _ in BROKEN.values() if step is not None)
    assert steps == expected
    # counted every pass (the XML is re-read for a domain that failed), logged once
    assert second.read_errors_total == dict(first.read_errors_total) | {
        k: first.read_errors_total[k] + v for k, v in expected.items()}
    warned = [r for r in caplog.records if r.getMessage().startswith("domain read failed")]
    assert warned == []  # all were logged at the first pass already
    store.close()


async def test_each_broken_domain_is_logged_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    host = broken_host(tmp_path)
    coll, store = make_collector(host, tmp_path)
    with caplog.at_level(logging.WARNING, logger="hostagent.collector"):
        for _ in range(3):
            report = await coll.run_pass()
            assert report.committed, report.error
            host.clock.advance(1.0)
    warned = Counter((r.__dict__["domain"], r.__dict__["step"]) for r in caplog.records
                     if r.getMessage().startswith("domain read failed"))
    assert set(warned.values()) == {1}
    assert len(warned) == sum(1 for step, _ in BROKEN.values() if step is not None)
    assert report.read_errors_total == {
        step: 3 * n for step, n in Counter(s for s, _ in BROKEN.values() if s).items()}
    store.close()


class HangingLinks:
    """A link reader stuck in the kernel (think of a hung cgroupfs or netlink read)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0

    def read(self) -> dict[str, Any]:
        self.calls += 1
        self.release.wait(30)
        return {}


async def test_hung_host_file_reads_are_abandoned_at_the_deadline(tmp_path: Path) -> None:
    """The blocking reads of a pass run in ONE worker call with a deadline; past it the pass
    commits without them, and no second call piles up behind the stuck one."""
    host = Host(tmp_path, "lab-hybrid")
    coll, store = make_collector(host, tmp_path)
    await coll.run_pass()
    host.move_to_t1()
    stuck = HangingLinks()
    coll.files.links = stuck
    try:
        t0 = time.monotonic()
        report = await coll.run_pass()
        assert time.monotonic() - t0 < 5  # call_timeout_s = 1
        assert report.committed, report.error
        assert report.events == report.domains > 0  # CPU still from libvirt
        for s in report.samples:
            assert s.missing["cgroup"] == "host file reads exceeded 1.0 s"
        host.clock.advance(2.0)
        again = await coll.run_pass()
        assert again.committed, again.error
        assert stuck.calls == 1  # the abandoned call still holds the files: not called again
        for s in again.samples:
            assert s.missing["cgroup"] == "host file reads of an earlier pass still blocked"
    finally:
        stuck.release.set()
    store.close()


def v2_host_with_partition(tmp: Path, usec_t0: int, usec_t1: int) -> Host:
    """The systemd-v2 host, copied, with the VM partition's cpu.stat at t0 and t1."""
    host = Host(tmp, "systemd-v2")
    src = tmp / "host-copy"
    shutil.copytree(host.src, src, symlinks=True)
    for t, usec in (("t0", usec_t0), ("t1", usec_t1)):
        (src / t / "sys/fs/cgroup/machine.slice/cpu.stat").write_text(f"usage_usec {usec}\n")
    host.src = src
    host.root.unlink()
    host.root.symlink_to(src / "t0")
    return host


async def test_a_steady_pass_reads_libvirt_and_host_files_in_one_worker_call(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each thread hand-off costs a wake-up of the event loop: a steady pass makes two, the
    bulk call with the host file reads and the VM partition's CPU, then the commit; a first
    sight needs the XML first (all of a pass's XML in one call)."""
    host = v2_host_with_partition(tmp_path, 1000, 3000)
    coll, store = make_collector(host, tmp_path)
    calls: list[str] = []

    def counting(real: Any) -> Any:
        async def counted(fn: Any, *args: Any, **kwargs: Any) -> Any:
            calls.append(getattr(fn, "__qualname__", repr(fn)))
            return await real(fn, *args, **kwargs)
        return counted

    # the pass hands off through hostagent.handoff; trio's own hand-off would count too
    monkeypatch.setattr(handoff, "run_sync", counting(handoff.run_sync))
    monkeypatch.setattr(trio.to_thread, "run_sync", counting(trio.to_thread.run_sync))
    first = await coll.run_pass()
    n = first.domains
    assert n > 0
    # the connection, bulk (+ partition CPU), every domain's XML, host files, commit
    assert len(calls) == 1 + 1 + 1 + 1 + 1, calls
    calls.clear()
    host.move_to_t1()
    report = await coll.run_pass()
    assert report.committed and report.events == report.domains == n > 0
    assert len(calls) == 2, calls
    assert all(s.pressure is not None for s in report.samples)  # the files were read
    assert coll.unattributed is not None and coll.unattributed.parent_last_ns == 3_000_000
    store.close()


async def test_the_partition_cpu_is_read_in_a_call_of_its_own_without_early_reads(
        tmp_path: Path) -> None:
    """On the per-domain path (the bulk call hung) nothing runs after the bulk call: the VM
    partition's CPU is read in a call of its own, as before."""
    host = v2_host_with_partition(tmp_path, 1000, 5000)
    coll, store = make_collector(host, tmp_path)
    await coll.run_pass()
    host.move_to_t1()
    host.conn.hang_bulk.set()
    try:
        report = await coll.run_pass()
    finally:
        host.conn.release.set()
    assert report.committed and report.libvirt_path == "per-domain"
    assert coll.unattributed is not None and coll.unattributed.parent_last_ns == 5_000_000
    store.close()


async def test_one_domain_whose_stats_call_fails_is_counted_and_the_others_billed(
        tmp_path: Path) -> None:
    """On the per-domain path (the bulk call hung), one domain's stats error costs that
    domain alone: counted under `stats`, its baseline kept; the others are billed exactly."""
    import libvirt

    host = Host(tmp_path, "lab-hybrid")
    coll, store = make_collector(host, tmp_path)
    await coll.run_pass()
    host.move_to_t1()
    real = host.conn.domainListGetStats

    def one_fails(doms: list[FakeDomain], stats: int, flags: int) -> Any:
        if doms[0].name() == "halab-1":
            raise libvirt.libvirtError("Requested operation is not valid: domain is not running")
        return real(doms, stats, flags)

    host.conn.domainListGetStats = one_fails  # type: ignore[method-assign]
    host.conn.hang_bulk.set()
    before = dict(coll.baselines)
    try:
        report = await coll.run_pass()
    finally:
        host.conn.release.set()
    assert report.committed, report.error
    assert report.libvirt_path == "per-domain"
    assert [(e.name, e.step) for e in report.read_errors] == [("halab-1", "stats")]
    assert report.read_errors_total == {"stats": 1}
    assert [u.name for u in report.usages] == ["halab-2"]
    u = report.usages[0]
    assert not host.conn.masks[-1] & libvirt.VIR_DOMAIN_STATS_CPU_TOTAL  # from the cgroup
    assert u.cpu_ns == host.cgroup_cpu_ns("t1", u.uuid) - host.cgroup_cpu_ns("t0", u.uuid)
    halab1 = next(iid for iid, b in before.items() if iid != u.instance_id)
    assert coll.baselines[halab1] == before[halab1]  # kept: the next pass covers the gap
    store.close()


def busy_answer(stats: dict[str, Any]) -> dict[str, Any]:
    """`stats` as libvirt answers under NOWAIT while another client holds the domain's job:
    without the figures of its QEMU monitor (balloon stats, disk bytes and sizes)."""
    kept = {"balloon.current", "balloon.maximum"}
    return {k: v for k, v in stats.items()
            if k in kept or not (k.startswith("balloon.")
                                 or (k.startswith("block.") and k.count(".") >= 3)
                                 or k.rsplit(".", 1)[-1] in ("allocation", "capacity",
                                                             "physical"))}


@pytest.mark.parametrize("busy_again", [False, True])
async def test_a_domain_busy_with_another_clients_job_is_asked_again(
        tmp_path: Path, busy_again: bool) -> None:
    """The NOWAIT bulk call found halab-1's job held by another client: it is asked again
    alone; a complete answer is billed exactly, a still-busy one defers its disk bytes with
    the reason (sources/libvirt_busy.py)."""
    from hostagent.accounting.assemble import JOB_BUSY

    host = Host(tmp_path, "lab-hybrid")
    coll, store = make_collector(host, tmp_path)
    await coll.run_pass()
    host.move_to_t1()
    bulk, again = host.conn.getAllDomainStats, host.conn.domainListGetStats
    asked: list[list[str]] = []

    def bulk_busy(stats: int, flags: int) -> Any:
        return [(d, busy_answer(s) if d.name() == "halab-1" else s) for d, s in bulk(stats, flags)]

    def asked_again(doms: list[FakeDomain], stats: int, flags: int) -> Any:
        asked.append([d.name() for d in doms])
        assert flags == libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT
        return [(d, busy_answer(s) if busy_again else s) for d, s in again(doms, stats, flags)]

    host.conn.getAllDomainStats = bulk_busy  # type: ignore[method-assign]
    host.conn.domainListGetStats = asked_again  # type: ignore[method-assign]
    report = await coll.run_pass()
    assert report.committed, report.error
    assert asked == [["halab-1"]] * (2 if busy_again else 1)
    u = next(u for u in report.usages if u.name == "halab-1")
    t0, t1 = host.bulk("t0"), host.bulk("t1")
    grown = t1[u.uuid]["block.0.wr.bytes"] - t0[u.uuid]["block.0.wr.bytes"]
    assert grown > 0
    if busy_again:
        assert u.disk_write_bytes == 0
        assert u.missing["disk:vda:wr_bytes"] == JOB_BUSY
        assert coll.baselines[u.instance_id].disks["vda"].wr_bytes == t0[u.uuid][
            "block.0.wr.bytes"]  # kept: the next complete answer bills the growth
    else:
        assert u.disk_write_bytes == grown
        assert not any(k.startswith("disk:") for k in u.missing)
    store.close()


class HungSysfs:
    """A GPU source whose sysfs scan hangs with hostdevs it has never identified."""

    async def read(self, infos: Any, limiter: Any) -> Any:
        from hostagent.errors import SourceTimeout

        raise SourceTimeout("sysfs scan under '/' took over 5.0 s")


async def test_a_domain_whose_gpus_cannot_be_read_is_withheld_alone(tmp_path: Path) -> None:
    """GPU seconds count time: a pass without the GPU reading must not advance that domain's
    baseline. The GPU domain is withheld (counted under `gpu`); the others are billed."""
    host = Host(tmp_path, "lab-hybrid")
    src = tmp_path / "src"
    shutil.copytree(host.src, src, symlinks=True)
    hostdev = ("<hostdev mode='subsystem' type='pci' managed='yes'><source><address "
               "domain='0x0000' bus='0x3b' slot='0x00' function='0x0'/></source></hostdev>")
    for t in ("t0", "t1"):
        xml = src / t / "libvirt" / "halab-1.xml"
        xml.write_text(xml.read_text().replace("</devices>", hostdev + "</devices>", 1))
    host.src = src
    host.root.unlink()
    host.root.symlink_to(src / "t0")
    coll, store = make_collector(host, tmp_path)
    await coll.run_pass()
    before = dict(coll.baselines)
    host.move_to_t1()
    coll.gpu = HungSysfs()  # type: ignore[assignment]
    report = await coll.run_pass()
    assert report.committed, report.error
    assert [(e.name, e.step) for e in report.read_errors] == [("halab-1", "gpu")]
    assert [u.name for u in report.usages] == ["halab-2"]
    gpu_iid = next(iid for iid in before if iid not in {u.instance_id for u in report.usages})
    assert coll.baselines[gpu_iid] == before[gpu_iid]
    store.close()


async def test_a_steady_pass_wakes_the_event_loop_only_for_its_two_worker_calls(
        tmp_path: Path) -> None:
    """Task steps of the pass's own task: each of the two worker calls costs two (the
    limiter's checkpoint, the result); taking the free reading lock costs none."""
    host = Host(tmp_path, "lab-hybrid")
    coll, store = make_collector(host, tmp_path)
    await coll.run_pass()
    host.move_to_t1()
    me = trio.lowlevel.current_task()

    class Steps(trio.abc.Instrument):
        n = 0

        def before_task_step(self, task: trio.lowlevel.Task) -> None:
            if task is me:
                self.n += 1

    steps = Steps()
    trio.lowlevel.add_instrument(steps)
    try:
        report = await coll.run_pass()
    finally:
        trio.lowlevel.remove_instrument(steps)
    assert report.committed and report.events == report.domains > 0
    assert steps.n == 4
    store.close()


async def test_two_domains_claiming_one_instance_id_are_billed_apart(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A virt-clone copies <metadata>: with the id taken from it, both domains claimed one id
    and each pass read the other's baseline, billing each domain's whole counter again."""
    host = editable_host(tmp_path, "lab-hybrid")
    owner = ('<metadata><hostagent:owner xmlns:hostagent="urn:hostagent:owner:1" '
             'user="lab-user-2" org="lab-org"/></metadata>')
    for tree in ("t0", "t1"):
        xml = host.src / tree / "libvirt" / "halab-2.xml"
        text = xml.read_text()
        if "<metadata>" not in text:
            xml.write_text(text.replace("</name>", "</name>" + owner, 1))
    uuids = sorted(host.bulk("t0"))
    assert len(uuids) == 2
    keeper, other = uuids  # no baseline yet: the smallest UUID keeps the id
    scheme = {"instance_id": "metadata", "instance_id_xpath": "hostagent:owner/@org"}
    coll, store = make_collector(host, tmp_path, count_preexisting=False, **scheme)
    with caplog.at_level(logging.WARNING):
        first = await coll.run_pass()
    assert first.committed, first.error
    assert "instance id claimed by several running domains" in caplog.text
    host.move_to_t1()
    for n in range(2):  # and the next pass (no time passed: nothing to bill) the same
        report = await coll.run_pass()
        assert report.committed, report.error
        assert not report.read_errors, report.read_errors
        assert {s.uuid: s.instance_id for s in report.samples} == {keeper: "lab-org",
                                                                     other: other}
        if n == 0:
            assert {u.uuid: u.instance_id for u in report.usages} == {keeper: "lab-org",
                                                                        other: other}
    store.close()
    billed: dict[str, int] = {}
    for p in (orjson.loads(p) for p in store_payloads(store)):
        billed[p["instance_id"]] = billed.get(p["instance_id"], 0) + p["metrics"]["cpu_ns"]
    def grew_ns(uuid: str) -> int:
        return host.cgroup_cpu_ns("t1", uuid) - host.cgroup_cpu_ns("t0", uuid)

    assert billed == {"lab-org": grew_ns(keeper), other: grew_ns(other)}  # once each
    # a restarted daemon gives each domain the id it had, and bills nothing twice
    coll2, store2 = make_collector(host, tmp_path, count_preexisting=False, **scheme)
    again = await coll2.run_pass()
    assert again.committed, again.error
    assert {s.uuid: s.instance_id for s in again.samples} == {keeper: "lab-org", other: other}
    assert all(u.cpu_ns == 0 for u in again.usages)
    store2.close()
