"""The real stores behind the API's seams: webhook registrations in the state file. (Threshold
rules: hostagent.alerts.rule_store, the API layer of the rule set.)"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from hostagent import handoff
from hostagent.delivery.ssrf import Guard, Resolver, system_resolver
from hostagent.store.webhooks import WebhookStore


class StoreWebhooks:
    """WebhookRegistry over the persistent WebhookStore; wakes the dispatcher on changes.

    `guard` is the webhook sink's SSRF guard (the dispatcher's), so registration refuses what
    delivery would refuse."""

    def __init__(self, store: WebhookStore, guard: Guard, *,
                 wake: Callable[[], None] = lambda: None,
                 resolver: Resolver = system_resolver) -> None:
        self._store = store
        self._guard = guard
        self._wake = wake
        self._resolver = resolver

    async def register(self, url: str, event_types: Sequence[str],
                       secret: str | None) -> Mapping[str, Any]:
        """Persist a registration; UrlRefused or ConfigError when invalid (both are 400)."""
        await self._guard.check_registration(url, self._resolver)
        reg = await handoff.run_sync(self._store.register, url, event_types, secret)
        self._wake()
        return reg.public()

    async def list(self) -> Sequence[Mapping[str, Any]]:
        """Every active registration, secrets shown as None."""
        regs = await handoff.run_sync(self._store.registrations)
        return [r.public() for r in regs]

    async def delete(self, webhook_id: str) -> bool:
        """Remove one (and what it was still owed); False when unknown."""
        return bool(await handoff.run_sync(self._store.delete, webhook_id))
