"""libvirt: ONE bulk `getAllDomainStats` per pass, domain XML on demand (one worker call for
all of a pass), reconnect with backoff.

Every libvirt call runs in a worker thread under the shared capacity limiter and a deadline; a
call past its deadline is abandoned (`abandon_on_cancel`) and the pass goes on without it.

A hung bulk call (a QEMU whose monitor does not answer, e.g. SIGSTOPped) is abandoned at
`call_timeout_s`; the same pass then asks each domain separately with the NOWAIT flag, so the
healthy domains still get their stats and the stuck one reports what libvirt has without its job
lock. While the abandoned call is still blocked, later passes use the per-domain path too.
A domain whose job another client held during the bulk call is asked again (libvirt_busy.py).

A connection is never closed under a call still inside it: whoever leaves it last closes it
(`Calls`, hostagent.sources.libvirt_conn, which also runs libvirt's event loop).

The daemon's lifecycle watcher subscribes on this same connection (`events_connection`): libvirtd
pings every client connection that speaks keepalive every 5 s, and answering costs both sides a
wake-up, so one connection instead of two halves that. Events and keepalive need libvirt's event
loop registered before the connection opens (`libvirt_conn.ensure_event_loop`); a connection
opened earlier is replaced once. Whoever finds the connection dead drops it
(`drop_if_current`), and the others hear it through `Calls.hold`, which also takes the event
callbacks back before the connection closes.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import trio

from hostagent import handoff
from hostagent.clock import Clock
from hostagent.config.schema import LibvirtConfig
from hostagent.errors import SourceTimeout, SourceUnavailable
from hostagent.source_model import DomainStats
from hostagent.sources.libvirt_busy import ask_busy_again
from hostagent.sources.libvirt_conn import Calls, alive_in, event_loop_running
from hostagent.tick import TickWait

log = logging.getLogger(__name__)

try:  # libvirt-python is a hard runtime dependency, but keep import errors readable
    import libvirt
except ImportError as _err:  # pragma: no cover
    libvirt = None
    _IMPORT_ERROR: ImportError | None = _err
else:
    _IMPORT_ERROR = None
    # libvirt's C library prints every error to stderr by default; we raise and log them
    # ourselves, so keep the journal to our own JSON lines.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


def stats_mask(*, cpu: bool = True) -> int:
    """The stats groups a pass asks for; `cpu=False` leaves out CPU_TOTAL (`cpu.time`), which
    the domains' cgroups give instead (`LibvirtSource.ask_cpu`)."""
    return int(
        libvirt.VIR_DOMAIN_STATS_STATE
        | (libvirt.VIR_DOMAIN_STATS_CPU_TOTAL if cpu else 0)
        | libvirt.VIR_DOMAIN_STATS_BALLOON
        | libvirt.VIR_DOMAIN_STATS_VCPU
        | libvirt.VIR_DOMAIN_STATS_INTERFACE
        | libvirt.VIR_DOMAIN_STATS_BLOCK
    )


@dataclass(frozen=True, slots=True)
class BulkResult:
    """What one pass got from libvirt; `path` says how ("bulk", "per-domain")."""

    domains: tuple[DomainStats, ...]
    path: str
    timed_out: tuple[str, ...] = ()
    # Domains whose own stats call failed on the per-domain path: (uuid, name, error).
    failed: tuple[tuple[str, str, str], ...] = ()


Connector = Callable[[str, bool], Any]
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Then(Generic[T]):
    """`bulk_stats_then`'s answer: the stats, and what `then` returned (None: not run)."""

    bulk: BulkResult
    after: T | None = None
    then_ran_out: bool = False


def _default_connector(uri: str, readonly: bool) -> Any:
    if libvirt is None:  # pragma: no cover
        raise SourceUnavailable(f"libvirt-python is not importable: {_IMPORT_ERROR}")
    return libvirt.openReadOnly(uri) if readonly else libvirt.open(uri)


class LibvirtSource:
    """The libvirt connection and the calls a pass makes through it."""

    def __init__(
        self,
        cfg: LibvirtConfig,
        *,
        clock: Clock,
        limiter: trio.CapacityLimiter,
        connector: Connector = _default_connector,
    ) -> None:
        self._cfg = cfg
        self._clock = clock
        self._limiter = limiter
        self._connector = connector
        self._conn: Calls | None = None
        self._nowait = cfg.nowait
        self._failures = 0
        self._next_try_ns = 0
        self._bulk_in_flight = 0
        # Whether the stats calls ask for CPU_TOTAL. libvirt 9 answers that group with a QMP
        # `query-stats` round trip to every QEMU (halt-poll times) besides two cgroup reads:
        # ~130 µs of libvirtd's CPU a domain on the lab, and QEMU's main loop woken each pass.
        # A domain's CPU is its VM cgroup's counter wherever that is found (accounting/
        # assemble.py): the collector turns the group off after a pass in which every domain's
        # cgroup was found and every baseline is in that counter, on where one is not
        # (pass_reads.libvirt_cpu_wanted).
        self.ask_cpu = True
        self.state = "never connected"
        self.last_error: str | None = None
        self.down_since_ns: int | None = None

    # --- connection ---------------------------------------------------------------------------

    async def _connection(self) -> Calls:
        if self._conn is not None:
            return self._conn
        now = self._clock.now().monotonic_ns
        if now < self._next_try_ns:
            raise SourceUnavailable(f"libvirt {self._cfg.uri} down; next try in "
                                    f"{(self._next_try_ns - now) / 1e9:.1f}s: {self.last_error}")
        try:
            conn = await self._call(self._connector, self._cfg.uri, self._cfg.readonly)
        except SourceTimeout as err:  # err names the connector function: not for people
            why = (f"libvirt at {self._cfg.uri} did not answer within "
                   f"{self._cfg.call_timeout_s:g} s")
            self._mark_down(f"connect timed out: {why}")
            raise SourceUnavailable(why) from err
        except Exception as err:  # libvirt.libvirtError and anything the connector raises
            self._mark_down(f"connect failed: {err}")
            raise SourceUnavailable(f"cannot connect to {self._cfg.uri}: {err}") from err
        self._conn = calls = Calls(conn, events_ready=event_loop_running())
        if self.state != "connected":
            log.info("libvirt connected", extra={"uri": self._cfg.uri,
                                                 "after_failures": self._failures})
        self.state = "connected"
        self._failures = 0
        self.down_since_ns = None
        self.last_error = None
        return calls

    def _mark_down(self, reason: str) -> None:
        calls, self._conn = self._conn, None
        if calls is not None:
            calls.close()
        self._failures += 1
        now = self._clock.now()
        delay_s = backoff_s(self._failures, self._cfg.reconnect_max_s)
        self._next_try_ns = now.monotonic_ns + int(delay_s * 1e9)
        if self.state != "down":
            log.warning("libvirt down", extra={"uri": self._cfg.uri, "error": reason})
            self.down_since_ns = now.wall_ns
        self.state = "down"
        self.last_error = reason

    def drop_connection(self, reason: str) -> None:
        """Forget the connection (after an RPC error); the next pass reconnects with backoff."""
        self._mark_down(reason)

    def drop_if_current(self, calls: Calls, reason: str) -> None:
        """`calls` was found dead (its close callback, a hung event registration): forget it,
        unless it was replaced already."""
        if self._conn is calls:
            self._mark_down(reason)

    async def events_connection(self) -> Calls:
        """The connection, for an event subscription on it: opened now if there is none (with
        the reconnect backoff), replaced once if it was opened before libvirt's event loop was
        registered (it could carry neither events nor keepalive). SourceUnavailable when down."""
        calls = await self._connection()
        if not calls.events_ready and event_loop_running():
            self._conn = None
            calls.close()
            calls = await self._connection()
        return calls

    async def _call(
        self, fn: Callable[..., Any], *args: Any, timeout_s: float | None = None,
        on: Calls | None = None,
    ) -> Any:
        """`fn(*args)` in a worker under the deadline; `on`: a call inside that connection."""
        limit = self._cfg.call_timeout_s if timeout_s is None else timeout_s
        call, call_args = (fn, args) if on is None else (on.run, (fn, *args))
        with trio.move_on_after(limit) as scope:
            return await handoff.run_sync(
                call, *call_args, limiter=self._limiter, abandon_on_cancel=True)
        if scope.cancelled_caught:
            raise SourceTimeout(f"{getattr(fn, '__name__', fn)} exceeded {limit}s")
        raise AssertionError("unreachable")  # pragma: no cover

    # --- calls --------------------------------------------------------------------------------

    async def bulk_stats(self) -> BulkResult:
        """All active domains' stats: one bulk call, or per-domain NOWAIT calls if it hangs."""
        return (await self.bulk_stats_then(None)).bulk

    async def bulk_stats_then(self, then: Callable[[tuple[DomainStats, ...]], T] | None, *,
                              wait: TickWait | None = None) -> Then[T]:
        """`bulk_stats()`, and `then(domains)` run in the SAME worker call right after a bulk
        call answered (one thread hand-off instead of two; the pass's host file reads).

        `then` is not run on the per-domain path. Past the deadline, a bulk call that had
        answered still counts: only `then` is reported as having run out (`then_ran_out`).
        `wait`: the same worker call first sleeps until the pass's tick (hostagent/tick.py;
        the deadline starts there); WaitInterrupted when it was cut short. Without a
        connection (or behind a hung call) the wait is a call of its own, before connecting.
        """
        if wait is not None and (self._conn is None or self._bulk_in_flight):
            await handoff.run_sync(wait, abandon_on_cancel=True)
            wait = None
        calls = await self._connection()
        if self._bulk_in_flight:
            # An abandoned bulk call still blocks in a worker; don't queue another behind it.
            return Then(await self._per_domain(calls))
        flags = libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE
        if self._nowait:
            flags |= libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT
        mask = stats_mask(cpu=self.ask_cpu)
        answered: list[tuple[DomainStats, ...]] = []

        def work() -> T | None:
            if wait is not None:
                wait()
            domains = tuple(_convert(calls.run(self._tracked_bulk, calls.conn, mask, flags)))
            answered.append(domains)
            if self._nowait:
                answered[0] = domains = ask_busy_again(domains, lambda handles: _convert(
                    calls.run(calls.conn.domainListGetStats, handles, mask,
                              libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT)))
            return None if then is None else then(domains)

        try:
            after = await self._call(work, timeout_s=None if wait is None else
                                     self._cfg.call_timeout_s + wait.remaining_s())
        except SourceTimeout:
            if answered:
                return Then(BulkResult(domains=answered[0], path="bulk"), then_ran_out=True)
            log.warning("libvirt bulk stats call hung; falling back to per-domain calls",
                        extra={"timeout_s": self._cfg.call_timeout_s})
            return Then(await self._per_domain(calls))
        except libvirt.libvirtError as err:
            if self._nowait and err.get_error_code() in (libvirt.VIR_ERR_INVALID_ARG,
                                                         libvirt.VIR_ERR_NO_SUPPORT):
                self._nowait = False
                log.info("libvirt has no NOWAIT stats flag; asking without it")
                return await self.bulk_stats_then(then)
            self.drop_connection(f"getAllDomainStats failed: {err}")
            raise SourceUnavailable(str(err)) from err
        return Then(BulkResult(domains=answered[0], path="bulk"), after)

    async def stats_of(self, uuids: Collection[str]) -> BulkResult:
        """The stats of these running domains only, in ONE worker call: a UUID lookup each
        and one `domainListGetStats` of the handles found (path "targeted").

        For the reads between passes (a VM started, a device plugged): a bulk call there
        costs the whole host's stats, ~16 ms of our CPU and as much of libvirtd's at 1,000
        domains, for one domain's. A UUID that names no domain, or an inactive one, is simply
        not in the answer, as it would not be in a bulk call's. Raises SourceError: the call
        hung (SourceTimeout) or failed (SourceUnavailable; the connection is dropped only
        when it is dead)."""
        calls = await self._connection()
        mask = stats_mask(cpu=self.ask_cpu)
        nowait = self._nowait
        flags = libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT if nowait else 0

        def work() -> tuple[DomainStats, ...]:
            conn = calls.conn
            handles = []
            for uuid in sorted(uuids):
                try:
                    handles.append(calls.run(conn.lookupByUUIDString, uuid))
                except libvirt.libvirtError as err:
                    if err.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                        raise
            if not handles:
                return ()
            domains = tuple(_convert(calls.run(conn.domainListGetStats, handles, mask, flags)))
            if nowait:
                domains = ask_busy_again(domains, lambda again: _convert(
                    calls.run(conn.domainListGetStats, again, mask, flags)))
            return domains

        try:
            domains: tuple[DomainStats, ...] = await self._call(work)
        except libvirt.libvirtError as err:
            if nowait and err.get_error_code() in (libvirt.VIR_ERR_INVALID_ARG,
                                                   libvirt.VIR_ERR_NO_SUPPORT):
                self._nowait = False
                log.info("libvirt has no NOWAIT stats flag; asking without it")
                return await self.stats_of(uuids)
            if not await self._call(alive_in, calls, calls.conn):
                self.drop_if_current(calls, f"domainListGetStats failed: {err}")
            raise SourceUnavailable(f"stats of {len(uuids)} domain(s): {err}") from err
        return BulkResult(domains=domains, path="targeted")

    def _tracked_bulk(self, conn: Any, mask: int, flags: int) -> Any:
        self._bulk_in_flight += 1
        try:
            return conn.getAllDomainStats(mask, flags)
        finally:
            self._bulk_in_flight -= 1

    async def _per_domain(self, calls: Calls) -> BulkResult:
        try:
            doms = await self._call(calls.conn.listAllDomains,
                                    libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE, on=calls)
        except SourceTimeout as err:
            raise SourceUnavailable(f"listAllDomains hung: {err}") from err
        except libvirt.libvirtError as err:
            self.drop_connection(f"listAllDomains failed: {err}")
            raise SourceUnavailable(str(err)) from err
        flags = libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT if self._nowait else 0
        mask = stats_mask(cpu=self.ask_cpu)
        got: list[DomainStats] = []
        hung: list[str] = []
        failed: list[tuple[str, str, str]] = []

        async def one(dom: Any) -> None:
            try:
                raw = await self._call(calls.conn.domainListGetStats, [dom], mask, flags,
                                       on=calls)
            except SourceTimeout:
                hung.append(dom.name())
                failed.append((dom.UUIDString().lower(), dom.name(), "stats call hung"))
                return
            except (libvirt.libvirtError, SourceUnavailable) as err:  # counted, logged once
                failed.append((dom.UUIDString().lower(), dom.name(), str(err)))
                return
            got.extend(_convert(raw))

        async with trio.open_nursery() as nursery:
            for dom in doms:
                nursery.start_soon(one, dom)
        return BulkResult(domains=tuple(got), path="per-domain", timed_out=tuple(hung),
                          failed=tuple(failed))

    async def domain_xml(self, handles: Sequence[DomainStats]) -> dict[str, str | Exception]:
        """Live XML of the given domains, in ONE worker call (one thread hand-off per pass, not
        one per domain); failures returned, not raised.

        The XMLDesc calls run one after another in that call until `call_timeout_s`: the domains
        not fetched by then get a SourceTimeout (the call is abandoned; it fetches no more).
        """
        limit = self._cfg.call_timeout_s
        out: dict[str, str | Exception] = {}
        stop = threading.Event()

        def fetch_all() -> None:
            for d in handles:
                if stop.is_set():
                    return
                try:
                    out[d.uuid] = d.handle.XMLDesc(0)
                except Exception as err:  # a domain may vanish between the two calls
                    out[d.uuid] = err

        with trio.move_on_after(limit):
            await handoff.run_sync(fetch_all, limiter=self._limiter, abandon_on_cancel=True)
        stop.set()
        got = dict(out)  # the abandoned call may still add the one it was fetching
        for d in handles:
            if d.uuid not in got:
                got[d.uuid] = SourceTimeout(f"XMLDesc exceeded {limit}s")
        return got

    def close(self) -> None:
        """Close the connection if one is open: now, or when the last call inside it (an
        abandoned, hung one) returns; the process may exit first, which closes it too."""
        calls, self._conn = self._conn, None
        if calls is not None and not calls.close():
            log.info("libvirt connection left to the call still inside it")


SHUTOFF = 5  # VIR_DOMAIN_SHUTOFF


def _convert(raw: Sequence[tuple[Any, Mapping[str, Any]]]) -> list[DomainStats]:
    out = []
    new = DomainStats  # positional, not frozen: once per domain and pass (~0.5 µs less each)
    for dom, stats in raw:
        domid = dom.ID()
        if domid < 0 or stats.get("state.state") == SHUTOFF:
            # Destroyed between libvirt's listing and its stats query: the old process's
            # counters arrive with id -1. Billing them as a new process would count them twice.
            continue
        # DomainStats' field order: uuid, name, domid, stats, handle.
        out.append(new(dom.UUIDString().lower(), dom.name(), domid, stats, dom))
    return out


def backoff_s(failures: int, cap_s: float) -> float:
    """Reconnect backoff after `failures` consecutive failures (exported for tests)."""
    return float(min(cap_s, 0.5 * math.pow(2, min(failures - 1, 16))))
