"""`hostagent top`: a live per-domain view of this host, read the way `hostagent dump` reads it.

Every refresh reads every source once (libvirt bulk stats, cgroups, taps, GPUs) and compares
with the previous refresh. The daemon's state comes from the state store, opened read-only
(`mode=ro`: top never writes), and, when the daemon serves `/metrics` on loopback without
credentials, the unattributed-CPU counter from there. No daemon is needed.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sqlite3
import sys
import termios
import tty
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import trio
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.live import Live

from hostagent.accounting.assemble import sample_of
from hostagent.cli import top_view
from hostagent.cli.outbox import breaker_text
from hostagent.cli.terminal import one_line
from hostagent.cli.top_view import DaemonState, Screen, SinkState, SortKey
from hostagent.clock import Clock, SystemClock
from hostagent.collector import Collector
from hostagent.config.load import Config
from hostagent.errors import HostAgentError, StateError
from hostagent.model import Sample
from hostagent.owners.resolver import Owners
from hostagent.sources.gpu import GpuSource
from hostagent.sources.libvirt import LibvirtSource
from hostagent.sources.net import link_reader_for
from hostagent.store import sqlite_tx
from hostagent.store.inspect import SinkStats, sink_depth
from hostagent.store.schema import APP, SCHEMA_VERSION, UPGRADABLE

log = logging.getLogger(__name__)
UNATTRIBUTED = "hostagent_unattributed_cpu_seconds_total"
# What `top` reads each refresh: index ranges (inspect.sink_depth) and the last row, never the
# day of rows that retention keeps.
LAST_EVENT_SQL = "SELECT created_ns FROM events WHERE rowid = (SELECT MAX(rowid) FROM events)"


# --- the daemon's state, read-only ------------------------------------------------------------


def daemon_state(cfg: Config, now_ns: int) -> DaemonState:
    """Last pass, backlog, breakers from the state store opened read-only; never raises and
    never writes (no -wal or -shm file created either).

    Path.exists() raises what is not "absent" (EACCES on a directory this user may not
    search: the shipped unit's StateDirectoryMode=0750 keeps operators outside the group out;
    ENAMETOOLONG): that is a state the view shows, as `store check` does, not a traceback."""
    path = Path(cfg.collector.state_path)
    try:
        if not path.exists():
            return DaemonState(str(path), False, "no state store: the daemon has not run here")
        wal, shm = Path(f"{path}-wal").exists(), Path(f"{path}-shm").exists()
        odd = next((p for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm"))
                    if p.exists() and not p.is_file()), None)
    except OSError as err:
        return DaemonState(str(path), False,
                           f"cannot reach the state store: {err.strerror or err}")
    if odd is not None:  # SQLite would open a FIFO and wait for a writer forever: top hung
        return DaemonState(str(path), False, f"{odd} is not a regular file: not reading "
                           "the state store (`hostagent store check` says more)")
    if wal and not shm:
        # Reading a write-ahead log needs its -shm index: SQLite would create one (as root: a
        # root-owned file the daemon's user cannot open), even read-only.
        return DaemonState(str(path), False, f"cannot read the state store without writing: "
                           f"{path.name}-wal has no {path.name}-shm (the daemon recovers the "
                           "log when it next starts)")
    # The inspecting commands' connection: `mode=ro` through a daemon's -wal and -shm,
    # `immutable=1` without them (a read-only open would create both).
    try:
        conn = sqlite_tx.connect_read_only(path)
    except StateError as err:  # its text names the file and what failed
        return DaemonState(str(path), False, str(err))
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        meta = (dict(conn.execute("SELECT key, value FROM meta").fetchall())
                if "meta" in tables else {})
        refused = _refused(meta)
        if refused is not None:
            return DaemonState(str(path), False, refused)
        last = conn.execute("SELECT MAX(json_extract(state, '$.t_wall_ns')) FROM baselines"
                            ).fetchone()[0]
        row = conn.execute(LAST_EVENT_SQL).fetchone()
        last_event = row[0] if row else None
        sinks = conn.execute("SELECT name, active, breaker_state, breaker_since_ns, "
                             "breaker_updated_ns FROM sinks WHERE active ORDER BY name"
                             ).fetchall()
        by = {}
        for name, *_ in sinks:
            by.update(sink_depth(conn, name))
    except sqlite3.Error as err:
        return DaemonState(str(path), False, f"cannot read the state store: {err}")
    finally:
        conn.close()
    try:
        hb = _ns(meta, "delivery_heartbeat_ns")
        passes = [_int(x, "last pass time") for x in (last, last_event) if x is not None]
        out = _sinks(cfg, sinks, by, hb, now_ns)
    except (ValueError, TypeError, OverflowError) as err:  # damaged values: not the daemon's
        return DaemonState(str(path), False, f"cannot read the state store: {err}")
    return DaemonState(str(path), True, None, max(passes) if passes else None,
                       None if hb is None else (now_ns - hb) / 1e9, tuple(out),
                       unattributed_cpu_s(cfg))


def _refused(meta: dict[str, str]) -> str | None:
    """Why the daemon would not use a store with this meta table, or None when it would."""
    version = meta.get("schema_version")
    if meta.get("app") != APP:
        return ("not a hostagent state store: the daemon refuses to start on it "
                "(`hostagent store reset` moves it aside)")
    if version == str(SCHEMA_VERSION):
        return None
    if version is None:
        return ("state store with no schema version: the daemon refuses to start on it "
                "(`hostagent store reset` moves it aside)")
    if version in {str(v) for v in UPGRADABLE}:
        return (f"state store of schema version {version}: the daemon upgrades it to "
                f"{SCHEMA_VERSION} when it next starts")
    return (f"state store of schema version {version}, which this hostagent cannot use: the "
            "daemon refuses to start on it (upgrade hostagent, or `hostagent store reset` to "
            "start afresh)")


def _int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} is {value!r}, not an integer")
    return value


def _ns(meta: dict[str, str], key: str) -> int | None:
    if key not in meta:
        return None
    try:
        return int(meta[key])
    except (ValueError, TypeError):
        raise ValueError(f"meta.{key} is {meta[key]!r}, not an integer") from None


def _sinks(cfg: Config, sinks: list[tuple[Any, ...]],
           by: dict[tuple[str, str], tuple[int, int | None]], hb: int | None,
           now_ns: int) -> list[SinkState]:
    stale_s = 3 * cfg.outbox.maintenance_interval_s + 5
    out = []
    for name, active, state, since, updated in sinks:
        pending, oldest = by.get((name, "pending"), (0, None))
        st = SinkStats(name, bool(active), pending, oldest, by.get((name, "acked"), (0, 0))[0],
                       by.get((name, "dead"), (0, 0))[0], state, since, updated)
        out.append(SinkState(str(name), pending, None if oldest is None
                             else max(now_ns - oldest, 0) / 1e9, st.dead,
                             breaker_text(st, hb, now_ns, stale_s)))
    return out


def unattributed_cpu_s(cfg: Config) -> float | None:
    """The daemon's unattributed-CPU counter, when it serves /metrics openly on loopback."""
    api = cfg.api
    if not api.enabled or not api.metrics_unauthenticated or api.tls_cert_file:
        return None
    try:
        host = "127.0.0.1" if ipaddress.ip_address(api.bind).is_unspecified else api.bind
        if not ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        return None
    try:
        text = httpx.get(f"http://{host}:{api.port}/metrics", timeout=0.5).text
        # Match samples, not families: how the text parser names a counter's family depends
        # on its TYPE line.
        values = [s.value for fam in text_string_to_metric_families(text)
                  for s in fam.samples if s.name == UNATTRIBUTED]
        return sum(values) if values else None
    except (httpx.HTTPError, ValueError):
        return None


# --- the host, read the way dump reads it -----------------------------------------------------


@dataclass
class Reader:
    """One collector kept across refreshes; each `read()` is one sample of every domain."""

    cfg: Config
    clock: Clock

    def __post_init__(self) -> None:
        limiter = trio.CapacityLimiter(self.cfg.collector.max_threads)
        self.lv = LibvirtSource(self.cfg.libvirt, clock=self.clock, limiter=limiter)
        gpu = GpuSource(self.cfg.gpu, root=self.cfg.paths.root, clock=self.clock)
        self.coll = Collector(self.cfg, clock=self.clock, store=None,
                              owners=Owners(self.cfg.owners, self.clock, None),
                              libvirt_source=self.lv, link_reader=link_reader_for(self.cfg),
                              gpu_source=gpu, limiter=limiter)

    async def read(self) -> tuple[list[Sample], dict[str, str]]:
        """Samples of every running domain and their owners (user id) by UUID."""
        host = await self.coll.read_host()
        samples = [sample_of(r) for r in host.domains]
        hints = {r.uuid: r.info.owner_hint for r in host.domains}
        owners = {s.uuid: self.coll.owners.resolve(s.instance_id, hints.get(s.uuid)).user_id
                  for s in samples}
        return samples, owners

    def close(self) -> None:
        """Release libvirt and cgroup handles."""
        self.lv.close()
        self.coll.cgroups.close()


@dataclass
class State:
    """What the screen shows and what the keys changed."""

    key: SortKey
    text: str
    screen: Screen | None = None
    prompt: str | None = None  # the filter being typed, None when not typing
    interrupted: bool = False  # Ctrl-C (SIGINT: cbreak keeps ISIG) ended the live view


async def refresh(reader: Reader, prev: dict[str, Sample], interval_s: float) -> Screen:
    """One sample, compared with `prev` (updated in place); errors go on the screen."""
    now = reader.clock.now().wall_ns
    errors: list[str] = []
    try:
        samples, owners = await reader.read()
    except HostAgentError as err:
        log.debug("top: read failed", extra={"error": str(err)})
        samples, owners, errors = [], {}, [str(err)]
    rs = top_view.rows(prev, samples, owners)
    prev.clear()
    prev.update({s.uuid: s for s in samples})
    cpus = os.cpu_count() or 1
    return Screen(samples[0].t_wall_ns if samples else now, interval_s, cpus, rs,
                  top_view.totals(rs, cpus), daemon_state(reader.cfg, now), tuple(errors))


async def once(reader: Reader, interval_s: float) -> Screen:
    """Two samples `interval_s` apart (like dump)."""
    prev: dict[str, Sample] = {}
    await refresh(reader, prev, interval_s)
    await trio.sleep(interval_s)
    return await refresh(reader, prev, interval_s)


def on_key(state: State, ch: str) -> bool:
    """Apply one key press; False means quit."""
    if state.prompt is not None:
        if ch in ("\r", "\n"):
            state.text, state.prompt = state.prompt, None
        elif ch == "\x1b":
            state.text, state.prompt = "", None
        elif ch in ("\x7f", "\b"):
            state.prompt = state.prompt[:-1]
        elif ch.isprintable():
            state.prompt += ch
        return True
    if ch in ("q", "Q", "\x03"):
        return False
    if ch in top_view.SORT_KEYS:
        state.key = ch  # type: ignore[assignment]
    elif ch == "/":
        state.prompt = ""
    elif ch == "\x1b":
        state.text = ""
    return True


@contextmanager
def _cbreak(fd: int) -> Iterator[None]:
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def live(reader: Reader, state: State, interval_s: float, console: Console) -> None:
    """Refresh every `interval_s` and react to keys until `q` or Ctrl-C (`state.interrupted`).

    SIGINT is received here rather than raised as KeyboardInterrupt into the nursery: the view
    closes the way `q` closes it (no half-started task, no ExceptionGroup)."""
    prev: dict[str, Sample] = {}
    fd = sys.stdin.fileno()
    state.screen = await refresh(reader, prev, interval_s)

    def draw() -> None:
        assert state.screen is not None
        lv.update(top_view.render(state.screen, state.key, state.text, prompt=state.prompt),
                  refresh=True)

    # Log lines would tear the full-screen view: only errors get through while it is up
    # (host-wide read errors show in the header instead).
    logging.disable(logging.WARNING)
    try:
        with (_cbreak(fd), trio.open_signal_receiver(signal.SIGINT) as sigint,
              Live(console=console, screen=True, auto_refresh=False) as lv):
            draw()
            async with trio.open_nursery() as nursery:

                async def on_sigint() -> None:
                    async for _ in sigint:
                        state.interrupted = True
                        nursery.cancel_scope.cancel()

                async def ticker() -> None:
                    while True:
                        await trio.sleep(interval_s)
                        state.screen = await refresh(reader, prev, interval_s)
                        draw()

                nursery.start_soon(ticker)
                nursery.start_soon(on_sigint)
                while True:
                    await trio.lowlevel.wait_readable(fd)
                    data = os.read(fd, 64).decode(errors="replace")
                    if not data or not all(on_key(state, ch) for ch in data):
                        nursery.cancel_scope.cancel()
                        return
                    draw()
    finally:
        logging.disable(logging.NOTSET)


def run(cfg: Config, args: argparse.Namespace) -> int:
    """Entry point of `hostagent top`."""
    interval_s = float(args.interval)  # checked by the parser: in (0, 3600]
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one /metrics GET per refresh
    reader = Reader(cfg, SystemClock())
    state = State(args.sort, args.filter)
    try:
        if args.json or args.once:
            screen = trio.run(once, reader, interval_s)
            if args.json:
                sys.stdout.write(orjson.dumps(top_view.as_json(screen, state.key, state.text),
                                              option=orjson.OPT_INDENT_2).decode() + "\n")
            else:
                Console(width=max(Console().width, 140)).print(
                    top_view.render(screen, state.key, state.text, interactive=False))
            if screen.errors:  # the host could not be read: no "0 domains" a script believes
                print(f"hostagent: {one_line(screen.errors[-1])}", file=sys.stderr)
                return 1
            return 0
        if not sys.stdin.isatty() or not sys.stdout.isatty():
            print("hostagent top: needs a terminal; use --once or --json", file=sys.stderr)
            return 2
        trio.run(live, reader, state, interval_s, Console())
        if state.interrupted:
            raise KeyboardInterrupt  # main's exit 130, as for Ctrl-C anywhere else
        return 0
    finally:
        reader.close()
