"""libvirt lifecycle events into trio: a subscription that survives reconnects.

::

    libvirt event loop thread                       trio
    (virEventRunDefaultImpl, forever)               LifecycleWatcher.run()
      lifecycle callback ── from_thread.run_sync ──►  send_nowait(LifecycleEvent) ──► channel
      close callback ────── from_thread.run_sync ──►  closed.set() ──► reconnect (backoff)

libvirt allows one event-loop implementation per process, registered before the connection
that wants events is opened, so `ensure_event_loop()` registers the default one once and runs
it in a daemon thread (it cannot be stopped; it idles in poll()). Each (re)connection opens a
read-only connection (enough for events, LAB-NOTES), registers the lifecycle callback and a
close callback, and turns libvirt keepalive on so a dead peer is noticed within
`keepalive_interval_s * (keepalive_count + 1)`; every reconnect sends a `Reconnected` value,
since events may have been missed meanwhile (the daemon then polls everything: events are
hints, never the source of truth).

The channel is never waited on from libvirt's thread: an event that finds it full is dropped
and counted (`dropped`), which costs what polling costs. Errors: connecting raises nothing out
of `run()`; failures are logged, counted and retried with `libvirt.backoff_s`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

import libvirt
import trio

from hostagent import handoff
from hostagent.accounting.lifecycle import LifecycleEvent, LifecycleKind, Reconnected
from hostagent.clock import Clock
from hostagent.sources.libvirt import backoff_s, close_quietly

log = logging.getLogger(__name__)

Message = LifecycleEvent | Reconnected
# Set on a connection whose close callback and keepalive are on (`_until_lost` needs no polling).
_CLOSE_WATCHED = "_hostagent_close_watched"
Connector = Callable[[str], Any]

# libvirt's event-loop implementation is process-wide by libvirt's design (one per process).
_loop_lock = threading.Lock()
_loop_threads: list[threading.Thread] = []


def ensure_event_loop() -> None:
    """Register libvirt's default event loop and run it in a daemon thread (once per process)."""
    with _loop_lock:
        if _loop_threads:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        thread = threading.Thread(target=run, name="libvirt-events", daemon=True)
        thread.start()
        _loop_threads.append(thread)


def _detail_names() -> dict[tuple[LifecycleKind, int], str]:
    """libvirt's detail constants by (kind, number): `VIR_DOMAIN_EVENT_STOPPED_DESTROYED`..."""
    out: dict[tuple[LifecycleKind, int], str] = {}
    for kind in LifecycleKind:
        prefix = f"VIR_DOMAIN_EVENT_{kind.name}_"
        for const in dir(libvirt):
            if const.startswith(prefix) and not const.endswith("_LAST"):
                out[(kind, int(getattr(libvirt, const)))] = const[len(prefix):]
    return out


_DETAILS = _detail_names()


def to_event(uuid: str, name: str, domid: int, event: int, detail: int, *,
             wall_ns: int, monotonic_ns: int) -> LifecycleEvent | None:
    """A typed event from libvirt's numbers; None for an event type this libvirt adds later."""
    try:
        kind = LifecycleKind(event)
    except ValueError:
        return None
    return LifecycleEvent(uuid=uuid.lower(), name=name, domid=domid, kind=kind,
                          detail=_DETAILS.get((kind, detail), str(detail)),
                          t_wall_ns=wall_ns, t_monotonic_ns=monotonic_ns)


def _open_readonly(uri: str) -> Any:
    return libvirt.openReadOnly(uri)


class LifecycleWatcher:
    """Lifecycle events of one libvirt URI, delivered to a trio memory channel."""

    def __init__(self, uri: str, *, clock: Clock, connector: Connector = _open_readonly,
                 keepalive_interval_s: int = 10, keepalive_count: int = 3,
                 reconnect_max_s: float = 30.0, connect_timeout_s: float = 30.0) -> None:
        self.uri = uri
        self._clock = clock
        self._connector = connector
        self._keepalive = (keepalive_interval_s, keepalive_count)
        self._reconnect_max_s = reconnect_max_s
        self._connect_timeout_s = connect_timeout_s
        self.connects = 0  # successful subscriptions, the first one included
        self.dropped = 0  # events that found the channel full or closed
        self.callback_errors = 0
        self.state = "never connected"
        self.last_error: str | None = None

    async def run(self, send: trio.MemorySendChannel[Message], *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Subscribe, deliver, re-subscribe after every lost connection, until cancelled.

        Reports started once the first attempt finished (subscribed or failed: the daemon's
        polling does not wait for events).
        """
        ensure_event_loop()
        token = trio.lowlevel.current_trio_token()
        failures = 0
        started = False
        while True:
            closed = trio.Event()
            conn = await self._connect_once(token, send, closed)
            if conn is None:
                failures += 1
                self.state = "down"
                log.warning("lifecycle events: cannot subscribe",
                            extra={"uri": self.uri, "error": self.last_error})
                if not started:
                    task_status.started()
                    started = True
                await trio.sleep(backoff_s(failures, self._reconnect_max_s))
                continue
            failures = 0
            self.connects += 1
            self.state = "subscribed"
            self._deliver(send, Reconnected(self.uri, self._clock.now().wall_ns,
                                            self.connects - 1))
            if not started:
                task_status.started()
                started = True
            try:
                await self._until_lost(conn, closed)
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await handoff.run_sync(close_quietly, conn, abandon_on_cancel=True)
            self.state = "down"
            log.warning("lifecycle events: connection lost, resubscribing",
                        extra={"uri": self.uri})

    async def _connect_once(self, token: trio.lowlevel.TrioToken,
                            send: trio.MemorySendChannel[Message], closed: trio.Event) -> Any:
        """A subscribed connection, or None (`last_error` says why)."""
        gave_up = threading.Event()  # an abandoned attempt closes what it opens late
        conn: Any = None
        try:
            with trio.move_on_after(self._connect_timeout_s):
                try:
                    conn = await handoff.run_sync(
                        self._subscribe, token, send, closed, gave_up, abandon_on_cancel=True)
                except Exception as err:  # libvirtError, or anything a connector raises
                    self.last_error = f"{type(err).__name__}: {err}"
                    return None
            if conn is None:
                self.last_error = f"no answer within {self._connect_timeout_s} s"
            return conn
        finally:
            if conn is None:  # timed out, failed or cancelled
                gave_up.set()

    async def _until_lost(self, conn: Any, closed: trio.Event) -> None:
        """Return when the close callback fired or the connection is no longer alive.

        With a close callback registered, libvirt calls it on EOF and on a keepalive timeout
        alike: waiting for it costs no wake-up at all. Only a connection that refused the
        callback (an in-process driver) is polled with `isAlive` every keepalive interval.
        """
        if getattr(conn, _CLOSE_WATCHED, False):
            await closed.wait()
            return
        check_s = float(self._keepalive[0])
        while not closed.is_set():
            with trio.move_on_after(check_s):
                await closed.wait()
            if not closed.is_set() and not await handoff.run_sync(_alive, conn):
                return

    # --- libvirt's side (worker thread, then the event-loop thread) ---------------------------

    def _subscribe(self, token: trio.lowlevel.TrioToken, send: trio.MemorySendChannel[Message],
                   closed: trio.Event, gave_up: threading.Event) -> Any:
        conn = self._connector(self.uri)
        if gave_up.is_set():  # trio stopped waiting (timeout, cancel): nobody would close it
            close_quietly(conn)
            return None
        try:
            conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                                        self._callback(token, send), None)
            with contextlib.suppress(libvirt.libvirtError):  # in-process drivers have neither
                conn.registerCloseCallback(
                    lambda _c, _reason, _o: _from_thread(token, closed.set), None)
                conn.setKeepAlive(*self._keepalive)
                with contextlib.suppress(AttributeError):  # an object that takes no attributes
                    setattr(conn, _CLOSE_WATCHED, True)
        except BaseException:
            close_quietly(conn)
            raise
        return conn

    def _callback(self, token: trio.lowlevel.TrioToken,
                  send: trio.MemorySendChannel[Message]) -> Callable[..., None]:
        def on_event(_conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
            try:
                now = self._clock.now()
                ev = to_event(dom.UUIDString(), dom.name(), dom.ID(), event, detail,
                              wall_ns=now.wall_ns, monotonic_ns=now.monotonic_ns)
                if ev is not None and not _from_thread(token, self._deliver, send, ev):
                    self.dropped += 1
            except Exception as err:  # never let an exception escape into libvirt's loop
                self.callback_errors += 1
                log.warning("lifecycle callback failed", extra={"error": str(err)})
        return on_event

    def _deliver(self, send: trio.MemorySendChannel[Message], msg: Message) -> None:
        try:
            send.send_nowait(msg)
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            self.dropped += 1


def _from_thread(token: trio.lowlevel.TrioToken, fn: Callable[..., object], *args: Any) -> bool:
    """Run `fn` in trio from a foreign thread; False when trio is gone."""
    try:
        trio.from_thread.run_sync(fn, *args, trio_token=token)
    except trio.RunFinishedError:
        return False
    return True


def _alive(conn: Any) -> bool:
    try:
        return bool(conn.isAlive())
    except Exception:  # a connection that cannot answer is not alive
        return False
