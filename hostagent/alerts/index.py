"""What a rule measures in one `Usage`, its comparison levels, and the rule index.

`measure` reads the value the table in `threshold_rules` describes, in the rule's measure unit;
None when it could not be read (missing data never fires or resolves an alert). The index is
built once per rule-set change: rules by instance, by user and wildcard, each grouped by what
they measure and sorted by level, so a pass visits only the rules a value reaches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from hostagent.alerts.rules import WILDCARD, Resource, Rule
from hostagent.model import Usage

NS_PER_S = 1_000_000_000


# --- measuring ------------------------------------------------------------------------------


def measure(rule: Rule, u: Usage) -> float | None:
    """The value `rule` compares for this usage, in `rule.measure_unit`; None when unknown."""
    return measure_value(rule.resource, rule.measure_unit, u)


def measure_value(res: Resource, mu: str, u: Usage) -> float | None:
    """What a (resource, measure unit) pair reads from one Usage; None when unknown.

    NaN and ±infinity are missing too, as the usage event reports them (`missing`): NaN once
    resolved a firing alert, and an infinite value fired one whose stored state (orjson
    writes inf as null) was then unreadable after a restart, so it fired again.
    """
    value = _reading(res, mu, u)
    return value if value is None or value - value == 0.0 else None


def _reading(res: Resource, mu: str, u: Usage) -> float | None:
    period_s = (u.period_end_ns - u.period_start_ns) / NS_PER_S
    if res == "cpu":
        if mu == "percent":
            return u.cpu_percent_avg
        if u.cpu_percent_avg is None:  # no CPU rate for the period: cpu_ns is not a reading
            return None
        return u.cpu_ns / NS_PER_S if mu == "seconds" else (
            u.cpu_ns / NS_PER_S / period_s if period_s > 0 else None)
    if res == "memory":
        return u.memory_percent if mu == "percent" else (
            None if u.memory_bytes is None else float(u.memory_bytes))
    if res == "storage":
        if u.storage_bytes is None:
            return None
        if mu == "percent":
            cap = u.storage_capacity_bytes
            return None if not cap else u.storage_bytes / cap * 100.0
        return float(u.storage_bytes)
    if res in ("network_egress", "network_ingress"):
        if any(k.startswith("net") for k in u.missing):
            return None
        b = u.net_egress_bytes if res == "network_egress" else u.net_ingress_bytes
        if mu == "bytes":
            return float(b)
        return b / period_s if period_s > 0 else None
    # gpu
    if u.gpu_count == 0:
        return None
    return u.gpu_util_avg if mu == "percent" else float(u.gpu_seconds)


# --- the index ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Settings:
    """The [thresholds] knobs the state machine uses (see ThresholdsConfig)."""

    approaching_fraction: float = 0.9
    hysteresis_fraction: float = 0.05
    default_for_passes: int = 1
    repeat_interval_s: float = 3600.0
    cooldown_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Levels:
    """A rule's precomputed comparison levels (in its measure unit)."""

    threshold: float
    approach: float  # at/above: approaching
    approach_clear: float  # approaching clears below this (hysteresis)
    resolve: float  # exceeded resolves below this (hysteresis)
    for_passes: int
    repeat_ns: int  # 0: never repeat


MeasureKey = tuple[Resource, str]
# Rules of one scope grouped by what they measure, sorted by the lowest level at which they
# need attention (min(approach, threshold)): a value v only has to visit rules[:bisect(lows, v)].
Bucket = Mapping[MeasureKey, tuple[Sequence[float], Sequence[Rule]]]


@dataclass(frozen=True, slots=True)
class RuleIndex:
    """Rules by instance, by user and wildcard, each grouped by measure and sorted by level."""

    rules: tuple[Rule, ...]
    settings: Settings
    levels: Mapping[str, Levels]
    by_id: Mapping[str, Rule]
    by_instance: Mapping[str, Bucket]
    by_user: Mapping[str, Bucket]
    wildcard: Bucket

    def applicable(self, instance_id: str, user_id: str | None) -> list[Rule]:
        """Every rule that applies to this instance owned by `user_id` (None: unknown)."""
        out = [r for _, rs in self.by_instance.get(instance_id, {}).values() for r in rs
               if r.user_id in (WILDCARD, user_id)]
        if user_id is not None:
            out.extend(r for _, rs in self.by_user.get(user_id, {}).values() for r in rs)
        out.extend(r for _, rs in self.wildcard.values() for r in rs)
        return out


def levels_of(rule: Rule, s: Settings) -> Levels:
    """Where `rule` approaches, fires and resolves under settings `s`."""
    thr = rule.threshold
    approach = thr * s.approaching_fraction
    repeat_s = s.repeat_interval_s if rule.repeat_interval_s is None else rule.repeat_interval_s
    return Levels(thr, approach, approach * (1 - s.hysteresis_fraction),
                  thr * (1 - s.hysteresis_fraction),
                  rule.for_passes or s.default_for_passes, int(repeat_s * NS_PER_S))


def _bucket(rules: Sequence[Rule], levels: Mapping[str, Levels]) -> Bucket:
    groups: dict[MeasureKey, list[tuple[float, Rule]]] = {}
    for r in rules:
        lv = levels[r.id]
        groups.setdefault((r.resource, r.measure_unit), []).append(
            (min(lv.approach, lv.threshold), r))
    out: dict[MeasureKey, tuple[Sequence[float], Sequence[Rule]]] = {}
    for key, items in groups.items():
        items.sort(key=lambda it: it[0])
        out[key] = ([it[0] for it in items], [it[1] for it in items])
    return out


def build_index(rules: Sequence[Rule], settings: Settings | None = None) -> RuleIndex:
    """Index rules once per rule-set change (not per pass)."""
    s = settings or Settings()
    levels = {r.id: levels_of(r, s) for r in rules}
    by_instance: dict[str, list[Rule]] = {}
    by_user: dict[str, list[Rule]] = {}
    wildcard: list[Rule] = []
    for r in rules:
        if r.instance_id is not None:
            by_instance.setdefault(r.instance_id, []).append(r)
        elif r.user_id != WILDCARD:
            by_user.setdefault(r.user_id, []).append(r)
        else:
            wildcard.append(r)
    return RuleIndex(tuple(rules), s, levels, {r.id: r for r in rules},
                     {k: _bucket(v, levels) for k, v in by_instance.items()},
                     {k: _bucket(v, levels) for k, v in by_user.items()},
                     _bucket(wildcard, levels))
