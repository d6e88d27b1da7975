"""Threshold rules: both seed formats → one `Rule`, with its units checked and converted.

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

The measuring itself (`measure`) and the rule index live in `threshold_index`; the alert state
machine in `threshold_state`.
"""

from __future__ import annotations

import hashlib
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from hostagent.errors import ConfigError
from hostagent.model import MAX_OWNER_ID_CHARS, MAX_REPEAT_S, usable_owner_id

Resource = Literal["cpu", "memory", "storage", "network_egress", "network_ingress", "gpu"]
Action = Literal["notify", "log", "alert"]
Kind = Literal["percent", "absolute"]
WILDCARD = "*"

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
_MAX_FLOAT_INT = int(sys.float_info.max)
# Consecutive passes before an alert fires: past a billion (30 years of 1 s passes) is no
# rule; the bound keeps the value a 64-bit integer, as the rules-in-force file stores it.
MAX_CHANNEL_CHARS = 256
MAX_INSTANCE_CHARS = 1024  # a rule's instance_id (the API's path parameters' bound)
MAX_FOR_PASSES = 1_000_000_000
# For the examples in the fixes: an absolute threshold each resource can take.
_EXAMPLE: dict[Resource, tuple[str, str]] = {
    "cpu": ("3600", "seconds"), "memory": ("8", "GB"), "storage": ("500", "GB"),
    "network_egress": ("100", "Mbps"), "network_ingress": ("100", "Mbps"),
    "gpu": ("3600", "seconds"),
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
         fix: str) -> ConfigError:
    return ConfigError(source, f"rules[{index}].{key}", expected, found, fix)


def _kv(key: str, value: str, toml: bool) -> str:
    """`key = value` in TOML, `"key": value` in JSON (`value` is written alike in both)."""
    return f"{key} = {value}" if toml else f'"{key}": {value}'


def _either(words: list[str]) -> str:
    """'"a", "b" or "c"'."""
    shown = [f'"{w}"' for w in words]
    return shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " or " + shown[-1]


def _thresholds(resource: Resource, toml: bool) -> str:
    """Both nested threshold_type forms, the absolute one in a unit `resource` takes."""
    value, unit = _EXAMPLE[resource]
    if toml:
        return (f"{{ Percentage = {{ value = 80.0 }} }} or "
                f'{{ Absolute = {{ value = {value}, unit = "{unit}" }} }}')
    return (f'{{"Percentage": {{"value": 80.0}}}} or '
            f'{{"Absolute": {{"value": {value}, "unit": "{unit}"}}}}')


def table_fix(toml: bool) -> str:
    """How a rule is written: the fix when a rule, or the rules, are not in that shape."""
    if toml:
        return ('write each rule as a [[rules]] table: a line [[rules]], then lines such as '
                'resource_type = "Cpu", threshold_type = { Percentage = { value = 80.0 } }, '
                'action = "Notify", user_id = "*"')
    return ('write the rules as an array of objects, [{"resource_type": "Cpu", '
            '"threshold_type": {"Percentage": {"value": 80.0}}, "action": "Notify", '
            '"user_id": "*", ...}], or as {"rules": [...]}')


def _str_fix(key: str, toml: bool) -> str:
    """The fix for string key `key` (resource_type, action, user_id, instance_id, id)."""
    if key == "resource_type":
        return "set " + _kv(key, _either(list(_SEED_NAMES.values())), toml)
    if key == "action":
        return "set " + _kv(key, _either(["Notify", "Log", "Alert"]), toml)
    if key == "user_id":
        return ('write the owner\'s id in double quotes, or "*" for every user, e.g. '
                + _kv(key, '"*"', toml))
    if key == "instance_id":
        return ("write the instance's id in double quotes, e.g. " + _kv(key, '"vm-1"', toml)
                + ", or remove the key for all of the user's instances")
    return ("write the rule's id in double quotes, e.g. " + _kv(key, '"cpu-high"', toml)
            + ", or remove the key for an id made from the rule")


def _str(raw: Mapping[str, Any], key: str, source: str, i: int, *, toml: bool,
         optional: bool = False) -> str | None:
    v = raw.get(key)
    if v is None and optional:
        return None
    if not isinstance(v, str) or not v:
        raise _err(source, i, key, "a non-empty string", v, _str_fix(key, toml))
    # An owner or instance id is matched against the account service's and libvirt's ids,
    # shown in notices and addressed in the API's paths: a 60 KB id, or one holding a NUL, a
    # line break or an escape sequence, was kept and written out as it was. A user id is one
    # an event can carry (model.usable_owner_id), or "*".
    if key == "user_id" and v != "*" and not usable_owner_id(v):
        raise _err(source, i, key, f"\"*\" or an owner id of at most {MAX_OWNER_ID_CHARS} "
                   "printable characters", v[:80], _str_fix(key, toml))
    if key == "instance_id" and (len(v) > MAX_INSTANCE_CHARS or not v.isprintable()):
        raise _err(source, i, key, f"at most {MAX_INSTANCE_CHARS} printable characters",
                   v[:80], _str_fix(key, toml))
    return v


def _number(v: Any, source: str, i: int, key: str, *, toml: bool, example: str) -> float:
    # An integer past float's range (TOML and the API keep big integers exact) is as infinite
    # as `inf`: math.isfinite would raise OverflowError on it, out of every loader.
    if (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0
            or (isinstance(v, int) and v > _MAX_FLOAT_INT) or not math.isfinite(v)):
        raise _err(source, i, key, "a finite non-negative number (not NaN or infinity)", v,
                   "write a number of 0 or more without quotes, e.g. "
                   + _kv(key.rsplit(".", 1)[-1], example, toml))
    return float(v)


def parse_rule(raw: Any, *, source: str = "<rules>", index: int = 0,
               toml: bool = False) -> Rule:
    """One rule in either seed format → `Rule`; ConfigError names source, index and key.

    `toml`: the rule was written in TOML (the fixes' examples are, too; else JSON)."""
    i = index
    if not isinstance(raw, Mapping):
        raise ConfigError(source, f"rules[{i}]", "a table/object", raw, table_fix(toml))
    tt = raw.get("threshold_type")
    nested = isinstance(tt, Mapping)
    allowed = _NESTED_KEYS if nested else _FLAT_KEYS
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise _err(source, i, unknown[0], f"one of {sorted(allowed)}", unknown[0],
                   "remove the key or fix its spelling")
    res_raw = _str(raw, "resource_type", source, i, toml=toml)
    assert res_raw is not None
    resource = _RESOURCES.get(res_raw.lower())
    if resource is None:
        raise _err(source, i, "resource_type", f"one of {sorted(_SEED_NAMES.values())}", res_raw,
                   _str_fix("resource_type", toml))
    kind: Kind
    if nested:
        assert isinstance(tt, Mapping)
        if len(tt) != 1 or next(iter(tt)) not in ("Percentage", "Absolute"):
            raise _err(source, i, "threshold_type", '{"Percentage": {...}} or '
                       '{"Absolute": {...}}', dict(tt),
                       "set " + _kv("threshold_type", _thresholds(resource, toml), toml))
        tname, body = next(iter(tt.items()))
        if not isinstance(body, Mapping):
            raise _err(source, i, f"threshold_type.{tname}", "an object", body,
                       "set " + _kv("threshold_type", _thresholds(resource, toml), toml))
        extra = sorted(set(body) - {"value", "unit"})
        if extra:
            raise _err(source, i, f"threshold_type.{tname}.{extra[0]}", "value or unit",
                       extra[0], "remove the key: a Percentage takes a value, an Absolute a "
                       "value and a unit")
        kind = "percent" if tname == "Percentage" else "absolute"
        value = _number(body.get("value"), source, i, f"threshold_type.{tname}.value",
                        toml=toml, example="80.0" if kind == "percent" else _EXAMPLE[resource][0])
        unit_raw = body.get("unit", "percent" if kind == "percent" else None)
        unit_key = f"threshold_type.{tname}.unit"
    else:
        t = str(tt).lower() if isinstance(tt, str) else None
        if t not in ("absolute", "percentage", "percent"):
            raise _err(source, i, "threshold_type", '"absolute" or "percentage" (or the nested '
                       'form)', tt, "set " + _kv("threshold_type", '"absolute" or "percentage"',
                                                 toml)
                       + " with threshold_value (and units), or the nested form "
                       + _thresholds(resource, toml))
        kind = "absolute" if t == "absolute" else "percent"
        value = _number(raw.get("threshold_value"), source, i, "threshold_value", toml=toml,
                        example="80.0" if kind == "percent" else _EXAMPLE[resource][0])
        unit_key = "units" if "units" in raw else "unit"
        unit_raw = raw.get(unit_key, "percent" if kind == "percent" else None)
    if not isinstance(unit_raw, str):
        shown = "percent" if kind == "percent" else _EXAMPLE[resource][1]
        raise _err(source, i, unit_key, "a unit string", unit_raw,
                   "write the unit in double quotes, e.g. "
                   + _kv(unit_key.rsplit(".", 1)[-1], f'"{shown}"', toml))
    threshold, measure_unit, unit = _check_unit(resource, kind, value, unit_raw, source, i,
                                                unit_key, toml)
    action_raw = _str(raw, "action", source, i, toml=toml)
    assert action_raw is not None
    action = _ACTIONS.get(action_raw.lower())
    if action is None:
        raise _err(source, i, "action", "Notify, Log or Alert", action_raw,
                   _str_fix("action", toml))
    user_id = _str(raw, "user_id", source, i, toml=toml)
    assert user_id is not None
    instance_id = _str(raw, "instance_id", source, i, toml=toml, optional=True)
    chans = raw.get("notification_channels", [])
    if not isinstance(chans, list) or not all(isinstance(c, str) and c for c in chans):
        raise _err(source, i, "notification_channels", "an array of strings", chans,
                   "write an array of quoted channel names, e.g. "
                   + _kv("notification_channels", '["email", "webhook"]', toml)
                   + " ([] for none)")
    for c in chans:  # a channel becomes a mail address, a subject, a NATS subject part
        if len(c) > MAX_CHANNEL_CHARS or not c.isprintable():
            raise _err(source, i, "notification_channels",
                       f"channel names of printable characters, at most {MAX_CHANNEL_CHARS}",
                       c[:80], f"shorten it to at most {MAX_CHANNEL_CHARS} characters, without "
                       "line breaks, tabs or other control characters")
    for_passes = raw.get("for_passes")
    if for_passes is not None and (isinstance(for_passes, bool) or not isinstance(
            for_passes, int) or not 1 <= for_passes <= MAX_FOR_PASSES):
        raise _err(source, i, "for_passes", f"an integer from 1 to {MAX_FOR_PASSES}",
                   for_passes, "write a whole number without quotes, e.g. "
                   + _kv("for_passes", "3", toml)
                   + ", or remove the key for [thresholds] default_for_passes")
    rep = raw.get("repeat_interval_s")
    repeat = (None if rep is None else
              _number(rep, source, i, "repeat_interval_s", toml=toml, example="3600"))
    if repeat is not None and repeat > MAX_REPEAT_S:
        # Here, not only in the merged set's check (`rules_file.check_limits`): that one named
        # the rule's place in the stored API layer (`rules[26]`), not the request's body.
        raise _err(source, i, "repeat_interval_s", f"a value <= {MAX_REPEAT_S} (a year)", rep,
                   f"use a value from 0 to {MAX_REPEAT_S} seconds (0: never repeat), or "
                   "remove the key for [thresholds] repeat_interval_s")
    rule = Rule(id="", resource=resource, kind=kind, value=value, unit=unit,
                threshold=threshold, measure_unit=measure_unit, action=action,
                user_id=user_id, instance_id=instance_id, channels=tuple(chans),
                for_passes=for_passes, repeat_interval_s=repeat)
    rid = _str(raw, "id", source, i, toml=toml, optional=True)
    if rid is None:
        canon = orjson.dumps({**rule.config_dict(), "for": for_passes, "repeat": repeat},
                             option=orjson.OPT_SORT_KEYS)
        rid = "rule-" + hashlib.sha256(canon).hexdigest()[:12]
    return _replace_id(rule, rid)


def _replace_id(rule: Rule, rid: str) -> Rule:
    return Rule(rid, rule.resource, rule.kind, rule.value, rule.unit, rule.threshold,
                rule.measure_unit, rule.action, rule.user_id, rule.instance_id, rule.channels,
                rule.for_passes, rule.repeat_interval_s)


def unit_factor(rule: Rule) -> float:
    """How many of `rule.measure_unit` one of its written `unit` is (1 for a percentage)."""
    if rule.kind == "percent":
        return 1.0
    entry = _UNITS[rule.resource].get(rule.unit.strip().upper())
    if entry is not None:
        return entry[1]
    return rule.threshold / rule.value if rule.value else 1.0  # not built by parse_rule


def _check_unit(resource: Resource, kind: Kind, value: float, unit_raw: str, source: str,
                i: int, key: str, toml: bool) -> tuple[float, str, str]:
    u = unit_raw.strip().upper()
    leaf = key.rsplit(".", 1)[-1]
    if kind == "percent":
        if u not in _PERCENT_UNITS:
            raise _err(source, i, key, "percent (or no unit) for a percentage", unit_raw,
                       "remove the unit or write " + _kv(leaf, '"percent"', toml)
                       + ", or use an Absolute threshold for a value in units")
        if resource in ("network_egress", "network_ingress"):
            example = ('{ Absolute = { value = 100, unit = "Mbps" } }' if toml
                       else '{"Absolute": {"value": 100, "unit": "Mbps"}}')
            raise _err(source, i, "threshold_type", "an absolute rate for network resources",
                       "percentage", "hostagent does not know a NIC's bandwidth; use e.g. "
                       + _kv("threshold_type", example, toml))
        return value, "percent", "percent"
    table = _UNITS[resource]
    if u not in table:
        canon = sorted(table)
        raise _err(source, i, key, f"a unit for {_SEED_NAMES[resource]}: one of {canon}",
                   unit_raw, "write one of those units in double quotes, e.g. "
                   + _kv(leaf, f'"{_EXAMPLE[resource][1]}"', toml))
    name, factor = table[u]
    threshold = value * factor
    if not math.isfinite(threshold):  # 1e308 TB: a threshold no value reaches, never fires
        value_key = f"{key.rsplit('.', 1)[0]}.value" if "." in key else "threshold_value"
        raise _err(source, i, value_key, f"a value whose size in {name} is finite", value,
                   f"use a value below {sys.float_info.max / factor:.3g} {unit_raw.strip()}")
    return threshold, name, unit_raw.strip()


def parse_rules(items: Any, *, source: str = "<rules>", toml: bool = False) -> tuple[Rule, ...]:
    """A list of rules (either format, mixed) → rules; duplicate ids are errors.

    `toml`: the rules were written in TOML (the fixes' examples are, too; else JSON)."""
    if not isinstance(items, list):
        raise ConfigError(source, "rules", "an array of rules", items, table_fix(toml))
    rules = [parse_rule(r, source=source, index=i, toml=toml) for i, r in enumerate(items)]
    seen: dict[str, int] = {}
    for i, r in enumerate(rules):
        if r.id in seen:
            raise _err(source, i, "id", "a unique rule id", r.id,
                       f"rules[{seen[r.id]}] has the same id")
        seen[r.id] = i
    return tuple(rules)
