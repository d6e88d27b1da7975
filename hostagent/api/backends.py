"""The real stores behind the API's seams: webhook registrations in the state file. (Threshold
rules: hostagent.alerts.rule_store, the API layer of the rule set.)"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import trio

from hostagent.store.webhooks import WebhookStore


class StoreWebhooks:
    """WebhookRegistry over the persistent WebhookStore; wakes the dispatcher on changes."""

    def __init__(self, store: WebhookStore, wake: Callable[[], None] = lambda: None) -> None:
        self._store = store
        self._wake = wake

    async def register(self, url: str, event_types: Sequence[str],
                       secret: str | None) -> Mapping[str, Any]:
        """Persist a registration; the secret is stored, never shown."""
        reg = await trio.to_thread.run_sync(self._store.register, url, event_types, secret)
        self._wake()
        return reg.public()

    async def list(self) -> Sequence[Mapping[str, Any]]:
        """Every active registration, secrets shown as None."""
        regs = await trio.to_thread.run_sync(self._store.registrations)
        return [r.public() for r in regs]

    async def delete(self, webhook_id: str) -> bool:
        """Remove one (and what it was still owed); False when unknown."""
        return bool(await trio.to_thread.run_sync(self._store.delete, webhook_id))
