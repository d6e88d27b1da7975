"""A blocking call that records how many of its calls ran at once (worker-thread tests)."""

from __future__ import annotations

import threading
import time


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
