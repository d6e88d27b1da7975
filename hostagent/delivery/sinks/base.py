"""Sinks: where outbox events go. Each sink sends ONE event per `send` and says how it went.

::

    send(event) ──► returns            the sink has the event (after `flush` for buffered sinks)
                ├─► SinkUnavailable    transient (transport error, timeout, 5xx, garbage reply):
                │                      retried, then the event waits in the outbox; never dropped
                └─► SinkRejected       the sink refused this event (`{"Failure": …}`, 4xx):
                     └─► Undeliverable dead-lettered at once (can never succeed, e.g. too large)

The delivery loop owns retries, the circuit breaker and the outbox state; a sink only talks to
its destination. Which events a sink gets is the outbox's decision (hostagent.alerts.routing), made
from the sink's `kinds` and `channels` when an event is committed: a sink sends every event
it is given and never looks into a payload to decide whether it is its own. `flush()` makes
everything sent so far durable (fsync for files); the delivery records acknowledgements only
after it returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar, runtime_checkable

from hostagent.alerts.routing import Route
from hostagent.clock import Clock
from hostagent.config.sinks import (
    BreakerConfig,
    EmailSinkConfig,
    JsonlSinkConfig,
    NatsSinkConfig,
    QueueSinkConfig,
    RetryConfig,
    SinkConfig,
    WebhookSinkConfig,
)
from hostagent.errors import SinkRejected, StateError
from hostagent.model import OutEvent

if TYPE_CHECKING:
    import trio

    from hostagent.store.webhooks import WebhookStore


class Undeliverable(SinkRejected):
    """This sink can never take this event (e.g. larger than its request limit)."""


class _SinkSettings(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def kinds(self) -> tuple[str, ...]: ...
    @property
    def retry(self) -> RetryConfig: ...
    @property
    def breaker(self) -> BreakerConfig: ...


C = TypeVar("C", bound=_SinkSettings)


class ConfiguredSink(Generic[C]):
    """The settings the Sink protocol asks for, read from the sink's `[[sinks]]` entry."""

    cfg: C

    @property
    def name(self) -> str:
        """Unique sink name."""
        return self.cfg.name

    @property
    def kinds(self) -> frozenset[str]:
        """Event kinds this sink receives."""
        return frozenset(self.cfg.kinds)

    @property
    def retry(self) -> RetryConfig:
        """Retry schedule of one attempt round."""
        return self.cfg.retry

    @property
    def breaker(self) -> BreakerConfig:
        """Circuit breaker settings."""
        return self.cfg.breaker


class Sink(Protocol):
    """What the delivery loop needs from a sink."""

    @property
    def name(self) -> str:
        """Unique sink name (the outbox keys delivery state by it)."""
        ...

    @property
    def kinds(self) -> frozenset[str]:
        """Event kinds this sink receives."""
        ...

    @property
    def channels(self) -> frozenset[str] | None:
        """Notify channels this sink answers to (None: every event of its kinds; a set holding
        hostagent.alerts.routing.UNCLAIMED: also every channel no other sink names)."""
        ...

    @property
    def max_in_flight(self) -> int:
        """How many `send` calls may run at once."""
        ...

    @property
    def retry(self) -> RetryConfig:
        """Retry schedule of one attempt round."""
        ...

    @property
    def breaker(self) -> BreakerConfig:
        """Circuit breaker settings."""
        ...

    async def send(self, event: OutEvent) -> None:
        """Deliver one event or raise SinkUnavailable / SinkRejected."""
        ...

    async def flush(self) -> None:
        """Make what was sent durable; SinkUnavailable if that failed."""
        ...

    async def aclose(self) -> None:
        """Release connections and files."""
        ...


@runtime_checkable
class BatchWriter(Protocol):
    """A local sink that can take a whole batch in ONE blocking call (the JSONL file): the
    delivery then claims the batch, writes it and records the acknowledgements in one
    worker-thread call instead of `send` per event and `flush`. Only used while the sink's
    breaker is closed; retries, backoff and dead letters are the same as with `flush`."""

    def write_batch(self, payloads: Sequence[bytes]) -> None:
        """Write every payload and make them durable (blocking; called from a worker thread,
        never while a `flush` runs); SinkUnavailable if that failed (all are sent again)."""
        ...

    def device(self) -> int:
        """The `st_dev` of the filesystem it writes to (OSError: not known yet). The pass
        commit writes a pass's rows itself only to the store's own filesystem
        (hostagent.delivery.local_round)."""
        ...


class Dispatcher(Protocol):
    """Delivery a sink runs on its own, after the outbox handed it an event (webhooks: one
    drain per endpoint); the daemon runs it in its nursery."""

    def wake(self) -> None:
        """New work was handed over (or its configuration changed): look now."""
        ...

    async def run(self, *, task_status: trio.TaskStatus[None] = ...) -> None:
        """Deliver until cancelled."""
        ...

    async def drained(self) -> None:
        """Return once it found nothing it can send right now (a stop waits for this)."""
        ...


@runtime_checkable
class DispatchingSink(Sink, Protocol):
    """A sink with a `Dispatcher` of its own (the Sink protocol itself is unchanged)."""

    @property
    def dispatcher(self) -> Dispatcher | None:
        """Its dispatcher (None: nothing to run, e.g. a sink built without one in a test)."""
        ...


def dispatchers(sinks: Sequence[Sink]) -> list[Dispatcher]:
    """The dispatchers the daemon must run beside the delivery."""
    return [s.dispatcher for s in sinks
            if isinstance(s, DispatchingSink) and s.dispatcher is not None]


def build_sink(cfg: SinkConfig, *, clock: Clock | None = None,
               webhook_store: WebhookStore | None = None, node_id: str = "") -> Sink:
    """The sink a `[[sinks]]` entry describes (nothing is opened until the first send).

    A webhook sink needs `webhook_store` and `clock`; run its `dispatcher.run` in a nursery.
    A NATS sink fills `node_id` ([host] node_id) into its subjects.
    """
    if isinstance(cfg, WebhookSinkConfig):
        from hostagent.delivery.sinks.webhook import WebhookDispatcher, WebhookSink

        if webhook_store is None or clock is None:
            raise StateError("a webhook sink needs the webhook store and a clock")
        return WebhookSink(cfg, webhook_store, WebhookDispatcher(cfg, webhook_store, clock))
    del clock  # other sinks keep no time of their own; timeouts are trio deadlines
    # Imported here: the sink modules import `Undeliverable` from this package.
    if isinstance(cfg, JsonlSinkConfig):
        from hostagent.delivery.sinks.jsonl import JsonlSink

        return JsonlSink(cfg)
    if isinstance(cfg, EmailSinkConfig):
        from hostagent.delivery.sinks.email import EmailSink

        return EmailSink(cfg)
    if isinstance(cfg, NatsSinkConfig):
        from hostagent.delivery.sinks.nats_jetstream import NatsSink

        return NatsSink(cfg, node_id=node_id)
    from hostagent.delivery.sinks.formation_queue import FormationQueueSink

    return FormationQueueSink(cfg)


def config_routes(sinks: Sequence[SinkConfig]) -> dict[str, Route]:
    """Each configured sink's route, from its `[[sinks]]` entry (no sink is built).

    Only the configured kinds' modules are imported: the HTTP and NATS sinks pull in their
    client stacks (httpx alone ~18 MB of RSS), which a host with a JSONL sink never needs."""
    out: dict[str, Route] = {}
    for cfg in sinks:
        chans: frozenset[str] | None
        if isinstance(cfg, EmailSinkConfig):
            chans = frozenset({cfg.channel})
        elif isinstance(cfg, JsonlSinkConfig):
            from hostagent.delivery.sinks.jsonl import JsonlSink

            chans = JsonlSink.channels
        elif isinstance(cfg, QueueSinkConfig):
            from hostagent.delivery.sinks.formation_queue import FormationQueueSink

            chans = FormationQueueSink.channels
        elif isinstance(cfg, NatsSinkConfig):
            from hostagent.delivery.sinks.nats_jetstream import NatsSink

            chans = NatsSink.channels
        else:
            from hostagent.delivery.sinks.webhook import WebhookSink

            chans = WebhookSink.channels
        out[cfg.name] = Route(frozenset(cfg.kinds), chans)
    return out
