"""Seams to the webhook store and the rule store, with in-memory versions for tests.

The API depends only on these Protocols; the daemon passes the real, persistent ones
(hostagent.store.webhooks / hostagent.alerts.rules_source). Invalid input is reported by raising
`ValueError` (webhooks) or `ConfigError` (rules, as the rules file does): both become 400.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol
from urllib.parse import urlsplit

EVENT_TYPES = ("metrics", "threshold_violation")


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

    async def put(self, rule: Mapping[str, Any]) -> bool:
        """Insert or replace by `id` (already validated); True when it was new."""
        ...

    async def delete(self, rule_id: str) -> bool:
        """Remove one; False when the id is unknown."""
        ...


def check_webhook(url: str, event_types: Sequence[str]) -> None:
    """Raise ValueError unless url is absolute http(s) and event types are known."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("url must be an absolute http:// or https:// URL")
    bad = [e for e in event_types if e not in EVENT_TYPES]
    if bad or not event_types:
        raise ValueError(f"event_types must be a non-empty subset of {list(EVENT_TYPES)}")


class MemoryWebhooks:
    """In-memory WebhookRegistry (tests; the daemon uses the persistent store)."""

    def __init__(self, now_iso: Callable[[], str] = lambda: "") -> None:
        self._items: dict[str, dict[str, Any]] = {}
        self._secrets: dict[str, str | None] = {}
        self._now_iso = now_iso

    async def register(self, url: str, event_types: Sequence[str],
                       secret: str | None) -> Mapping[str, Any]:
        """See WebhookRegistry.register."""
        check_webhook(url, event_types)
        wid = f"webhook_{secrets.token_hex(4)}"
        item = {"id": wid, "url": url, "event_types": list(event_types), "secret": None,
                "created_at": self._now_iso()}
        self._items[wid] = item
        self._secrets[wid] = secret
        return dict(item)

    async def list(self) -> Sequence[Mapping[str, Any]]:
        """See WebhookRegistry.list."""
        return [dict(v) for v in self._items.values()]

    async def delete(self, webhook_id: str) -> bool:
        """See WebhookRegistry.delete."""
        self._secrets.pop(webhook_id, None)
        return self._items.pop(webhook_id, None) is not None


class MemoryRules:
    """In-memory RuleStore validating with hostagent.thresholds.parse_rule."""

    def __init__(self) -> None:
        self._rules: dict[str, dict[str, Any]] = {}

    def validate(self, raw: Any) -> dict[str, Any]:
        """See RuleStore.validate."""
        from hostagent.alerts.rules import parse_rule

        r = parse_rule(raw, source="<api>")
        out = r.config_dict()
        if r.for_passes is not None:
            out["for_passes"] = r.for_passes
        if r.repeat_interval_s is not None:
            out["repeat_interval_s"] = r.repeat_interval_s
        return out

    async def list(self) -> Sequence[Mapping[str, Any]]:
        """See RuleStore.list."""
        return [dict(v) for v in self._rules.values()]

    async def get(self, rule_id: str) -> Mapping[str, Any] | None:
        """See RuleStore.get."""
        r = self._rules.get(rule_id)
        return None if r is None else dict(r)

    async def put(self, rule: Mapping[str, Any]) -> bool:
        """See RuleStore.put."""
        new = rule["id"] not in self._rules
        self._rules[str(rule["id"])] = dict(rule)
        return new

    async def delete(self, rule_id: str) -> bool:
        """See RuleStore.delete."""
        return self._rules.pop(rule_id, None) is not None


