"""The domains whose XML libvirt said changed, on their way from its event thread to the next
pass (hostagent/collector.py, accounting/inventory.py).

The lifecycle subscription also carries libvirt's METADATA_CHANGE, DEVICE_ADDED and
DEVICE_REMOVED events (sources/lifecycle.py): a metadata edit (an owner) or a device replaced
between two passes changes a domain's XML without changing its bulk stats. The callback runs in
libvirt's thread and only leaves the UUID here; the next pass takes them all and re-reads those
domains' XML. While the events are heard (`hear(True)`) the inventory's periodic re-read is an
hourly backstop; when they start being heard, the next pass re-reads every domain once (a
change made while nobody listened was never told).

A device event with a `hostdev` alias (libvirt's own name for a `<hostdev>`, which a GPU passed
through is) also leaves the time it was heard: `take()` moves those times to `hostdev_changes`,
so the pass that re-reads the XML knows when the GPUs changed (accounting/gpu_change.py).
"""

from __future__ import annotations

import threading
from collections.abc import Container
from typing import Protocol

# libvirt's alias for a <hostdev> it names itself: hostdev0, hostdev1, ...
HOSTDEV_ALIAS = "hostdev"


class XmlChangeHook(Protocol):
    """Told in libvirt's thread that a domain's XML changed (`XmlChanges.tell`; the lifecycle
    watcher's hook): its UUID and, for a device added or removed, the device's alias and when."""

    def __call__(self, uuid: str, device: str | None = None, wall_ns: int | None = None
                 ) -> None: ...


class XmlChanges:
    """UUIDs told since the last `take()`, and whether the events are heard; thread-safe."""

    __slots__ = ("_everything", "_hostdevs", "_lock", "_uuids", "heard", "hostdev_changes")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._uuids: set[str] = set()
        self._hostdevs: dict[str, int] = {}
        self._everything = False
        self.heard = False
        # uuid -> wall ns of its last hostdev change, as of the last `take()` (the pass's),
        # until `settled` (the pass's thread only).
        self.hostdev_changes: dict[str, int] = {}

    def tell(self, uuid: str, device: str | None = None, wall_ns: int | None = None) -> None:
        """libvirt says this domain's XML changed (any thread; never blocks for long);
        `device`: the alias of the device added or removed, heard at `wall_ns`."""
        uuid = uuid.lower()
        with self._lock:
            self._uuids.add(uuid)
            if wall_ns is not None and device is not None and device.startswith(HOSTDEV_ALIAS):
                self._hostdevs[uuid] = wall_ns

    def hear(self, heard: bool) -> None:
        """The events are heard from now on, or no longer; heard: every domain is read again."""
        self.heard = heard
        if heard:
            with self._lock:
                self._everything = True

    def take(self) -> tuple[set[str], bool]:
        """(the UUIDs told, whether every domain must be read) since the last take; emptied."""
        if not self._uuids and not self._everything:  # the steady pass: no lock
            return set(), False
        with self._lock:
            uuids, self._uuids = self._uuids, set()
            everything, self._everything = self._everything, False
            if self._hostdevs:
                self.hostdev_changes.update(self._hostdevs)
                self._hostdevs = {}
        return uuids, everything

    def peek(self) -> tuple[frozenset[str], bool]:
        """What `take()` would give, left in place (a read of some domains between passes:
        the next pass still takes it)."""
        if not self._uuids and not self._everything:
            return frozenset(), False
        with self._lock:
            return frozenset(self._uuids), self._everything

    def settled(self, failed: Container[str]) -> None:
        """The pass that took the hostdev changes is committed: only those of the domains it
        failed to read stay, for the pass that reads them."""
        if self.hostdev_changes:
            self.hostdev_changes = {u: t for u, t in self.hostdev_changes.items()
                                    if u in failed}
