"""Webhooks: ONE outbox sink fans events out durably; one task per endpoint delivers them.

::

    outbox ──► WebhookSink.send(event) ──► WebhookStore.fan_out: a pending row per registration
               (returns only after that transaction committed; then the outbox acks the event)
    WebhookDispatcher ──► per registration: due rows ──► SSRF check + pin ──► signed POST

Request: ``POST <url>`` with body ``{"event_type": "metrics"|"threshold_violation",
"timestamp": <unix s>, "data": <our event>}`` and headers ``Content-Type: application/json``,
``X-Webhook-Event``, ``webhook-id`` (the event_id: the same on every retry),
``webhook-timestamp`` (unix s of this attempt) and, when the registration has a secret, both
signatures:

* Standard Webhooks ``webhook-signature: v1,<base64 HMAC-SHA256(key, f"{id}.{ts}.{body}")>``
  (key: the secret's bytes, or base64-decoded when it is written ``whsec_<base64>``);
* legacy upstream ``X-Webhook-Signature: <hex HMAC-SHA256(secret, body)>``.

Each endpoint is one drain of hostagent.delivery.drain (the engine the outbox uses too):
breaker gate, due rows, wake-ups, store-error pause. Outcomes: 2xx delivered. Transport
errors, timeouts, 408, 429 and 5xx are transient: they count against the endpoint's circuit
breaker and the row waits the engine's one formula, ``drain.round_backoff_s`` with rounds =
attempts (``max_backoff_s × multiplier^(attempts−1)``, capped at ``round_backoff_max_s``,
± jitter), or, after a 429 or 503 with ``Retry-After`` (seconds or an HTTP-date), what the
endpoint asked when that is longer, at most ``round_backoff_max_s``. 3xx (redirects are
never followed), other 4xx and a URL the SSRF guard refuses count 5 attempts each; 410 Gone is
dead at once; a row is dead after ``dead_after_attempts``. Nothing is dropped silently: dead
rows stay in ``webhook_deliveries`` with their last error until ``retention_s``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio

from hostagent import handoff
from hostagent.alerts.routing import UNCLAIMED
from hostagent.clock import Clock
from hostagent.config.sinks import WebhookSinkConfig
from hostagent.delivery.breaker import Breaker
from hostagent.delivery.drain import (
    Drain,
    Taken,
    all_quiet,
    at_least_s,
    retry_after_s,
    round_backoff_s,
)
from hostagent.delivery.sinks.base import ConfiguredSink
from hostagent.delivery.ssrf import Guard, Resolver, UrlRefused, system_resolver
from hostagent.errors import ConfigError, SinkUnavailable, StateError
from hostagent.model import OutEvent
from hostagent.store.webhooks import (
    ALL_WEBHOOKS_CHANNELS,
    Delivery,
    Registration,
    WebhookStore,
    signing_key,
)

log = logging.getLogger(__name__)
USER_AGENT = "hostagent-webhooks/1"
HARD_FAILURE_WEIGHT = 5
PRUNE_EVERY_S = 600.0  # delivered/dead rows older than retention_s go
# Re-read the registrations at least this often. A change through the API wakes the dispatcher
# at once (`wake`), as each fan-out does: this is only a safety net. It was 5 s: 12 wake-ups of
# trio a 30 s pass (the timer, the read's answer), ~0.5 ms of process CPU each on a busy host.
REGISTRATIONS_CHECK_S = 60.0
ROWS_PER_SLOT = 4  # rows an endpoint takes per round, per concurrent POST
# One attempt's deadline (resolve + connect + send + read) beyond the HTTP client's own
# per-operation timeout: twice it, plus this much.
ATTEMPT_SLACK_S = 1.0


def signature_headers(secret: str | None, msg_id: str, ts: int, body: bytes) -> dict[str, str]:
    """Standard Webhooks and legacy signature headers (none without a secret).

    ConfigError for a malformed `whsec_` secret (registration refuses those; a row written
    before that check is refused at delivery, never signed with the raw text)."""
    if not secret:
        return {}
    signed = f"{msg_id}.{ts}.".encode() + body
    mac = hmac.new(signing_key(secret), signed, hashlib.sha256).digest()
    std = base64.b64encode(mac).decode()
    legacy = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {"webhook-signature": f"v1,{std}", "X-Webhook-Signature": legacy}


def request_headers(reg: Registration, d: Delivery, ts: int) -> dict[str, str]:
    """Every header of one attempt."""
    return {"Content-Type": "application/json", "User-Agent": USER_AGENT,
            "X-Webhook-Event": d.event_type, "webhook-id": d.event_id,
            "webhook-timestamp": str(ts), **signature_headers(reg.secret, d.event_id, ts, d.body)}


class WebhookSink(ConfiguredSink[WebhookSinkConfig]):
    """The outbox side: `send` fans an event out into the webhook delivery table.

    Channels: "webhook", "webhooks", "api_callback" and, since registration ids are made at run
    time, every channel no other sink names (UNCLAIMED); the fan-out then picks the
    registrations a Notify alert names (hostagent.store.webhooks.wants).
    """

    channels: frozenset[str] | None = ALL_WEBHOOKS_CHANNELS | {UNCLAIMED}

    def __init__(self, cfg: WebhookSinkConfig, store: WebhookStore,
                 dispatcher: WebhookDispatcher | None = None) -> None:
        self.cfg = cfg
        self.store = store
        self.dispatcher = dispatcher
        self.fanned_out = 0

    @property
    def max_in_flight(self) -> int:
        """Concurrent fan-out writes."""
        return self.cfg.max_in_flight

    async def send(self, event: OutEvent) -> None:
        """Commit the event's fan-out rows; SinkUnavailable if the state file refused."""
        try:
            self.fanned_out += await handoff.run_sync(self.store.fan_out, event)
        except StateError as err:
            raise SinkUnavailable(f"webhook fan-out: {err}") from err
        if self.dispatcher is not None:
            self.dispatcher.wake()

    async def flush(self) -> None:
        """Nothing buffered: fan-out rows are committed in `send`."""

    async def aclose(self) -> None:
        """The dispatcher owns the HTTP client."""


@dataclass
class EndpointStats:
    """Counters of one endpoint."""

    delivered: int = 0
    failed: int = 0
    dead: int = 0
    refused: int = 0


@dataclass(eq=False)
class _Endpoint:
    """One registration's rows of the webhook table (a `drain.Queue[Delivery]`)."""

    reg: Registration
    breaker: Breaker
    dispatcher: WebhookDispatcher
    client: httpx.AsyncClient
    stats: EndpointStats
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    @property
    def name(self) -> str:
        """The registration id."""
        return self.reg.id

    async def take(self, now_ns: int) -> Taken[Delivery]:
        """Due rows, oldest first, else when the next one is due (one worker-thread call)."""
        store, limit = self.dispatcher.store, self.dispatcher.batch_rows

        def read() -> Taken[Delivery]:
            rows = store.due(self.reg.id, limit, now_ns)
            return Taken(rows, None if rows else store.next_due_ns(self.reg.id))

        return await handoff.run_sync(read)

    async def deliver(self, rows: Sequence[Delivery]) -> None:
        """POST the rows (each outcome is recorded as it comes)."""
        await self.dispatcher.deliver_batch(self, rows)

    async def settle(self) -> None:
        """Nothing waits: every outcome was recorded by `deliver`."""

    def store_failed(self, err: StateError) -> None:
        """Say so; the engine pauses."""
        log.error("webhook deliveries unreadable",
                  extra={"webhook_id": self.reg.id, "error": str(err)})


class WebhookDispatcher:
    """One drain (hostagent.delivery.drain) per registration, with its own breaker; `wake()`
    after a fan-out."""

    def __init__(self, cfg: WebhookSinkConfig, store: WebhookStore, clock: Clock, *,
                 resolver: Resolver = system_resolver, rng: random.Random | None = None,
                 registrations_check_s: float = REGISTRATIONS_CHECK_S) -> None:
        self.cfg = cfg
        self.store = store
        self.clock = clock
        self.guard = Guard.from_config(cfg)
        self.resolver = resolver
        self._rng = rng or random.Random()
        self._check_s = registrations_check_s
        self._live: dict[str, tuple[_Endpoint, Drain[Delivery]]] = {}
        self._changed = trio.Event()
        self.stats: dict[str, EndpointStats] = {}
        self.batch_rows = cfg.endpoint_concurrency * ROWS_PER_SLOT

    def wake(self) -> None:
        """New rows were fanned out (or registrations changed): look now."""
        self._changed.set()
        for _, drain in self._live.values():
            drain.wake()

    async def _db(self, fn: Any, *args: Any) -> Any:
        return await handoff.run_sync(fn, *args)

    async def drained(self) -> None:
        """Return once every endpoint found nothing it can send right now: a stop waits for
        this (within the daemon's drain grace), so a POST in flight is answered and recorded,
        not sent again after the restart. Rows waiting for a backoff do not count, nor an
        endpoint paused because its outcome could not be recorded (`drain.all_quiet`)."""
        await all_quiet(lambda: [d for _, d in self._live.values()], stalled_too=True)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Deliver until cancelled; picks up new and deleted registrations."""
        async with httpx.AsyncClient(follow_redirects=False, trust_env=False,
                                     timeout=self.cfg.timeout_s,
                                     ) as client, trio.open_nursery() as nursery:
            task_status.started()
            last_prune_s = -math.inf
            while True:
                try:
                    regs = {r.id: r for r in await self._db(self.store.registrations)}
                except StateError as err:
                    log.error("webhook registrations unreadable", extra={"error": str(err)})
                    regs = {wid: ep.reg for wid, (ep, _) in self._live.items()}
                for wid in set(self._live) - set(regs):
                    self._live.pop(wid)[0].scope.cancel()
                for wid, reg in regs.items():
                    if wid not in self._live or self._live[wid][0].reg != reg:
                        if wid in self._live:
                            self._live[wid][0].scope.cancel()
                        ep = _Endpoint(reg, Breaker(self.cfg.breaker, self.clock), self, client,
                                       self.stats.setdefault(wid, EndpointStats()))
                        self._live[wid] = (ep, drain := Drain(ep, self.clock))
                        nursery.start_soon(self._endpoint_loop, ep, drain)
                now_s = self.clock.now().monotonic_ns / 1e9
                if now_s - last_prune_s >= PRUNE_EVERY_S:
                    last_prune_s = now_s
                    try:
                        await self._db(self.store.prune, self.cfg.retention_s)
                    except StateError as err:
                        log.error("cannot prune webhook deliveries", extra={"error": str(err)})
                with trio.move_on_after(self._check_s):
                    await self._changed.wait()
                self._changed = trio.Event()

    @staticmethod
    async def _endpoint_loop(ep: _Endpoint, drain: Drain[Delivery]) -> None:
        with ep.scope:
            await drain.run()

    async def deliver_batch(self, ep: _Endpoint, batch: Sequence[Delivery]) -> None:
        """POST a batch of one endpoint's rows, `endpoint_concurrency` at a time. StateError
        when an outcome could not be recorded: the drain then pauses, since the row is still
        due and taking it again at once POSTed it again in a tight loop (a full disk, a
        damaged table: thousands of requests and error lines a second)."""
        limiter = trio.CapacityLimiter(self.cfg.endpoint_concurrency)
        unrecorded: list[StateError] = []
        if self.cfg.endpoint_concurrency == 1:
            # one at a time, oldest first: trio may start a nursery's tasks in any
            # order, so only a plain loop keeps the promised per-endpoint order
            for d in batch:
                await self._deliver(ep, d, limiter, unrecorded)
                if unrecorded:
                    break
        else:
            async with trio.open_nursery() as nursery:
                for d in batch:
                    nursery.start_soon(self._deliver, ep, d, limiter, unrecorded)
        if unrecorded:
            raise unrecorded[0]

    def _later_ns(self, rounds: int, asked_s: float | None = None) -> int:
        now_ns = self.clock.now().wall_ns
        wait_s = at_least_s(round_backoff_s(self.cfg.retry, rounds, self._rng), asked_s,
                            self.cfg.retry)
        return now_ns + int(wait_s * 1e9)

    async def _deliver(self, ep: _Endpoint, d: Delivery, limiter: trio.CapacityLimiter,
                       unrecorded: list[StateError]) -> None:
        async with limiter:
            if not ep.breaker.allow():
                return  # stays pending; the loop waits for the breaker
            error, weight, transient, asked_s = await self._post(ep.client, ep.reg, d)
        try:
            if error is None:
                ep.breaker.record_success()
                ep.stats.delivered += 1
                await self._db(self.store.delivered, d)
                return
            if transient:
                ep.breaker.record_failure()
            else:
                ep.breaker.record_success()  # it answered: the endpoint is up
            ep.stats.failed += 1
            dead = await self._db(lambda: self.store.failed(
                d, error, self._later_ns(d.attempts + 1, asked_s), weight=weight,
                dead_after=self.cfg.dead_after_attempts))
        except StateError as err:
            log.error("cannot record webhook delivery", extra={"error": str(err)})
            unrecorded.append(err)
            return
        if dead:
            ep.stats.dead += 1
            log.error("webhook delivery dead", extra={"webhook_id": d.webhook_id,
                                                      "event_id": d.event_id, "error": error})
        else:
            log.warning("webhook delivery failed", extra={"webhook_id": d.webhook_id,
                                                          "event_id": d.event_id,
                                                          "error": error})

    async def _post(self, client: httpx.AsyncClient, reg: Registration, d: Delivery,
                    ) -> tuple[str | None, int, bool, float | None]:
        """One attempt → (error or None, attempts it counts for, transient?, the wait its
        `Retry-After` asked for, on a 429 or 503)."""
        with trio.move_on_after(self.cfg.timeout_s * 2 + ATTEMPT_SLACK_S) as scope:
            try:
                target = await self.guard.resolve(reg.url, self.resolver)
                ts = self.clock.now().wall_ns // 1_000_000_000
                headers = {**request_headers(reg, d, ts), "Host": target.host_header}
            except (UrlRefused, ConfigError) as err:
                self.stats.setdefault(reg.id, EndpointStats()).refused += 1
                return str(err), HARD_FAILURE_WEIGHT, False, None
            ext: Mapping[str, Any] = ({"sni_hostname": target.host}
                                      if target.scheme == "https" else {})
            try:
                async with client.stream("POST", target.pinned_url, content=d.body,
                                         headers=headers, extensions=dict(ext)) as resp:
                    read = 0
                    async for chunk in resp.aiter_raw():
                        read += len(chunk)
                        if read >= self.cfg.max_response_bytes:
                            break
                    status = resp.status_code
                    asked = (resp.headers.get("retry-after") if status in (429, 503)
                             else None)
            except httpx.HTTPError as err:
                return f"{type(err).__name__}: {err}", 1, True, None
            except Exception as err:  # outside httpx's contract (a bug, a header it cannot
                # encode): never the dispatcher's end, which would take the daemon with it;
                # this delivery fails hard and is dead after its attempts, the others go on.
                log.exception("webhook attempt failed unexpectedly",
                              extra={"webhook_id": reg.id, "event_id": d.event_id})
                return f"{type(err).__name__}: {err}", HARD_FAILURE_WEIGHT, False, None
        if scope.cancelled_caught:
            return "timed out", 1, True, None
        if 200 <= status < 300:
            return None, 0, False, None
        if status in (408, 429) or status >= 500:
            asked_s = retry_after_s(asked, self.clock.now().wall_ns / 1e9)
            return (f"HTTP {status}" + (f" (Retry-After: {asked_s:.0f} s)"
                                        if asked_s is not None else ""), 1, True, asked_s)
        if status == 410:
            return "HTTP 410 Gone", self.cfg.dead_after_attempts, False, None
        if 300 <= status < 400:
            return (f"HTTP {status}: redirects are not followed", HARD_FAILURE_WEIGHT, False,
                    None)
        return f"HTTP {status}", HARD_FAILURE_WEIGHT, False, None
