"""The API's real webhook store in the state file (rules: tests/alerts/test_rule_store.py)."""

from __future__ import annotations

from pathlib import Path

from hostagent.api.backends import StoreWebhooks
from hostagent.config.sinks import WebhookSinkConfig
from hostagent.delivery.ssrf import Guard
from hostagent.store.outbox import Store
from hostagent.store.webhooks import WebhookStore
from tests.api.support import resolver_for_tests
from tests.clocks import FakeClock


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
