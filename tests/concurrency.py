"""Concurrency probes for tests: a blocking call that records how many of its calls ran at once
(worker-thread tests), and a count of the turns of trio's run loop (wake-up tests)."""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable

import trio


class PeakCounter:
    """`work()` holds for `hold_s`; `peak`: the most calls of it that ran at once."""

    def __init__(self, hold_s: float) -> None:
        self.hold_s = hold_s
        self.running = self.peak = 0
        self._lock = threading.Lock()

    def work(self) -> None:
        with self._lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        time.sleep(self.hold_s)
        with self._lock:
            self.running -= 1


class LoopTurns(trio.abc.Instrument):
    """How often trio's run loop waited for I/O (one turn each)."""

    def __init__(self) -> None:
        self.turns = 0

    def before_io_wait(self, timeout: float) -> None:
        self.turns += 1


async def turns_of(call: Callable[[], Awaitable[object]]) -> int:
    """The turns of trio's run loop while `call()` runs (those of every task)."""
    turns = LoopTurns()
    trio.lowlevel.add_instrument(turns)
    try:
        await call()
    finally:
        trio.lowlevel.remove_instrument(turns)
    return turns.turns
