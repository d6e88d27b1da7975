"""The reflective walk from a parsed TOML table to a frozen config dataclass.

`build_table` checks a table against a dataclass's fields: unknown keys, the types of the type
hints, `Literal` choices and each field's `_meta` range; `build_sinks` does the [[sinks]] array.
Every error is a `ConfigError` naming the source, the dotted key, what was expected, what was
found and, where there is one, the fix.
"""

from __future__ import annotations

import dataclasses
import json
import math
import socket
import sys
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

from hostagent.config import nats_check, sink_checks
from hostagent.config.sinks import PLACEHOLDER_FILE, SINK_TYPES, NatsSinkConfig, SinkConfig
from hostagent.errors import ConfigError

# The largest integer a float holds (as alerts.rules has it): past it, float() overflows.
_MAX_FLOAT_INT = int(sys.float_info.max)


def build_sinks(raw: Any, source: str) -> tuple[SinkConfig, ...]:
    """Validate the [[sinks]] array: each table by its `type`, names unique."""
    if not isinstance(raw, list):
        raise ConfigError(source, "sinks", "an array of tables ([[sinks]])", raw,
                          "write each sink as a [[sinks]] table with its type")
    if not raw:  # events would be billed to nowhere
        raise ConfigError(source, "sinks", "at least one [[sinks]] table", raw,
                          "add a [[sinks]] table, or remove `sinks = []` for the default JSONL "
                          "sink")
    out: list[SinkConfig] = []
    names: set[str] = set()
    for i, item in enumerate(raw):
        key = f"sinks[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(source, key, "a table", item,
                              "write each sink as a [[sinks]] table with its type")
        kind = item.get("type")
        if not isinstance(kind, str) or kind not in SINK_TYPES:
            raise ConfigError(source, f"{key}.type", f"one of {sorted(SINK_TYPES)}", kind,
                              'set type = "jsonl", "formation-queue", "webhook", "email" or '
                              '"nats"')
        sink = build_table(SINK_TYPES[kind], item, source, key)
        sink_checks.check_sink(sink, source, key)
        if isinstance(sink, NatsSinkConfig):
            nats_check.check(sink, source, key)
        if "name" not in item and sink.name in names:
            sink = dataclasses.replace(sink, name=f"{sink.name}-{i}")  # only to avoid a clash
        if sink.name in names:
            raise ConfigError(source, f"{key}.name", "a unique sink name", sink.name,
                              "give each [[sinks]] its own name")
        names.add(sink.name)
        out.append(sink)
    return tuple(out)


def build_table(cls: type[Any], raw: Any, source: str, prefix: str,
                skip: frozenset[str] | set[str] = frozenset()) -> Any:
    """An instance of dataclass `cls` from table `raw` (at dotted key `prefix`), validated."""
    where = prefix or "top level"
    if not isinstance(raw, dict):
        raise ConfigError(source, where, "a table", raw,
                          "make it a table: a [section] of key = value lines, or { key = value }")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in skip}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(source, key, f"one of {sorted(fields)}", unknown[0],
                          "remove the key or fix its spelling")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(hints[name], raw[name], source, key, f.metadata, _default(f))
    try:
        return cls(**kwargs)
    except ConfigError as err:  # a table's own __post_init__ check: name this file and key
        if err.file != PLACEHOLDER_FILE:
            raise
        key = f"{prefix}.{err.key}" if prefix else err.key
        raise ConfigError(source, key, err.expected, err.found, err.fix) from None


def _coerce(tp: Any, value: Any, source: str, key: str, meta: Mapping[str, Any],
            default: Any = None) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return build_table(tp, value, source, key)
    name = key.rsplit(".", 1)[-1]
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(source, key, "one of " + ", ".join(repr(c) for c in choices), value,
                              f"set {name} = {_either(choices)}")
        return value
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(args[0], value, source, key, meta, default)
    if origin is tuple:
        example = _toml(default if default else ("a", "b"))
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(source, key, "an array of strings (no NUL characters)", value,
                              f"write an array of quoted strings, e.g. {name} = {example}")
        if any("\x00" in v for v in value):
            raise ConfigError(source, key, "an array of strings (no NUL characters)", value,
                              "remove the NUL (\\u0000) characters")
        return tuple(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(source, key, "true or false", value,
                              f"write {name} = true or {name} = false, without quotes")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(source, key, "an integer", value,
                              f"write a whole number without quotes, e.g. {name} = "
                              f"{_toml(default if isinstance(default, int) else 1)}")
        _check_range(value, source, key, meta)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(source, key, "a number", value,
                              f"write a number without quotes, e.g. {name} = "
                              f"{_toml(default if isinstance(default, float) else 1.0)}")
        # TOML keeps integers exact: one past float's range is checked against the bounds as
        # an integer (`interval_s = 1e309` written out in digits is "at most 3600", not an
        # OverflowError from math.isfinite), and is as infinite as `inf` where none binds it.
        if isinstance(value, int):
            _check_range(value, source, key, meta)
        if (isinstance(value, int) and abs(value) > _MAX_FLOAT_INT) or not math.isfinite(value):
            raise ConfigError(source, key, "a finite number", value,
                              "nan, inf and numbers past 1.8e308 are not values")
        _check_range(float(value), source, key, meta)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            example = default if isinstance(default, str) and default else "..."
            raise ConfigError(source, key, "a string", value,
                              f"write it in double quotes, e.g. {name} = {_toml(example)}")
        if "\x00" in value:
            raise ConfigError(source, key, "a string without NUL characters", value,
                              "remove the NUL (\\u0000) characters")
        return value
    raise ConfigError(source, key, f"a value of type {tp}", value,  # pragma: no cover
                      "see the configuration reference in the README")


def _default(f: dataclasses.Field[Any]) -> Any:
    """A field's default, for the example in a fix; None when it has none (or it is made
    from the host: the host name)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    factory: Any = f.default_factory
    if factory is dataclasses.MISSING or factory is socket.gethostname:
        return None
    return factory()


def _toml(value: Any) -> str:
    """`value` written as TOML: "text", true, 30.0, ["a", "b"]."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def _either(choices: tuple[Any, ...]) -> str:
    """'"a", "b" or "c"' for choices a, b, c."""
    shown = [_toml(c) for c in choices]
    return shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " or " + shown[-1]


def _check_range(value: float, source: str, key: str, meta: Mapping[str, Any]) -> None:
    lo: float | None = meta.get("min")
    hi: float | None = meta.get("max")
    if lo is not None and hi is not None:
        span = f"from {_num(lo)} to {_num(hi)}"
    else:
        span = f"of at least {_num(lo)}" if lo is not None else f"of at most {_num(hi or 0)}"
    if lo is not None and value < lo:
        raise ConfigError(source, key, f"a value >= {lo}", value, f"use a value {span}")
    if hi is not None and value > hi:
        raise ConfigError(source, key, f"a value <= {hi}", value, f"use a value {span}")


def _num(x: float) -> str:
    """A bound as a TOML reader writes it: 315_360_000, 0.1."""
    return f"{int(x):_}" if float(x).is_integer() else repr(x)
