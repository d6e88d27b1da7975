"""A real Prometheus (Debian's `prometheus`, on 127.0.0.1) scrapes a real daemon on the lab
with the shipped rules loaded: the series exist, and per-domain CPU counters agree with the
events the daemon wrote."""

from __future__ import annotations

import itertools
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import unavailable
from tests.test_lab import DaemonProc, dedupe, read_events, wait_for, write_config

pytestmark = pytest.mark.lab

PROM = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"
SCRAPE_S = 2
SERIES = [
    "hostagent_instance_cpu_seconds_total", "hostagent_instance_vcpus",
    "hostagent_instance_memory_alloc_bytes", "hostagent_instance_network_egress_bytes_total",
    "hostagent_instance_disk_write_bytes_total", "hostagent_instance_last_update_timestamp_seconds",
    "hostagent_passes_total", "hostagent_last_committed_pass_timestamp_seconds",
    "hostagent_pass_interval_seconds", "hostagent_pass_timeout_seconds",
    "hostagent_outbox_depth", "hostagent_outbox_dead_letters", "hostagent_outbox_max_bytes",
    "hostagent_sink_breaker_state", "hostagent_owner_lookups_total",
    "hostagent_light_samples_total", "hostagent_vm_ends_watched",
]
# recorded by deploy/prometheus/recording.yml from the above (its groups run every 30 s)
RECORDED = ["owner:hostagent_instance_cpu_seconds:rate5m", "hostagent:last_pass_age_seconds",
            "hostagent:outbox_fill:ratio", "owner:hostagent_instance_memory_used_bytes:sum"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def prometheus(tmp_path: Path, lab_guests: list[str]) -> Iterator[tuple[str, int, Path]]:
    """(Prometheus base URL, the daemon's API port, the daemon's tmp dir); both stopped after."""
    if shutil.which("prometheus") is None:
        unavailable("prometheus missing (apt package prometheus; `make deps` installs it)")
    api_port, prom_port = free_port(), free_port()
    cfg = write_config(tmp_path, interval_s=2.0, extra=f"""
[api]
enabled = true
bind = "127.0.0.1"
port = {api_port}
metrics_unauthenticated = true
""")
    for name in ("recording.yml", "alerts.yml"):
        shutil.copy(PROM / name, tmp_path / name)
    (tmp_path / "prometheus.yml").write_text(f"""
global: {{scrape_interval: {SCRAPE_S}s, evaluation_interval: {SCRAPE_S}s}}
rule_files: [recording.yml, alerts.yml]
scrape_configs:
  - job_name: hostagent
    static_configs: [{{targets: ["127.0.0.1:{api_port}"]}}]
""")
    daemon = DaemonProc(cfg, tmp_path / "daemon.log")
    prom_log = (tmp_path / "prometheus.log").open("wb")
    prom = subprocess.Popen(
        ["prometheus", f"--config.file={tmp_path}/prometheus.yml",
         f"--storage.tsdb.path={tmp_path}/tsdb", f"--web.listen-address=127.0.0.1:{prom_port}"],
        cwd=tmp_path, stdout=prom_log, stderr=subprocess.STDOUT)
    try:
        yield f"http://127.0.0.1:{prom_port}", api_port, tmp_path
    finally:
        prom.terminate()
        prom.wait(timeout=30)
        prom_log.close()
        daemon.stop()


def query(base: str, promql: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{base}/api/v1/query", params={"query": promql}, timeout=10)
    r.raise_for_status()
    body = r.json()
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/-/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_prometheus_scrapes_the_daemon_and_cpu_agrees_with_events(
        prometheus: tuple[str, int, Path], lab_guests: list[str]) -> None:
    base, _api_port, tmp = prometheus
    wait_for(lambda: ready(base), 60, "prometheus ready")
    # two scrapes of a daemon that had committed a pass, then a few more for the CPU check
    wait_for(lambda: any(float(s["value"][1]) >= 4 for s in query(
        base, 'count_over_time(hostagent_passes_total{job="hostagent"}[10m])')),
        90, "four scrapes of the daemon")
    up = query(base, 'up{job="hostagent"}')
    assert [float(s["value"][1]) for s in up] == [1.0]
    missing = [name for name in SERIES if not query(base, name)]
    assert missing == []
    wait_for(lambda: all(query(base, name) for name in RECORDED), 75,
             "the recording rules over two scrapes")
    # per-domain labels: hostagent's `instance` became `exported_instance` (default scrape)
    by_uuid = {s["metric"]["exported_instance"]: s for s in
               query(base, "hostagent_instance_cpu_seconds_total")}
    assert len(by_uuid) >= len(lab_guests)
    # CPU: between two scrapes, the counter's growth equals the cpu_seconds of the events whose
    # periods end at the readings those scrapes saw (events carry the fraction: < 1 s apart)
    evs = dedupe(read_events(tmp / "events.jsonl"))
    checked = 0
    for uuid in by_uuid:
        sel = f'{{exported_instance="{uuid}"}}[10m]'
        cpu = query(base, "hostagent_instance_cpu_seconds_total" + sel)
        seen = query(base, "hostagent_instance_last_update_timestamp_seconds" + sel)
        if not cpu or not seen:
            continue
        at = {ts: float(v) for ts, v in seen[0]["values"]}
        points = sorted({(at[ts], float(v)) for ts, v in cpu[0]["values"] if ts in at})
        ends = {e["period_ns"]["end"] for e in evs if e["instance_id"] == uuid}
        points = [(t, v) for t, v in points if round(t * 1e9) in ends or any(
            abs(round(t * 1e9) - end) < 1000 for end in ends)]
        for (t1, v1), (t2, v2) in itertools.pairwise(points):
            billed = sum(e["metrics"]["cpu_seconds"] for e in evs if e["instance_id"] == uuid
                         and t1 * 1e9 + 1000 < e["period_ns"]["end"] <= t2 * 1e9 + 1000)
            assert abs(billed - (v2 - v1)) < 1.0 + 1e-6, (uuid, t1, t2, billed, v2 - v1)
            checked += 1
    assert checked >= len(lab_guests), "too few scrape pairs to compare"
    # the per-owner recording rule sums the same counters
    owners = query(base, "owner:hostagent_instance_cpu_seconds:rate5m")
    assert owners and all(float(s["value"][1]) >= 0 for s in owners)
