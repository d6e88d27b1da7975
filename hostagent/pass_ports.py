"""The ports of a pass (hostagent/collector.py): the state store and the delivery, as the pass
uses them (hostagent.store.outbox.Store, hostagent.delivery.engine.Delivery)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from hostagent.model import Baseline, OutEvent
from hostagent.store.inspect import Pending


class PassStore(Protocol):
    """The state store as the pass uses it (store.outbox.Store)."""

    created_ns: int

    def load_baselines(self) -> dict[str, Baseline]:
        """Every instance's persisted baseline."""
        ...

    def load_alert_state(self) -> dict[str, bytes]:
        """Alert state by fingerprint."""
        ...

    def commit_pass(self, baselines: Sequence[Baseline], events: Sequence[OutEvent], *,
                    removed_instances: Sequence[str] = (),
                    alert_state: Mapping[str, bytes | None] | None = None
                    ) -> Mapping[str, Sequence[Pending]]:
        """ONE transaction: baselines, events, removed baselines, alert state. Returns the new
        rows it claimed for local sinks (by sink)."""
        ...


class AfterCommit(Protocol):
    """Delivery as the pass commit uses it (hostagent.delivery.engine.Delivery)."""

    def write_committed(self, claimed: Mapping[str, Sequence[Pending]]) -> Callable[[], None]:
        """In the commit's worker call: write what a caught-up local sink can write now;
        returns what trio applies after the call."""
        ...
