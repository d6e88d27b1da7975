"""deploy/prometheus/: the rules pass promtool, every alert fires and clears in promtool's unit
tests, and the Grafana dashboard reads the same recorded series the alerts read."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import unavailable

PROM = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"
RULE_FILES = [PROM / "recording.yml", PROM / "alerts.yml"]


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("promtool") is None:
        unavailable("promtool missing (apt package prometheus; `make deps` installs it)")
    return subprocess.run(["promtool", *args], cwd=PROM, capture_output=True, text=True,
                          timeout=120, check=False)


def rules(path: Path) -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"]]


def test_promtool_check_rules_and_config() -> None:
    out = promtool("check", "rules", *map(str, RULE_FILES))
    assert out.returncode == 0, out.stdout + out.stderr
    out = promtool("check", "config", str(PROM / "prometheus.yml"))
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_unit_tests_pass() -> None:
    out = promtool("test", "rules", "tests/alerts_test.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout + out.stderr


def test_every_alert_is_made_to_fire_and_then_to_clear() -> None:
    alerts = {r["alert"] for r in rules(PROM / "alerts.yml")}
    tests = yaml.safe_load((PROM / "tests" / "alerts_test.yml").read_text())["tests"]
    fired: dict[str, list[float]] = {}
    cleared: dict[str, list[float]] = {}

    def minutes(t: str) -> float:
        return float(t.rstrip("m"))

    for t in tests:
        for check in t.get("alert_rule_test", []):
            into = fired if check["exp_alerts"] else cleared
            into.setdefault(check["alertname"], []).append(minutes(check["eval_time"]))
    assert set(fired) == alerts
    for name in alerts:
        assert any(c > f for f in fired[name] for c in cleared.get(name, [])), name


def test_the_dashboard_reads_the_recorded_series_the_alerts_read() -> None:
    recorded = {r["record"] for r in rules(PROM / "recording.yml")}
    dash = json.loads((PROM / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    names = {n for e in exprs for n in re.findall(r"[a-z_:]+:[a-z0-9_:]+|hostagent_[a-z_]+", e)}
    assert recorded <= names, recorded - names            # every recorded series has a panel
    for alert in rules(PROM / "alerts.yml"):
        used = set(re.findall(r"[a-z_]+:[a-z0-9_:]+|hostagent_[a-z_]+", alert["expr"]))
        if alert["alert"] != "HostagentDown":            # `up` is Prometheus's own
            assert used and used <= names, (alert["alert"], used - names)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("name", ["hostagent_domain_read_errors_total",
                                  "hostagent_unattributed_cpu_seconds_total"])
def test_rules_cover_the_metrics_other_components_add(name: str) -> None:
    assert name in (PROM / "recording.yml").read_text()
