"""The API's real stores: rules through the rules file, webhooks in the state file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hostagent.alerts.index import Settings
from hostagent.alerts.rules_source import RulesSource, load_rules
from hostagent.api.backends import FileRuleStore, StoreWebhooks
from hostagent.clock import FakeClock
from hostagent.config.sinks import WebhookSinkConfig
from hostagent.delivery.ssrf import Guard
from hostagent.errors import ConfigError
from hostagent.store.outbox import Store
from hostagent.store.webhooks import WebhookStore
from tests.api.support import resolver_for_tests

NESTED = {"id": "cpu-high", "resource_type": "Cpu",
          "threshold_type": {"Percentage": {"value": 80.0}}, "action": "Notify",
          "user_id": "*", "notification_channels": ["queue"], "for_passes": 3}
FLAT = {"id": "disk-big", "resource_type": "storage", "threshold_type": "absolute",
        "threshold_value": 500, "units": "GB", "action": "notify", "user_id": "user_1",
        "notification_channels": ["email"]}


@pytest.mark.parametrize("suffix", [".json", ".toml"])
async def test_rules_written_through_the_api_land_in_the_file(tmp_path: Path,
                                                              suffix: str) -> None:
    path = tmp_path / f"rules{suffix}"
    path.write_text("[]" if suffix == ".json" else "")
    source = RulesSource(path, Settings())
    source.load_initial()
    store = FileRuleStore(source)
    assert await store.put(store.validate(NESTED)) is True
    assert await store.put(store.validate(FLAT)) is True
    assert await store.put(store.validate({**NESTED, "for_passes": 5})) is False  # replaced
    # the file itself holds the rules, and reloads to the same set
    on_disk = {r.id: r for r in load_rules(path)}
    assert set(on_disk) == {"cpu-high", "disk-big"}
    assert on_disk["cpu-high"].for_passes == 5
    assert on_disk["disk-big"].threshold == 500 * 2**30
    got = await store.get("cpu-high")
    assert got is not None
    assert got["threshold_type"] == {"Percentage": {"value": 80.0}}
    assert await store.delete("cpu-high") is True
    assert await store.delete("cpu-high") is False
    assert [r["id"] for r in await store.list()] == ["disk-big"]
    assert [r.id for r in source.index.rules] == ["disk-big"]


async def test_invalid_rules_are_refused_and_nothing_changes(tmp_path: Path) -> None:
    path = tmp_path / "rules.json"
    path.write_text(json.dumps([NESTED]))
    source = RulesSource(path, Settings())
    source.load_initial()
    store = FileRuleStore(source)
    with pytest.raises(ConfigError):
        store.validate({**FLAT, "units": "percent"})
    assert json.loads(path.read_text()) == [NESTED]


async def test_without_a_rules_path_writes_are_a_clear_error(tmp_path: Path) -> None:
    store = FileRuleStore(RulesSource(None, Settings()))
    with pytest.raises(ConfigError, match="rules_path"):
        await store.put(store.validate(NESTED))


async def test_webhook_registrations_persist_and_never_show_the_secret(tmp_path: Path) -> None:
    clock = FakeClock()
    db = tmp_path / "state.db"
    Store.open(db, clock=clock, node_id="h", sink_names=["webhooks"]).close()
    woken = []
    guard = Guard.from_config(WebhookSinkConfig())
    hooks = StoreWebhooks(WebhookStore(db, clock), guard, wake=lambda: woken.append(1),
                          resolver=resolver_for_tests)
    reg = await hooks.register("https://example.invalid/hook", ["threshold_violation"], "s")
    assert reg["id"].startswith("webhook_")
    assert reg["secret"] is None
    assert woken == [1]
    again = StoreWebhooks(WebhookStore(db, clock), guard)   # a restart: still there
    assert [r["id"] for r in await again.list()] == [reg["id"]]
    assert await again.delete(reg["id"]) is True
    assert await again.delete(reg["id"]) is False
