"""libvirt lifecycle events into trio: a subscription that survives reconnects.

::

    libvirt event loop thread                       trio
    (virEventRunDefaultImpl, forever)               LifecycleWatcher.run()
      lifecycle callback ── from_thread.run_sync ──►  send_nowait(LifecycleEvent) ──► channel
      close callback ────── from_thread.run_sync ──►  closed.set() ──► reconnect (backoff)

libvirt allows one event-loop implementation per process, registered before the connection
that wants events is opened, so `ensure_event_loop()` registers the default one once and runs
it in a daemon thread (it cannot be stopped; it idles in poll()). Each (re)subscription
registers the lifecycle callback and a close callback on a connection, and turns libvirt
keepalive on so a dead peer is noticed within `keepalive_interval_s * (keepalive_count + 1)`;
every one sends a `Reconnected` value, since events may have been missed meanwhile (the daemon
then polls everything: events are hints, never the source of truth).

The connection is the pass's own when a `LibvirtSource` is given (the daemon): libvirtd then
serves one client connection and pings one, not two. A lost connection is dropped from the
source, and a connection the source drops (an RPC error in a pass) ends the subscription, which
resubscribes on the next one. Without a source (tests, tools) the watcher opens a read-only
connection of its own (enough for events, LAB-NOTES) and closes it when it is lost.

With `on_xml_change`, the same subscription registers the XML change events: a metadata edit
or a device added or removed calls it with the domain's UUID (in libvirt's thread, no trio
hop), and `on_xml_heard(True/False)` says when they start and stop being heard, so the
inventory re-reads a domain's XML when it changed instead of every 10 minutes. A device added
is also sent down the channel as `DeviceAdded` (the billing tail reads the domain's new taps).

The channel is never waited on from libvirt's thread: an event that finds it full is dropped
and counted (`dropped`), which costs what polling costs. Errors: connecting raises nothing out
of `run()`; failures are logged, counted and retried with `libvirt.backoff_s`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import libvirt
import trio

from hostagent import handoff
from hostagent.accounting.lifecycle import (
    DeviceAdded,
    LifecycleEvent,
    LifecycleKind,
    Reconnected,
)
from hostagent.clock import Clock
from hostagent.errors import SourceError
from hostagent.sources.libvirt import LibvirtSource, backoff_s
from hostagent.sources.libvirt_conn import (
    Calls,
    alive,
    alive_in,
    close_quietly,
    ensure_event_loop,
    take_back,
)
from hostagent.xml_changes import XmlChangeHook

log = logging.getLogger(__name__)

__all__ = ["LifecycleWatcher", "Message", "ensure_event_loop", "to_event"]

Message = LifecycleEvent | Reconnected | DeviceAdded


Connector = Callable[[str], Any]
# What changes a domain's XML without changing its bulk stats' shape (accounting/inventory.py):
# a metadata edit (the owner), a device added or removed (a NIC replaced between two passes).
XML_CHANGE_EVENTS = (libvirt.VIR_DOMAIN_EVENT_ID_METADATA_CHANGE,
                     libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_ADDED,
                     libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED)


# The opaque value of the DEVICE_ADDED registration (its callback is DEVICE_REMOVED's too).
_ADDED = "added"


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


@dataclass(slots=True)
class _Subscription:
    """A subscribed connection: its own (`calls` None) or the pass's."""

    conn: Any
    callback_id: int
    close_watched: bool  # the close callback and keepalive are on: no polling needed
    calls: Calls | None = None
    forget: Callable[[], None] | None = None  # the pass's connection no longer holds it
    change_ids: tuple[int, ...] = ()  # the XML change callbacks (`on_xml_change`)


class LifecycleWatcher:
    """Lifecycle events of one libvirt URI, delivered to a trio memory channel."""

    def __init__(self, uri: str, *, clock: Clock, connector: Connector = _open_readonly,
                 source: LibvirtSource | None = None,
                 keepalive_interval_s: int = 10, keepalive_count: int = 3,
                 reconnect_max_s: float = 30.0, connect_timeout_s: float = 30.0,
                 on_xml_change: XmlChangeHook | None = None,
                 on_xml_heard: Callable[[bool], None] | None = None) -> None:
        self.uri = uri
        # A domain's XML changed (libvirt's thread: thread-safe, never blocking), and whether
        # those changes are heard (trio): XmlChanges.tell / hear (hostagent/xml_changes.py).
        self._on_xml_change = on_xml_change
        self._on_xml_heard = on_xml_heard
        self._clock = clock
        self._connector = connector
        self._source = source
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
            if self._source is None:
                sub = await self._connect_once(token, send, closed)
            else:
                sub = await self._subscribe_shared(self._source, token, send, closed)
            if sub is None:
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
            if self._on_xml_heard is not None and sub.change_ids:
                self._on_xml_heard(True)
            self._deliver(send, Reconnected(self.uri, self._clock.now().wall_ns,
                                            self.connects - 1))
            if not started:
                task_status.started()
                started = True
            try:
                await self._until_lost(sub, closed)
            finally:
                if self._on_xml_heard is not None and sub.change_ids:
                    self._on_xml_heard(False)
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await self._release(sub, lost=closed.is_set())
            self.state = "down"
            log.warning("lifecycle events: connection lost, resubscribing",
                        extra={"uri": self.uri})

    async def _connect_once(self, token: trio.lowlevel.TrioToken,
                            send: trio.MemorySendChannel[Message],
                            closed: trio.Event) -> _Subscription | None:
        """A subscribed connection of our own, or None (`last_error` says why)."""
        sub, _ = await self._attempt(self._subscribe, token, send, closed)
        return sub

    async def _subscribe_shared(self, source: LibvirtSource, token: trio.lowlevel.TrioToken,
                                send: trio.MemorySendChannel[Message],
                                closed: trio.Event) -> _Subscription | None:
        """A subscription on the pass's connection, or None (`last_error` says why). A
        registration that hangs, or fails on a connection no longer alive, drops the
        connection: libvirt answers it at once on a live one."""
        try:
            calls = await source.events_connection()
        except SourceError as unavailable:
            self.last_error = str(unavailable)
            return None
        sub, failed = await self._attempt(calls.run, self._register, calls.conn, token, send,
                                          closed)
        if sub is None:
            if failed is None:
                source.drop_if_current(calls, "event registration hung")
            # A live connection that refuses events keeps serving the passes; the
            # subscription is tried again after the backoff. (SourceUnavailable: dropped.)
            elif isinstance(failed, libvirt.libvirtError) and not await handoff.run_sync(
                    alive_in, calls, calls.conn, abandon_on_cancel=True):
                source.drop_if_current(calls, f"event registration failed: {failed}")
            return None
        sub.calls = calls
        # The pass drops it: resubscribe on the next one; the callbacks go before it closes.
        sub.forget = calls.hold(closed.set, functools.partial(_deregister, sub))
        return sub

    async def _attempt(self, fn: Callable[..., _Subscription | None], *args: Any
                       ) -> tuple[_Subscription | None, Exception | None]:
        """`fn(*args, gave_up)` in a worker within the connect timeout: (subscription, None),
        (None, the error), or (None, None) when it did not answer in time. `gave_up` is set
        then (and on cancel), so an answer that comes late takes itself back."""
        gave_up = threading.Event()
        sub: _Subscription | None = None
        try:
            with trio.move_on_after(self._connect_timeout_s):
                try:
                    call: Any = fn  # the arguments and `gave_up` after them
                    sub = await handoff.run_sync(call, *args, gave_up, abandon_on_cancel=True)
                except Exception as err:  # libvirtError, or anything a connector raises
                    self.last_error = f"{type(err).__name__}: {err}"
                    return None, err
            if sub is None:
                self.last_error = f"no answer within {self._connect_timeout_s} s"
            return sub, None
        finally:
            if sub is None:  # timed out, failed or cancelled
                gave_up.set()

    async def _until_lost(self, sub: _Subscription, closed: trio.Event) -> None:
        """Return when the close callback fired (or the pass dropped the shared connection)
        or the connection is no longer alive.

        With a close callback registered, libvirt calls it on EOF and on a keepalive timeout
        alike: waiting for it costs no wake-up at all. Only a connection that refused the
        callback (an in-process driver) is polled with `isAlive` every keepalive interval.
        """
        if sub.close_watched:
            await closed.wait()
            return
        check_s = float(self._keepalive[0])
        while not closed.is_set():
            with trio.move_on_after(check_s):
                await closed.wait()
            if closed.is_set():
                return
            up = (alive if sub.calls is None else functools.partial(alive_in, sub.calls))
            if not await handoff.run_sync(up, sub.conn):
                closed.set()
                return

    async def _release(self, sub: _Subscription, *, lost: bool) -> None:
        """Close our own connection; on the pass's, drop it when lost, else (cancelled) take
        the callbacks back and leave it to the pass."""
        if sub.calls is None:
            await handoff.run_sync(_deregister_and_close, sub, abandon_on_cancel=True)
        elif lost:
            assert self._source is not None  # a subscription on the pass's connection
            # its close takes the callbacks back first
            self._source.drop_if_current(sub.calls, "lifecycle: the connection was lost")
        elif not sub.calls.closing:
            with contextlib.suppress(Exception):
                await handoff.run_sync(sub.calls.run, _deregister, sub, abandon_on_cancel=True)
                if sub.forget is not None:
                    sub.forget()

    # --- libvirt's side (worker thread, then the event-loop thread) ---------------------------

    def _subscribe(self, token: trio.lowlevel.TrioToken, send: trio.MemorySendChannel[Message],
                   closed: trio.Event, gave_up: threading.Event) -> _Subscription | None:
        conn = self._connector(self.uri)
        if gave_up.is_set():  # trio stopped waiting (timeout, cancel): nobody would close it
            close_quietly(conn)
            return None
        try:
            sub = self._register(conn, token, send, closed, gave_up)
        except BaseException:
            close_quietly(conn)
            raise
        if sub is None:  # given up on while registering: taken back, closed here
            close_quietly(conn)
        return sub

    def _register(self, conn: Any, token: trio.lowlevel.TrioToken,
                  send: trio.MemorySendChannel[Message], closed: trio.Event,
                  gave_up: threading.Event) -> _Subscription | None:
        callback_id = conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._callback(token, send), None)
        close_watched = False
        with contextlib.suppress(libvirt.libvirtError):  # in-process drivers have neither
            conn.registerCloseCallback(
                lambda _c, _reason, _o: _from_thread(token, closed.set), None)
            conn.setKeepAlive(*self._keepalive)
            close_watched = True
        sub = _Subscription(conn, callback_id, close_watched)
        if self._on_xml_change is not None:
            sub.change_ids = self._register_changes(conn, self._on_xml_change, token, send)
        if gave_up.is_set():  # nobody waits for it: take it back
            _deregister(sub)
            return None
        return sub

    def _register_changes(self, conn: Any, on_change: XmlChangeHook,
                          token: trio.lowlevel.TrioToken, send: trio.MemorySendChannel[Message]
                          ) -> tuple[int, ...]:
        """The XML change callbacks (metadata, device added or removed); () when libvirt
        refuses one: then none, and the inventory keeps its 10-minute re-reads. A device
        added is also delivered to the channel (`DeviceAdded`: the tails follow a new tap)."""
        def changed(_conn: Any, dom: Any, *_details: Any) -> None:
            try:
                on_change(dom.UUIDString())
            except Exception as err:  # never into libvirt's loop
                self.callback_errors += 1
                log.warning("XML change callback failed", extra={"error": str(err)})

        def device(_conn: Any, dom: Any, alias: Any, opaque: Any) -> None:
            # Which device and when: a GPU's time is billed from its change
            # (accounting/gpu_change.py).
            try:
                uuid, name = dom.UUIDString(), alias if isinstance(alias, str) else None
                wall_ns = self._clock.now().wall_ns
                on_change(uuid, name, wall_ns)
                if opaque == _ADDED and not _from_thread(
                        token, self._deliver, send, DeviceAdded(uuid.lower(), name, wall_ns)):
                    self.dropped += 1
            except Exception as err:  # never into libvirt's loop
                self.callback_errors += 1
                log.warning("XML change callback failed", extra={"error": str(err)})

        ids: list[int] = []
        try:
            for event_id in XML_CHANGE_EVENTS:
                ids.append(conn.domainEventRegisterAny(
                    None, event_id,
                    changed if event_id == libvirt.VIR_DOMAIN_EVENT_ID_METADATA_CHANGE
                    else device,
                    _ADDED if event_id == libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_ADDED else None))
        except libvirt.libvirtError as err:
            take_back(conn, ids)
            log.info("no XML change events: domain XML re-read every 10 minutes",
                     extra={"error": str(err)})
            return ()
        return tuple(ids)

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


def _deregister(sub: _Subscription) -> None:
    """Take the callbacks back (in a worker, or in the thread that closes the connection)."""
    take_back(sub.conn, (sub.callback_id, *sub.change_ids))
    if sub.close_watched:
        with contextlib.suppress(libvirt.libvirtError):
            sub.conn.unregisterCloseCallback()



def _deregister_and_close(sub: _Subscription) -> None:
    """Close our own connection: libvirt keeps one that has callbacks open (and their
    events coming), so they go first."""
    _deregister(sub)
    close_quietly(sub.conn)
