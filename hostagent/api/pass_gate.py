"""Collection first: a writer-priority gate between collector passes and API requests.

The API shares the daemon's trio loop (and the GIL) with the collector. Under heavy API load a
pass would otherwise get a fraction of the CPU and run several times longer. The gate works
like a reader-writer lock that prefers the writer:

- the daemon closes it for each pass (`busy()`) as soon as the pass has read the host (the
  read itself runs in a worker thread at the pass's tick, hostagent/tick.py, without the
  event loop), then lets the requests already being served finish (`drain()`, bounded)
  before the pass accounts and commits;
- every API request (but liveness) passes `request()`: while a pass runs it waits, so each
  client's next request is parked and the pass has the loop and the cores to itself.

Both waits are bounded: a pass stuck on a slow libvirtd delays API answers by at most the
request bound, and a slow request delays the start of a pass by at most the drain bound.

    async def on_read():                     # Collector.run_pass_at calls it
        stack.enter_context(gate.busy())
        await gate.drain(1.0)

    async with gate.request(cfg.api.yield_to_pass_max_s):   # in the API
        ...
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import trio


class PassGate:
    """Open between passes, closed while one runs; counts what it held back."""

    def __init__(self) -> None:
        self._idle = trio.Event()
        self._idle.set()
        self._in_flight = 0
        self._drained = trio.Event()
        self._drained.set()
        self.deferred_requests = 0
        self.deferred_s = 0.0
        self.timed_out_waits = 0
        self.drain_s = 0.0  # total time passes waited for requests in flight

    @property
    def pass_running(self) -> bool:
        """True while a pass holds the gate."""
        return not self._idle.is_set()

    @property
    def in_flight(self) -> int:
        """Requests past the gate and not finished."""
        return self._in_flight

    @contextmanager
    def busy(self) -> Iterator[None]:
        """Hold the gate closed for the duration of the block (one pass)."""
        if self.pass_running:  # passes never overlap; a nested use keeps the outer one's event
            yield
            return
        self._idle = trio.Event()
        try:
            yield
        finally:
            self._idle.set()

    async def drain(self, max_s: float) -> float:
        """Inside `busy()`: wait for the requests in flight to finish, at most `max_s`."""
        if self._drained.is_set():
            return 0.0
        t0 = trio.current_time()
        with trio.move_on_after(max_s):
            await self._drained.wait()
        waited_s = trio.current_time() - t0
        self.drain_s += waited_s
        return waited_s

    async def wait_idle(self, max_wait_s: float) -> float:
        """Wait until no pass runs, at most `max_wait_s`; the seconds waited."""
        if self._idle.is_set() or max_wait_s <= 0:
            return 0.0
        t0 = trio.current_time()
        with trio.move_on_after(max_wait_s) as scope:
            await self._idle.wait()
        waited_s = trio.current_time() - t0
        self.deferred_requests += 1
        self.deferred_s += waited_s
        if scope.cancelled_caught:
            self.timed_out_waits += 1
        return waited_s

    @asynccontextmanager
    async def request(self, max_wait_s: float) -> AsyncIterator[None]:
        """One API request: wait out a running pass (bounded), then count as in flight."""
        await self.wait_idle(max_wait_s)
        self._enter()
        try:
            yield
        finally:
            self._leave()

    @asynccontextmanager
    async def away(self, max_wait_s: float) -> AsyncIterator[None]:
        """Inside `request()`: a wait on the client (its request body), not in flight
        meanwhile, so a pass's `drain()` does not wait for a client slow to send; afterwards
        the request waits out a running pass again (at most `max_wait_s`) and is back in
        flight, whatever ended the block."""
        self._leave()
        try:
            yield
        finally:
            try:
                await self.wait_idle(max_wait_s)
            finally:
                self._enter()

    def _enter(self) -> None:
        if self._in_flight == 0:
            self._drained = trio.Event()
        self._in_flight += 1

    def _leave(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._drained.set()
