"""The central rules source against a real HTTP server on 127.0.0.1 (issue 17 §3): ETag,
persisted last good set, stale-while-error, faults, a signed pull, precedence under the file."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostagent.alerts.central import CentralRules, from_config
from hostagent.alerts.index import Settings
from hostagent.alerts.routing import Route
from hostagent.alerts.rules_source import RulesSource
from hostagent.config.schema import ThresholdsConfig
from hostagent.errors import ConfigError
from hostagent.owners.signing import verify
from tests.clocks import FakeClock
from tests.standins.rules_server import RulesServer

ROUTES = {"jsonl": Route(None, None), "queue": Route(None, frozenset({"queue"}))}
RULE = {"id": "fleet-cpu", "resource_type": "Cpu", "action": "Notify", "user_id": "*",
        "threshold_type": {"Percentage": {"value": 85.0}}, "notification_channels": ["queue"]}
S = 10**9


@pytest.fixture
def server() -> Iterator[RulesServer]:
    srv = RulesServer(json.dumps([RULE]).encode()).start()
    try:
        yield srv
    finally:
        srv.stop()


def make(tmp_path: Path, url: str, clock: FakeClock, **kw: object) -> tuple[CentralRules,
                                                                            RulesSource]:
    src = RulesSource(None, Settings(), routes=ROUTES)
    src.load_initial()
    central = CentralRules(url, src, tmp_path / "central-rules.json", clock, timeout_s=0.5,
                           max_bytes=64 * 1024, **kw)  # type: ignore[arg-type]
    return central, src


async def test_pull_etag_persist_and_restart_without_the_source(tmp_path: Path,
                                                                 server: RulesServer) -> None:
    clock = FakeClock()
    central, src = make(tmp_path, server.url, clock)
    assert await central.refresh() is True
    assert [r.id for r in src.index.rules] == ["fleet-cpu"]
    assert src.origin == {"fleet-cpu": "central"}
    clock.advance(30)
    assert await central.refresh() is True  # 304: unchanged, and fresh again
    assert server.requests[-1]["If-None-Match"] == central.etag
    assert central.age_s() == 0.0
    server.stop()
    # a restart while the source is down starts with the last good set
    clock.advance(100)
    again, src2 = make(tmp_path, server.url, clock)
    assert again.load_persisted() is True
    assert [r.id for r in src2.index.rules] == ["fleet-cpu"]
    assert await again.refresh() is False  # down: stale-while-error
    assert [r.id for r in src2.index.rules] == ["fleet-cpu"]
    assert again.age_s() == 130.0  # since the persisted 200 (a 304 is not persisted)
    assert again.health()["central_failures"] == 1


@pytest.mark.parametrize("fault", ["500", "slow", "garbage", "huge", "drop"])
async def test_faults_keep_the_last_good_set(tmp_path: Path, server: RulesServer,
                                             fault: str) -> None:
    clock = FakeClock()
    central, src = make(tmp_path, server.url, clock)
    assert await central.refresh()
    before = (tmp_path / "central-rules.json").read_bytes()
    server.fault = fault
    server.slow_s = 1.5
    clock.advance(60)
    assert await central.refresh() is False
    assert central.last_error
    assert [r.id for r in src.index.rules] == ["fleet-cpu"]
    assert (tmp_path / "central-rules.json").read_bytes() == before
    assert central.age_s() == 60.0
    server.fault = None
    assert await central.refresh() is True
    assert central.last_error is None


async def test_one_invalid_rule_refuses_the_whole_set(tmp_path: Path,
                                                      server: RulesServer) -> None:
    central, src = make(tmp_path, server.url, FakeClock())
    assert await central.refresh()
    server.body = json.dumps([{**RULE, "id": "ok-2"}, {**RULE, "id": "bad",
                              "threshold_type": {"Percentage": {"value": -1}}}]).encode()
    assert await central.refresh() is False
    assert "rules[1]" in (central.last_error or "")
    server.body = json.dumps([{**RULE, "id": "mail", "notification_channels": ["email"]}]).encode()
    assert await central.refresh() is False  # a channel no sink serves
    assert [r.id for r in src.index.rules] == ["fleet-cpu"]


async def test_the_file_overrides_the_central_set(tmp_path: Path, server: RulesServer) -> None:
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps([{**RULE, "threshold_type": {"Percentage": {"value": 50.0}}}]))
    src = RulesSource(rules, Settings(), routes=ROUTES)
    src.load_initial()
    central = CentralRules(server.url, src, tmp_path / "c.json", FakeClock())
    assert await central.refresh()
    (rule,) = src.index.rules
    assert (rule.threshold, src.origin[rule.id]) == (50.0, "file")


async def test_signed_pulls_carry_the_node_signature(tmp_path: Path,
                                                     server: RulesServer) -> None:
    key = tmp_path / "node.key"
    key.write_text("11" * 32)
    key.chmod(0o600)
    src = RulesSource(None, Settings(), routes=ROUTES)
    cfg = ThresholdsConfig(source_url=server.url, source_signed=True)
    central = from_config(cfg, src, FakeClock(), state_path=tmp_path / "state.db",
                          key_file=str(key))
    assert central is not None
    assert await central.refresh()
    v = verify(server.requests[-1]["Authorization"])
    assert v.message.startswith(b"GET /v1/thresholds ")
    assert v.address == central.signer.address  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="key_file"):
        from_config(cfg, src, FakeClock(), state_path=tmp_path / "state.db")
    with pytest.raises(ConfigError, match="source_url"):
        CentralRules("ftp://x/rules", src, tmp_path / "c.json", FakeClock())
