"""Token buckets per key (principal or client address), bounded in memory."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from hostagent.clock import Clock


@dataclass(slots=True)
class _Bucket:
    tokens: float
    t_ns: int


class RateLimiter:
    """`take(key)` → 0.0 when allowed, else seconds until a token is available.

    Buckets are kept in LRU order and capped at `max_keys`; an evicted key starts full, which
    only ever errs toward allowing a request (a bounded table beats an unbounded one that an
    address-spraying client could grow).
    """

    def __init__(self, clock: Clock, rate_per_s: float, burst: int,
                 max_keys: int = 10_000) -> None:
        self.clock = clock
        self.rate_per_s = rate_per_s
        self.burst = float(burst)
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self.refused = 0

    def take(self, key: str) -> float:
        """Take one token for `key`; the wait in seconds when none is left (nothing taken)."""
        now_ns = self.clock.now().monotonic_ns
        b = self._buckets.get(key)
        if b is None:
            b = _Bucket(self.burst, now_ns)
            self._buckets[key] = b
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            elapsed_s = (now_ns - b.t_ns) / 1e9
            b.tokens = min(self.burst, b.tokens + elapsed_s * self.rate_per_s)
            b.t_ns = now_ns
        if b.tokens >= 1.0:
            b.tokens -= 1.0
            return 0.0
        self.refused += 1
        return (1.0 - b.tokens) / self.rate_per_s
