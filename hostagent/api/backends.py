"""The real stores behind the API's seams: webhook registrations in the state file, and threshold
rules in the rules file (the one source of truth the daemon reloads).

Rules written through the API are validated by the same parser as the file, then the whole file
is rewritten atomically (temp file, fsync, rename) and reloaded, so an operator who edits the
file and the dashboard that calls the API see one rule set.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
import trio

from hostagent.alerts.rules import Rule, parse_rule
from hostagent.alerts.rules_source import RulesSource
from hostagent.delivery.ssrf import Guard, Resolver, system_resolver
from hostagent.errors import ConfigError
from hostagent.store.webhooks import WebhookStore


def rule_dict(rule: Rule) -> dict[str, Any]:
    """A rule as the rules file and the API hold it (seed 000 form plus our optional keys)."""
    out = rule.config_dict()
    if out.get("instance_id") is None:
        out.pop("instance_id", None)
    if rule.for_passes is not None:
        out["for_passes"] = rule.for_passes
    if rule.repeat_interval_s is not None:
        out["repeat_interval_s"] = rule.repeat_interval_s
    return out


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


class FileRuleStore:
    """RuleStore over the rules file: every write rewrites the file and reloads the rule set."""

    def __init__(self, source: RulesSource) -> None:
        self._source = source
        self._lock = trio.Lock()

    def validate(self, raw: Any) -> dict[str, Any]:
        """Parse one rule in either seed format (ConfigError when invalid)."""
        return rule_dict(parse_rule(raw, source="<api>", index=0))

    async def list(self) -> Sequence[Mapping[str, Any]]:
        """Every rule in force."""
        return [rule_dict(r) for r in self._source.index.rules]

    async def get(self, rule_id: str) -> Mapping[str, Any] | None:
        """One rule, or None."""
        return next((rule_dict(r) for r in self._source.index.rules if r.id == rule_id), None)

    async def put(self, rule: Mapping[str, Any]) -> bool:
        """Insert or replace by id; True when it was new."""
        async with self._lock:
            rules = [rule_dict(r) for r in self._source.index.rules]
            new = all(r["id"] != rule["id"] for r in rules)
            rules = [r for r in rules if r["id"] != rule["id"]] + [dict(rule)]
            await self._write(rules)
            return new

    async def delete(self, rule_id: str) -> bool:
        """Remove one; False when unknown."""
        async with self._lock:
            rules = [rule_dict(r) for r in self._source.index.rules]
            kept = [r for r in rules if r["id"] != rule_id]
            if len(kept) == len(rules):
                return False
            await self._write(kept)
            return True

    async def _write(self, rules: Sequence[dict[str, Any]]) -> None:
        path = self._source.path
        if path is None:
            raise ConfigError("<config>", "thresholds.rules_path", "a rules file path",
                              "", "set thresholds.rules_path to manage rules through the API")
        await trio.to_thread.run_sync(_atomic_write, path, rules)
        if not self._source.reload():
            raise ConfigError(str(path), "-", "a rules file that reloads",
                              self._source.last_error)


def _atomic_write(path: Path, rules: Sequence[dict[str, Any]]) -> None:
    body = (orjson.dumps(rules, option=orjson.OPT_INDENT_2) + b"\n"
            if path.suffix.lower() != ".toml" else _toml(rules))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o640)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _toml(rules: Sequence[dict[str, Any]]) -> bytes:
    # A TOML rules file is rewritten as JSON would be refused by its suffix: write TOML tables.
    lines: list[str] = []
    for r in rules:
        lines.append("[[rules]]")
        for k, v in r.items():
            if k == "threshold_type":
                continue
            lines.append(f"{k} = {orjson.dumps(v).decode()}")
        tt = r["threshold_type"]
        kind, body = next(iter(tt.items()))
        inner = ", ".join(f"{k} = {orjson.dumps(v).decode()}" for k, v in body.items())
        lines.append(f"threshold_type = {{ {kind} = {{ {inner} }} }}")
        lines.append("")
    return "\n".join(lines).encode()
