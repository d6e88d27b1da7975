"""The drain engine: ONE loop that empties a durable queue, whatever the queue holds.

Two queues use it: the outbox (rows per sink, hostagent.delivery.engine) and the webhook
delivery table (rows per endpoint, hostagent.delivery.sinks.webhook). Each gives a small
adapter (`Queue`); the loop is the same for both::

    ┌► breaker gate ── open ──► settle what is unrecorded, wait for the trial time (or a wake-up)
    │   take due rows ── none ──► idle; wait for a wake-up or the next due time
    │    (a local sink's take may deliver them itself: then only "more may be due" comes back)
    │   deliver them (the adapter sends and records the outcome)
    └── a store error ──► count it, pause STORE_ERROR_PAUSE_S (or until woken), try again

and there is ONE backoff formula for a row that failed a round (`round_backoff_s`):
``min(round_backoff_max_s, max(max_backoff_s, initial_backoff_s) × multiplier^(rounds−1))``
± jitter. `attempt_backoff_s` is the wait between attempts inside a round (the outbox's
retries): ``min(max_backoff_s, initial_backoff_s × multiplier^(attempt−1))`` ± jitter; a round
ends where that schedule is capped, so the first wait between rounds is ``max_backoff_s``.
"""

from __future__ import annotations

import email.utils
import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import trio

from hostagent.clock import Clock
from hostagent.config.sinks import RetryConfig
from hostagent.delivery.breaker import Breaker
from hostagent.errors import StateError

STORE_ERROR_PAUSE_S = 1.0  # after a store error, before the loop tries the queue again
_EXP_SAFE = 700.0  # e**700 ≈ 1e304: a float power below it cannot overflow

R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)


def _jittered(base_s: float, jitter: float, rng: random.Random) -> float:
    return max(base_s * (1 + rng.uniform(-jitter, jitter)), 0.0)


def capped_growth(start: float, multiplier: float, steps: int, cap: float) -> float:
    """``min(cap, start × multiplier^steps)`` (`steps` below 0 count as 0) that never overflows:
    once the cap is reached the exponent grows no further. A row of a sink down for days
    counts thousands of rounds, and ``2.0 ** 1024`` raises OverflowError."""
    steps = max(steps, 0)
    if steps == 0 or start <= 0.0 or start >= cap:
        return min(start, cap)
    if multiplier <= 1.0:  # (the config's minimum is 1) it can only shrink: no overflow
        return min(cap, start * multiplier ** steps)
    growth = steps * math.log(multiplier)  # in logs: cap / start itself may overflow
    if growth >= math.log(cap) - math.log(start):
        return cap
    if growth < _EXP_SAFE:
        return min(cap, start * multiplier ** steps)
    return min(cap, math.exp(math.log(start) + growth))  # a start near 0: the power overflows


def attempt_backoff_s(retry: RetryConfig, attempt: int, rng: random.Random) -> float:
    """Wait before retry number `attempt` (1-based) inside a round, with ± jitter."""
    base = capped_growth(retry.initial_backoff_s, retry.multiplier, attempt - 1,
                         retry.max_backoff_s)
    return _jittered(base, retry.jitter, rng)


def round_backoff_s(retry: RetryConfig, rounds: int, rng: random.Random) -> float:
    """Wait in the queue after `rounds` failed rounds (1-based), with ± jitter; any number of
    rounds (the growth stops at `round_backoff_max_s`)."""
    first = max(retry.max_backoff_s, retry.initial_backoff_s)
    base = capped_growth(first, retry.multiplier, rounds - 1, retry.round_backoff_max_s)
    return _jittered(base, retry.jitter, rng)


def retry_after_s(value: str | None, now_wall_s: float) -> float | None:
    """Seconds a `Retry-After` header asks to wait (RFC 9110 §10.2.3: delay-seconds or an
    HTTP-date, read against `now_wall_s`); None for no header or one that is neither. A date
    in the past is 0."""
    if value is None:
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():
        return float(min(int(text), 10**9))  # any more is 'for ever': capped by the caller
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; a date without a zone is not one
        return None
    return max(0.0, when.timestamp() - now_wall_s)


def at_least_s(backoff_s: float, asked_s: float | None, retry: RetryConfig) -> float:
    """The wait before the next round: the backoff, or what the receiver asked (Retry-After)
    when longer, at most `round_backoff_max_s` (a receiver cannot park a row for ever)."""
    if asked_s is None:
        return backoff_s
    return max(backoff_s, min(asked_s, retry.round_backoff_max_s))


@dataclass(frozen=True, slots=True)
class Taken(Generic[R]):
    """What one `take` found: rows due now, else when the next one is due (None: never).
    `more`: the take delivered what it claimed itself (no rows for `deliver`) and more rows may
    be due now: take again at once."""

    rows: Sequence[R]
    next_due_ns: int | None = None
    more: bool = False


class Queue(Protocol[R]):
    """One durable queue's adapter: the store calls and the sending; the loop is the engine's."""

    @property
    def name(self) -> str:
        """For logs and metrics."""
        ...

    @property
    def breaker(self) -> Breaker:
        """The breaker gating this queue's destination."""
        ...

    async def take(self, now_ns: int) -> Taken[R]:
        """Claim the rows due at `now_ns` (may also record what `deliver` left unrecorded)."""
        ...

    async def deliver(self, rows: Sequence[R]) -> None:
        """Send the rows and record (or keep for the next `take`) how each went."""
        ...

    async def settle(self) -> None:
        """Record now whatever `deliver` left for the next `take` (before a long wait)."""
        ...

    def store_failed(self, err: StateError) -> None:
        """Count and report a store error (the engine then pauses)."""
        ...


class Drain(Generic[R]):
    """Runs one queue's loop; `wake()` when new rows may be due; `idle` once it found none,
    `stalled` while it pauses on a store error; `quiet` (either) is what a stop waits for
    (`all_quiet`)."""

    def __init__(self, queue: Queue[R], clock: Clock) -> None:
        self.queue = queue
        self.clock = clock
        self.idle = False
        self.stalled = False
        self.idle_changed = trio.Event()  # set (and replaced) whenever it turns quiet
        self._wake = trio.Event()

    @property
    def quiet(self) -> bool:
        """Nothing it can do right now: no row due (`idle`), or the store refused its last
        take or record (`stalled`: the rows stay owed in the store, for the next try or the
        next start; waiting out the pause sends nothing new)."""
        return self.idle or self.stalled

    def wake(self) -> None:
        """Look for due rows now."""
        self.idle = False
        self._wake.set()

    def _set_idle(self, idle: bool) -> None:
        self.idle = idle
        if idle:
            self._turned_quiet()

    def _turned_quiet(self) -> None:
        self.idle_changed.set()
        self.idle_changed = trio.Event()

    async def _wait(self, timeout_s: float | None) -> None:
        with trio.move_on_after(math.inf if timeout_s is None else timeout_s):
            await self._wake.wait()
        self._wake = trio.Event()

    async def run(self) -> None:
        """Drain until cancelled."""
        q = self.queue
        while True:
            try:
                if not q.breaker.would_allow():
                    await q.settle()
                    await self._wait(q.breaker.seconds_until_trial())
                    continue
                now_ns = self.clock.now().wall_ns
                taken = await q.take(now_ns)
                self.stalled = False
                if taken.more:
                    self._set_idle(False)
                    continue
                if not taken.rows:
                    self._set_idle(True)
                    due = taken.next_due_ns
                    await self._wait(None if due is None else max(due - now_ns, 0) / 1e9)
                    continue
                self._set_idle(False)
                await q.deliver(taken.rows)
            except StateError as err:
                q.store_failed(err)
                self.stalled = True
                self._turned_quiet()  # a stop need not wait out the pause (`all_quiet`)
                await self._wait(STORE_ERROR_PAUSE_S)


async def all_quiet(drains: Callable[[], Iterable[Drain[Any]]], *,
                    stalled_too: bool = False) -> None:
    """Return once every drain `drains()` lists is `idle` or, with `stalled_too`, paused on a
    store error (`quiet`): what a stop waits for, within the daemon's drain grace, so a send
    in flight is answered and recorded, not sent again after the restart.

    `stalled_too` is for queues whose unrecorded outcome is lost anyway (webhook endpoints: the
    row stays due and is POSTed again): an endpoint whose outcome the store could not record (a
    full disk, a damaged table) held every stop for the whole grace, POSTing the same row
    again each pause; its row stays owed in the store and goes again, with the same event id,
    after the restart. The outbox's sinks keep unrecorded acknowledgements for their next
    take, so waiting through a passing store error spares a resend: not for them."""
    while True:
        busy = next((d for d in drains() if not (d.quiet if stalled_too else d.idle)), None)
        if busy is None:
            return
        await busy.idle_changed.wait()
