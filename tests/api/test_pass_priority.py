"""Collection first: a real server parks requests while a pass runs (not /health), bounded by
`api.yield_to_pass_max_s`, and counts the deferrals in /metrics."""

from __future__ import annotations

import re

import httpx
import trio

from hostagent.api.pass_gate import PassGate
from hostagent.api.view import ApiView
from tests.api.support import ALICE, Keys, Server, api_config, report, start_server


async def _hold(gate: PassGate, until: trio.Event, *,
                task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """A pass: the gate is closed until `until` is set."""
    with gate.busy():
        task_status.started()
        await until.wait()


async def gated_server(nursery: trio.Nursery, keys: Keys, max_wait_s: float
                       ) -> tuple[ApiView, PassGate, Server]:
    """A server over one instance of ALICE, held back by a fresh gate."""
    view = ApiView()
    view.update(report({"i-1": ALICE}))
    gate = PassGate()
    srv = await start_server(nursery, api_config(keys, yield_to_pass_max_s=max_wait_s), view,
                             gate=gate)
    return view, gate, srv


async def test_requests_wait_for_the_pass_and_health_does_not(nursery: trio.Nursery,
                                                              keys: Keys) -> None:
    view, gate, srv = await gated_server(nursery, keys, 30.0)
    got: dict[str, httpx.Response] = {}
    async with httpx.AsyncClient(base_url=srv.url, timeout=10,
                                 headers={"X-API-Key": keys.admin_key}) as http:
        async def get(path: str) -> None:
            got[path] = await http.get(path)

        pass_ends = trio.Event()
        async with trio.open_nursery() as n:
            await n.start(_hold, gate, pass_ends)
            n.start_soon(get, "/api/v1/metrics")
            n.start_soon(get, f"/api/v1/usage/users/{ALICE}/current")
            with trio.fail_after(5):
                assert (await http.get("/health")).status_code == 200  # liveness at once
            await trio.sleep(0.5)
            assert got == {}  # both parked while the pass runs
            view.update(report({"i-1": ALICE, "i-2": ALICE}))  # the pass's snapshot
            pass_ends.set()
        assert {p: r.status_code for p, r in got.items()} == {
            "/api/v1/metrics": 200, f"/api/v1/usage/users/{ALICE}/current": 200}
        # served after the pass: they see its snapshot, never a half-updated one
        assert "i-2" in got["/api/v1/metrics"].text
        metrics = (await http.get("/metrics")).text
    deferred = re.search(r"^hostagent_api_deferred_requests_total (\S+)$", metrics, re.M)
    assert deferred is not None and float(deferred.group(1)) == 2.0
    waited = re.search(r"^hostagent_api_deferred_seconds_total (\S+)$", metrics, re.M)
    assert waited is not None and float(waited.group(1)) >= 2 * 0.5


async def test_a_stuck_pass_delays_answers_by_the_bound_only(nursery: trio.Nursery,
                                                             keys: Keys) -> None:
    _, gate, srv = await gated_server(nursery, keys, 0.3)
    never = trio.Event()
    await nursery.start(_hold, gate, never)  # a pass stuck on a slow libvirtd
    async with httpx.AsyncClient(base_url=srv.url, timeout=10,
                                 headers={"X-API-Key": keys.read_key}) as http:
        t0 = trio.current_time()
        with trio.fail_after(5):
            r = await http.get("/api/v1/usage/instances/i-1/current")
        elapsed_s = trio.current_time() - t0
    assert r.status_code == 200
    assert elapsed_s >= 0.3
    assert gate.pass_running and gate.timed_out_waits == 1
    never.set()
