"""Logging setup: one JSON object per line (for journald and log shippers) or text for humans.

Logs always go to stderr (stdout is for what a command prints). Format ``auto`` picks short
human lines when stderr is a terminal and JSON otherwise (journald, pipes, files); the CLI's
``--log-format`` pins a format for the life of the process (a SIGHUP reload keeps it).

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
    """Formats a record for a terminal: `HH:MM:SS level   msg key=value ...` (local time)."""

    def format(self, record: logging.LogRecord) -> str:
        """Render the record on one line, then the traceback if any."""
        clock = datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        parts = [clock, f"{record.levelname.lower():<7}", record.getMessage()]
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


Format = Literal["auto", "json", "text"]
FORMATS: tuple[str, ...] = ("auto", "json", "text")


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler setup() installed, so a second setup() (SIGHUP) replaces it."""

    pinned: Literal["json", "text"] | None = None


class _StderrHandler(_Handler):
    """Writes to whatever `sys.stderr` is at each record (like logging's last resort), so a
    replaced and closed stderr (test capture, a daemonising wrapper) never breaks logging."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> IO[str]:
        """The current sys.stderr."""
        return sys.stderr

    @stream.setter
    def stream(self, _value: IO[str]) -> None:
        pass  # StreamHandler.__init__ sets it; the property always answers sys.stderr


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or exotic streams
        return False


def resolve_format(fmt: Format, stream: IO[str]) -> Literal["json", "text"]:
    """`auto` becomes `text` on a terminal and `json` anywhere else."""
    if fmt == "auto":
        return "text" if _is_terminal(stream) else "json"
    return fmt


def setup(level: str, fmt: Format, stream: IO[str] | None = None, *, pin: bool = False) -> None:
    """Route all logging to `stream` (default: stderr) at `level` in `fmt`; safe to call again.

    `pin`: this format wins over later calls (the CLI's `--log-format` over a config reload).
    """
    try:
        numeric = LEVELS[level.lower()]
    except KeyError:
        raise ConfigError("<log>", "log.level", "one of " + ", ".join(LEVELS), level,
                          'set level = "debug", "info", "warning" or "error"') from None
    if fmt not in FORMATS:
        raise ConfigError("<log>", "log.format", "'auto', 'json' or 'text'", fmt,
                          'set format = "auto", "json" or "text"')
    root = logging.getLogger()
    olds = [h for h in root.handlers if isinstance(h, _Handler)]
    chosen = resolve_format(fmt, sys.stderr if stream is None else stream)
    pinned = next((h.pinned for h in olds if h.pinned is not None), None)
    if pin:
        pinned = chosen
    handler = _StderrHandler() if stream is None else _Handler(stream)
    handler.pinned = pinned
    handler.setFormatter(JsonFormatter() if (pinned or chosen) == "json" else TextFormatter())
    for old in olds:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(numeric)
    logging.captureWarnings(True)
