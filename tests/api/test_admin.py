"""Webhook and threshold routes (admin only) over the real stores; body limits."""

from __future__ import annotations

import base64
from typing import Any

import httpx
import pytest
import trio

from hostagent.api.view import ApiView
from hostagent.config.sinks import WebhookSinkConfig
from tests.api.support import Keys, Server, api_config, start_server

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


async def test_concurrent_creates_of_one_rule_id_make_one_rule_and_409s(
        client: httpx.AsyncClient, keys: Keys) -> None:
    """POSTs of one id at once: exactly one 201, the others 409 `rule-exists`, and the rule
    in force is the one whose 201 said so. The existence check ran outside the store's write
    lock: all eight got 201 and the last write won (found by an API sweep)."""
    h = {"X-API-Key": keys.admin_key}
    answers: list[httpx.Response] = []

    async def post(i: int) -> None:
        answers.append(await client.post("/api/v1/thresholds", headers=h,
                                         json={**RULE, "id": "race0",
                                               "threshold_value": 100 + i}))

    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(post, i)
    assert sorted(r.status_code for r in answers) == [201] + [409] * 7
    assert all(r.json()["type"].endswith("rule-exists") for r in answers
               if r.status_code == 409)
    (won,) = [r.json() for r in answers if r.status_code == 201]
    now = (await client.get("/api/v1/thresholds/race0", headers=h)).json()
    assert now == won


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


# Issue 13 §2/§3: every one of these answered 500 or 201 before; each is a 400 problem+json
# whose detail says why (the same guard refuses them at delivery).
BAD_WEBHOOKS = [
    ({"url": "https://public.test/h", "event_types": ["bogus"]}, "event_types"),
    ({"url": "https://public.test/h", "event_types": []}, "event_types"),
    ({"url": "", "event_types": ["metrics"]}, "scheme"),
    ({"url": "ftp://public.test/", "event_types": ["metrics"]}, "scheme"),
    ({"url": "file:///etc/passwd", "event_types": ["metrics"]}, "scheme"),
    ({"url": "http://127.0.0.1/", "event_types": ["metrics"]}, "loopback"),
    ({"url": "http://10.1.2.3/", "event_types": ["metrics"]}, "private-use"),
    ({"url": "http://169.254.169.254/latest", "event_types": ["metrics"]}, "metadata"),
    ({"url": "http://[fe80::1]/", "event_types": ["metrics"]}, "link-local"),
    ({"url": "http://192.0.0.8/", "event_types": ["metrics"]}, "192.0.0.0/24"),
    ({"url": "http://[fec0::1]/", "event_types": ["metrics"]}, "site-local"),
    ({"url": "http://[::ffff:10.0.0.1]/", "event_types": ["metrics"]}, "IPv6 form"),
    ({"url": "http://2130706433/", "event_types": ["metrics"]}, "ambiguous"),
    ({"url": "http://0x7f.1/", "event_types": ["metrics"]}, "ambiguous"),
    ({"url": "http://", "event_types": ["metrics"]}, "no host"),
    ({"url": "http:///x", "event_types": ["metrics"]}, "no host"),
    ({"url": "https://public.test/a\r\nX-Evil: 1", "event_types": ["metrics"]}, "'\\r'"),
    ({"url": "https://public.test/" + "a" * 3000, "event_types": ["metrics"]}, "longer"),
    ({"url": "https://public.test:0/", "event_types": ["metrics"]}, "port 0"),
    ({"url": "https://public.test:6379/", "event_types": ["metrics"]}, "internal service"),
    ({"url": "https://public.test:22/", "event_types": ["metrics"]}, "allowed_ports"),
    ({"url": "https://private.test/", "event_types": ["metrics"]}, "resolves to"),
    ({"url": "https://mixed.test/", "event_types": ["metrics"]}, "resolves to"),
    ({"url": "https://public.test/", "event_types": ["metrics"], "secret": "whsec_!!"},
     "whsec_"),
    ({"url": "https://public.test/", "event_types": ["metrics"], "secret": "whsec_c2hvcnQ="},
     "whsec_"),
    ({"url": "https://public.test/", "event_types": ["metrics"], "secret": "has space"},
     "secret"),
]


@pytest.mark.parametrize(("body", "reason"), BAD_WEBHOOKS,
                         ids=[f"{i}" for i in range(len(BAD_WEBHOOKS))])
async def test_bad_webhooks_are_400_with_the_reason(client: httpx.AsyncClient, keys: Keys,
                                                     server: Server, body: dict[str, Any],
                                                     reason: str) -> None:
    r = await client.post("/api/v1/webhooks", headers={"X-API-Key": keys.admin_key}, json=body)
    assert r.status_code == 400, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["type"].endswith("invalid-webhook")
    assert reason in r.json()["detail"]
    assert server.webhook_store.registrations() == []  # nothing stored


async def test_good_webhooks_are_registered(client: httpx.AsyncClient, keys: Keys) -> None:
    h = {"X-API-Key": keys.admin_key}
    secret = "whsec_" + base64.b64encode(bytes(range(32))).decode()
    for url in ("HTTPS://e.test/", "https://public.test:8443/h?x=1", "https://nx.test/",
                "http://93.184.215.14/"):
        r = await client.post("/api/v1/webhooks", headers=h,
                              json={"url": url, "event_types": ["metrics"], "secret": secret})
        assert r.status_code == 201, (url, r.text)


async def test_allow_listed_internal_hosts_register(nursery: trio.Nursery, keys: Keys) -> None:
    srv = await start_server(nursery, api_config(keys), ApiView(),
                             webhook_sink=WebhookSinkConfig(allow_list=("10.0.0.0/8",)))
    async with httpx.AsyncClient(base_url=srv.url) as c:
        r = await c.post("/api/v1/webhooks", headers={"X-API-Key": keys.admin_key},
                         json={"url": "http://private.test:8080/", "event_types": ["metrics"]})
    assert r.status_code == 201, r.text
    srv.stop.set()


async def test_rules_with_non_finite_numbers_are_400(client: httpx.AsyncClient,
                                                     keys: Keys) -> None:
    h = {"X-API-Key": keys.admin_key, "Content-Type": "application/json"}
    for raw in (b'{"resource_type": "storage", "threshold_type": "absolute", "threshold_value":'
                b' 1e999, "units": "GB", "action": "notify", "user_id": "u"}',
                b'{"resource_type": "storage", "threshold_type": "absolute", "threshold_value":'
                b' NaN, "units": "GB", "action": "notify", "user_id": "u"}'):
        r = await client.post("/api/v1/thresholds", headers=h, content=raw)
        assert r.status_code == 400, r.text
        assert "JSON" in r.json()["detail"]


async def test_a_rules_store_that_cannot_be_written_is_503(server: Server,
                                                           client: httpx.AsyncClient,
                                                           keys: Keys) -> None:
    api_rules = server.rules_path.parent / "api-rules.json"  # the API layer, in the state dir
    api_rules.unlink(missing_ok=True)
    api_rules.mkdir()  # os.replace onto a directory fails: an OSError, not a 500
    h = {"X-API-Key": keys.admin_key}
    for r in (await client.post("/api/v1/thresholds", headers=h, json=RULE),
              await client.put("/api/v1/thresholds/r1", headers=h, json=RULE)):
        assert r.status_code == 503, r.text
        assert r.json()["type"].endswith("rules-not-writable")


async def test_path_parameters_are_bounded(client: httpx.AsyncClient, keys: Keys) -> None:
    h = {"X-API-Key": keys.admin_key}
    r = await client.get("/api/v1/thresholds/" + "x" * 1025, headers=h)
    assert r.status_code == 400
    assert (await client.get("/api/v1/thresholds/" + "x" * 1024, headers=h)).status_code == 404
    # no control character: a NUL or a line break was answered (200, echoed back)
    for path in ("/api/v1/usage/users/%00/current", "/api/v1/usage/users/a%0ab/current",
                 "/api/v1/thresholds/%00", "/api/v1/metrics/instances/a%C2%85"):
        r = await client.get(path, headers=h)
        assert r.status_code == 400, (path, r.text)
        assert r.headers["content-type"] == "application/problem+json"
    for path in ("/api/v1/thresholds/a%20b", "/api/v1/thresholds/%ff",  # U+FFFD: not found
                 "/api/v1/thresholds/r%C3%A9gle"):
        assert (await client.get(path, headers=h)).status_code == 404, path


@pytest.mark.parametrize("query", ["limit=1_0", "limit=%EF%BC%95", "limit=+5", "offset=%205",
                                   "resource=cpu,,memory", "resource=%20cpu", "fields=",
                                   "instance_id=" + "a" * 1025])
async def test_query_parameters_are_exact(client: httpx.AsyncClient, keys: Keys,
                                          query: str) -> None:
    r = await client.get(f"/api/v1/metrics?{query}", headers={"X-API-Key": keys.admin_key})
    assert r.status_code == 400, r.text
    assert r.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize("over", [{"repeat_interval_s": 1.29e308}, {"threshold_value": 1e300},
                                  {"for_passes": 10**18}, {"repeat_interval_s": 40_000_000}])
async def test_rule_numbers_that_would_overflow_are_400(server: Server,
                                                        client: httpx.AsyncClient, keys: Keys,
                                                        over: dict[str, Any]) -> None:
    """Found by schemathesis: repeat_interval_s = 1.29e308 was a 500 and left the file bad."""
    h = {"X-API-Key": keys.admin_key}
    for r in (await client.post("/api/v1/thresholds", headers=h, json={**RULE, **over}),
              await client.put("/api/v1/thresholds/r1", headers=h, json={**RULE, **over})):
        assert r.status_code == 400, r.text
        assert r.json()["key"] == next(iter(over))  # the body's key, not its place in a file
    assert server.rules_path.read_text() == "[]"  # nothing written
