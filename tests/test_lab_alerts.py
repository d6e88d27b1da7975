"""Alerts on real guests (issue 6, 17): lab guests' CPU crosses a threshold, a real webhook
receiver on 127.0.0.1 gets exactly the expected transitions with both signatures, a real SMTP
server on 127.0.0.1 gets each of them once by email, and a rules file rewritten under the
running daemon resolves them ("rule changed")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hostagent.clock import SystemClock
from hostagent.store.outbox import Store
from hostagent.store.webhooks import WebhookStore
from tests import lab_support
from tests.standins.smtp_server import Handler, smtp_server
from tests.standins.webhook_receiver import WebhookReceiver
from tests.test_lab import DaemonProc, wait_for, write_config

pytestmark = pytest.mark.lab

SECRET = "lab-secret"


def rule(percent: float) -> str:
    return json.dumps([{"id": "cpu-busy", "resource_type": "Cpu",
                        "threshold_type": {"Percentage": {"value": percent}},
                        "action": "Alert", "user_id": "*", "for_passes": 2}])


def test_cpu_threshold_crossed_and_resolved_on_lab_guests(tmp_path: Path,
                                                          lab_guests: list[str]) -> None:
    rules = tmp_path / "rules.json"
    rules.write_text(rule(1.0))   # lab guests run a steady ~8 % CPU loop
    with smtp_server() as (smtp, smtp_port):
        cfg = write_config(tmp_path, extra=f"""
[thresholds]
rules_path = "{rules}"
reload_check_s = 0.5
approaching_fraction = 0.9
[[sinks]]
type = "webhook"
allow_list = ["127.0.0.1"]
[[sinks]]
type = "email"
host = "127.0.0.1"
port = {smtp_port}
tls = "none"
to = ["oncall@lab.test"]
digest_after = 100
journal_path = "{tmp_path}/email-sent.db"
""")
        run_lab(tmp_path, cfg, rules, lab_guests, smtp)


def run_lab(tmp_path: Path, cfg: Path, rules: Path, lab_guests: list[str],
            smtp: Handler) -> None:
    receiver = WebhookReceiver(secret=SECRET).start()
    try:
        # Register the hook in the daemon's state file before it starts (the API does this live).
        clock = SystemClock()
        store = Store.open(tmp_path / "state.db", clock=clock, node_id="lab-test",
                           sink_names=["webhooks", "jsonl"])
        hooks = WebhookStore(tmp_path / "state.db", clock)
        hooks.register(receiver.url, ["threshold_violation"], secret=SECRET)
        hooks.close()
        store.close()
        uuids = {lab_support.domain_uuid(g) for g in lab_guests}

        def mailed() -> dict[str, list[str]]:
            out: dict[str, list[str]] = {}
            for m in smtp.to("oncall@lab.test"):
                inst = m["Subject"].split(" on ", 1)[1].split(" ", 1)[0]
                if inst in uuids:
                    out.setdefault(inst, []).append(m["Subject"].split()[1].lower())
            return out

        def transitions() -> dict[str, list[str]]:
            out: dict[str, list[str]] = {}
            for r in list(receiver.received):
                data = r.json["data"]
                if data["instance_id"] in uuids:
                    out.setdefault(data["instance_id"], []).append(data["transition"])
            return out

        d = DaemonProc(cfg, tmp_path / "daemon.log")
        try:
            # for_passes = 2: the first pass over the threshold is `approaching` (pending; with
            # approaching_fraction = 1, "no approaching state", that pass notifies nothing)
            wait_for(lambda: all(transitions().get(u) == ["approaching", "exceeded"]
                                 for u in uuids), 60, "an `exceeded` alert per lab guest")
            rules.write_text(rule(99.0))   # reloaded on change: nothing is that busy
            wait_for(lambda: all(transitions().get(u) == ["approaching", "exceeded", "resolved"]
                                 for u in uuids), 60, "`resolved` after the rules change")
            wait_for(lambda: mailed() == transitions(), 30, "every transition mailed")
        finally:
            assert d.stop() == 0
        assert all(r.std_ok and r.legacy_ok for r in receiver.received)
        assert transitions() == {u: ["approaching", "exceeded", "resolved"] for u in uuids}
        first = next(r.json for r in receiver.received if r.json["data"]["instance_id"] in uuids)
        assert first["event_type"] == "threshold_violation"
        assert first["data"]["threshold_value"] == 1.0
        assert first["data"]["current_value"] > 1.0
        last = [r.json["data"] for r in receiver.received if r.json["data"]["instance_id"] in uuids]
        assert {d["reason"] for d in last if d["transition"] == "resolved"} == {"rule changed"}
        # by email too: each transition once, to the sink's recipient
        assert mailed() == {u: ["approaching", "exceeded", "resolved"] for u in uuids}
    finally:
        receiver.stop()
