"""The rules file: JSON or TOML, reloaded on SIGHUP and when it changes; a bad file never wins.

Formats (by suffix; `.toml` is TOML, anything else JSON)::

    JSON:  [ {rule}, ... ]   or   {"rules": [ {rule}, ... ]}
    TOML:  [[rules]]
           id = "cpu-high"
           resource_type = "Cpu"
           threshold_type = { Percentage = { value = 80.0 } }
           ...

Each rule is either seed format (see hostagent.alerts.rules). A file that cannot be read or
has one invalid rule raises `ConfigError` naming the file, `rules[i].key`, what was expected and
the fix; `RulesSource` then keeps serving the last valid set (and says so in `last_error`).
A file that disappears is an error too (rules are not silently dropped); an empty `rules_path`
means no rules.
"""

from __future__ import annotations

import logging
import os
import signal
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import trio

from hostagent.alerts.index import RuleIndex, Settings, build_index
from hostagent.alerts.rules import Rule, parse_rules
from hostagent.alerts.violations import StormControl
from hostagent.config.schema import ThresholdsConfig
from hostagent.errors import ConfigError

log = logging.getLogger(__name__)


def settings_from(cfg: ThresholdsConfig) -> Settings:
    """The state machine's settings from the [thresholds] section."""
    return Settings(approaching_fraction=cfg.approaching_fraction,
                    hysteresis_fraction=cfg.hysteresis_fraction,
                    default_for_passes=cfg.default_for_passes,
                    repeat_interval_s=cfg.repeat_interval_s, cooldown_s=cfg.cooldown_s)


def storm_from(cfg: ThresholdsConfig) -> StormControl:
    """The per-channel rate limit from the [thresholds] section (the evaluation's gate)."""
    return StormControl(per_minute=cfg.channel_per_minute, burst=cfg.channel_burst)


def from_config(cfg: ThresholdsConfig) -> RulesSource:
    """A RulesSource for the [thresholds] section (call `load_initial()` at start-up)."""
    return RulesSource(cfg.rules_path or None, settings_from(cfg),
                       reload_check_s=cfg.reload_check_s)


def load_rules(path: str | Path) -> tuple[Rule, ...]:
    """Parse a rules file; ConfigError names file, rule index and key."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as err:
        raise ConfigError(str(p), "-", "a readable rules file", err.strerror or str(err),
                          "fix thresholds.rules_path") from err
    doc: Any
    if p.suffix.lower() == ".toml":
        try:
            doc = tomllib.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
            raise ConfigError(str(p), "-", "valid TOML", str(err), "fix the syntax") from err
    else:
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError as err:
            raise ConfigError(str(p), "-", "valid JSON", str(err), "fix the syntax") from err
    if isinstance(doc, dict):
        unknown = sorted(set(doc) - {"rules"})
        if unknown:
            raise ConfigError(str(p), unknown[0], "only a `rules` array", unknown[0])
        doc = doc.get("rules", [])
    return parse_rules(doc, source=str(p))


@dataclass(frozen=True, slots=True)
class _Stamp:
    ino: int
    size: int
    mtime_ns: int


def _stamp(p: Path) -> _Stamp | None:
    try:
        st = p.stat()
    except OSError:
        return None
    return _Stamp(st.st_ino, st.st_size, st.st_mtime_ns)


class RulesSource:
    """The current valid rule set and its index; `check()` reloads when the file changed."""

    def __init__(self, path: str | Path | None, settings: Settings, *,
                 reload_check_s: float = 5.0) -> None:
        self.path = Path(path) if path else None
        self.reload_check_s = max(reload_check_s, 0.1)
        self.settings = settings
        self.index: RuleIndex = build_index((), settings)
        self.last_error: str | None = None
        self.loads = 0
        self.failures = 0
        self._stamp: _Stamp | None = None

    def load_initial(self) -> None:
        """First load at start-up: an invalid file is fatal here (ConfigError)."""
        if self.path is None:
            return
        self._stamp = _stamp(self.path)
        self._install(load_rules(self.path))

    def _install(self, rules: tuple[Rule, ...]) -> None:
        self.index = build_index(rules, self.settings)
        self.loads += 1
        self.last_error = None
        log.info("threshold rules loaded", extra={"path": str(self.path), "rules": len(rules)})

    def reload(self) -> bool:
        """Load the file again; on error keep the valid set, log and return False."""
        if self.path is None:
            return True
        self._stamp = _stamp(self.path)
        try:
            rules = load_rules(self.path)
        except ConfigError as err:
            self.failures += 1
            self.last_error = str(err)
            log.error("threshold rules rejected; keeping the previous set",
                      extra={"path": str(self.path), "error": str(err),
                             "rules_kept": len(self.index.rules)})
            return False
        self._install(rules)
        return True

    def check(self) -> bool | None:
        """Reload if the file's inode, size or mtime changed; None when unchanged."""
        if self.path is None or _stamp(self.path) == self._stamp:
            return None
        return self.reload()

    async def run(self, *, sighup: bool = True,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Poll the file every `reload_check_s` and reload on SIGHUP, until cancelled."""
        interval_s = self.reload_check_s
        if not sighup:
            task_status.started()
            while True:
                await trio.sleep(interval_s)
                self.check()
        with trio.open_signal_receiver(signal.SIGHUP) as signals:
            task_status.started()
            async with trio.open_nursery() as nursery:
                async def poll() -> None:
                    while True:
                        await trio.sleep(interval_s)
                        self.check()

                nursery.start_soon(poll)
                async for _ in signals:
                    log.info("SIGHUP: reloading threshold rules", extra={"pid": os.getpid()})
                    self.reload()
