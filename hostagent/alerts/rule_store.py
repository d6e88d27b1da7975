"""The API's rule store: rules written through /api/v1/thresholds go to the `api` layer.

The layer lives in the state directory (hostagent.alerts.rules_source), never in the
operator's rules file: the API works with the default config and a read-only /etc, and an
ansible run that rewrites the rules file keeps what was written through the API. Every write is
validated (the rule, then the merged set's channels) before the layer's file is replaced
atomically; writes are serialised, so concurrent PUTs each land and the file is always whole.

A PUT of an id that comes from the file or the central source overrides it (the API layer
wins); DELETE removes only API rules (the file's rule, if any, is in force again); deleting a
rule that only the file or the central source holds is refused (`RuleNotWritable`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import trio

from hostagent import handoff
from hostagent.alerts import channels
from hostagent.alerts.rules import Rule, parse_rule
from hostagent.alerts.rules_file import rule_dict
from hostagent.alerts.rules_source import RulesSource
from hostagent.errors import RuleExists, RuleNotWritable, StateError


class LayeredRuleStore:
    """RuleStore (hostagent.api.seams) over the layered RulesSource."""

    def __init__(self, source: RulesSource) -> None:
        self._source = source
        self._lock = trio.Lock()

    def validate(self, raw: Any) -> dict[str, Any]:
        """Parse one rule in either seed format and check its channels (ConfigError)."""
        rule = parse_rule(raw, source="<api>", index=0)
        channels.check([rule], self._source.routes, source="<api>")
        return rule_dict(rule)

    def _shown(self, rule: Rule) -> dict[str, Any]:
        return {**rule_dict(rule), "source": self._source.origin.get(rule.id, "file")}

    async def list(self) -> Sequence[Mapping[str, Any]]:
        """Every rule in force, each with `source`: central, file or api."""
        return [self._shown(r) for r in self._source.index.rules]

    async def get(self, rule_id: str) -> Mapping[str, Any] | None:
        """One rule in force (with its `source`), or None."""
        rule = self._source.index.by_id.get(rule_id)
        return None if rule is None else self._shown(rule)

    async def put(self, rule: Mapping[str, Any], *, create: bool = False) -> bool:
        """Insert or replace by id in the API layer; True when the id was not in force.
        `create`: insert only (RuleExists when the id is in force), checked under the write
        lock: two POSTs of one id at once used to both answer 201, the second replacing the
        first."""
        parsed = parse_rule(dict(rule), source="<api>", index=0)
        async with self._lock:
            new = parsed.id not in self._source.index.by_id
            if create and not new:
                raise RuleExists(f"rule {parsed.id!r} exists; PUT /api/v1/thresholds/{{id}} "
                                 "replaces it")
            api = [r for r in self._source.layers["api"] if r.id != parsed.id] + [parsed]
            await self._write(api)
            return new

    async def delete(self, rule_id: str) -> bool:
        """Remove an API rule; False when unknown; RuleNotWritable for a file/central rule."""
        async with self._lock:
            api = self._source.layers["api"]
            kept = [r for r in api if r.id != rule_id]
            if len(kept) == len(api):
                if rule_id in self._source.index.by_id:
                    raise RuleNotWritable(
                        f"rule {rule_id!r} comes from the {self._source.origin[rule_id]} "
                        "rules; change it there")
                return False
            await self._write(kept)
            return True

    async def _write(self, api: Sequence[Rule]) -> None:
        try:
            await handoff.run_sync(self._source.write_api, api)
        except OSError as err:
            raise StateError(f"{self._source.api_path}: cannot write the API rules: "
                             f"{err.strerror or err}") from err
