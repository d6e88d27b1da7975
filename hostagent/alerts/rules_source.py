"""The rule set in force: three layers (central source, rules file, API), a bad one never wins.

Layers, lowest precedence first; a rule id in a higher layer replaces the same id below it:

1. ``central``: the set pulled from ``[thresholds] source_url`` (hostagent.alerts.central),
   persisted in the state directory;
2. ``file``: the operator's ``rules_path`` (ansible-managed), never written by the daemon;
3. ``api``: rules written through ``/api/v1/thresholds``, kept in the state directory
   (``api_rules_path``, default ``<state dir>/api-rules.json``), so the API works with the
   default config and a read-only /etc, and an ansible run that rewrites the file keeps them.

Every layer is validated like the file (both seed formats, NaN/±inf refused) and the merged
set must name only channels a configured sink serves (hostagent.alerts.channels); a load that
fails keeps the previous set in force, logged and counted (`failures`, `last_error`).

The files' formats and their reading: hostagent.alerts.rules_file.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import trio

from hostagent.alerts import channels
from hostagent.alerts.index import RuleIndex, Settings, build_index
from hostagent.alerts.routing import Route
from hostagent.alerts.rules import Rule
from hostagent.alerts.rules_file import atomic_write, check_limits, load_rules, rule_dict
from hostagent.alerts.violations import StormControl
from hostagent.config.schema import ThresholdsConfig
from hostagent.errors import ConfigError
from hostagent.file_watch import DirWatch

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


FILE_KEY = "thresholds.rules_path"
API_KEY = "thresholds.api_rules_path"
# The rules in force are remembered next to the state store (see `from_config`).
IN_FORCE_KEY = "collector.state_path"


def api_rules_path(cfg: ThresholdsConfig, state_path: str | Path) -> Path:
    """Where API-written rules live: `api_rules_path`, or next to the state store."""
    return Path(cfg.api_rules_path) if cfg.api_rules_path else (
        Path(state_path).parent / "api-rules.json")


def from_config(cfg: ThresholdsConfig, *, state_path: str | Path | None = None,
                routes: Mapping[str, Route] | None = None) -> RulesSource:
    """A RulesSource for the [thresholds] section (call `load_initial()` at start-up)."""
    return RulesSource(cfg.rules_path or None, settings_from(cfg),
                       reload_check_s=cfg.reload_check_s,
                       api_path=None if state_path is None else api_rules_path(cfg, state_path),
                       routes=routes,
                       in_force_path=None if state_path is None
                       else Path(state_path).parent / "rules-in-force.json")


LAYERS = ("central", "file", "api")  # lowest precedence first
# With inotify watching the rules files, how often they are checked anyway (what inotify
# cannot see); `reload_check_s` when that is longer.
SAFETY_CHECK_S = 60.0
WRITE_RETRY_S = 0.02  # a check that found the API writing its file tries again after this


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
    """The layered rule set in force and its index; `check()` reloads when a file changed."""

    def __init__(self, path: str | Path | None, settings: Settings, *,
                 reload_check_s: float = 5.0, api_path: str | Path | None = None,
                 routes: Mapping[str, Route] | None = None,
                 in_force_path: str | Path | None = None) -> None:
        self.path = Path(path) if path else None
        # The merged set, remembered across restarts: a rule deleted or changed while the
        # daemon was down still resolves its open alerts ("rule deleted"/"rule changed").
        self.in_force_path = Path(in_force_path) if in_force_path else None
        self.api_path = Path(api_path) if api_path else None
        self.routes = routes  # the sinks' channels (None: channels not checked)
        self.reload_check_s = max(reload_check_s, 0.1)
        self.settings = settings
        self.index: RuleIndex = build_index((), settings)
        self.layers: dict[str, tuple[Rule, ...]] = dict.fromkeys(LAYERS, ())
        self.origin: dict[str, str] = {}  # rule id → the layer it comes from
        self.retired: dict[str, Rule] = {}  # deleted/changed since the last pass: old rules
        self.last_error: str | None = None
        self.loads = 0
        self.failures = 0
        self._stamps: tuple[_Stamp | None, _Stamp | None] = (None, None)
        # Held by `write_api` (a worker thread) while it writes and installs the API layer: the
        # watch sees that write at once and must not reload beside it (`_when_free`).
        self._writing = threading.Lock()

    # --- merging -----------------------------------------------------------------------

    @staticmethod
    def merge(layers: Mapping[str, Sequence[Rule]]) -> tuple[tuple[Rule, ...], dict[str, str]]:
        """Rules in force and where each comes from: a higher layer's id replaces a lower's."""
        by_id: dict[str, Rule] = {}
        origin: dict[str, str] = {}
        for name in LAYERS:
            for r in layers.get(name, ()):
                by_id.pop(r.id, None)  # the overriding rule takes the later position
                by_id[r.id] = r
                origin[r.id] = name
        return tuple(by_id.values()), origin

    def candidate(self, name: str, rules: Sequence[Rule]) -> dict[str, tuple[Rule, ...]]:
        """The layers with `name` replaced, checked (channels); ConfigError when refused."""
        layers = {**self.layers, name: tuple(rules)}
        check_limits(rules, source=f"<{name} rules>")
        self._check_channels(layers, {name: f"<{name} rules>"})
        return layers

    def _check_channels(self, layers: Mapping[str, Sequence[Rule]],
                        sources: Mapping[str, str]) -> None:
        """The channels of the rules in force, each refusal naming the layer's own file and
        the rule's index in it (it once named the rules file, at the merged set's index, for
        a rule of api-rules.json: a `rules[2]` of a file holding two rules)."""
        if self.routes is None:
            return
        _, origin = self.merge(layers)
        for name in LAYERS:
            source = sources.get(name) or self._layer_source(name)
            for i, rule in enumerate(layers.get(name, ())):
                if origin.get(rule.id) == name:  # an overridden rule is not in force
                    channels.check_rule(rule, self.routes, source=source, index=i)

    def _layer_source(self, name: str) -> str:
        path = {"file": self.path, "api": self.api_path}.get(name)
        return str(path) if path is not None else f"<{name} rules>"

    def install(self, layers: Mapping[str, tuple[Rule, ...]]) -> None:
        """Put checked layers (`candidate`) in force."""
        self.layers = dict(layers)
        old = self.index.by_id
        merged, self.origin = self.merge(self.layers)
        now = {r.id: r for r in merged}
        for rid, rule in old.items():
            if now.get(rid) != rule:
                self.retired.setdefault(rid, rule)
        self.retired = {k: v for k, v in self.retired.items() if now.get(k) != v}
        if self.in_force_path is not None and now != dict(old):
            try:
                atomic_write(self.in_force_path, orjson.dumps([rule_dict(r) for r in merged]))
            except (OSError, orjson.JSONEncodeError) as err:  # never fails an install
                log.warning("could not remember the rules in force", extra={
                    "path": str(self.in_force_path), "error": str(err)})
        self.index = build_index(merged, self.settings)
        self.loads += 1
        self.last_error = None
        log.info("threshold rules loaded", extra={
            "path": str(self.path), "rules": len(merged),
            **{f"{k}_rules": len(v) for k, v in self.layers.items()}})

    def set_layer(self, name: str, rules: Sequence[Rule]) -> None:
        """Replace one layer (the central source's); ConfigError keeps the previous set."""
        self.install(self.candidate(name, rules))

    def _read(self) -> dict[str, tuple[Rule, ...]]:
        file_rules = (load_rules(self.path, key=FILE_KEY) if self.path is not None
                      else ())
        api_rules = (load_rules(self.api_path, key=API_KEY) if self.api_path is not None
                     and self.api_path.exists() else ())
        layers = {**self.layers, "file": file_rules, "api": api_rules}
        self._check_channels(layers, {})
        return layers

    def _stamp_now(self) -> tuple[_Stamp | None, _Stamp | None]:
        return (None if self.path is None else _stamp(self.path),
                None if self.api_path is None else _stamp(self.api_path))

    def forget_retired(self, done: Mapping[str, Rule]) -> None:
        """A pass committed the resolved notices of `done` (a copy of `retired` it used)."""
        self.retired = {k: v for k, v in self.retired.items() if done.get(k) is not v}

    def health(self) -> dict[str, Any]:
        """For /api/v1/health/status and /metrics: counts per layer, loads, the last error."""
        return {"rules": len(self.index.rules), "loads": self.loads, "failures": self.failures,
                "last_error": self.last_error,
                "by_source": {k: sum(1 for v in self.origin.values() if v == k) for k in LAYERS}}

    # --- loading -----------------------------------------------------------------------

    def load_initial(self) -> None:
        """First load at start-up: an invalid file is fatal here (ConfigError)."""
        self._stamps = self._stamp_now()
        if self.in_force_path is not None and self.in_force_path.exists():
            try:  # what was in force before the restart: its changes retire rules
                self.index = build_index(load_rules(self.in_force_path, key=IN_FORCE_KEY),
                                         self.settings)
            except ConfigError as err:
                log.warning("remembered rules unreadable", extra={"error": str(err)})
        if self.path is None and self.api_path is None:
            if self.index.rules:
                self.install(dict.fromkeys(LAYERS, ()))
            return
        self.install(self._read())

    def reload(self) -> bool:
        """Load the files again; on error keep the valid set, log and return False."""
        self._stamps = self._stamp_now()
        try:
            layers = self._read()
        # Exception, not only ConfigError: whatever a file holds, a reload (SIGHUP, the
        # watch) must never end the daemon; the defect is counted and logged.
        except Exception as err:
            self.failures += 1
            error = str(err) if isinstance(err, ConfigError) else f"{type(err).__name__}: {err}"
            self.last_error = error
            log.error("threshold rules rejected; keeping the previous set",
                      extra={"path": str(self.path), "error": error,
                             "rules_kept": len(self.index.rules)})
            return False
        self.install(layers)
        return True

    def check(self) -> bool | None:
        """Reload if a file's inode, size or mtime changed; None when unchanged."""
        if self._stamp_now() == self._stamps:
            return None
        return self.reload()

    def write_api(self, rules: Sequence[Rule]) -> None:
        """Replace the API layer: check the merged set, write the file atomically, install.

        ConfigError (nothing written) when the set is refused; OSError when it cannot be
        written (nothing changed).
        """
        if self.api_path is None:
            raise ConfigError("<config>", "thresholds.api_rules_path", "a writable path", "",
                              "the daemon sets it next to collector.state_path")
        with self._writing:
            layers = self.candidate("api", rules)
            body = orjson.dumps([rule_dict(r) for r in rules],
                                option=orjson.OPT_INDENT_2) + b"\n"
            atomic_write(self.api_path, body)
            self.install(layers)
            # Only the API file's stamp: a change of the rules file meanwhile is still seen.
            self._stamps = (self._stamps[0], _stamp(self.api_path))

    async def run(self, *, sighup: bool = True,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Reload when a rules file changes, and on SIGHUP (`sighup`), until cancelled.

        Changes are seen through inotify on the files' directories (hostagent/file_watch.py):
        at once, and without a wake-up while nothing changes; a check every
        max(`reload_check_s`, SAFETY_CHECK_S) catches what inotify cannot see (a file on a
        network filesystem changed from another host). Where inotify cannot watch them (a
        directory that does not exist yet), the files are polled every `reload_check_s`.
        """
        if not sighup:
            task_status.started()
            await self._follow()
            return
        with trio.open_signal_receiver(signal.SIGHUP) as signals:
            task_status.started()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._follow)
                async for _ in signals:
                    log.info("SIGHUP: reloading threshold rules", extra={"pid": os.getpid()})
                    await self._when_free(self.reload)

    async def _when_free(self, fn: Callable[[], bool | None]) -> None:
        """`fn` (check or reload) once no API write is in progress (it is short)."""
        while not self._writing.acquire(blocking=False):  # noqa: ASYNC110 -- a worker holds it
            await trio.sleep(WRITE_RETRY_S)
        try:
            fn()
        finally:
            self._writing.release()

    async def _follow(self) -> None:
        paths = [p for p in (self.path, self.api_path) if p is not None]
        if not paths:
            await trio.sleep_forever()
        while True:
            try:
                watch = DirWatch(paths)
            except OSError as err:
                log.debug("rules files polled", extra={"error": str(err)})
                await trio.sleep(self.reload_check_s)
                await self._when_free(self.check)
                continue  # the watch again: a directory created meanwhile is watched
            try:
                await self._when_free(self.check)  # a change before the watch began
                while not watch.lost:
                    changed = True
                    with trio.move_on_after(max(self.reload_check_s, SAFETY_CHECK_S)):
                        await trio.lowlevel.wait_readable(watch.fd)
                        changed = watch.drain()
                    if changed:
                        await self._when_free(self.check)
            finally:
                trio.lowlevel.notify_closing(watch.fd)
                watch.close()
