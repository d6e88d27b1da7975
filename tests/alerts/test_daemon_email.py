"""Alerts by email end to end: rules → the daemon's pass → outbox → email sink → a real SMTP
server on 127.0.0.1. A server that is down keeps the alerts in the outbox; a restarted daemon
delivers each transition exactly once per recipient (issue 17 §1)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import trio

from hostagent.daemon import Daemon
from tests.replay import Host, build_daemon, daemon_config
from tests.standins.smtp_server import free_port, smtp_server

CPU = {"id": "cpu-high", "resource_type": "Cpu",
       "threshold_type": {"Percentage": {"value": 80.0}}, "action": "Notify", "user_id": "*",
       "notification_channels": ["email", "email:owner@example.test"]}


def build(tmp_path: Path, host: Host, port: int) -> Daemon:
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps([CPU]))
    cfg = daemon_config(tmp_path, host, tables=f'[thresholds]\nrules_path = "{rules}"',
                        sinks=f'[[sinks]]\ntype = "email"\nhost = "127.0.0.1"\nport = {port}\n'
                              f'tls = "none"\nto = ["ops@example.test"]\ndigest_after = 100\n'
                              f'journal_path = "{tmp_path}/email-sent.db"\ntimeout_s = 2\n'
                              '[sinks.retry]\nmax_retries = 0\nround_backoff_max_s = 0.2\n'
                              'max_backoff_s = 0.1\ninitial_backoff_s = 0.05')
    return build_daemon(cfg, host)


async def run_until(daemon: Daemon, done: Callable[[], bool], timeout_s: float) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(daemon.run)
        with trio.move_on_after(timeout_s):
            while not done():  # noqa: ASYNC110 - fed by the SMTP server's thread
                await trio.sleep(0.05)
        daemon.stop.set()


async def test_transitions_are_mailed_once_per_recipient_after_an_outage(
        tmp_path: Path) -> None:
    host = Host(tmp_path, "lab-hybrid")
    guests = len(host.meta["guests"])
    port = free_port()
    # the SMTP server is down: the passes commit their alerts, nothing is lost
    down = build(tmp_path, host, port)
    await run_until(down, lambda: down.passes_done >= 2, 20)
    with smtp_server(port) as (h, _):
        again = build(tmp_path, host, port)
        want = 2 * guests  # exceeded (pass 1), resolved (pass 2), per guest

        def done() -> bool:
            return (len(h.to("ops@example.test")) >= want
                    and len(h.to("owner@example.test")) >= want)

        await run_until(again, done, 20)
    for rcpt in ("ops@example.test", "owner@example.test"):
        subjects = [m["Subject"] for m in h.to(rcpt)]
        assert len(subjects) == want, subjects
        assert sorted(s.split()[1] for s in subjects) == ["EXCEEDED"] * guests + [
            "RESOLVED"] * guests
        assert all("cpu-high" in s for s in subjects)
    ids = [m["X-Hostagent-Events"] for m in h.to("ops@example.test")]
    assert len(set(ids)) == len(ids)  # each transition once
    # the storm-control buckets were committed with the passes: a restart finds them
    assert down.collector.storm is not None and again.collector.storm is not None
    spent = {k: b.tokens for k, b in again.collector.storm.buckets.items()}
    assert set(spent) == {"email", "email:owner@example.test"}
    third = build(tmp_path, host, port)
    assert third.collector.storm is not None
    assert {k: b.tokens for k, b in third.collector.storm.buckets.items()} == spent

