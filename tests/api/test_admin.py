"""Webhook and threshold routes (admin only) over the real stores; body limits."""

from __future__ import annotations

import httpx

from tests.api.support import Keys, Server

RULE = {"resource_type": "storage", "threshold_type": "absolute", "threshold_value": 500,
        "units": "GB", "action": "notify", "user_id": "user_123456",
        "notification_channels": ["email", "api_callback"]}


async def test_webhooks_round_trip(server: Server, client: httpx.AsyncClient,
                                   keys: Keys) -> None:
    h = {"X-API-Key": keys.admin_key}
    r = await client.post("/api/v1/webhooks", headers=h,
                          json={"url": "https://example.test/hook", "event_types": ["metrics"],
                                "secret": "s3cret"})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["status"] == "registered"
    assert body["id"].startswith("webhook_") and len(body["id"]) == len("webhook_") + 8
    assert body["secret"] is None
    r = await client.get("/api/v1/webhooks", headers=h)
    assert isinstance(r.json(), list)
    assert [w["id"] for w in r.json()] == [body["id"]]
    assert all(w["secret"] is None for w in r.json())
    stored = {r.id: r.secret for r in server.webhook_store.registrations()}
    assert stored[body["id"]] == "s3cret"  # stored, never shown
    assert (await client.delete(f"/api/v1/webhooks/{body['id']}", headers=h)).status_code == 204
    r = await client.delete(f"/api/v1/webhooks/{body['id']}", headers=h)
    assert r.status_code == 404
    assert r.headers["content-type"] == "application/problem+json"


async def test_webhook_validation(client: httpx.AsyncClient, keys: Keys) -> None:
    h = {"X-API-Key": keys.admin_key}
    for bad in ({"url": "ftp://x", "event_types": ["metrics"]},
                {"url": "https://x.test", "event_types": ["bogus"]},
                {"url": "https://x.test", "event_types": []},
                {"url": "https://x.test", "event_types": ["metrics"], "extra": 1},
                [1, 2]):
        r = await client.post("/api/v1/webhooks", headers=h, json=bad)
        assert r.status_code == 400, bad
    r = await client.post("/api/v1/webhooks", headers=h, content=b"{not json",
                          )
    assert r.status_code == 415
    r = await client.post("/api/v1/webhooks", headers={**h, "Content-Type": "application/json"},
                          content=b"{not json")
    assert r.status_code == 400


async def test_webhooks_and_rules_need_admin(client: httpx.AsyncClient, keys: Keys) -> None:
    h = {"X-API-Key": keys.read_key}
    for method, path in (("GET", "/api/v1/webhooks"), ("POST", "/api/v1/webhooks"),
                         ("DELETE", "/api/v1/webhooks/webhook_00000000"),
                         ("GET", "/api/v1/thresholds"), ("PUT", "/api/v1/thresholds/r1")):
        r = await client.request(method, path, headers=h, json={})
        assert r.status_code == 403, (method, path)
        assert r.json()["type"].endswith("insufficient-scope")


async def test_thresholds_crud(client: httpx.AsyncClient, keys: Keys) -> None:
    h = {"X-API-Key": keys.admin_key}
    r = await client.post("/api/v1/thresholds", headers=h, json=RULE)
    assert r.status_code == 201, r.text
    rule = r.json()
    assert rule["id"].startswith("rule-")
    assert rule["resource_type"] == "Storage"
    assert (await client.post("/api/v1/thresholds", headers=h, json=RULE)).status_code == 409
    assert (await client.get(f"/api/v1/thresholds/{rule['id']}", headers=h)).json() == rule
    r = await client.put(f"/api/v1/thresholds/{rule['id']}", headers=h,
                         json={**RULE, "threshold_value": 800})
    assert r.status_code == 200
    assert r.json()["threshold_type"]["Absolute"]["value"] == 800
    r = await client.put("/api/v1/thresholds/mine", headers=h, json=RULE)
    assert r.status_code == 201
    assert r.json()["id"] == "mine"
    r = await client.put("/api/v1/thresholds/mine", headers=h, json={**RULE, "id": "other"})
    assert r.status_code == 400
    assert len((await client.get("/api/v1/thresholds", headers=h)).json()) == 2
    bad = await client.post("/api/v1/thresholds", headers=h,
                            json={**RULE, "resource_type": "network_egress",
                                  "threshold_type": "percentage"})
    assert bad.status_code == 400
    assert bad.json()["type"].endswith("invalid-rule")
    assert (await client.delete("/api/v1/thresholds/mine", headers=h)).status_code == 204
    assert (await client.get("/api/v1/thresholds/mine", headers=h)).status_code == 404


async def test_body_size_cap(client: httpx.AsyncClient, keys: Keys) -> None:
    h = {"X-API-Key": keys.admin_key, "Content-Type": "application/json"}
    big = b'{"url": "https://x.test/' + b"a" * 70_000 + b'", "event_types": ["metrics"]}'
    r = await client.post("/api/v1/webhooks", headers=h, content=big)
    assert r.status_code == 413

    async def chunks():  # type: ignore[no-untyped-def]
        for _ in range(100):
            yield b" " * 1024  # no Content-Length: the streamed size is what counts

    r = await client.post("/api/v1/webhooks", headers=h, content=chunks())
    assert r.status_code == 413
