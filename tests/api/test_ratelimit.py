"""Token buckets: unit behaviour on a fake clock, and 429 + Retry-After over HTTP."""

from __future__ import annotations

import httpx
import trio

from hostagent.api.ratelimit import RateLimiter
from hostagent.api.view import ApiView
from tests.api.support import ALICE, Keys, api_config, report, start_server
from tests.clocks import FakeClock


def test_bucket_refills_at_rate() -> None:
    clock = FakeClock()
    rl = RateLimiter(clock, rate_per_s=2.0, burst=3)
    assert [rl.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = rl.take("a")
    assert 0.49 < wait <= 0.5
    assert rl.take("b") == 0.0  # keys are independent
    clock.advance(0.5)
    assert rl.take("a") == 0.0
    assert rl.take("a") > 0
    clock.advance(100)
    assert [rl.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]  # capped at burst
    assert rl.take("a") > 0
    assert rl.refused == 3


def test_table_is_bounded() -> None:
    rl = RateLimiter(FakeClock(), rate_per_s=1.0, burst=1, max_keys=100)
    for i in range(1000):
        rl.take(f"10.0.{i // 256}.{i % 256}")
    assert len(rl._buckets) == 100


async def test_429_per_principal_and_per_address(nursery: trio.Nursery, keys: Keys) -> None:
    view = ApiView()
    view.update(report({"i-a1": ALICE}))
    cfg = api_config(keys, rate_per_principal_s=0.01, burst_per_principal=3,
                     rate_per_address_s=0.01, burst_per_address=6)
    srv = await start_server(nursery, cfg, view)
    async with httpx.AsyncClient(base_url=srv.url) as c:
        alice = {"X-API-Key": keys.read_key}
        codes = [(await c.get("/api/v1/metrics", headers=alice)).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        r = await c.get("/api/v1/metrics", headers=alice)
        assert r.status_code == 429
        assert int(r.headers["retry-after"]) >= 1
        assert r.headers["content-type"] == "application/problem+json"
        assert "principal" in r.json()["detail"]
        # another principal still has its own bucket, until the address runs dry
        admin = {"X-API-Key": keys.admin_key}
        assert (await c.get("/api/v1/metrics", headers=admin)).status_code == 200
        r = await c.get("/api/v1/metrics", headers=admin)
        assert r.status_code == 429
        assert "address" in r.json()["detail"]
        # liveness is answered whatever the address's bucket holds (a probe never fails)
        assert [(await c.get("/health")).status_code for _ in range(10)] == [200] * 10
    srv.stop.set()


async def test_the_routers_own_answers_are_limited_per_address(nursery: trio.Nursery,
                                                               keys: Keys) -> None:
    """404 (no such path) and 405 (no such method) come from the router, not from a route:
    they skipped the address's bucket (300 at once got 300 answers, found by an API sweep)."""
    cfg = api_config(keys, rate_per_address_s=0.01, burst_per_address=4)
    srv = await start_server(nursery, cfg, ApiView())
    async with httpx.AsyncClient(base_url=srv.url) as c:
        codes = [(await c.get("/nope")).status_code,
                 (await c.request("OPTIONS", "/api/v1/metrics")).status_code,
                 (await c.get("/nope")).status_code,
                 (await c.delete("/api/v1/metrics")).status_code,
                 (await c.get("/nope")).status_code,
                 (await c.request("OPTIONS", "/api/v1/metrics")).status_code]
        assert codes == [404, 405, 404, 405, 429, 429]
        r = await c.get("/nope")
        assert r.headers["content-type"] == "application/problem+json"
        assert int(r.headers["retry-after"]) >= 1
        assert [(await c.get("/health")).status_code for _ in range(3)] == [200] * 3
    srv.stop.set()
