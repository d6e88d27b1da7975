"""The billing tail across a libvirtd restart as the daemon sees it: libvirtd's test driver
through a private socket proxy that cuts our connections (the shared daemon is never
restarted). Domains start and stop before and after the cut: the lifecycle events resume, each
short-lived domain is read on its STARTED event, closed out by the next pass, and billed once."""

from __future__ import annotations

import os
import time
from pathlib import Path

import libvirt
import orjson
import trio

from hostagent.clock import SystemClock
from hostagent.collector import Collector
from hostagent.config.load import from_mapping
from hostagent.owners.resolver import Owners
from hostagent.sources.libvirt import LibvirtSource
from hostagent.sources.net import link_reader_for
from hostagent.store.outbox import Store
from hostagent.tailing import TailTasks
from tests.sources.libvirt_proxy import SocketProxy
from tests.sources.test_lifecycle import domain_xml
from tests.test_collector import store_payloads


async def until(pred: object, what: str, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await trio.sleep(0.05)


async def committed_pass(coll: Collector) -> None:
    """Passes until one commits (the first after a cut finds a dead connection)."""
    for _ in range(20):
        if (await coll.run_pass()).committed:
            return
        await trio.sleep(0.2)
    raise AssertionError("no pass committed")


async def test_events_resume_after_a_cut_and_no_domain_is_billed_twice(
        proxy: SocketProxy, tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    cfg = from_mapping({
        "host": {"node_id": "tail-restart"},
        "libvirt": {"uri": f"test+unix:///default?socket={proxy.path}", "call_timeout_s": 2.0,
                    "reconnect_max_s": 1.0},
        "paths": {"root": str(tmp_path / "root")},
        "collector": {"state_path": str(tmp_path / "state.db"), "sample_interval_s": 0.2,
                      "lifecycle_keepalive_interval_s": 1, "lifecycle_keepalive_count": 1},
        "sinks": [{"type": "jsonl", "path": str(tmp_path / "events.jsonl")}],
    })
    clock = SystemClock()
    store = Store.open(cfg.collector.state_path, clock=clock, node_id="tail-restart",
                       sink_names=["jsonl"])
    limiter = trio.CapacityLimiter(4)
    lv = LibvirtSource(cfg.libvirt, clock=clock, limiter=limiter)
    coll = Collector(cfg, clock=clock, store=store, owners=Owners(cfg.owners, clock, None),
                     libvirt_source=lv, link_reader=link_reader_for(cfg), gpu_source=None,
                     limiter=limiter)
    tail = TailTasks(coll, clock=clock)
    actor = libvirt.open("test+unix:///default")  # the same daemon, not through the proxy
    uuids: list[str] = []

    async def short_life(name: str) -> None:
        dom = await trio.to_thread.run_sync(actor.createXML, domain_xml(name), 0)
        uuids.append(dom.UUIDString())
        await until(lambda: any(k[0] == uuids[-1] for k in coll.tails), f"{name} read")
        stopped = tail.events_total["STOPPED"]
        await trio.to_thread.run_sync(dom.destroy)
        # the reason is only for logs and metrics; wait so the count below is exact
        await until(lambda: tail.events_total["STOPPED"] > stopped, f"{name} STOPPED")

    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await nursery.start(tail.run)
                await committed_pass(coll)
                stamp = os.getpid()
                await short_life(f"tr-before-{stamp}")
                await committed_pass(coll)  # closes out the first one
                proxy.cut()  # libvirtd "restarts": both of our connections see EOF
                assert tail.watcher is not None
                await until(lambda: tail.watcher is not None and tail.watcher.connects == 2,
                            "the resubscription")
                await short_life(f"tr-after-{stamp}")
                await committed_pass(coll)
                await committed_pass(coll)  # nothing more for either
                nursery.cancel_scope.cancel()
    finally:
        actor.close()
        lv.close()
        coll.cgroups.close()
    payloads = [orjson.loads(p) for p in store_payloads(store)]
    store.close()
    for u in uuids:
        mine = [p for p in payloads if p.get("instance_id") == u]
        assert len(mine) == 1, mine  # one close-out each, billed once
    assert coll.closeouts_total["DESTROYED"] >= 2
    assert not any(k[0] in uuids for k in coll.tails)
