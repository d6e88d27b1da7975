"""The clock doubles of the tests: a clock moved by hand, and one driven by trio's clock."""

from __future__ import annotations

import trio

from hostagent.clock import Reading

T0_NS = 1_700_000_000 * 10**9  # the tests' epoch


class FakeClock:
    """A clock tests move by hand."""

    def __init__(self, wall_ns: int = T0_NS, monotonic_ns: int = 10**12) -> None:
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


class TrioClock:
    """hostagent's Clock driven by trio's clock (MockClock in tests); usable from threads."""

    def __init__(self, wall0_ns: int = T0_NS + 10**12) -> None:
        self._trio_clock = trio.lowlevel.current_clock()
        self.wall0_ns = wall0_ns

    def now(self) -> Reading:
        """Wall = wall0 + trio time; monotonic = trio time."""
        t_ns = int(self._trio_clock.current_time() * 1e9)
        return Reading(wall_ns=self.wall0_ns + t_ns, monotonic_ns=t_ns)
