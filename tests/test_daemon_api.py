"""The API inside the daemon (issue 7 wired to issues 3-6): a replayed host, the real store,
the rules file and the webhook store behind the routes."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import trio

from tests.api.support import make_keys
from tests.replay import Host, build_daemon, daemon_config


async def test_daemon_serves_usage_webhooks_rules_and_metrics(tmp_path: Path) -> None:
    host = Host(tmp_path, "lab-hybrid")
    keys = make_keys(tmp_path)
    rules = tmp_path / "rules.json"
    rules.write_text("[]")
    cfg = daemon_config(tmp_path, host, tables=f"""
[thresholds]
rules_path = "{rules}"
[api]
enabled = true
port = 0
api_keys_file = "{keys.keys_file}"
""", sinks='[[sinks]]\ntype = "webhook"')
    daemon = build_daemon(cfg, host)
    admin = {"Authorization": f"Bearer {keys.admin_key}"}
    uuid = host.meta["guests"][0]["uuid"]
    first_pass = trio.Event()
    daemon.on_pass.append(lambda _report: first_pass.set())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(daemon.run)
        with trio.fail_after(15):
            await first_pass.wait()  # the API starts before the first pass
        assert daemon.api_urls
        async with httpx.AsyncClient(base_url=daemon.api_urls[0], timeout=5) as http:
            assert (await http.get("/health")).status_code == 200
            got = await http.get(f"/api/v1/usage/instances/{uuid}/current", headers=admin)
            assert got.status_code == 200, got.text
            assert uuid in got.text
            # a read key of a user who owns nothing sees no such instance (404, not 403)
            other = {"Authorization": f"Bearer {keys.other_key}"}
            assert (await http.get(f"/api/v1/usage/instances/{uuid}/current",
                                   headers=other)).status_code == 404
            # webhooks persist in the state file the webhook sink delivers from
            reg = await http.post("/api/v1/webhooks", headers=admin,
                                  json={"url": "https://hooks.example.invalid/x",
                                        "event_types": ["threshold_violation"], "secret": "s"})
            assert reg.status_code in (200, 201), reg.text
            assert daemon.webhooks is not None
            stored = [r.id for r in daemon.webhooks.registrations()]
            assert reg.json()["id"] in stored
            assert reg.json()["secret"] is None
            # a rule written through the API lands in the rules file and is in force
            rule = {"id": "mem-high", "resource_type": "Memory",
                    "threshold_type": {"Percentage": {"value": 90.0}}, "action": "Alert",
                    "user_id": "*", "notification_channels": []}
            put = await http.post("/api/v1/thresholds", headers=admin, json=rule)
            assert put.status_code in (200, 201), put.text
            assert [r["id"] for r in json.loads(rules.read_text())] == ["mem-high"]
            assert daemon.rules is not None
            assert [r.id for r in daemon.rules.index.rules] == ["mem-high"]
            bad = await http.post("/api/v1/thresholds", headers=admin,
                                  json={**rule, "threshold_type": {"Absolute": {
                                      "value": 1, "unit": "percent"}}})
            assert bad.status_code == 400
            assert bad.headers["content-type"].startswith("application/problem+json")
            metrics = await http.get("/metrics", headers=admin)
            assert metrics.status_code == 200
            assert "hostagent_" in metrics.text
        daemon.stop.set()
    assert daemon.api_done.is_set()
