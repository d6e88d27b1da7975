"""Alerts end to end in the daemon: rules file → the pass → outbox → JSONL and a signed webhook;
a restart neither re-notifies nor forgets (issue 6); Notify rules reach only their channels."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import trio

from hostagent.daemon import Daemon
from tests.replay import Host, build_daemon, daemon_config
from tests.standins.queue import serve_queue
from tests.standins.webhook_receiver import WebhookReceiver

SECRET = "s3cret-for-tests"
CPU = {"id": "cpu-high", "resource_type": "Cpu",
       "threshold_type": {"Percentage": {"value": 80.0}}, "action": "Alert", "user_id": "*",
       "notification_channels": ["webhook"]}
# The recorded guests use ~15 % of their memory: a gauge that stays put, so this keeps firing.
MEMORY = {"id": "mem-high", "resource_type": "Memory",
          "threshold_type": {"Percentage": {"value": 10.0}}, "action": "Alert", "user_id": "*",
          "notification_channels": ["webhook"]}


def build(tmp_path: Path, host: Host) -> Daemon:
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps([CPU, MEMORY]))
    cfg = daemon_config(tmp_path, host, tables=f'[thresholds]\nrules_path = "{rules}"',
                        sinks='[[sinks]]\ntype = "webhook"\nallow_list = ["127.0.0.1"]')
    return build_daemon(cfg, host)


async def run_until(daemon: Daemon, done: Callable[[], bool], timeout_s: float) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(daemon.run)
        with trio.move_on_after(timeout_s):
            while not done():  # noqa: ASYNC110 - fed by the receiver's thread, no trio.Event
                await trio.sleep(0.05)
        daemon.stop.set()


def jsonl_alerts(path: Path) -> list[dict[str, Any]]:
    docs = [orjson.loads(line) for line in path.read_bytes().splitlines() if line]
    return [d for d in docs if d.get("event_type") == "threshold_violation"]


async def test_transitions_reach_the_webhook_signed_and_survive_a_restart(tmp_path: Path) -> None:
    host = Host(tmp_path, "lab-hybrid")
    receiver = WebhookReceiver(secret=SECRET).start()
    try:
        daemon = build(tmp_path, host)
        assert daemon.webhooks is not None
        daemon.webhooks.register(receiver.url, ["threshold_violation"], secret=SECRET)
        guests = len(host.meta["guests"])
        # Pass 1 bills each guest's whole CPU time over the few ms since the store was created
        # (count_preexisting): far above 80 %. Pass 2 sees no growth (the tree stays at t0): 0 %.
        # Memory stays at ~15 % > 10 %: exceeded once, then quiet (only transitions notify).
        await run_until(daemon, lambda: len(receiver.received) >= 3 * guests, 20)
        got = [r.json for r in receiver.received]
        assert len(got) == 3 * guests
        assert all(r.std_ok and r.legacy_ok for r in receiver.received)  # both signatures
        assert {g["event_type"] for g in got} == {"threshold_violation"}
        by_fp: dict[str, list[str]] = {}
        for g in got:
            by_fp.setdefault(g["data"]["fingerprint"], []).append(g["data"]["transition"])
        cpu = [v for fp, v in by_fp.items() if fp.startswith("cpu-high|")]
        mem = [v for fp, v in by_fp.items() if fp.startswith("mem-high|")]
        assert cpu == [["exceeded", "resolved"]] * guests
        assert mem == [["exceeded"]] * guests
        # the same alerts went through the outbox to the JSONL sink
        assert len(jsonl_alerts(tmp_path / "events.jsonl")) == 3 * guests

        # A restart on the same state: the memory alerts are still firing and are not
        # re-notified (their state was committed with the pass), the CPU ones stay resolved.
        again = build(tmp_path, host)
        firing = {fp for fp, st in again.collector.alert_states.items()
                  if st.status == "exceeded"}
        assert {fp.split("|")[0] for fp in firing} == {"mem-high"}
        assert len(firing) == guests
        before = len(receiver.received)
        await run_until(again, lambda: again.passes_done >= 3, 20)
        assert again.passes_done >= 3
        assert len(receiver.received) == before
    finally:
        receiver.stop()


async def test_a_stop_waits_for_the_webhook_answers_in_flight(tmp_path: Path) -> None:
    """Stopped while a slow consumer holds a POST: the daemon waits for the answers (within
    its drain grace) and records them, so the restarted daemon sends none of them again."""
    host = Host(tmp_path, "lab-hybrid")
    receiver = WebhookReceiver(secret=SECRET, answer_after_s=0.3).start()
    try:
        daemon = build(tmp_path, host)
        assert daemon.webhooks is not None
        daemon.webhooks.register(receiver.url, ["threshold_violation"], secret=SECRET)
        await run_until(daemon, lambda: len(receiver.received) >= 1, 20)  # one in flight
        first = [r.headers["webhook-id"] for r in receiver.received]
        again = build(tmp_path, host)
        await run_until(again, lambda: again.passes_done >= 2, 20)
        ids = [r.headers["webhook-id"] for r in receiver.received]
        assert len(ids) == len(set(ids)), "a webhook answered before the stop was sent again"
        assert set(first) <= set(ids) and len(first) >= 1
    finally:
        receiver.stop()


def alert_rows(state: Path) -> dict[str, list[str]]:
    """Rule ids of the alert delivery rows per outbox sink (what `outbox status` counts)."""
    with sqlite3.connect(state) as c:
        rows = c.execute("SELECT d.sink, e.payload FROM deliveries d JOIN events e USING "
                         "(event_id) WHERE e.kind = 'threshold_violation'").fetchall()
    out: dict[str, list[str]] = {}
    for sink, payload in rows:
        out.setdefault(sink, []).append(orjson.loads(payload)["fingerprint"].split("|")[0])
    return {k: sorted(v) for k, v in sorted(out.items())}


async def test_notify_rules_reach_only_their_channels(tmp_path: Path) -> None:
    host = Host(tmp_path, "lab-hybrid")
    guests = len(host.meta["guests"])
    receiver = WebhookReceiver(secret=SECRET).start()
    rules = tmp_path / "rules.json"
    rules.write_text("[]")
    try:
        with serve_queue() as queue:
            cfg = daemon_config(
                tmp_path, host, tables=f'[thresholds]\nrules_path = "{rules}"',
                sinks=f'[[sinks]]\ntype = "formation-queue"\nurl = "{queue.url}"\n'
                      '[[sinks]]\ntype = "webhook"\nallow_list = ["127.0.0.1"]')
            daemon = build_daemon(cfg, host)
            assert daemon.webhooks is not None and daemon.rules is not None
            hook = daemon.webhooks.register(receiver.url, ["threshold_violation"], secret=SECRET)
            daemon.webhooks.register(receiver.url + "?unnamed", ["threshold_violation"])
            # exceeded then resolved, to the queue only; exceeded, to one registration only;
            # exceeded, an Alert rule: everywhere (the JSONL audit log gets every alert)
            rules.write_text(json.dumps([
                {**CPU, "id": "cpu-queue", "action": "Notify",
                 "notification_channels": ["queue"]},
                {**MEMORY, "id": "mem-hook", "action": "Notify",
                 "notification_channels": [hook.id]},
                {**MEMORY, "id": "mem-alert", "notification_channels": []}]))
            assert daemon.rules.reload()

            def done() -> bool:
                return (len(receiver.received) >= 3 * guests
                        and len(queue.events("usage_alerts")) >= 3 * guests
                        and len(jsonl_alerts(tmp_path / "events.jsonl")) >= 4 * guests)

            await run_until(daemon, done, 20)
            to_queue = queue.events("usage_alerts")
        assert sorted(e["fingerprint"].split("|")[0] for e in to_queue) == sorted(
            ["cpu-queue"] * 2 * guests + ["mem-alert"] * guests)
        got = [(r.path, r.json["data"]["fingerprint"].split("|")[0]) for r in receiver.received]
        assert sorted(got) == sorted([("/hook", "mem-hook")] * guests
                                     + [("/hook", "mem-alert")] * guests
                                     + [("/hook?unnamed", "mem-alert")] * guests)
        assert len(jsonl_alerts(tmp_path / "events.jsonl")) == 4 * guests
        # no delivery row for a sink that is not among a Notify rule's channels
        assert alert_rows(tmp_path / "state.db") == {
            "formation-queue": sorted(["cpu-queue"] * 2 * guests + ["mem-alert"] * guests),
            "jsonl": sorted(["cpu-queue"] * 2 * guests + ["mem-hook", "mem-alert"] * guests),
            "webhooks": sorted(["mem-hook", "mem-alert"] * guests)}
    finally:
        receiver.stop()
