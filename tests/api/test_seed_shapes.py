"""Seed-compatible shapes (issue 17 §5): `/api/v1/health/status` answers form-vm-metrics'
`{"status": "ok", "uptime_seconds", "version"}` plus our fields; `GET /get` one SystemMetrics."""

from __future__ import annotations

import httpx
import trio

from hostagent import __version__
from hostagent.api.view import ApiView
from hostagent.clock import SystemClock
from tests.api.support import Keys, api_config, report, start_server


async def test_health_status_has_the_upstream_fields(nursery: trio.Nursery, keys: Keys) -> None:
    now_ns = SystemClock().now().wall_ns
    rules = {"rules": 2, "last_error": None, "by_source": {"file": 2}, "central_age_s": 12.5}
    view = ApiView(rules_health=lambda: rules)
    rep = report({"i-x": "u"})
    rep.started_wall_ns = now_ns  # a fresh pass: healthy
    view.update(rep)
    srv = await start_server(nursery, api_config(keys), view)
    async with httpx.AsyncClient(base_url=srv.url,
                                 headers={"X-API-Key": keys.admin_key}) as c:
        body = (await c.get("/api/v1/health/status")).json()
        assert (body["status"], body["version"]) == ("ok", __version__)
        assert isinstance(body["uptime_seconds"], float) and body["uptime_seconds"] >= 0
        assert body["components"]["thresholds"]["by_source"] == {"file": 2}
        rules["last_error"] = "rules.json: [rules[0].notification_channels] ..."
        r = await c.get("/api/v1/health/status")
        assert (r.status_code, r.json()["status"]) == (503, "degraded")
        assert any("threshold rules" in x for x in r.json()["reasons"])
        metrics = (await c.get("/metrics")).text
        assert "hostagent_threshold_rules_load_error 1.0" in metrics
        assert "hostagent_threshold_rules_central_age_seconds 12.5" in metrics  # stale-while-error
    srv.stop.set()


async def test_get_answers_one_system_metrics(nursery: trio.Nursery, keys: Keys) -> None:
    view = ApiView()
    view.update(report({"i-a": "0xalice", "i-b": "0xbob"}))
    srv = await start_server(nursery, api_config(keys), view)
    async with httpx.AsyncClient(base_url=srv.url,
                                 headers={"X-API-Key": keys.admin_key}) as c:
        one = await c.get("/get", params={"instance_id": "i-a"})
        assert one.status_code == 200, one.text
        m = one.json()
        assert set(m) == {"timestamp", "instance_id", "account_id", "cpu", "memory", "disks",
                          "network", "gpus", "load"}
        assert (m["instance_id"], m["account_id"]) == ("i-a", "0xalice")
        assert m["cpu"]["usage_pct"] == 50.0 and m["memory"]["total"] == 4 << 30
        assert m["network"]["bytes_sent"] == 10 << 20
        several = await c.get("/get")
        assert several.status_code == 400
        assert several.json()["type"].endswith("instance-ambiguous")
        assert (await c.get("/get", params={"instance_id": "i-zz"})).status_code == 404
    srv.stop.set()
