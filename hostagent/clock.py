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


class FakeClock:
    """A clock tests move by hand."""

    def __init__(self, wall_ns: int = 1_700_000_000 * 10**9, monotonic_ns: int = 10**12) -> None:
        self.wall_ns = wall_ns
        self.monotonic_ns = monotonic_ns

    def now(self) -> Reading:
        """Return the current fake reading."""
        return Reading(wall_ns=self.wall_ns, monotonic_ns=self.monotonic_ns)

    def advance(self, seconds: float) -> None:
        """Move both clocks forward."""
        step = round(seconds * 1e9)
        self.wall_ns += step
        self.monotonic_ns += step
