"""Light readings on their way from the sampler thread to the tails (hostagent/tailing.py).

The periodic light samples run in a thread of their own (`TailTasks`), not in trio: a sample
every `sample_interval_s` (2 s by default, 15 per 30 s pass) through trio cost a timer wake-up,
a thread hand-off and a wake-up for its result, several times the sample's own reads. The
thread leaves its readings here; trio merges them into `Collector.tails` when it uses them: a
pass before it closes out gone domains, a lifecycle event before its own sample.

A pass must see every sample taken before its host reading (a domain destroyed after its last
sample and gone at the pass is closed out at that sample). `begin()` marks a sample in flight
and `put()` ends it, under one lock: a pass that finds no sample in flight after its reading
has every earlier one here; one that finds one waits for it (`wait_idle`, bounded).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

from hostagent.accounting import tails
from hostagent.accounting.closeout import LightReading


class LightInbox:
    """The newest light reading per domain since trio last took them; thread-safe."""

    __slots__ = ("_busy", "_idle", "_lock", "_readings")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._readings: dict[str, LightReading] = {}
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
            self._readings.update(got)
            self._busy = False
            self._idle.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until no sample is in flight (False: still one after `timeout_s`)."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._busy, timeout_s)

    def take(self) -> dict[str, LightReading]:
        """The readings left since the last take; the inbox is empty afterwards."""
        with self._lock:
            out, self._readings = self._readings, {}
        return out


def merge_into(current: dict[tails.Key, tails.Tail], got: Mapping[str, LightReading]) -> None:
    """Merge the readings of `got` into the tails of their incarnation, in place."""
    if not got:
        return
    for key, tail in list(current.items()):
        light = got.get(key[0])
        if light is not None and light.domid == key[1]:
            current[key] = tails.with_light(tail, light)
