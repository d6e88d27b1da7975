"""GET /metrics: a parseable exposition with bounded labels and the daemon's own metrics."""

from __future__ import annotations

import dataclasses

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from hostagent.accounting import unattributed
from hostagent.api.view import ApiView
from hostagent.delivery import metrics as em
from tests.api.support import ALICE, BOB, Keys, api_config, report, start_server


def emission() -> em.EmissionMetrics:
    c = em.SinkCounters(published=7, failed=2)
    c.observe_latency(0.02)
    return em.EmissionMetrics(
        sinks={"queue": em.snapshot("queue", c, depth=3, oldest_pending_age_s=12.5,
                                    dead_letters=1, breaker_state="open", breaker_opened=1)},
        store_used_bytes=4096, store_file_bytes=8192, store_max_bytes=10**9, merges=0)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_exposition(nursery: trio.Nursery, keys: Keys) -> None:
    view = ApiView(emission_metrics=emission,
                   owners_health=lambda: {"lookup_ok": 5, "lookup_failed": 2, "refresh_ok": 1},
                   pass_settings=lambda: {"interval_s": 30.0, "timeout_s": 20.0},
                   tail_health=lambda: {"light_samples": 12, "light_sample_errors": 1,
                                        "vm_ends_seen": 2, "vm_ends_watched": True,
                                        "closeouts": {"DESTROYED": 2, "GONE": 1},
                                        "xml_changes_heard": True,
                                        "domain_xml_reads": {"new": 8, "changed": 1}})
    rep = report({"i-a1": ALICE, "i-b1": BOB})
    rep.read_errors_total = {"pid_file": 3, "xml": 1}
    view.update(rep)
    srv = await start_server(nursery, api_config(keys), view)
    async with httpx.AsyncClient(base_url=srv.url) as c:
        assert (await c.get("/metrics")).status_code == 401
        assert (await c.get("/metrics", headers={"X-API-Key": keys.read_key})).status_code == 403
        await c.get("/api/v1/metrics", headers={"X-API-Key": keys.read_key})
        r = await c.get("/metrics", headers={"X-API-Key": keys.admin_key})
    srv.stop.set()
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    s = samples(r.text)
    a1 = (("instance", "i-a1"), ("owner", ALICE))
    assert s[("hostagent_instance_cpu_seconds_total", a1)] == 3600.0
    assert s[("hostagent_instance_network_egress_bytes_total", a1)] == 200
    assert s[("hostagent_instance_memory_used_bytes", a1)] == 2 << 30
    assert s[("hostagent_instances", ())] == 2
    assert s[("hostagent_passes_total", ())] == 1
    assert s[("hostagent_domain_read_errors_total", (("reason", "pid_file"),))] == 3
    assert s[("hostagent_domain_read_errors_total", (("reason", "xml"),))] == 1
    assert s[("hostagent_events_published_total", (("sink", "queue"),))] == 7
    assert s[("hostagent_outbox_depth", (("sink", "queue"),))] == 3
    assert s[("hostagent_sink_breaker_state", (("sink", "queue"), ("state", "open")))] == 1
    assert s[("hostagent_sink_latency_seconds_count", (("sink", "queue"),))] == 1
    # what the shipped alert rules (deploy/prometheus/) need besides the above
    assert s[("hostagent_outbox_dead_letters", (("sink", "queue"),))] == 1
    assert s[("hostagent_outbox_max_bytes", ())] == 10**9
    assert s[("hostagent_owner_lookups_total", (("result", "failed"),))] == 2
    assert s[("hostagent_owner_lookups_total", (("result", "not_found"),))] == 0
    assert s[("hostagent_owner_refreshes_total", (("result", "ok"),))] == 1
    assert s[("hostagent_pass_interval_seconds", ())] == 30.0
    assert s[("hostagent_pass_timeout_seconds", ())] == 20.0
    # the billing tail (hostagent/tailing.py TailTasks.health)
    assert s[("hostagent_light_samples_total", ())] == 12
    assert s[("hostagent_light_sample_errors_total", ())] == 1
    assert s[("hostagent_vm_ends_seen_total", ())] == 2
    assert s[("hostagent_vm_ends_watched", ())] == 1
    assert s[("hostagent_closeouts_total", (("reason", "DESTROYED"),))] == 2
    assert s[("hostagent_closeouts_total", (("reason", "GONE"),))] == 1
    assert s[("hostagent_domain_xml_changes_heard", ())] == 1
    assert s[("hostagent_domain_xml_reads_total", (("reason", "new"),))] == 8
    assert s[("hostagent_domain_xml_reads_total", (("reason", "changed"),))] == 1
    assert s[("hostagent_api_requests_total",
              (("code", "2xx"), ("route", "/api/v1/metrics")))] == 1
    # bounded labels: only these label names anywhere
    names = {k for (_n, labels) in s for k, _v in labels}
    assert names <= {"instance", "owner", "sink", "state", "route", "code", "le", "reason",
                     "result"}
    routes = {dict(labels).get("route") for (n, labels) in s if n.startswith("hostagent_api")}
    assert "/api/v1/metrics/instances/i-a1" not in routes


async def test_metrics_can_be_opened(nursery: trio.Nursery, keys: Keys) -> None:
    view = ApiView()
    srv = await start_server(nursery, api_config(keys, metrics_unauthenticated=True), view)
    async with httpx.AsyncClient(base_url=srv.url) as c:
        r = await c.get("/metrics")
    srv.stop.set()
    assert r.status_code == 200
    assert "hostagent_passes_total 0.0" in r.text


async def test_unattributed_cpu_is_exported_only_where_a_v2_parent_gives_it(
        nursery: trio.Nursery, keys: Keys) -> None:
    view = ApiView()
    srv = await start_server(nursery, api_config(keys, metrics_unauthenticated=True), view)
    async with httpx.AsyncClient(base_url=srv.url) as c:
        view.update(report({"i-a1": "0xalice"}))
        without = samples((await c.get("/metrics")).text)
        rep = report({"i-a1": "0xalice"})
        state = unattributed.advance(unattributed.start(10**9, 0), 4 * 10**9, 10**9, [])
        assert state is not None
        rep.unattributed_cpu_s = state.total_s
        view.update(rep)
        with_v2 = samples((await c.get("/metrics")).text)
        view.update(dataclasses.replace(rep, committed=False))  # a failed pass keeps it
        failed = samples((await c.get("/metrics")).text)
    srv.stop.set()
    assert ("hostagent_unattributed_cpu_seconds_total", ()) not in without
    assert with_v2[("hostagent_unattributed_cpu_seconds_total", ())] == 3.0
    assert failed[("hostagent_unattributed_cpu_seconds_total", ())] == 3.0
