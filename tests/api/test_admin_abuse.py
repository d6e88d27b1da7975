"""Admin routes under hostile requests: never a write by HEAD, never a 500, never a stall.

Each case here once answered 500 (a traceback in the log, a 5xx counted), wrote on a HEAD, or
held every pass back: found by fuzzing a running daemon, checked against a real server.
"""

from __future__ import annotations

import re

import httpx
import pytest
import trio

from hostagent.api import server as server_mod
from hostagent.api.pass_gate import PassGate
from hostagent.api.view import ApiView
from tests.api.support import Keys, Server, api_config, start_server

RULE = {"resource_type": "storage", "threshold_type": "absolute", "threshold_value": 500,
        "units": "GB", "action": "notify", "user_id": "user_123456",
        "notification_channels": ["email", "api_callback"]}
HOOK = {"url": "https://example.test/hook", "event_types": ["metrics"]}


async def server_errors(client: httpx.AsyncClient, keys: Keys) -> int:
    """The 5xx the server counted, from its own /metrics."""
    text = (await client.get("/metrics", headers={"X-API-Key": keys.admin_key})).text
    return sum(int(float(n)) for n in re.findall(
        r'^hostagent_api_requests_total\{[^}]*code="5xx"[^}]*\} (\S+)', text, re.M))


async def test_head_reads_and_never_writes(server: Server, client: httpx.AsyncClient,
                                           keys: Keys) -> None:
    h = {"X-API-Key": keys.admin_key}
    r = await client.request("HEAD", "/api/v1/webhooks", headers=h, json=HOOK)
    assert r.status_code == 200 and r.content == b""
    r = await client.request("HEAD", "/api/v1/thresholds", headers=h, json=RULE)
    assert r.status_code == 200
    r = await client.request("HEAD", "/api/v1/thresholds/headrule", headers=h, json=RULE)
    assert r.status_code == 404  # as GET: no such rule, and none is made
    assert (await client.get("/api/v1/webhooks", headers=h)).json() == []
    assert (await client.get("/api/v1/thresholds", headers=h)).json() == []
    assert server.webhook_store.registrations() == []


@pytest.mark.parametrize("depth", [33, 600, 1000])
async def test_deeply_nested_bodies_are_400(client: httpx.AsyncClient, keys: Keys,
                                            depth: int) -> None:
    h = {"X-API-Key": keys.admin_key, "Content-Type": "application/json"}
    nested = "[" * depth + "]" * depth
    for method, path, body in (
            ("POST", "/api/v1/thresholds", f'{{"id": "d", "x": {nested}}}'),
            ("PUT", "/api/v1/thresholds/d", f'{{"x": {nested}}}'),
            ("POST", "/api/v1/webhooks", f'{{"url": "https://x.test", "event_types": {nested}}}')):
        r = await client.request(method, path, headers=h, content=body.encode())
        assert r.status_code == 400, (method, path, r.text)
        assert r.headers["content-type"] == "application/problem+json"
    r = await client.post("/api/v1/webhooks", headers=h, content=b'{"url": [[["x"]]]}')
    assert r.status_code == 400  # shallow nesting is judged as before
    assert await server_errors(client, keys) == 0


async def test_an_empty_secret_is_refused(client: httpx.AsyncClient, keys: Keys) -> None:
    h = {"X-API-Key": keys.admin_key}
    r = await client.post("/api/v1/webhooks", headers=h, json={**HOOK, "secret": ""})
    assert r.status_code == 400, r.text
    assert r.json()["key"] == "secret"
    assert (await client.get("/api/v1/webhooks", headers=h)).json() == []


async def test_an_encoded_body_is_415(client: httpx.AsyncClient, keys: Keys) -> None:
    h = {"X-API-Key": keys.admin_key, "Content-Type": "application/json"}
    for enc in ("gzip", "br", "deflate"):
        r = await client.post("/api/v1/webhooks", headers={**h, "Content-Encoding": enc},
                              content=b'{"url": "https://x.test", "event_types": ["metrics"]}')
        assert r.status_code == 415, enc
    body = b'{"url": "https://x.test", "event_types": ["metrics"]}'
    # every header counts, not the first (an `identity` then a `gzip` was let through), and a
    # charset other than UTF-8 is not read as UTF-8
    for headers in ([("Content-Encoding", "identity"), ("Content-Encoding", "gzip")],
                    [("Content-Encoding", "identity, gzip")],
                    [("Content-Type", "application/json")],  # a second Content-Type
                    [("Content-Type", "text/plain")]):
        r = await client.post("/api/v1/webhooks", content=body,
                              headers=httpx.Headers([*h.items(), *headers]))
        assert r.status_code == 415, (headers, r.text)
    r = await client.post("/api/v1/webhooks", content=body, headers={
        **h, "Content-Type": "application/json; charset=latin-1"})
    assert r.status_code == 415, r.text
    r = await client.post("/api/v1/webhooks", headers={
        **h, "Content-Encoding": "identity", "Content-Type": "application/json; charset=UTF-8"},
        content=b'{"url": "https://public.test/", "event_types": ["metrics"]}')
    assert r.status_code == 201, r.text


@pytest.mark.parametrize("rid", ["a/b", "a b", "a\x00b", "tab\there", "x" * 1025, "r\u00e9gle",
                                 "line\n"])
async def test_rule_ids_the_api_could_not_address_again_are_refused(
        client: httpx.AsyncClient, keys: Keys, rid: str) -> None:
    h = {"X-API-Key": keys.admin_key}
    r = await client.post("/api/v1/thresholds", headers=h, json={**RULE, "id": rid})
    assert r.status_code == 400, r.text
    assert r.json()["key"] == "id"
    assert (await client.get("/api/v1/thresholds", headers=h)).json() == []


@pytest.mark.parametrize("owner", [{"user_id": "u" * 257}, {"user_id": "a\x00b"},
                                   {"user_id": "\n\r"}, {"instance_id": "\x1b[31mvm"},
                                   {"instance_id": "i" * 1025}])
async def test_rule_owners_that_are_not_ids_are_refused(
        client: httpx.AsyncClient, keys: Keys, owner: dict[str, str]) -> None:
    """A rule's user_id: an owner id an event can carry (at most 256 printable characters) or
    "*"; its instance_id: at most 1,024 printable characters (a 60 KB user id and one of
    control characters were accepted and kept, found by an API sweep)."""
    h = {"X-API-Key": keys.admin_key}
    r = await client.post("/api/v1/thresholds", headers=h, json={**RULE, **owner})
    assert r.status_code == 400, r.text
    assert r.json()["key"] == next(iter(owner))
    assert (await client.get("/api/v1/thresholds", headers=h)).json() == []
    r = await client.post("/api/v1/thresholds", headers=h,
                          json={**RULE, "user_id": "u" * 256, "instance_id": "vm 1 é" * 170})
    assert r.status_code == 201, r.text


async def test_every_addressable_rule_id_round_trips(client: httpx.AsyncClient,
                                                     keys: Keys) -> None:
    h = {"X-API-Key": keys.admin_key}
    rid = "cpu.hot_host-1~A:x@y!" + "z" * 1000
    r = await client.post("/api/v1/thresholds", headers=h, json={**RULE, "id": rid})
    assert r.status_code == 201, r.text
    assert (await client.get(f"/api/v1/thresholds/{rid}", headers=h)).json()["id"] == rid
    assert (await client.delete(f"/api/v1/thresholds/{rid}", headers=h)).status_code == 204


async def raw_partial_post(url: str, key: str) -> trio.SocketStream:
    """A POST whose headers promise 100 bytes of body, of which one is sent."""
    host, port = url.removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    await stream.send_all(
        b"POST /api/v1/webhooks HTTP/1.1\r\nHost: x\r\nX-API-Key: " + key.encode()
        + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
    return stream


async def test_a_client_that_hangs_up_mid_body_costs_no_500(
        server: Server, client: httpx.AsyncClient, keys: Keys) -> None:
    for _ in range(3):
        stream = await raw_partial_post(server.url, keys.admin_key)
        await trio.sleep(0.05)
        await stream.aclose()
    await trio.sleep(0.3)
    assert await server_errors(client, keys) == 0
    assert server.webhook_store.registrations() == []


async def test_a_client_slow_to_send_its_body_is_cut_off_and_no_pass_waits_for_it(
        nursery: trio.Nursery, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_mod, "READ_TIMEOUT_S", 1)
    gate = PassGate()
    srv = await start_server(nursery, api_config(keys), ApiView(), gate=gate)
    stream = await raw_partial_post(srv.url, keys.admin_key)
    await trio.sleep(0.3)  # past the gate and authenticated, waiting for the body's bytes
    assert gate.in_flight == 0  # waiting on its client: not in flight
    with gate.busy():  # a pass: its drain does not wait for the silent client
        assert await gate.drain(5.0) == 0.0
    t0 = trio.current_time()
    with trio.fail_after(5):  # the server closes the connection after 1 s of silence
        while await stream.receive_some():
            pass
    assert trio.current_time() - t0 < 3
    await stream.aclose()
    async with httpx.AsyncClient(base_url=srv.url, timeout=10) as c:
        assert await server_errors(c, keys) == 0
        assert (await c.get("/api/v1/webhooks",
                            headers={"X-API-Key": keys.admin_key})).json() == []
    srv.stop.set()


async def test_a_channel_with_a_line_break_is_refused(client: httpx.AsyncClient,
                                                      keys: Keys) -> None:
    """`email:a@x\\r\\nBcc: …` would forge mail headers (and once crashed delivery at every
    start): refused as a bad field, nothing stored."""
    h = {"X-API-Key": keys.admin_key}
    for chans in (["email:a@x\r\nBcc: b@y"], ["api_callback\n"], ["e" * 300]):
        r = await client.post("/api/v1/thresholds", headers=h,
                              json={**RULE, "id": "crlf", "notification_channels": chans})
        assert 400 <= r.status_code < 500, (chans, r.text)
        assert r.headers["content-type"] == "application/problem+json"
    assert (await client.get("/api/v1/thresholds", headers=h)).json() == []
    assert await server_errors(client, keys) == 0
