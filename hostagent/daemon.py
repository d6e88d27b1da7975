"""The trio daemon: collector loop, delivery, owner refresh and signals in one nursery.

Signals (SIGTERM/SIGINT stop, SIGHUP reloads, SIGUSR1/2 ignored) and the reload:
hostagent.daemon_signals.

Start-up checks the config first (`hostagent.config.preflight`, the same checks as
`hostagent check-config`), then opens the store (`hostagent.store.guard`: never an empty one
in place of a lost one).

Collection comes first: while a pass runs, API requests wait for it (`PassGate`), so API
load cannot slow a pass.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from hostagent import handoff, heap
from hostagent.accounting.readings import PassReport
from hostagent.alerts import central, rules_source
from hostagent.alerts.rules_source import RulesSource
from hostagent.api.lifetime import serve_in_daemon
from hostagent.api.pass_gate import PassGate
from hostagent.clock import Clock, SystemClock
from hostagent.collector import Collector
from hostagent.config import preflight
from hostagent.config.load import Config
from hostagent.config.sinks import WebhookSinkConfig
from hostagent.daemon_signals import SignalsAndReload
from hostagent.delivery.engine import Delivery
from hostagent.delivery.sinks.base import Sink, build_sink, config_routes, dispatchers
from hostagent.errors import HostAgentError
from hostagent.notify import Notifier
from hostagent.owners.resolver import Owners, make_client
from hostagent.sources.gpu import GpuSource
from hostagent.sources.libvirt import LibvirtSource
from hostagent.sources.net import link_reader_for
from hostagent.store import guard
from hostagent.store.outbox import Store
from hostagent.store.schema import upgrade_budget_s
from hostagent.store.webhooks import WebhookStore
from hostagent.tailing import TailTasks
from hostagent.threads import thread_limiter

log = logging.getLogger(__name__)
# Longest a pass waits for API requests in flight, once it has read the host, before it accounts.
PASS_DRAIN_MAX_S = 1.0


def _none_held() -> list[int]:
    return []


_LOST = {
    "store": "passes go on in the file the daemon has open and their events are delivered, "
             "but the next start refuses it (deleted) or uses the file now there (replaced)",
    "write-ahead log": "its commits were copied into the store file (a checkpoint), and so is "
                       "every pass's commit from now on, before its events are sent: a crash "
                       "loses at most delivery acknowledgements (those events are sent again "
                       "with the same event_id); a clean stop (systemctl restart) creates a "
                       "new log",
}


def _inode(path: Path) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the file at `path`; None when there is none. OSError when it
    cannot be looked up (a directory made unsearchable: not evidence of anything)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def next_tick_s(now_wall_s: float, interval_s: float, align: bool) -> float:
    """Seconds to wait until the next pass: the next multiple of interval_s when aligned."""
    if not align:
        return interval_s
    nxt = math.floor(now_wall_s / interval_s + 1e-9) * interval_s + interval_s
    return max(nxt - now_wall_s, 0.0)


@dataclass
class Daemon(SignalsAndReload):
    """Everything the running daemon holds; built by `build()`, run by `run()`."""

    cfg: Config
    clock: Clock
    store: Store
    collector: Collector
    delivery: Delivery
    owners: Owners
    libvirt: LibvirtSource
    notifier: Notifier = field(default_factory=Notifier)
    config_path: str | None = None
    stop: trio.Event = field(default_factory=trio.Event)
    passes_done: int = 0
    drain_grace_s: float = 5.0
    on_pass: list[Callable[[PassReport], None]] = field(default_factory=list)
    rules: RulesSource | None = None
    central_rules: central.CentralRules | None = None
    webhooks: WebhookStore | None = None
    sinks: list[Sink] = field(default_factory=list)
    api_view: Any = None  # hostagent.api.view.ApiView when [api] is enabled
    api_app: Any = None
    api_auth: Any = None  # hostagent.api.auth.Authenticator: re-reads key files on SIGHUP
    pass_gate: PassGate = field(default_factory=PassGate)
    api_stop: trio.Event = field(default_factory=trio.Event)
    api_done: trio.Event = field(default_factory=trio.Event)
    api_urls: list[str] = field(default_factory=list)
    api_listens: int = 0  # times the API server listened (restarts: api/lifetime.py)
    tail: TailTasks | None = None  # lifecycle events and light samples (the billing tail)
    # The signals that arrived before the daemon's receiver was open (`hostagent run` holds them).
    held_signals: Callable[[], list[int]] = _none_held
    store_lock: guard.StoreLock | None = None  # released once the store is closed
    store_inode: tuple[int, int] | None = None  # the store file opened: (st_dev, st_ino)
    wal_inode: tuple[int, int] | None = None  # and its write-ahead log
    _log_saved: bool = False  # the log found deleted or replaced was checkpointed

    @classmethod
    def build(cls, cfg: Config, *, clock: Clock | None = None,
              config_path: str | None = None, owner_client: Any = None) -> Daemon:
        """Open the store and construct every component from the config."""
        preflight.check(cfg)  # the checks `hostagent check-config` makes, before any write
        # One daemon per store (hostagent.store.guard): two would each bill every period.
        lock = guard.hold(Path(cfg.collector.state_path))
        try:
            daemon = cls._build(cfg, clock or SystemClock(), config_path, owner_client)
        except BaseException:
            lock.release(discard=True)
            raise
        daemon.store_lock = lock
        with contextlib.suppress(OSError):
            daemon.store_inode = _inode(daemon.store.path)
            daemon.wal_inode = _inode(Path(f"{daemon.store.path}-wal"))  # written by now
        return daemon

    @classmethod
    def _build(cls, cfg: Config, clock: Clock, config_path: str | None,
               owner_client: Any) -> Daemon:
        limiter = thread_limiter(cfg.collector.max_threads)
        rules = rules_source.from_config(cfg.thresholds, state_path=cfg.collector.state_path,
                                         routes=config_routes(cfg.sinks))
        rules.load_initial()  # an invalid rules file at start is a config error: refuse to run
        central_rules = central.from_config(cfg.thresholds, rules, clock,
                                            state_path=cfg.collector.state_path,
                                            key_file=cfg.owners.key_file, config_source=cfg.source)
        notifier = Notifier()

        def upgrading(version: int, file_bytes: int) -> None:  # may outlast TimeoutStartSec
            notifier.extend_start(upgrade_budget_s(file_bytes),
                                  f"upgrading the state store from schema version {version}")

        store = Store.open(cfg.collector.state_path, clock=clock, node_id=cfg.host.node_id,
                           sink_names=[s.name for s in cfg.sinks], on_upgrade=upgrading)
        hooks = (WebhookStore(cfg.collector.state_path, clock)
                 if any(isinstance(s, WebhookSinkConfig) for s in cfg.sinks) else None)
        sinks = [build_sink(s, clock=clock, webhook_store=hooks, node_id=cfg.host.node_id)
                 for s in cfg.sinks]
        if owner_client is None and cfg.owners.enabled:
            owner_client = make_client(cfg.owners, clock, cfg.source)
        owners = Owners(cfg.owners, clock, owner_client)
        lv = LibvirtSource(cfg.libvirt, clock=clock, limiter=limiter)
        gpu = GpuSource(cfg.gpu, root=cfg.paths.root, clock=clock)
        collector = Collector(cfg, clock=clock, store=store, owners=owners, libvirt_source=lv,
                              link_reader=link_reader_for(cfg), gpu_source=gpu, limiter=limiter,
                              rules=rules, storm=rules_source.storm_from(cfg.thresholds))
        delivery = Delivery(store, sinks, clock, cfg)
        collector.after_commit = delivery  # a caught-up JSONL sink is written at the commit
        daemon = cls(cfg=cfg, clock=clock, store=store, collector=collector, delivery=delivery,
                     owners=owners, libvirt=lv, config_path=config_path, rules=rules,
                     webhooks=hooks, sinks=sinks, central_rules=central_rules,
                     tail=TailTasks(collector, clock=clock), notifier=notifier)
        if cfg.api.enabled:
            # Imported only when enabled: the web stack costs ~120 ms of start-up otherwise.
            from hostagent.alerts.rule_store import LayeredRuleStore
            from hostagent.api.auth import Authenticator, reserved_principals
            from hostagent.api.backends import StoreWebhooks
            from hostagent.api.server import make_app
            from hostagent.api.view import ApiView
            from hostagent.delivery.sinks.webhook import WebhookDispatcher

            daemon.api_view = ApiView(
                authorized=owners.authorized, delivery_health=delivery.health,
                owners_health=owners.health,
                libvirt_health=lambda: {"state": lv.state, "last_error": lv.last_error},
                emission_metrics=delivery.metrics, rules_health=daemon.rules_health,
                pass_settings=lambda: {"interval_s": daemon.cfg.collector.interval_s,
                                       "timeout_s": daemon.cfg.collector.pass_timeout_s},
                tail_health=daemon.tail.health if daemon.tail is not None else None)
            dispatcher = next((d for d in dispatchers(sinks)
                               if isinstance(d, WebhookDispatcher)), None)
            registry = (StoreWebhooks(hooks, dispatcher.guard, wake=dispatcher.wake)
                        if hooks is not None and dispatcher is not None else None)
            daemon.api_auth = Authenticator(
                cfg.api, reserved=reserved_principals(cfg.owners.unassigned))
            daemon.api_app = make_app(cfg.api, daemon.api_view, clock=clock, webhooks=registry,
                                      rules=LayeredRuleStore(rules), authenticator=daemon.api_auth,
                                      gate=daemon.pass_gate)
            daemon.on_pass.append(daemon.api_view.update)
        return daemon

    def rules_health(self) -> dict[str, Any]:
        """The rule set's layers, loads and errors, and the central source's age."""
        out = self.rules.health() if self.rules is not None else {}
        if self.central_rules is not None:
            out.update(self.central_rules.health())
        return out

    async def run(self, *, passes: int | None = None,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until `passes` passes are done or a stop signal arrives."""
        try:
            async with trio.open_nursery() as nursery:
                # First: from here a stop or a reload is the daemon's, not the default action.
                await nursery.start(self._signals)
                await nursery.start(self.delivery.run)
                for dispatcher in dispatchers(self.sinks):  # webhooks: one drain per endpoint
                    await nursery.start(dispatcher.run)
                if self.rules is not None:
                    # the daemon owns SIGHUP and calls rules.reload() from reload()
                    await nursery.start(functools.partial(self.rules.run, sighup=False))
                if self.central_rules is not None:
                    await nursery.start(self.central_rules.run)
                if self.cfg.owners.enabled:
                    await nursery.start(self.owners.run)
                if self.api_app is not None:
                    self.api_urls = await nursery.start(self._api)
                if self.tail is not None:
                    await nursery.start(self.tail.run)
                nursery.start_soon(self._interrupt_on_stop)
                task_status.started()
                await self._collect_loop(passes)
                await self._drain()
                if self.api_app is not None:
                    self.api_stop.set()  # graceful: in-flight requests finish
                    with trio.move_on_after(self.cfg.api.shutdown_grace_s + 1):
                        await self.api_done.wait()
                nursery.cancel_scope.cancel()
        finally:
            self.notifier.stopping()
            if self.collector.gpu is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    await self.collector.gpu.aclose()
            self.libvirt.close()
            self.collector.cgroups.close()
            if self.webhooks is not None:
                self.webhooks.close()
            self.store.close()
            if self.store_lock is not None:
                self.store_lock.release()

    async def _api(self, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED
                   ) -> None:
        from hostagent.api.server import serve_api

        def on_urls(urls: list[str]) -> None:
            self.api_urls = urls
            self.api_listens += 1

        try:  # restarted after a failure once it listens: never the end of the passes
            await serve_in_daemon(
                serve_api, self.cfg.api, self.api_app, self.api_stop, source=self.cfg.source,
                on_urls=on_urls, task_status=task_status)
        finally:
            self.api_done.set()

    async def _collect_loop(self, passes: int | None) -> None:
        first = True
        while passes is None or self.passes_done < passes:
            due_s = time.monotonic()
            if not first:
                due_s += next_tick_s(self.clock.now().wall_s, self.cfg.collector.interval_s,
                                     self.cfg.collector.align)
            if self.stop.is_set():
                return
            first = False
            # The wait for the tick is the pass's first worker call (hostagent/tick.py): a stop
            # request cuts it short (`_interrupt_on_stop`), a cancellation abandons it. From the
            # moment the host is read the pass is shielded (a stop never interrupts it between
            # reading and committing) and the API's gate is closed: new requests wait for the
            # pass, and it lets the requests already being served finish (at most
            # PASS_DRAIN_MAX_S) before it accounts.
            with trio.CancelScope() as guard, contextlib.ExitStack() as gate:
                async def on_read(guard: trio.CancelScope = guard,
                                  gate: contextlib.ExitStack = gate) -> None:
                    guard.shield = True
                    gate.enter_context(self.pass_gate.busy())
                    await self.pass_gate.drain(PASS_DRAIN_MAX_S)

                report = await self.collector.run_pass_at(due_s, stop=self.stop.is_set,
                                                          on_read=on_read)
            if report is None:  # stopped while waiting for the tick
                return
            self.passes_done += 1
            self._after_pass(report)
            if self.store.log_lost and not self._log_saved:
                # Its commits live only in the open, deleted (or replaced) log: into the store
                # file now, and every pass commit from now on (`Store.checkpoint`).
                self._log_saved = await handoff.run_sync(self.store.checkpoint)
            if self.stop.is_set():
                return

    async def _interrupt_on_stop(self) -> None:
        """A stop request cuts short the pass's wait for its tick (it sleeps in a worker)."""
        await self.stop.wait()
        self.collector.interrupt_wait()

    def _after_pass(self, report: PassReport) -> None:
        if self.passes_done == 1:
            heap.settle_heap()
        heap.fit_young_generation(report.domains)
        heap.release_freed(report.domains)
        fields = {"domains": report.domains, "events": report.events,
                  "duration_s": round(report.duration_s, 4), "cpu_s": round(report.cpu_s, 4),
                  "libvirt_path": report.libvirt_path, "missing": report.missing,
                  "unattributed_cpu_s": report.unattributed_cpu_s}
        if report.committed:
            log.info("pass committed", extra=fields)
            self.delivery.wake(after_commit=True)
        else:
            log.warning("pass failed", extra={**fields, "error": report.error})
        lost = self._store_lost()
        # The loop is alive either way: a libvirtd outage must not become a watchdog restart
        # loop. READY comes with the first pass attempt; STATUS says whether it committed.
        self.notifier.pass_done(
            (f"state {lost} behind the daemon's back (see the log); " if lost else "")
            + f"{report.domains} domains, {report.events} events, "
            f"pass {report.duration_s:.2f}s" + (f", error: {report.error}" if report.error else "")
        )
        for cb in self.on_pass:
            cb(report)

    def _store_lost(self) -> str | None:
        """Whether the store file or its write-ahead log was deleted or replaced behind the
        daemon's back; logged as an error every pass, and said in STATUS. The store: the
        daemon then commits to a file no later start sees (the marker makes that start refuse
        it). The log: the commits since SQLite last copied it into the store live only in the
        deleted file, so a crash would take the store back in time, silently (baselines and
        pending events lost, periods billed again); a clean stop copies them in. The daemon
        goes on either way: what the open files hold is delivered from them, and only them."""
        files = (("store", self.store.path, self.store_inode),
                 ("write-ahead log", Path(f"{self.store.path}-wal"), self.wal_inode))
        for what, path, opened in files:
            if opened is None:
                continue
            try:
                now = _inode(path)
            except OSError:
                continue  # cannot tell (its directory made unsearchable): a failed pass says more
            if now == opened:
                continue
            lost = f"{what} {'deleted' if now is None else 'replaced'}"
            if what == "write-ahead log":
                self.store.log_lost = True
            log.error("state store deleted or replaced while the daemon runs", extra={
                "path": str(path), "what": lost,
                "consequence": _LOST[what] + "; stop the daemon (a clean stop) and restore "
                                             "the file, or see `hostagent store reset`"})
            return lost
        return None

    async def _drain(self) -> None:
        with trio.move_on_after(self.drain_grace_s):
            await self.delivery.drained()  # the outbox hands webhook rows over first
            for dispatcher in dispatchers(self.sinks):
                await dispatcher.drained()

def run(cfg: Config, *, config_path: str | None, passes: int | None,
        held_signals: Callable[[], list[int]] = _none_held) -> int:
    """Entry point of `hostagent run`; `held_signals` gives the signals that arrived before
    the daemon listens (`hostagent.cli.main.HeldSignals`). With `passes` (`--once`,
    `--passes N`) a pass that did not commit (source unavailable, commit failed, timed out)
    is a HostAgentError once the daemon has closed (exit 1: scripts and timers read it),
    naming how many failed and the last one's reason; without, 0 (a daemon stopped by
    SIGTERM: its failed passes were logged, and the next good pass covered their gap)."""
    daemon = Daemon.build(cfg, config_path=config_path)
    daemon.held_signals = held_signals
    failed: list[PassReport] = []

    def note(report: PassReport) -> None:
        if not report.committed:
            failed.append(report)

    daemon.on_pass.append(note)
    trio.run(lambda: daemon.run(passes=passes))
    if passes is not None and failed:
        why = failed[-1].error or "not committed"
        raise HostAgentError(f"pass failed: {why}" if daemon.passes_done == 1 else
                             f"{len(failed)} of {daemon.passes_done} passes failed; the last "
                             f"failed: {why}")
    return 0
