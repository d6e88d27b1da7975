"""What signals do to a running daemon, and the SIGHUP reload (mixed into
hostagent.daemon.Daemon, which holds the state named below).

SIGTERM/SIGINT: the pass in progress finishes and commits, delivery gets `drain_grace_s` to
flush (the outbox's sinks, then the webhook endpoints: a POST in flight is answered and
recorded, not resent after the restart), then everything is cancelled. SIGHUP: reload the
config file; only the live keys (`hostagent.config.live`: interval, alignment, pass timeout,
baseline retention, log level and format, the API's credentials) take effect, at the next
pass; every other changed key is named in one log line as needing a restart and has no effect
until then. The rules file and the API's key files (API keys, JWT keys) are re-read, so a new
or revoked key takes effect at once. SIGUSR1 and SIGUSR2 mean nothing to hostagent: they are
logged and ignored (their default action ended the daemon mid-pass). `hostagent run` holds
SIGTERM, SIGHUP, SIGUSR1 and SIGUSR2 from before it loads the config until it has closed the
store (`hostagent.cli.main.HeldSignals`): the first thing `Daemon.run` does is open its signal
receiver and act on the ones held meanwhile, so a stop or a reload during start-up (config,
store, libvirt's first connection: seconds on a large host) or a second SIGTERM during shutdown
is never the default action's death.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from typing import Any

import trio

from hostagent import logs
from hostagent.alerts.rules_source import RulesSource
from hostagent.collector import Collector
from hostagent.config import live
from hostagent.config.load import Config, load
from hostagent.errors import ConfigError
from hostagent.notify import Notifier

log = logging.getLogger("hostagent.daemon")  # its records, as before the split

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Signals with no meaning for hostagent (a logrotate postrotate's `kill -USR1`): logged, ignored.
IGNORED_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


class SignalsAndReload:
    """The daemon's signal task and its reload (hostagent.daemon.Daemon sets these)."""

    cfg: Config
    collector: Collector
    notifier: Notifier
    config_path: str | None
    stop: trio.Event
    rules: RulesSource | None
    api_auth: Any
    held_signals: Callable[[], list[int]]

    async def _signals(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                       ) -> None:
        with trio.open_signal_receiver(*STOP_SIGNALS, signal.SIGHUP, *IGNORED_SIGNALS) as sigs:
            task_status.started()
            held = self.held_signals()  # arrived during start-up: a stop wins, reloads are one
            for signum in dict.fromkeys(sorted(held, key=lambda s: s == signal.SIGHUP)):
                if signum != signal.SIGHUP or not self.stop.is_set():
                    self._on_signal(signum)
            async for signum in sigs:
                self._on_signal(signum)

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGHUP:
            self.reload()
        elif signum in IGNORED_SIGNALS:
            log.warning("signal ignored: it means nothing to hostagent (SIGHUP reloads the "
                        "config, SIGTERM stops)", extra={"signal": name})
        elif self.stop.is_set():
            log.info("stop already requested; finishing the pass in progress",
                     extra={"signal": name})
        else:
            log.info("stop requested; finishing the pass in progress", extra={"signal": name})
            self.stop.set()

    def reload(self) -> list[str] | None:
        """SIGHUP: re-read the config; apply the live keys, name the rest as needing a restart.

        Returns the changed keys that need a restart; None when the file was refused."""
        if self.config_path is None:
            return None
        # Before the first pass (a SIGHUP held during start-up) READY=1 is the pass's to send.
        notifier = self.notifier if self.notifier.started else Notifier({})
        notifier.reloading()
        if self.rules is not None:
            self.rules.reload()  # an invalid rules file keeps the valid set (logged)
        try:
            new = load(self.config_path)
        except ConfigError as err:
            log.error("reload refused: config invalid, keeping the running one",
                      extra={"error": str(err)})
            notifier.ready()
            return None
        except Exception as err:  # a defect load() missed must not end a running daemon
            log.error("reload refused, keeping the running config",
                          extra={"error": f"{type(err).__name__}: {err}"})
            notifier.ready()
            return None
        needs_restart = live.restart_keys(self.cfg, new)
        applied = live.apply(self.cfg, new)
        self._reload_api(applied)
        logs.setup(applied.log.level, applied.log.format)
        self.cfg = applied
        self.collector.cfg = applied
        if needs_restart:
            log.warning("config reloaded; these keys need a restart to take effect",
                        extra={"needs_restart": needs_restart})
        else:
            log.info("config reloaded", extra={"needs_restart": needs_restart})
        notifier.ready()
        return needs_restart

    def _reload_api(self, applied: Config) -> None:
        """Re-read the API's key files named by the (live) credential keys of `applied`."""
        if self.api_auth is None:
            return
        try:
            creds = self.api_auth.reload(applied.api, applied.source)
        except ConfigError as err:
            log.error("API credentials reload refused, keeping the keys in force",
                      extra={"error": str(err)})
        except Exception as err:  # a defect the key readers missed: still never fatal
            log.error("API credentials reload refused, keeping the keys in force",
                          extra={"error": f"{type(err).__name__}: {err}"})
        else:
            log.info("API credentials reloaded", extra={
                "api_keys": len(creds.api_keys), "jwt_keys": len(creds.verify_keys)})
