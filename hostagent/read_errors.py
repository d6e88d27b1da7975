"""Per-domain read errors: counted by read step, logged once per (domain, step) until it clears.

One domain's failed read costs only that domain's readings (issue 13); this keeps the operator
told without a log line every pass: `hostagent_domain_read_errors_total{reason=<step>}` is
`total`, and the log says when a (domain, step) starts failing and when it recovers.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence

from hostagent.accounting.readings import ReadError

log = logging.getLogger("hostagent.collector")


class ReadErrorLog:
    """The counts since start and the (domain, step) pairs failing at the last pass."""

    def __init__(self) -> None:
        self.total: Counter[str] = Counter()
        self._failing: set[tuple[str, str]] = set()

    def note(self, errors: Sequence[ReadError], live: set[str]) -> None:
        """Count this pass's errors by step; log the new ones, and those of `live` domains
        that no longer fail."""
        now: set[tuple[str, str]] = set()
        for e in errors:
            self.total[e.step] += 1
            now.add((e.uuid, e.step))
            if (e.uuid, e.step) not in self._failing:
                log.warning("domain read failed; its readings are missing until it recovers",
                            extra={"domain": e.name, "uuid": e.uuid, "step": e.step,
                                   "error": e.detail})
        for uuid, step in self._failing - now:
            if uuid in live:
                log.info("domain read recovered", extra={"uuid": uuid, "step": step})
        self._failing = now
