"""Threshold rules: both seed formats → one `Rule`; the rule index; what a rule measures.

Formats (both normalise to the same `Rule`; `config_dict` renders it back in seed 000's form):

* nested (seeds 000/003): ``{"id", "resource_type": "Cpu"|"Memory"|"Storage"|"NetworkEgress"|
  "NetworkIngress"|"Gpu", "threshold_type": {"Percentage": {"value"}} | {"Absolute": {"value",
  "unit"}}, "action": "Notify"|"Log"|"Alert", "user_id" ("*" = everyone), "instance_id"?,
  "notification_channels"}``
* flat (seed 004): ``{"resource_type": "storage", "threshold_type": "absolute"|"percentage",
  "threshold_value", "units", "action", "user_id", "instance_id"?, "notification_channels",
  "id"?}``; without an ``id`` the id is ``rule-<sha256 of the canonical rule, 12 hex>``.

Both accept the optional extras ``for_passes`` (consecutive passes above the threshold before
an alert fires) and ``repeat_interval_s``. Unknown keys are errors (a typo must not silently
change what a rule means).

What a value is, per resource (`measure`):

=============== =============================================== =============================
resource        percentage (of the instance's allocation)       absolute units
=============== =============================================== =============================
cpu             cpu_percent_avg: CPU time / (period × vCPUs)    seconds (CPU s in the period),
                                                                cores (average cores busy)
memory          memory_percent: used / allocated memory         B, KB/KiB, MB/MiB, GB/GiB, TB
storage         storage_bytes / storage_capacity_bytes          same byte units
network_*       refused: hostagent does not know a NIC's        bytes per period (byte units)
                bandwidth (use an absolute rate)                or a rate (B/s … GB/s, kbps,
                                                                Mbps, Gbps)
gpu             gpu_util_avg (mean utilisation of its GPUs)     seconds (GPU s in the period)
=============== =============================================== =============================

Byte units are binary, like the events (`_gb` = GiB): "GB" means 2**30 bytes. Rates in bits
(kbps, Mbps, Gbps) are decimal (10**3, 10**6, 10**9 bit/s). A value that could not be read
(`Usage.missing`, None) is `None`: missing data never fires or resolves an alert.
"""

from __future__ import annotations

import hashlib
import math
from bisect import bisect_right
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from hostagent.errors import ConfigError
from hostagent.model import Usage

Resource = Literal["cpu", "memory", "storage", "network_egress", "network_ingress", "gpu"]
Action = Literal["notify", "log", "alert"]
Kind = Literal["percent", "absolute"]
WILDCARD = "*"
NS_PER_S = 1_000_000_000

_RESOURCES: dict[str, Resource] = {
    "cpu": "cpu", "memory": "memory", "storage": "storage", "networkegress": "network_egress",
    "network_egress": "network_egress", "networkingress": "network_ingress",
    "network_ingress": "network_ingress", "gpu": "gpu",
}
_SEED_NAMES: dict[Resource, str] = {
    "cpu": "Cpu", "memory": "Memory", "storage": "Storage", "network_egress": "NetworkEgress",
    "network_ingress": "NetworkIngress", "gpu": "Gpu",
}
_ACTIONS: dict[str, Action] = {"notify": "notify", "log": "log", "alert": "alert"}
_BYTE_UNITS = {"B": 1, "KB": 1 << 10, "KIB": 1 << 10, "MB": 1 << 20, "MIB": 1 << 20,
               "GB": 1 << 30, "GIB": 1 << 30, "TB": 1 << 40, "TIB": 1 << 40}
_RATE_UNITS = {"B/S": 1.0, "KB/S": 1024.0, "MB/S": 1024.0**2, "GB/S": 1024.0**3,
               "KBPS": 1e3 / 8, "MBPS": 1e6 / 8, "GBPS": 1e9 / 8}
_PERCENT_UNITS = {"", "%", "PERCENT", "PCT"}
# Which absolute units each resource takes: unit (upper case) → (canonical name, factor).
_UNITS: dict[Resource, dict[str, tuple[str, float]]] = {
    "cpu": {"SECONDS": ("seconds", 1.0), "S": ("seconds", 1.0), "CORES": ("cores", 1.0),
            "VCPUS": ("cores", 1.0)},
    "memory": {u: ("bytes", float(f)) for u, f in _BYTE_UNITS.items()},
    "storage": {u: ("bytes", float(f)) for u, f in _BYTE_UNITS.items()},
    "network_egress": {**{u: ("bytes", float(f)) for u, f in _BYTE_UNITS.items()},
                       **{u: ("bytes/s", f) for u, f in _RATE_UNITS.items()}},
    "network_ingress": {**{u: ("bytes", float(f)) for u, f in _BYTE_UNITS.items()},
                        **{u: ("bytes/s", f) for u, f in _RATE_UNITS.items()}},
    "gpu": {"SECONDS": ("seconds", 1.0), "S": ("seconds", 1.0)},
}
_NESTED_KEYS = {"id", "resource_type", "threshold_type", "action", "user_id", "instance_id",
                "notification_channels", "for_passes", "repeat_interval_s"}
_FLAT_KEYS = _NESTED_KEYS | {"threshold_value", "units", "unit"}


@dataclass(frozen=True, slots=True)
class Rule:
    """One normalised threshold rule; `threshold` is in `measure_unit` (percent, bytes, ...)."""

    id: str
    resource: Resource
    kind: Kind
    value: float  # as written, in `unit`
    unit: str  # as written ("percent" for percentages)
    threshold: float  # in `measure_unit`
    measure_unit: str  # "percent", "bytes", "bytes/s", "seconds" or "cores"
    action: Action
    user_id: str
    instance_id: str | None
    channels: tuple[str, ...]
    for_passes: int | None = None  # None: the [thresholds] default
    repeat_interval_s: float | None = None

    def config_dict(self) -> dict[str, Any]:
        """The rule in seed 000's ThresholdConfig form (the `config` of a violation event)."""
        tt: dict[str, Any] = (
            {"Percentage": {"value": self.value}} if self.kind == "percent"
            else {"Absolute": {"value": self.value, "unit": self.unit}})
        return {"id": self.id, "resource_type": _SEED_NAMES[self.resource],
                "threshold_type": tt, "action": self.action.capitalize(),
                "user_id": self.user_id, "instance_id": self.instance_id,
                "notification_channels": list(self.channels)}


def _err(source: str, index: int, key: str, expected: str, found: object,
         fix: str | None = None) -> ConfigError:
    return ConfigError(source, f"rules[{index}].{key}", expected, found, fix)


def _str(raw: Mapping[str, Any], key: str, source: str, i: int, *,
         optional: bool = False) -> str | None:
    v = raw.get(key)
    if v is None and optional:
        return None
    if not isinstance(v, str) or not v:
        raise _err(source, i, key, "a non-empty string", v)
    return v


def _number(v: Any, source: str, i: int, key: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or v < 0:
        raise _err(source, i, key, "a non-negative number", v)
    return float(v)


def parse_rule(raw: Any, *, source: str = "<rules>", index: int = 0) -> Rule:
    """One rule in either seed format → `Rule`; ConfigError names source, index and key."""
    i = index
    if not isinstance(raw, Mapping):
        raise ConfigError(source, f"rules[{i}]", "a table/object", raw)
    tt = raw.get("threshold_type")
    nested = isinstance(tt, Mapping)
    allowed = _NESTED_KEYS if nested else _FLAT_KEYS
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise _err(source, i, unknown[0], f"one of {sorted(allowed)}", unknown[0],
                   "remove the key or fix its spelling")
    res_raw = _str(raw, "resource_type", source, i)
    assert res_raw is not None
    resource = _RESOURCES.get(res_raw.lower())
    if resource is None:
        raise _err(source, i, "resource_type", f"one of {sorted(_SEED_NAMES.values())}", res_raw)
    kind: Kind
    if nested:
        assert isinstance(tt, Mapping)
        if len(tt) != 1 or next(iter(tt)) not in ("Percentage", "Absolute"):
            raise _err(source, i, "threshold_type", '{"Percentage": {...}} or '
                       '{"Absolute": {...}}', dict(tt))
        tname, body = next(iter(tt.items()))
        if not isinstance(body, Mapping):
            raise _err(source, i, f"threshold_type.{tname}", "an object", body)
        extra = sorted(set(body) - {"value", "unit"})
        if extra:
            raise _err(source, i, f"threshold_type.{tname}.{extra[0]}", "value or unit",
                       extra[0])
        kind = "percent" if tname == "Percentage" else "absolute"
        value = _number(body.get("value"), source, i, f"threshold_type.{tname}.value")
        unit_raw = body.get("unit", "percent" if kind == "percent" else None)
        unit_key = f"threshold_type.{tname}.unit"
    else:
        t = str(tt).lower() if isinstance(tt, str) else None
        if t not in ("absolute", "percentage", "percent"):
            raise _err(source, i, "threshold_type", '"absolute" or "percentage" (or the nested '
                       'form)', tt)
        kind = "absolute" if t == "absolute" else "percent"
        value = _number(raw.get("threshold_value"), source, i, "threshold_value")
        unit_key = "units" if "units" in raw else "unit"
        unit_raw = raw.get(unit_key, "percent" if kind == "percent" else None)
    if not isinstance(unit_raw, str):
        raise _err(source, i, unit_key, "a unit string", unit_raw)
    threshold, measure_unit, unit = _check_unit(resource, kind, value, unit_raw, source, i,
                                                unit_key)
    action_raw = _str(raw, "action", source, i)
    assert action_raw is not None
    action = _ACTIONS.get(action_raw.lower())
    if action is None:
        raise _err(source, i, "action", "Notify, Log or Alert", action_raw)
    user_id = _str(raw, "user_id", source, i)
    assert user_id is not None
    instance_id = _str(raw, "instance_id", source, i, optional=True)
    chans = raw.get("notification_channels", [])
    if not isinstance(chans, list) or not all(isinstance(c, str) and c for c in chans):
        raise _err(source, i, "notification_channels", "an array of strings", chans)
    for_passes = raw.get("for_passes")
    if for_passes is not None and (isinstance(for_passes, bool) or not isinstance(
            for_passes, int) or for_passes < 1):
        raise _err(source, i, "for_passes", "an integer >= 1", for_passes)
    rep = raw.get("repeat_interval_s")
    repeat = None if rep is None else _number(rep, source, i, "repeat_interval_s")
    rule = Rule(id="", resource=resource, kind=kind, value=value, unit=unit,
                threshold=threshold, measure_unit=measure_unit, action=action,
                user_id=user_id, instance_id=instance_id, channels=tuple(chans),
                for_passes=for_passes, repeat_interval_s=repeat)
    rid = _str(raw, "id", source, i, optional=True)
    if rid is None:
        canon = orjson.dumps({**rule.config_dict(), "for": for_passes, "repeat": repeat},
                             option=orjson.OPT_SORT_KEYS)
        rid = "rule-" + hashlib.sha256(canon).hexdigest()[:12]
    return _replace_id(rule, rid)


def _replace_id(rule: Rule, rid: str) -> Rule:
    return Rule(rid, rule.resource, rule.kind, rule.value, rule.unit, rule.threshold,
                rule.measure_unit, rule.action, rule.user_id, rule.instance_id, rule.channels,
                rule.for_passes, rule.repeat_interval_s)


def _check_unit(resource: Resource, kind: Kind, value: float, unit_raw: str, source: str,
                i: int, key: str) -> tuple[float, str, str]:
    u = unit_raw.strip().upper()
    if kind == "percent":
        if u not in _PERCENT_UNITS:
            raise _err(source, i, key, "percent (or no unit) for a percentage", unit_raw,
                       "use an Absolute threshold for a value in units")
        if resource in ("network_egress", "network_ingress"):
            raise _err(source, i, "threshold_type", "an absolute rate for network resources",
                       "percentage", "hostagent does not know a NIC's bandwidth; use e.g. "
                       '{"Absolute": {"value": 100, "unit": "Mbps"}}')
        return value, "percent", "percent"
    table = _UNITS[resource]
    if u not in table:
        canon = sorted(table)
        raise _err(source, i, key, f"a unit for {_SEED_NAMES[resource]}: one of {canon}",
                   unit_raw)
    name, factor = table[u]
    return value * factor, name, unit_raw.strip()


def parse_rules(items: Any, *, source: str = "<rules>") -> tuple[Rule, ...]:
    """A list of rules (either format, mixed) → rules; duplicate ids are errors."""
    if not isinstance(items, list):
        raise ConfigError(source, "rules", "an array of rules", type(items).__name__)
    rules = [parse_rule(r, source=source, index=i) for i, r in enumerate(items)]
    seen: dict[str, int] = {}
    for i, r in enumerate(rules):
        if r.id in seen:
            raise _err(source, i, "id", "a unique rule id", r.id,
                       f"rules[{seen[r.id]}] has the same id")
        seen[r.id] = i
    return tuple(rules)


# --- measuring ------------------------------------------------------------------------------


def measure(rule: Rule, u: Usage) -> float | None:
    """The value `rule` compares for this usage, in `rule.measure_unit`; None when unknown."""
    return measure_value(rule.resource, rule.measure_unit, u)


def measure_value(res: Resource, mu: str, u: Usage) -> float | None:
    """What a (resource, measure unit) pair reads from one Usage; None when unknown."""
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


# --- the alert state machine ----------------------------------------------------------------
#
#   ok ──(value ≥ approach)──► approaching ──(value ≥ threshold for `for` passes)──► exceeded
#   exceeded ──(value < threshold × (1 − hysteresis))──► approaching | ok      ("resolved")
#   approaching ──(value < approach × (1 − hysteresis))──► ok                  ("resolved")
#   exceeded, still firing, repeat_interval since the last notice            ("repeat")
#
# Consumers are told about a status through a notification; `notified` is what they were last
# told. A notification held back (cooldown, rate limit) leaves `notified` behind, so it is sent
# as soon as it may be: the latest status always reaches consumers, with a count of what was
# held back. A pass without a value (None) changes nothing at all.

Status = Literal["ok", "approaching", "exceeded"]
TransitionKind = Literal["approaching", "exceeded", "repeat", "resolved"]
_RANK: dict[Status, int] = {"ok": 0, "approaching": 1, "exceeded": 2}
Gate = Callable[[Rule, str, int], bool]


@dataclass(frozen=True, slots=True)
class AlertState:
    """What the store keeps per fingerprint (`rule_id|instance_id`) while it is not plain ok."""

    rule_id: str
    instance_id: str
    status: Status
    breaches: int  # consecutive passes at/above the threshold before it fired
    since_ns: int  # when `status` began
    notified: Status  # what consumers were last told
    notified_ns: int | None  # when they were told
    suppressed: int  # notifications held back since the last one sent
    value: float  # at the last status change

    def to_bytes(self) -> bytes:
        """The store's form (orjson)."""
        return orjson.dumps({"v": 1, "rule_id": self.rule_id, "instance_id": self.instance_id,
                             "status": self.status, "breaches": self.breaches,
                             "since_ns": self.since_ns, "notified": self.notified,
                             "notified_ns": self.notified_ns, "suppressed": self.suppressed,
                             "value": self.value})

    @classmethod
    def from_bytes(cls, raw: bytes) -> AlertState:
        """Inverse of `to_bytes`; ValueError on anything else."""
        d = orjson.loads(raw)
        if not isinstance(d, dict) or d.get("v") != 1:
            raise ValueError("unknown alert state version")
        if d["status"] not in _RANK or d["notified"] not in _RANK:
            raise ValueError(f"bad alert status {d['status']!r}")
        return cls(str(d["rule_id"]), str(d["instance_id"]), d["status"], int(d["breaches"]),
                   int(d["since_ns"]), d["notified"],
                   None if d["notified_ns"] is None else int(d["notified_ns"]),
                   int(d["suppressed"]), float(d["value"]))


@dataclass(frozen=True, slots=True)
class Transition:
    """A notification to send: `kind` moved the alert from `previous` to `state.status`."""

    fingerprint: str
    rule: Rule
    usage: Usage
    kind: TransitionKind
    previous: Status
    state: AlertState
    value: float
    levels: Levels
    suppressed_before: int  # notifications of this fingerprint held back before this one


@dataclass(frozen=True, slots=True)
class Evaluation:
    """One pass's outcome: notifications, store changes (None deletes), counts."""

    transitions: tuple[Transition, ...]
    changes: Mapping[str, bytes | None]
    states: Mapping[str, AlertState]
    suppressed: int
    checked: int


def fingerprint(rule_id: str, instance_id: str) -> str:
    """The alert's identity: one per (rule, instance)."""
    return f"{rule_id}|{instance_id}"


def next_status(prev: Status, breaches: int, value: float, lv: Levels) -> tuple[Status, int]:
    """Pure core: the status and breach count after one pass with `value`."""
    if value >= lv.threshold:
        breaches += 1
        if prev == "exceeded" or breaches >= lv.for_passes:
            return "exceeded", 0
        return "approaching", breaches
    if prev == "exceeded" and value >= lv.resolve:
        return "exceeded", 0  # hysteresis: still firing
    if value >= lv.approach and lv.approach < lv.threshold:
        return "approaching", 0
    if prev != "ok" and value >= lv.approach_clear and lv.approach < lv.threshold:
        return "approaching", 0  # hysteresis below the approach level
    return "ok", 0


def step(rule: Rule, lv: Levels, prev: AlertState | None, instance_id: str,
         value: float | None, now_ns: int, cooldown_ns: int, gate: Gate | None,
         ) -> tuple[AlertState | None, TransitionKind | None, bool]:
    """One alert, one pass → (new state or None for ok, notification kind, suppressed?)."""
    if value is None:
        return prev, None, False
    if prev is None:
        if value < lv.approach and value < lv.threshold:
            return None, None, False  # the hot path: nothing to keep, nothing to say
        prev = AlertState(rule.id, instance_id, "ok", 0, now_ns, "ok", None, 0, value)
    status, breaches = next_status(prev.status, prev.breaches, value, lv)
    since = prev.since_ns if status == prev.status else now_ns
    # The value at the last status change: an unchanged alert is an unchanged row (no write).
    kept = prev.value if status == prev.status else value
    kind: TransitionKind | None = None
    if status != prev.notified:
        kind = "resolved" if _RANK[status] < _RANK[prev.notified] else status  # type: ignore[assignment]
    elif (status == "exceeded" and lv.repeat_ns > 0 and prev.notified_ns is not None
          and now_ns - prev.notified_ns >= lv.repeat_ns):
        kind = "repeat"
    new = AlertState(rule.id, instance_id, status, breaches, since, prev.notified,
                     prev.notified_ns, prev.suppressed, kept)
    suppressed = False
    if kind is not None:
        fp = fingerprint(rule.id, instance_id)
        cooling = (prev.notified_ns is not None and now_ns - prev.notified_ns < cooldown_ns)
        if cooling or (gate is not None and not gate(rule, fp, now_ns)):
            suppressed = status != prev.status or kind == "repeat"
            new = AlertState(rule.id, instance_id, status, breaches, since, prev.notified,
                             prev.notified_ns, prev.suppressed + int(suppressed), kept)
            kind = None
        else:
            new = AlertState(rule.id, instance_id, status, breaches, since, status, now_ns, 0,
                             kept)
    if new.status == "ok" and new.notified == "ok" and new.breaches == 0:
        return None, kind, suppressed
    return new, kind, suppressed


def evaluate(index: RuleIndex, usages: Iterable[Usage], owners: Mapping[str, str | None],
             states: Mapping[str, AlertState], now_ns: int, *, gate: Gate | None = None,
             removed_instances: Iterable[str] = ()) -> Evaluation:
    """One pass: the rules that apply to each usage → notifications + state changes.

    `owners` maps instance → user_id (None or absent: unknown; then only instance and wildcard
    rules apply). Per instance and measure, only rules whose level the value reaches are
    visited (bisect), plus the rules with an open alert for that instance (so it can resolve).
    States of rules no longer in the index, and of removed instances, are dropped silently.
    """
    cooldown_ns = int(index.settings.cooldown_s * NS_PER_S)
    levels, by_id = index.levels, index.by_id
    open_by_inst: dict[str, dict[str, AlertState]] = {}
    for st in states.values():
        open_by_inst.setdefault(st.instance_id, {})[st.rule_id] = st
    changes: dict[str, bytes | None] = {}
    out_states = dict(states)
    transitions: list[Transition] = []
    suppressed = checked = 0

    def visit(rule: Rule, u: Usage, value: float | None, prev: AlertState | None) -> None:
        nonlocal suppressed
        iid = u.instance_id
        fp = fingerprint(rule.id, iid)
        lv = levels[rule.id]
        new, kind, held = step(rule, lv, prev, iid, value, now_ns, cooldown_ns, gate)
        suppressed += held
        if new != prev:
            changes[fp] = None if new is None else new.to_bytes()
            if new is None:
                out_states.pop(fp, None)
            else:
                out_states[fp] = new
        if kind is not None and value is not None:
            transitions.append(Transition(fp, rule, u, kind, prev.notified if prev else "ok",
                                          new or _ok(rule.id, iid, now_ns, value), value, lv,
                                          prev.suppressed if prev else 0))

    for u in usages:
        iid = u.instance_id
        user = owners.get(iid)
        opened = open_by_inst.get(iid, {})
        done: set[str] = set()
        cache: dict[MeasureKey, float | None] = {}
        buckets = [index.by_instance.get(iid), index.wildcard,
                   index.by_user.get(user) if user is not None else None]
        for bucket in buckets:
            if not bucket:
                continue
            for key, (lows, rules) in bucket.items():
                checked += len(rules)
                if key in cache:
                    value = cache[key]
                else:
                    value = cache[key] = measure_value(key[0], key[1], u)
                if value is None:
                    continue  # missing data: nothing fires, nothing resolves
                for rule in rules[:bisect_right(lows, value)]:
                    if rule.instance_id is not None and rule.user_id not in (WILDCARD, user):
                        continue
                    done.add(rule.id)
                    visit(rule, u, value, opened.get(rule.id))
        for rid, prev in opened.items():
            held_rule = by_id.get(rid)
            if rid in done or held_rule is None or held_rule.user_id not in (WILDCARD, user):
                continue
            key = (held_rule.resource, held_rule.measure_unit)
            value = cache[key] if key in cache else measure_value(key[0], key[1], u)
            visit(held_rule, u, value, prev)
    gone = set(removed_instances)
    for fp, st in list(out_states.items()):
        if st.rule_id not in levels or st.instance_id in gone:
            del out_states[fp]
            changes[fp] = None
    return Evaluation(tuple(transitions), changes, out_states, suppressed, checked)


def _ok(rule_id: str, instance_id: str, now_ns: int, value: float) -> AlertState:
    return AlertState(rule_id, instance_id, "ok", 0, now_ns, "ok", now_ns, 0, value)


def load_states(raw: Mapping[str, bytes]) -> dict[str, AlertState]:
    """The store's alert_state rows → states; unreadable rows are skipped (and reported)."""
    out: dict[str, AlertState] = {}
    for fp, b in raw.items():
        try:
            out[fp] = AlertState.from_bytes(b)
        except (ValueError, KeyError, TypeError, orjson.JSONDecodeError):
            continue
    return out
