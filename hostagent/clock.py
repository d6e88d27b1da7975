"""The one injected clock: wall time for periods, monotonic time for intervals and timeouts."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Reading:
    """A reading of both clocks taken at the same instant."""

    wall_ns: int
    monotonic_ns: int

    @property
    def wall_s(self) -> float:
        """Wall time in seconds since the epoch."""
        return self.wall_ns / 1e9


class Clock(Protocol):
    """Anything that can tell the time twice over."""

    def now(self) -> Reading:
        """Read wall and monotonic time."""
        ...


class SystemClock:
    """The real clock."""

    def now(self) -> Reading:
        """Read wall and monotonic time from the OS."""
        return Reading(wall_ns=time.time_ns(), monotonic_ns=time.monotonic_ns())
