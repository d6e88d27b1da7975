"""libvirt connections as the stats source and the lifecycle watcher share them: libvirt's
process-wide event loop, and `Calls`, one connection with the worker calls inside it.

A connection is never closed under a call still inside it (`Calls`): libvirt frees a
connection on its last close, and an abandoned call that returns afterwards would run on freed
memory (seen as a SIGSEGV at shutdown right after a SIGSTOPped QEMU answered). Whoever leaves
it last closes it: `close()` at once when no call is inside, else the last call on its way out.
What is registered on the connection (the lifecycle watcher's event callbacks) is held with
`Calls.hold`: told when the connection closes, and taken back right before it does.

Events and keepalive need libvirt's event loop registered before a connection opens
(`ensure_event_loop`, once per process); the connections are opened and replaced by
hostagent.sources.libvirt (`LibvirtSource`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from hostagent.errors import SourceError, SourceUnavailable

log = logging.getLogger(__name__)

try:  # a missing libvirt-python is reported when a connection is opened (sources/libvirt.py)
    import libvirt
except ImportError:  # pragma: no cover
    libvirt = None

T = TypeVar("T")


# libvirt's event-loop implementation is process-wide by libvirt's design (one per process).
_loop_lock = threading.Lock()
_loop_threads: list[threading.Thread] = []


def ensure_event_loop() -> None:
    """Register libvirt's default event loop and run it in a daemon thread (once per process;
    it cannot be stopped and idles in poll())."""
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


def event_loop_running() -> bool:
    """libvirt's event loop is registered: connections opened from now on carry events and
    keepalive."""
    return bool(_loop_threads)


class Calls:
    """One libvirt connection and the worker calls inside it; closed by whoever leaves last."""

    __slots__ = ("_closing", "_holds", "_inside", "_lock", "conn", "events_ready")

    def __init__(self, conn: Any, *, events_ready: bool = False) -> None:
        self.conn = conn
        self.events_ready = events_ready  # opened after libvirt's event loop was registered
        self._lock = threading.Lock()
        self._inside = 0
        self._closing = False
        self._holds: dict[int, tuple[Callable[[], object], Callable[[], object]]] = {}

    @property
    def closing(self) -> bool:
        """`close()` was called: no new call gets in."""
        return self._closing

    def hold(self, on_close: Callable[[], object],
             release: Callable[[], object]) -> Callable[[], None]:
        """Something registered on the connection (event callbacks). `on_close()` is called
        when `close()` is (in its thread: the trio thread), `release()` right before the
        connection closes (libvirt keeps a connection that has callbacks open, and its events
        coming). Returns what forgets both, for a caller that released it itself. On a closing
        connection `on_close()` runs at once and nothing is held."""
        if self._closing:
            on_close()
            return lambda: None
        key = id(release)
        with self._lock:
            self._holds[key] = (on_close, release)

        def forget() -> None:
            with self._lock:
                self._holds.pop(key, None)
        return forget

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the connection (in a worker thread); a closed one raises."""
        self._enter()
        try:
            return fn(*args)
        finally:
            with self._lock:
                self._inside -= 1
                last = self._closing and self._inside == 0
            if last:
                self._shut()

    def _enter(self) -> None:
        with self._lock:
            if self._closing:
                raise SourceUnavailable("the libvirt connection was closed")
            self._inside += 1

    def close(self) -> bool:
        """Close now (True), or leave it to the last call still inside (False). With
        callbacks held the close runs in a thread of its own: taking them back is an RPC."""
        with self._lock:
            if self._closing:
                return False
            self._closing = True
            now = self._inside == 0
            holds = list(self._holds.values())
        for on_close, _ in holds:
            on_close()
        if now:
            if holds:
                threading.Thread(target=self._shut, name="libvirt-close", daemon=True).start()
            else:
                self._shut()
        return now

    def _shut(self) -> None:
        with self._lock:
            holds, self._holds = list(self._holds.values()), {}
        for _, release in holds:
            try:
                release()
            except Exception as err:  # a dead peer: the close below frees it anyway
                log.debug("libvirt release failed", extra={"error": str(err)})
        close_quietly(self.conn)


def close_quietly(conn: Any) -> None:
    """Close a libvirt connection; a failure (a dead peer) is only logged at debug."""
    try:
        conn.close()
    except Exception as err:  # closing a dead connection is not worth a crash
        log.debug("libvirt close failed", extra={"error": str(err)})


def take_back(conn: Any, callback_ids: Iterable[int]) -> None:
    """Deregister domain event callbacks; one libvirt no longer knows is skipped."""
    for cid in callback_ids:
        with contextlib.suppress(libvirt.libvirtError):
            conn.domainEventDeregisterAny(cid)

def alive_in(calls: Calls, conn: Any) -> bool:
    """`alive` through the pass's connection guard (a closed one is not alive)."""
    try:
        return calls.run(alive, conn)
    except SourceError:
        return False

def alive(conn: Any) -> bool:
    """libvirt's keepalive says the connection is up (anything else: it is not)."""
    try:
        return bool(conn.isAlive())
    except Exception:  # a connection that cannot answer is not alive
        return False
