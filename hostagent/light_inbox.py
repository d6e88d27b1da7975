"""Light readings on their way from the sampler thread to the tails (hostagent/tailing.py).

The light samples run in a thread of their own (`TailTasks`), not in trio: a sample through
trio (15 a 30 s pass before the stop watch) cost a timer wake-up, a thread hand-off and a
wake-up for its result, several times the sample's own reads. The
thread leaves its readings here; trio merges them into `Collector.tails` when it uses them: a
pass before it closes out gone domains, a lifecycle event before its own sample.

A pass must see every sample taken before its host reading (a domain destroyed after its last
sample and gone at the pass is closed out at that sample). `begin()` marks a sample in flight
and `put()` ends it, under one lock: a pass that finds no sample in flight after its reading
has every earlier one here; one that finds one waits for it (`wait_idle`, bounded).

Readings are kept per incarnation (uuid, domid), merged by the tails' own rule
(`tails.newer_light`): a sample taken after a destroy (its cgroup gone, no CPU) never replaces
the last good one, a tap already deleted keeps its last counters, and a domain restarted
between two takes keeps the old process's last reading beside the new one's. The first reading
of each incarnation is kept too: it gives the tail its `anchor_io`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping

from hostagent.accounting import tails
from hostagent.accounting.closeout import LightReading

# Per incarnation: its first reading since the last take and the merged latest one.
_Kept = tuple[LightReading, LightReading]


class LightInbox:
    """The light readings per incarnation since trio last took them; thread-safe."""

    __slots__ = ("_busy", "_idle", "_lock", "_readings")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._readings: dict[tails.Key, _Kept] = {}
        self._busy = False

    @property
    def busy(self) -> bool:
        """A sample is being taken now."""
        return self._busy

    def begin(self) -> None:
        """A sample starts (before its first read)."""
        with self._lock:
            self._busy = True

    def put(self, got: Mapping[str, LightReading]) -> None:
        """The sample's readings, by uuid (an empty mapping: the sample failed); ends it."""
        with self._lock:
            kept = self._readings
            for light in got.values():
                key = (light.uuid, light.domid)
                had = kept.get(key)
                if had is None:
                    if light.cpu_ns is not None:
                        kept[key] = (light, light)
                    continue
                merged = tails.newer_light(had[1], light)
                if merged is not None and merged is not had[1]:
                    kept[key] = (had[0], merged)
            self._busy = False
            self._idle.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until no sample is in flight (False: still one after `timeout_s`)."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._busy, timeout_s)

    def take(self) -> list[LightReading]:
        """The readings since the last take, oldest first per incarnation (its first, then
        its merged latest); the inbox is empty afterwards."""
        with self._lock:
            kept, self._readings = self._readings, {}
        out: list[LightReading] = []
        for first, latest in kept.values():
            out.append(first)
            if latest is not first:
                out.append(latest)
        return out


def merge_into(current: dict[tails.Key, tails.Tail], got: Iterable[LightReading]) -> None:
    """Merge the readings of `got` (oldest first) into the tails of their incarnation, in
    place; a reading of an incarnation without a tail is dropped."""
    for light in got:
        key = (light.uuid, light.domid)
        tail = current.get(key)
        if tail is not None:
            current[key] = tails.with_light(tail, light)
