"""Lifecycle events as values, and the pure rule that turns one into what the daemon does next.

Events are hints that make the daemon look sooner, never the source of truth: polling still
sees every domain, so a missed event costs what polling costs. The libvirt subscription that
produces these values lives in hostagent/sources/lifecycle.py; this module imports no I/O.

What each kind means for billing (libvirt 9.0 on the lab, /work/shared/LAB-NOTES.md):

* STARTED / RESUMED: a new process or a running one again: read it now (identity, first
  baseline in memory), so a VM that lives less than a pass is seen at all.
* SUSPENDED (also the pause before a migration's switch-over), SHUTDOWN (the guest powers off),
  PMSUSPENDED: QEMU may still exist: read the counters now, they may be the last ones this
  incarnation ever shows. After `virsh destroy` SHUTDOWN arrives when QEMU is already gone, so
  this read must be a light read (hostagent/sources/light.py: cgroup files through kept
  descriptors, which fail on a removed cgroup, and tap counters keyed by ifindex), never
  libvirt stats, which may describe something else by then.
* STOPPED / CRASHED / UNDEFINED: QEMU is gone. A read taken now is NOT the domain's (the lab saw
  a `cpu.time` of 51 s for a domain at 319 s): close the incarnation out at its last reading.

libvirt's DEVICE_ADDED (a NIC hot-plugged into a running VM) arrives as `DeviceAdded`: the
daemon reads the domain's taps at once, so the stop watch follows a new tap from then on and a
NIC unplugged again before the next pass is still billed (docs/billing-tail.md).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class LifecycleKind(enum.Enum):
    """libvirt's `virDomainEventType`, by name; the values are libvirt's stable numbers."""

    DEFINED = 0
    UNDEFINED = 1
    STARTED = 2
    SUSPENDED = 3
    RESUMED = 4
    STOPPED = 5
    SHUTDOWN = 6
    PMSUSPENDED = 7
    CRASHED = 8


class Action(enum.Enum):
    """What the daemon does on an event."""

    IGNORE = "ignore"  # nothing to read (a definition changed)
    READ_NOW = "read-now"  # a (new) running process: identity and a first in-memory reading
    READ_BEFORE_GONE = "read-before-gone"  # last chance to read counters while QEMU exists
    CLOSE = "close"  # QEMU is gone: close the incarnation at its last reading; do not read


@dataclass(frozen=True, slots=True)
class LifecycleEvent:
    """One lifecycle event; `detail` is libvirt's detail name (`DESTROYED`, `MIGRATED`, ...).

    `domid` is -1 when libvirt gives none (an inactive domain). `t_wall_ns` and
    `t_monotonic_ns` are when the callback ran, from the injected clock.
    """

    uuid: str
    name: str
    domid: int
    kind: LifecycleKind
    detail: str
    t_wall_ns: int
    t_monotonic_ns: int

    @property
    def migrated(self) -> bool:
        """The event is part of a migration (source: SUSPENDED/STOPPED, dest: STARTED/RESUMED)."""
        return self.detail == "MIGRATED"


@dataclass(frozen=True, slots=True)
class Reconnected:
    """The subscription was (re-)established: events may have been missed; poll everything."""

    uri: str
    t_wall_ns: int
    reconnects: int


@dataclass(frozen=True, slots=True)
class DeviceAdded:
    """libvirt's DEVICE_ADDED: a device (`alias`: libvirt's name of it, `net1`, `hostdev0`...)
    was hot-plugged into the running domain `uuid`, heard at `t_wall_ns`."""

    uuid: str
    alias: str | None
    t_wall_ns: int


_ACTIONS = {
    LifecycleKind.DEFINED: Action.IGNORE,
    LifecycleKind.STARTED: Action.READ_NOW,
    LifecycleKind.RESUMED: Action.READ_NOW,
    LifecycleKind.SUSPENDED: Action.READ_BEFORE_GONE,
    LifecycleKind.SHUTDOWN: Action.READ_BEFORE_GONE,
    LifecycleKind.PMSUSPENDED: Action.READ_BEFORE_GONE,
    LifecycleKind.STOPPED: Action.CLOSE,
    LifecycleKind.CRASHED: Action.CLOSE,
    LifecycleKind.UNDEFINED: Action.CLOSE,
}


def action_for(event: LifecycleEvent) -> Action:
    """What to do on `event` (pure; see the module docstring for why)."""
    if event.kind is LifecycleKind.UNDEFINED and event.domid > 0:
        # Undefining a running transient-to-be domain leaves QEMU running: nothing is gone.
        return Action.IGNORE
    return _ACTIONS[event.kind]


def close_reason(event: LifecycleEvent) -> str:
    """The reason a CLOSE event gives its incarnation's close-out (`MIGRATED`, `DESTROYED`, ...)."""
    if event.kind is LifecycleKind.CRASHED:
        return "CRASHED"
    if event.kind is LifecycleKind.UNDEFINED:
        return "UNDEFINED"
    return event.detail or event.kind.name
