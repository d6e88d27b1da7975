"""Load: 50 concurrent clients against a live server: no errors, no 5xx, sane latency.

Runs HOSTAGENT_API_LOAD_S seconds (default 3 to keep the suite fast; the issue's 20 s run and
the pass-duration comparison are in bench/api.py).
"""

from __future__ import annotations

import os

import httpx
import trio

from hostagent.api.view import ApiView
from tests.api.support import Keys, api_config, report, start_server, token

DURATION_S = float(os.environ.get("HOSTAGENT_API_LOAD_S", "3"))
CLIENTS = 50
MAX_S = 30.0


async def test_fifty_clients_no_errors(nursery: trio.Nursery, keys: Keys) -> None:
    view = ApiView()
    owned = {f"i-{n:04d}": f"0xu{n % 10}" for n in range(1000)}
    view.update(report(owned))
    cfg = api_config(keys, rate_per_address_s=1e6, burst_per_address=10**6,
                     rate_per_principal_s=1e6, burst_per_principal=10**6)
    srv = await start_server(nursery, cfg, view)
    statuses: dict[int, int] = {}
    failures: list[str] = []
    answered = [0] * CLIENTS  # per client

    async def client(i: int) -> None:
        user = f"0xu{i % 10}"
        h = {"Authorization": f"Bearer {token(keys, user)}"}
        paths = [f"/api/v1/usage/users/{user}/current", "/api/v1/metrics?limit=20",
                 f"/api/v1/usage/instances/i-{i % 10:04d}/current", "/health"]
        async with httpx.AsyncClient(base_url=srv.url, headers=h, timeout=30) as c:
            n = 0
            # DURATION_S, and on a loaded machine on until the clients have CLIENTS answers
            # between them (at most MAX_S): the count below is then about the server, not
            # about how busy the machine was (one CI-like run with other work beside it got
            # fewer than 50 answers in 3 s).
            with trio.move_on_after(MAX_S):
                while trio.current_time() < done_at or sum(answered) < CLIENTS:
                    try:
                        r = await c.get(paths[n % len(paths)])
                    except httpx.HTTPError as err:
                        failures.append(repr(err))
                        continue
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                    answered[i] += 1
                    n += 1

    done_at = trio.current_time() + DURATION_S
    async with trio.open_nursery() as n:
        for i in range(CLIENTS):
            n.start_soon(client, i)
        # meanwhile the "collector" swaps snapshots, as Daemon.on_pass would
        for _ in range(int(DURATION_S * 4)):
            await trio.sleep(0.25)
            view.update(report(owned))
    srv.stop.set()
    assert failures == []
    assert set(statuses) == {200}, statuses
    # The server kept answering throughout: at least as many answers as clients. A count,
    # not a rate: how many fit in the window depends on the machine's load (other test
    # workers on the same cores: 68 in 3 s with three, ~200 alone). The clients share this
    # trio loop with the server, so a few of them may get no turn in a short window.
    assert sum(answered) >= CLIENTS, answered
