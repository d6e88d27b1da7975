"""Logging setup: one JSON object per line (for journald and log shippers) or text for humans.

Callers log key-value events with the stdlib::

    log.warning("sink down", extra={"sink": name, "error": str(err)})

and the JSON formatter turns that into::

    {"ts":"2024-05-01T12:00:00.123Z","level":"warning","logger":"hostagent.delivery.sinks.base",
     "msg":"sink down","sink":"queue","error":"timeout"}

(on one line). Every ``extra`` field is kept; an extra whose name collides with a core field
(``ts``, ``level``, ``logger``, ``msg``, ``exc``, ``stack``) is emitted as ``extra.<name>``.
Values orjson cannot encode natively are written with ``str()``; logging never raises.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import IO, Any, Literal

import orjson

from hostagent.errors import ConfigError

LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

_CORE = frozenset({"ts", "level", "logger", "msg", "exc", "stack"})
# Attributes every LogRecord has; whatever else is in __dict__ came from `extra=`.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message", "asctime", "taskName",
}


def _ts(created_s: float) -> str:
    """RFC 3339 UTC with milliseconds: 2024-05-01T12:00:00.123Z."""
    dt = datetime.fromtimestamp(created_s, tz=UTC)
    return f"{dt:%Y-%m-%dT%H:%M:%S}.{dt.microsecond // 1000:03d}Z"


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a caller passed with `extra=`, in the order given."""
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


def _default(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    return str(value)


class JsonFormatter(logging.Formatter):
    """Formats a record as one line of JSON."""

    def format(self, record: logging.LogRecord) -> str:
        """Render the record; never raises on odd `extra` values."""
        out: dict[str, Any] = {
            "ts": _ts(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in extra_fields(record).items():
            out[f"extra.{key}" if key in _CORE else key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        try:
            data = orjson.dumps(out, default=_default, option=orjson.OPT_NON_STR_KEYS)
        except (TypeError, orjson.JSONEncodeError):
            # e.g. an int wider than 64 bits: degrade the extras to strings, keep the line.
            safe = {k: v if k in _CORE else repr(v) for k, v in out.items()}
            data = orjson.dumps(safe)
        return data.decode()


class TextFormatter(logging.Formatter):
    """Formats a record for a terminal: `ts LEVEL logger: msg key=value ...`."""

    def format(self, record: logging.LogRecord) -> str:
        """Render the record on one line, then the traceback if any."""
        parts = [_ts(record.created), f"{record.levelname:<7}", f"{record.name}:",
                 record.getMessage()]
        for key, value in extra_fields(record).items():
            text = value if isinstance(value, str) else repr(value)
            if not text or any(c.isspace() or c in "\"=" for c in text):
                text = orjson.dumps(text).decode()
            parts.append(f"{key}={text}")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler setup() installed, so a second setup() (SIGHUP) replaces it."""


def setup(level: str, fmt: Literal["json", "text"], stream: IO[str] | None = None) -> None:
    """Route all logging to `stream` (default: stdout) at `level` in `fmt`; safe to call again."""
    try:
        numeric = LEVELS[level.lower()]
    except KeyError:
        raise ConfigError("<log>", "log.level", "one of " + ", ".join(LEVELS), level) from None
    if fmt not in ("json", "text"):
        raise ConfigError("<log>", "log.format", "'json' or 'text'", fmt)
    handler = _Handler(sys.stdout if stream is None else stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(numeric)
    logging.captureWarnings(True)
