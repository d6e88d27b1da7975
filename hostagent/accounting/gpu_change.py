"""Pure: a GPU hot-plugged or unplugged while the VM runs is billed from the moment it changed.

GPU seconds count allocation time, not a counter: a period is billed with the GPUs its end
reading shows, so without more a GPU attached during a period was billed from the period's
start and one detached during it not at all (≤ `interval_s` × GPU either way). libvirt tells
of a hostdev attached or detached (DEVICE_ADDED / DEVICE_REMOVED with a `hostdev…` alias:
sources/lifecycle.py, hostagent/xml_changes.py), with the time the daemon heard it. The pass
that re-reads that domain's XML takes those times; here a sample whose GPU count differs from
its tail's anchor (the last pass's reading of the same incarnation) gets
`Sample.gpu_change = (the anchor's GPU count, the time of the change)`, and sampling.usage
bills the anchor's GPUs up to that time and the new ones after it.

Several changes of one domain within a period are split at the last one heard (the GPUs before
it are not known in between). A change heard while the daemon was not listening (stopped, or
libvirt's events not subscribed) is billed as before: with the end reading's GPUs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from hostagent.accounting.tails import Key, Tail
from hostagent.model import Sample

__all__ = ["fill"]


def fill(samples: list[Sample], live: Mapping[Key, Tail],
         changed_at_ns: Mapping[str, int]) -> list[Sample]:
    """`samples`, each of a domain in `changed_at_ns` (uuid → wall ns of its last hostdev
    change) whose GPU count differs from its tail's anchor with `gpu_change` set; the same
    list when none does."""
    out = samples
    for i, s in enumerate(samples):
        at_ns = changed_at_ns.get(s.uuid)
        if at_ns is None:
            continue
        tail = live.get((s.uuid, s.domid))
        if tail is None or len(tail.sample.gpus) == len(s.gpus):
            continue
        if out is samples:
            out = list(samples)
        out[i] = dataclasses.replace(s, gpu_change=(len(tail.sample.gpus), at_ns))
    return out
