"""Every read route against a real server on 127.0.0.1, with real JWTs and API keys."""

from __future__ import annotations

import httpx
import pytest
import trio

from hostagent.api.view import ApiView
from hostagent.clock import SystemClock
from tests.api.support import (
    ALICE,
    ALICE_UPPER,
    BOB,
    DAVE,
    Keys,
    Server,
    api_config,
    report,
    start_server,
    token,
)


def bearer(t: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {t}"}


async def test_health_is_open_and_plain(client: httpx.AsyncClient) -> None:
    r = await client.get("/health")
    assert r.status_code == 200
    assert r.text == "healthy"


async def test_alice_sees_only_her_instances(client: httpx.AsyncClient, keys: Keys) -> None:
    r = await client.get("/api/v1/metrics", headers=bearer(token(keys, ALICE_UPPER)))
    assert r.status_code == 200
    body = r.json()
    assert [i["instance_id"] for i in body["items"]] == ["i-a1", "i-a2"]
    assert body["total"] == 2
    assert body["next_offset"] is None
    first = body["items"][0]
    assert first["metrics"]["cpu"]["cpu_seconds"] == 30
    assert first["metrics"]["network"]["network_egress_mb"] == 10.0
    assert first["readings"]["cpu_ns"] == 3600 * 10**9
    assert first["period"]["duration_s"] == 30.0


async def test_admin_sees_all_and_filters(client: httpx.AsyncClient, keys: Keys) -> None:
    h = {"X-API-Key": keys.admin_key}
    r = await client.get("/api/v1/metrics", headers=h)
    assert [i["instance_id"] for i in r.json()["items"]] == ["i-a1", "i-a2", "i-b1", "i-c1"]
    r = await client.get("/api/v1/metrics", headers=h, params={"user_id": BOB})
    assert [i["instance_id"] for i in r.json()["items"]] == ["i-b1"]
    r = await client.get("/api/v1/metrics", headers=h,
                         params={"instance_id": "i-b1,i-c1,nope", "fields": "instance_id,metrics",
                                 "resource": "cpu,gpu"})
    items = r.json()["items"]
    assert items == [{"instance_id": "i-b1", "metrics": items[0]["metrics"]},
                     {"instance_id": "i-c1", "metrics": items[1]["metrics"]}]
    assert set(items[0]["metrics"]) == {"cpu", "gpu"}


async def test_pagination(client: httpx.AsyncClient, keys: Keys) -> None:
    h = {"X-API-Key": keys.admin_key}
    seen = []
    offset: int | None = 0
    while offset is not None:
        r = await client.get("/api/v1/metrics", headers=h, params={"limit": 3, "offset": offset})
        body = r.json()
        assert body["total"] == 4
        seen += [i["instance_id"] for i in body["items"]]
        offset = body["next_offset"]
    assert seen == ["i-a1", "i-a2", "i-b1", "i-c1"]


@pytest.mark.parametrize(("params", "word"), [
    ({"resource": "ram"}, "resource"), ({"fields": "secret"}, "field"),
    ({"limit": "0"}, "limit"), ({"limit": "x"}, "limit"), ({"offset": "-1"}, "offset"),
    ({"limit": "100000"}, "limit"), ({"user_id": "a,b"}, "user_id"),
])
async def test_bad_query_is_a_problem(client: httpx.AsyncClient, keys: Keys,
                                      params: dict[str, str], word: str) -> None:
    r = await client.get("/api/v1/metrics", headers={"X-API-Key": keys.admin_key}, params=params)
    assert r.status_code == 400
    assert r.headers["content-type"] == "application/problem+json"
    p = r.json()
    assert p["status"] == 400
    assert word in p["detail"]
    assert p["instance"] == "/api/v1/metrics"


async def test_instance_routes_and_ownership(client: httpx.AsyncClient, keys: Keys) -> None:
    alice = bearer(token(keys, ALICE))
    r = await client.get("/api/v1/usage/instances/i-a1/current", headers=alice)
    assert r.status_code == 200
    assert r.json()["user_id"] == ALICE
    assert "readings" not in r.json()
    r = await client.get("/api/v1/metrics/instances/i-a2", headers=alice)
    assert r.json()["readings"]["nics"][0]["guest_tx_bytes"] == 200
    # another user's instance and a missing one answer identically
    theirs = await client.get("/api/v1/usage/instances/i-b1/current", headers=alice)
    missing = await client.get("/api/v1/usage/instances/i-zz/current", headers=alice)
    assert theirs.status_code == missing.status_code == 404
    assert theirs.json()["detail"] == missing.json()["detail"]
    # an authorized (non-owner) address can read; owner-less access via the index works
    r = await client.get("/api/v1/usage/instances/i-c1/current",
                         headers=bearer(token(keys, "0X" + DAVE[2:].upper())))
    assert r.status_code == 200


@pytest.mark.parametrize("spelled", [ALICE, ALICE[2:], ALICE.upper().replace("0X", "0x"),
                                     "0X" + ALICE[2:].upper(), ALICE[2:].upper()])
async def test_a_principal_sees_its_instances_however_its_address_is_spelled(
        client: httpx.AsyncClient, keys: Keys, spelled: str) -> None:
    """Issue 13 §6: owners and principals are normalised by the same function."""
    h = bearer(token(keys, spelled))
    r = await client.get("/api/v1/metrics", headers=h)
    assert r.status_code == 200
    assert sorted(i["instance_id"] for i in r.json()["items"]) == ["i-a1", "i-a2"]
    r = await client.get(f"/api/v1/usage/users/{spelled}/current", headers=h)
    assert r.status_code == 200, r.text
    assert r.json()["totals"]["instances"] == 2


async def test_user_current_sums_and_refuses_others(client: httpx.AsyncClient,
                                                    keys: Keys) -> None:
    alice = {"X-API-Key": keys.read_key}  # principal ALICE_UPPER
    r = await client.get(f"/api/v1/usage/users/{ALICE}/current", headers=alice)
    assert r.status_code == 200
    body = r.json()
    assert body["totals"]["instances"] == 2
    assert body["totals"]["cpu_seconds"] == 60
    assert body["totals"]["egress_bytes"] == 2 * (10 << 20)
    assert [i["instance_id"] for i in body["instances"]] == ["i-a1", "i-a2"]
    r = await client.get(f"/api/v1/usage/users/{ALICE}/current", headers=alice,
                         params={"limit": 1})
    assert r.json()["next_offset"] == 1
    assert r.json()["totals"]["instances"] == 2
    for other in (BOB, "nobody"):
        r = await client.get(f"/api/v1/usage/users/{other}/current", headers=alice)
        assert r.status_code == 403
    r = await client.get(f"/api/v1/usage/users/{BOB}/current",
                         headers={"X-API-Key": keys.admin_key})
    assert r.json()["totals"]["instances"] == 1


async def test_legacy_get_needs_credentials_unless_configured(
        client: httpx.AsyncClient, keys: Keys, nursery: trio.Nursery) -> None:
    r = await client.get("/get")
    assert r.status_code == 401
    r = await client.get("/get", headers={"X-API-Key": keys.other_key})
    assert r.json()["instance_id"] == "i-b1"  # upstream's single SystemMetrics
    view = ApiView()
    view.update(report({"i-x": "u"}))
    srv = await start_server(nursery, api_config(keys, legacy_get_unauthenticated=True), view)
    async with httpx.AsyncClient(base_url=srv.url) as c:
        r = await c.get("/get")
    srv.stop.set()
    assert r.status_code == 200
    assert r.json()["instance_id"] == "i-x"


async def test_unknown_route_and_method_are_problems(client: httpx.AsyncClient,
                                                     keys: Keys) -> None:
    r = await client.get("/api/v1/nothing")
    assert r.status_code == 404
    assert r.headers["content-type"] == "application/problem+json"
    r = await client.delete("/api/v1/metrics", headers={"X-API-Key": keys.admin_key})
    assert r.status_code == 405
    assert r.json()["status"] == 405


async def test_health_status(nursery: trio.Nursery, keys: Keys) -> None:
    now_ns = SystemClock().now().wall_ns
    sinks = {"queue": {"breaker": "closed", "depth": 0, "oldest_pending_age_s": None}}
    state = {"libvirt": "connected", "owners": "fresh"}
    view = ApiView(delivery_health=lambda: {"status": "ok", "sinks": sinks,
                                            "store_near_cap": False},
                   owners_health=lambda: {"state": state["owners"]},
                   libvirt_health=lambda: {"state": state["libvirt"]})
    view.update(_fresh_report(now_ns))
    srv = await start_server(nursery, api_config(keys), view)
    h = {"X-API-Key": keys.admin_key}
    async with httpx.AsyncClient(base_url=srv.url) as c:
        r = await c.get("/api/v1/health/status", headers=h)
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "ok"
        assert r.json()["components"]["collector"]["instances"] == 1
        state["libvirt"] = "reconnecting"
        sinks["queue"] = {"breaker": "open", "depth": 9, "oldest_pending_age_s": 7200.0}
        r = await c.get("/api/v1/health/status", headers=h)
        assert r.status_code == 503
        reasons = r.json()["reasons"]
        assert "libvirt not connected" in reasons
        assert any("breaker open" in x for x in reasons)
        assert any("oldest pending" in x for x in reasons)
    srv.stop.set()


def _fresh_report(now_ns: int):  # type: ignore[no-untyped-def]
    rep = report({"i-1": "u"})
    rep.started_wall_ns = now_ns
    return rep


async def test_failed_pass_keeps_last_instances(server: Server,
                                                client: httpx.AsyncClient, keys: Keys) -> None:
    from tests.api.support import Report

    server.view.update(Report(committed=False, error="source unavailable: libvirtd down"))
    r = await client.get("/api/v1/metrics", headers={"X-API-Key": keys.admin_key})
    assert r.json()["total"] == 4
    assert server.view.snapshot.pass_info.failed_passes == 1
