"""Circuit breaker per sink, after the seed's CircuitBreakerConfig (5 failures, 60 s, 2 trials).

closed ──(failure_threshold consecutive failures)──► open ──(reset_timeout_s)──► half_open
half_open ──(half_open_calls successes)──► closed;  half_open ──(any failure)──► open

While open nothing is sent. In half-open at most `half_open_calls` trial calls are let through.
A rejection (the sink answered and refused the event) is a working sink: it counts as a
success here; only transient failures (transport errors, timeouts, 5xx, garbage) count.
Time comes from the injected clock's monotonic reading, so tests can drive it.
"""

from __future__ import annotations

from typing import Literal

from hostagent.clock import Clock
from hostagent.config.sinks import BreakerConfig
from hostagent.errors import SinkUnavailable

State = Literal["closed", "open", "half_open"]


class CircuitOpen(SinkUnavailable):
    """The breaker refused the call: nothing was sent (transient; the event stays pending)."""


class Breaker:
    """One sink's breaker; `version` changes on every state change (for persisting it)."""

    def __init__(self, cfg: BreakerConfig, clock: Clock) -> None:
        self.cfg = cfg
        self._clock = clock
        self._state: State = "closed"
        self.since_mono_ns = clock.now().monotonic_ns
        self.since_wall_ns = clock.now().wall_ns
        self._failures = 0
        self._trials = 0
        self._trial_ok = 0
        self.version = 0
        self.opened_count = 0

    def _set(self, state: State) -> None:
        now = self._clock.now()
        self._state = state
        self.since_mono_ns, self.since_wall_ns = now.monotonic_ns, now.wall_ns
        self._failures = self._trials = self._trial_ok = 0
        self.version += 1
        if state == "open":
            self.opened_count += 1

    @property
    def state(self) -> State:
        """Current state; an open breaker whose reset timeout has passed reads as half-open."""
        if self._state == "open" and self.seconds_until_trial() <= 0:
            self._set("half_open")
        return self._state

    def seconds_until_trial(self) -> float:
        """How long until an open breaker lets a trial call through (0 when not open)."""
        if self._state != "open":
            return 0.0
        elapsed_s = (self._clock.now().monotonic_ns - self.since_mono_ns) / 1e9
        return max(self.cfg.reset_timeout_s - elapsed_s, 0.0)

    def would_allow(self) -> bool:
        """True when a call could go through now (does not reserve a trial slot)."""
        state = self.state
        return state == "closed" or (state == "half_open"
                                     and self._trials < self.cfg.half_open_calls)

    def allow(self) -> bool:
        """Ask to make one call; in half-open this takes one of the trial slots."""
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and self._trials < self.cfg.half_open_calls:
            self._trials += 1
            return True
        return False

    def record_success(self) -> None:
        """A call worked (or the sink answered with a rejection)."""
        if self._state == "closed":
            self._failures = 0
        elif self._state == "half_open":
            self._trial_ok += 1
            if self._trial_ok >= self.cfg.half_open_calls:
                self._set("closed")

    def record_failure(self) -> None:
        """A call failed transiently."""
        if self._state == "closed":
            self._failures += 1
            if self._failures >= self.cfg.failure_threshold:
                self._set("open")
        elif self._state == "half_open":
            self._set("open")
        # Late failures of calls made before the breaker opened do not extend the open time.
