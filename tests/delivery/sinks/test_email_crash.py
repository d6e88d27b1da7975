"""kill -9 safety of the email sink: a delivery process (this file run as a program) mailing
committed alerts to a real SMTP server on 127.0.0.1 is SIGKILLed at random moments. Afterwards
every alert reached every recipient, and any repeat (a kill between the server's 250 and the
journal write) carries the same Message-ID, so a mail client can drop it."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import orjson
import trio

from hostagent.config.schema import OutboxConfig
from hostagent.config.sinks import EmailSinkConfig
from hostagent.delivery.engine import Delivery
from hostagent.delivery.sinks.email import EmailSink
from hostagent.model import OutEvent
from hostagent.store.outbox import Store
from tests.clocks import FakeClock, TrioClock
from tests.delivery.miniature import kill_while_running, run_to_done
from tests.standins.smtp_server import smtp_server

ROOT = Path(__file__).resolve().parents[3]
ALERTS = 30
RCPTS = ("ops@example.test", "owner@example.test")


def alert(n: int) -> OutEvent:
    doc = {"event_type": "threshold_violation", "event_id": f"ev-{n:03d}", "host": "host-a",
           "instance_id": f"vm-{n % 5}", "user_id": "0xalice", "transition": "exceeded",
           "state": "exceeded", "since": "t", "period": {"end": "t"},
           "config": {"id": f"rule-{n}", "resource_type": "Cpu"}, "current_value": 95.0,
           "threshold_value": 80.0, "unit": "percent", "action": "notify",
           "channels": ["email", "email:owner@example.test"]}
    return OutEvent(f"ev-{n:03d}", "threshold_violation", f"vm-{n % 5}", n, n + 1,
                    orjson.dumps(doc), frozenset({"email", "email:owner@example.test"}))


def sink_config(tmp: str, port: int) -> EmailSinkConfig:
    return EmailSinkConfig(host="127.0.0.1", port=port, tls="none", to=(RCPTS[0],),
                           journal_path=f"{tmp}/email-sent.db", timeout_s=2.0,
                           digest_after=1000)


async def child(tmp: str, port: str) -> None:
    """Deliver whatever the outbox holds to the SMTP server, then say so."""
    clock = TrioClock(wall0_ns=time.time_ns())
    store = Store.open(f"{tmp}/state.db", clock=clock, node_id="host-a", sink_names=["email"])
    sink = EmailSink(sink_config(tmp, int(port)))
    d = Delivery(store, [sink], clock, OutboxConfig(maintenance_interval_s=0.5))
    async with trio.open_nursery() as nursery:
        await nursery.start(d.run)
        print("ready", flush=True)
        while True:
            await d.drained()
            await d.refresh_metrics()
            if d.metrics().sinks["email"].depth == 0:
                break
            await trio.sleep(0.05)
        print("done", flush=True)
        nursery.cancel_scope.cancel()
    store.close()


def spawn(tmp: Path, port: int) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, __file__, "child", str(tmp), str(port)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_while_mailing_loses_nothing(tmp_path: Path) -> None:
    rng = random.Random(1717)
    store = Store.open(tmp_path / "state.db", clock=FakeClock(), node_id="host-a",
                       sink_names=["email"], sink_kinds={"email": ["threshold_violation"]},
                       sink_channels={"email": ["email"]})
    store.commit_pass([], [alert(n) for n in range(ALERTS)])
    store.close()
    with smtp_server() as (h, port):
        h.delay_s = 0.03  # ~2 s of mailing: the kills land mid-delivery
        for _ in range(8):
            kill_while_running(lambda: spawn(tmp_path, port), rng, max_wait_s=0.5)
        run_to_done(lambda: spawn(tmp_path, port))
        mails = list(h.mails)
    for rcpt in RCPTS:
        got = [m for r, m in mails if rcpt in r]
        events = Counter(m["X-Hostagent-Events"] for m in got)
        assert set(events) == {f"ev-{n:03d}" for n in range(ALERTS)}  # nothing lost
        by_event: dict[str, set[str]] = {}
        for m in got:
            by_event.setdefault(m["X-Hostagent-Events"], set()).add(m["Message-ID"])
        assert all(len(ids) == 1 for ids in by_event.values())  # repeats are recognisable
        repeats = sum(events.values()) - len(events)
        assert repeats <= 8  # at most one per kill
        print(f"{rcpt}: {len(got)} mails for {ALERTS} alerts ({repeats} repeats)")


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "child":
    trio.run(child, sys.argv[2], sys.argv[3])
