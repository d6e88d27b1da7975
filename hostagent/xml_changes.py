"""The domains whose XML libvirt said changed, on their way from its event thread to the next
pass (hostagent/collector.py, accounting/inventory.py).

The lifecycle subscription also carries libvirt's METADATA_CHANGE, DEVICE_ADDED and
DEVICE_REMOVED events (sources/lifecycle.py): a metadata edit (an owner) or a device replaced
between two passes changes a domain's XML without changing its bulk stats. The callback runs in
libvirt's thread and only leaves the UUID here; the next pass takes them all and re-reads those
domains' XML. While the events are heard (`hear(True)`) the inventory's periodic re-read is an
hourly backstop; when they start being heard, the next pass re-reads every domain once (a
change made while nobody listened was never told).
"""

from __future__ import annotations

import threading


class XmlChanges:
    """UUIDs told since the last `take()`, and whether the events are heard; thread-safe."""

    __slots__ = ("_everything", "_lock", "_uuids", "heard")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._uuids: set[str] = set()
        self._everything = False
        self.heard = False

    def tell(self, uuid: str) -> None:
        """libvirt says this domain's XML changed (any thread; never blocks for long)."""
        with self._lock:
            self._uuids.add(uuid.lower())

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
        return uuids, everything
