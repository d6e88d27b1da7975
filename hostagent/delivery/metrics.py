"""Emission metrics: in-process counters per sink and the snapshot the API and CLI read.

Counters only go up (Prometheus counters); depth, oldest pending age, store size and breaker
state are gauges refreshed by the delivery's maintenance task. Publish latency is a histogram
of successful sends (seconds, cumulative buckets like Prometheus' `le`).
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from dataclasses import dataclass, field

LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(slots=True)
class SinkCounters:
    """Mutable counters of one sink (owned by its delivery task)."""

    published: int = 0
    failed: int = 0
    retried: int = 0
    rejected: int = 0
    dead_lettered: int = 0
    merged: int = 0
    refused_by_breaker: int = 0
    store_errors: int = 0
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))
    latency_sum_s: float = 0.0
    # The last failure's reason and when (wall ns): health shows why a sink is not delivering
    # (a queue answering 503, a NATS stream gone, a full disk under the JSONL file).
    last_error: str | None = None
    last_error_wall_ns: int | None = None

    def note_error(self, error: str, wall_ns: int) -> None:
        """A send, write or flush failed (or the event was refused) for this reason."""
        self.last_error, self.last_error_wall_ns = error[:500], wall_ns

    def observe_latency(self, seconds: float, events: int = 1) -> None:
        """Count `events` successful sends that took `seconds` each (a batch written at once:
        one call, not one per event)."""
        self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += events
        self.latency_sum_s += seconds * events


@dataclass(frozen=True, slots=True)
class SinkMetrics:
    """A snapshot of one sink."""

    name: str
    published: int
    failed: int
    retried: int
    rejected: int
    dead_lettered: int
    merged: int
    refused_by_breaker: int
    store_errors: int
    depth: int
    oldest_pending_age_s: float | None
    dead_letters: int
    breaker_state: str
    breaker_opened: int
    latency_buckets: tuple[tuple[float, int], ...]  # (le seconds, cumulative count); +inf last
    latency_sum_s: float
    latency_count: int
    last_error: str | None = None
    last_error_wall_ns: int | None = None



@dataclass(frozen=True, slots=True)
class EmissionMetrics:
    """A snapshot of every sink plus the store."""

    sinks: Mapping[str, SinkMetrics]
    store_used_bytes: int
    store_file_bytes: int
    store_max_bytes: int | None
    merges: int


def snapshot(name: str, c: SinkCounters, *, depth: int, oldest_pending_age_s: float | None,
             dead_letters: int, breaker_state: str, breaker_opened: int) -> SinkMetrics:
    """Freeze one sink's counters together with its gauges."""
    cumulative: list[tuple[float, int]] = []
    total = 0
    for le, n in zip((*LATENCY_BUCKETS_S, float("inf")), c.latency_counts, strict=True):
        total += n
        cumulative.append((le, total))
    return SinkMetrics(
        name=name, published=c.published, failed=c.failed, retried=c.retried,
        rejected=c.rejected, dead_lettered=c.dead_lettered, merged=c.merged,
        refused_by_breaker=c.refused_by_breaker, store_errors=c.store_errors, depth=depth,
        oldest_pending_age_s=oldest_pending_age_s, dead_letters=dead_letters,
        breaker_state=breaker_state, breaker_opened=breaker_opened,
        latency_buckets=tuple(cumulative), latency_sum_s=c.latency_sum_s, latency_count=total,
        last_error=c.last_error, last_error_wall_ns=c.last_error_wall_ns)
