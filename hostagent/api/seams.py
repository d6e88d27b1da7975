"""Seams to the webhook store and the rule store: the Protocols the routes are written against.

There is ONE implementation of each, the real one (hostagent.api.backends: StoreWebhooks over
the state file; hostagent.alerts.rule_store: LayeredRuleStore over the rules), which the daemon
and the tests both use, so the tests see exactly the errors the daemon raises. Invalid input is
reported by raising `ConfigError` (event types, secret, rules) or `UrlRefused` (the SSRF
guard): both become 400.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol


class WebhookRegistry(Protocol):
    """Webhook registrations (FORMATION.md §4); the secret is write-only."""

    async def register(self, url: str, event_types: Sequence[str],
                       secret: str | None) -> Mapping[str, Any]:
        """Store a registration; returns it (with `"secret": None`) including its `id`."""
        ...

    async def list(self) -> Sequence[Mapping[str, Any]]:
        """Every registration, secrets shown as None."""
        ...

    async def delete(self, webhook_id: str) -> bool:
        """Remove one; False when the id is unknown."""
        ...


class RuleStore(Protocol):
    """Threshold rules, validated like the rules file; rules are JSON dicts with an `id`."""

    def validate(self, raw: Any) -> dict[str, Any]:
        """Parse one rule in either seed format; raises ConfigError; returns its canonical dict."""
        ...

    async def list(self) -> Sequence[Mapping[str, Any]]:
        """Every rule."""
        ...

    async def get(self, rule_id: str) -> Mapping[str, Any] | None:
        """One rule, or None."""
        ...

    async def put(self, rule: Mapping[str, Any], *, create: bool = False) -> bool:
        """Insert or replace by `id` (already validated); True when it was new. `create`:
        insert only, RuleExists when the id is in force (atomic with the insert)."""
        ...

    async def delete(self, rule_id: str) -> bool:
        """Remove one; False when the id is unknown."""
        ...
