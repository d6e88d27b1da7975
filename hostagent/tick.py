"""The daemon's wait for the next pass, done in the worker thread that then reads the host.

Between two passes the daemon used to sleep in trio (`move_on_after` around `stop.wait()`) and
then hand the bulk stats call to a worker: two wake-ups of the event loop before the pass had
its counters, and trio's timer wake-up is its dearest one (a cancellation raised and caught).
Now the pass hands the bulk call's worker a `TickWait` first: the worker sleeps until the tick
(`threading.Event.wait`, ~50 µs a wake-up on the 2-core lab VM against trio's ~200 µs), reads,
and the event loop wakes once, when the counters are there. `bench/handoff_cost.py` shows the
skeleton both ways side by side.

The wait holds the collector's `reading` lock, as the pass always did, so it must give way to
whoever else needs the collector before the tick: `Collector.interrupt_wait()` sets the event
the wait sleeps on, and the wait raises `WaitInterrupted` instead of reading. The lifecycle
reads and light samples (hostagent/tailing.py) take the lock through `Collector.exclusive()`,
which interrupts before it queues on the lock; the daemon interrupts when it stops. The pass
then lets them go first and waits again for what is left of the interval
(`Collector.run_pass_at`).
"""

from __future__ import annotations

import threading
import time

__all__ = ["TickWait", "WaitInterrupted"]


class WaitInterrupted(Exception):
    """The wait for the tick was cut short: a reader wants the collector, or the daemon stops.
    Raised in the worker before anything is read."""


class TickWait:
    """One attempt's wait until `due_s` (time.monotonic()), cut short by `event`."""

    __slots__ = ("cpu_at_wake_s", "due_s", "event", "waited_s")

    def __init__(self, due_s: float, event: threading.Event) -> None:
        self.due_s = due_s
        self.event = event
        self.waited_s = 0.0  # how long the call slept (the pass's duration leaves it out)
        self.cpu_at_wake_s: float | None = None  # process CPU at the tick

    def remaining_s(self) -> float:
        """Seconds until the tick (0 when it is past)."""
        return max(0.0, self.due_s - time.monotonic())

    def __call__(self) -> None:
        """Block until the tick (in a worker thread); WaitInterrupted when interrupted first,
        or when someone asked for the collector by the time it came."""
        t0 = time.monotonic()
        remaining_s = self.due_s - t0
        if remaining_s > 0:
            self.event.wait(remaining_s)
        if self.event.is_set():
            raise WaitInterrupted
        self.waited_s = max(0.0, time.monotonic() - t0)
        self.cpu_at_wake_s = time.process_time()
