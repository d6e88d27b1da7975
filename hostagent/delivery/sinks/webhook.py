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

Outcomes: 2xx delivered. Transport errors, timeouts, 408, 429 and 5xx are transient: they
count against the endpoint's circuit breaker and the row waits ``initial_backoff_s ×
multiplier^(attempts−1)`` (capped at ``round_backoff_max_s``, ± jitter). 3xx (redirects are
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
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio

from hostagent.alerts.routing import UNCLAIMED
from hostagent.clock import Clock
from hostagent.config.sinks import WebhookSinkConfig
from hostagent.delivery.breaker import Breaker
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
            self.fanned_out += await trio.to_thread.run_sync(self.store.fan_out, event)
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
    reg: Registration
    breaker: Breaker
    wake: trio.Event = field(default_factory=trio.Event)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    stats: EndpointStats = field(default_factory=EndpointStats)


class WebhookDispatcher:
    """One delivery task per registration, with its own breaker; `wake()` after a fan-out."""

    def __init__(self, cfg: WebhookSinkConfig, store: WebhookStore, clock: Clock, *,
                 resolver: Resolver = system_resolver, rng: random.Random | None = None,
                 transport: httpx.AsyncBaseTransport | None = None,
                 registrations_check_s: float = 5.0) -> None:
        self.cfg = cfg
        self.store = store
        self.clock = clock
        self.guard = Guard.from_config(cfg)
        self.resolver = resolver
        self._rng = rng or random.Random()
        self._transport = transport
        self._check_s = registrations_check_s
        self._endpoints: dict[str, _Endpoint] = {}
        self._changed = trio.Event()
        self.stats: dict[str, EndpointStats] = {}

    def wake(self) -> None:
        """New rows were fanned out (or registrations changed): look now."""
        self._changed.set()
        for ep in self._endpoints.values():
            ep.wake.set()

    async def _db(self, fn: Any, *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Deliver until cancelled; picks up new and deleted registrations."""
        async with httpx.AsyncClient(follow_redirects=False, trust_env=False,
                                     timeout=self.cfg.timeout_s, transport=self._transport,
                                     ) as client, trio.open_nursery() as nursery:
            task_status.started()
            last_prune_s = -math.inf
            while True:
                try:
                    regs = {r.id: r for r in await self._db(self.store.registrations)}
                except StateError as err:
                    log.error("webhook registrations unreadable", extra={"error": str(err)})
                    regs = {wid: ep.reg for wid, ep in self._endpoints.items()}
                for wid in set(self._endpoints) - set(regs):
                    self._endpoints.pop(wid).scope.cancel()
                for wid, reg in regs.items():
                    if wid not in self._endpoints or self._endpoints[wid].reg != reg:
                        if wid in self._endpoints:
                            self._endpoints[wid].scope.cancel()
                        ep = _Endpoint(reg, Breaker(self.cfg.breaker, self.clock))
                        ep.stats = self.stats.setdefault(wid, EndpointStats())
                        self._endpoints[wid] = ep
                        nursery.start_soon(self._endpoint_loop, client, ep)
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

    async def _endpoint_loop(self, client: httpx.AsyncClient, ep: _Endpoint) -> None:
        limiter = trio.CapacityLimiter(self.cfg.endpoint_concurrency)
        with ep.scope:
            while True:
                if not ep.breaker.would_allow():
                    await self._wait(ep, ep.breaker.seconds_until_trial())
                    continue
                now = self.clock.now().wall_ns
                try:
                    batch = await self._db(self.store.due, ep.reg.id,
                                           self.cfg.endpoint_concurrency * 4, now)
                    if not batch:
                        due = await self._db(self.store.next_due_ns, ep.reg.id)
                        await self._wait(ep, None if due is None else max(due - now, 0) / 1e9)
                        continue
                except StateError as err:
                    log.error("webhook deliveries unreadable", extra={"error": str(err)})
                    await self._wait(ep, 1.0)
                    continue
                if self.cfg.endpoint_concurrency == 1:
                    # one at a time, oldest first: trio may start a nursery's tasks in any
                    # order, so only a plain loop keeps the promised per-endpoint order
                    for d in batch:
                        await self._deliver(client, ep, d, limiter)
                    continue
                async with trio.open_nursery() as nursery:
                    for d in batch:
                        nursery.start_soon(self._deliver, client, ep, d, limiter)

    async def _wait(self, ep: _Endpoint, timeout_s: float | None) -> None:
        with trio.move_on_after(math.inf if timeout_s is None else timeout_s):
            await ep.wake.wait()
        ep.wake = trio.Event()

    def _later_ns(self, attempts: int) -> int:
        r = self.cfg.retry
        base = min(r.round_backoff_max_s, r.initial_backoff_s * r.multiplier ** max(attempts - 1,
                                                                                  0))
        wait_s = max(base * (1 + self._rng.uniform(-r.jitter, r.jitter)), 0.0)
        return self.clock.now().wall_ns + int(wait_s * 1e9)

    async def _deliver(self, client: httpx.AsyncClient, ep: _Endpoint, d: Delivery,
                       limiter: trio.CapacityLimiter) -> None:
        async with limiter:
            if not ep.breaker.allow():
                return  # stays pending; the loop waits for the breaker
            error, weight, transient = await self._post(client, ep.reg, d)
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
                d, error, self._later_ns(d.attempts + 1), weight=weight,
                dead_after=self.cfg.dead_after_attempts))
        except StateError as err:
            log.error("cannot record webhook delivery", extra={"error": str(err)})
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
                    ) -> tuple[str | None, int, bool]:
        """One attempt → (error or None, attempts it counts for, transient?)."""
        with trio.move_on_after(self.cfg.timeout_s * 2 + 1) as scope:
            try:
                target = await self.guard.resolve(reg.url, self.resolver)
                ts = self.clock.now().wall_ns // 1_000_000_000
                headers = {**request_headers(reg, d, ts), "Host": target.host_header}
            except (UrlRefused, ConfigError) as err:
                self.stats.setdefault(reg.id, EndpointStats()).refused += 1
                return str(err), HARD_FAILURE_WEIGHT, False
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
            except httpx.HTTPError as err:
                return f"{type(err).__name__}: {err}", 1, True
        if scope.cancelled_caught:
            return "timed out", 1, True
        if 200 <= status < 300:
            return None, 0, False
        if status in (408, 429) or status >= 500:
            return f"HTTP {status}", 1, True
        if status == 410:
            return "HTTP 410 Gone", self.cfg.dead_after_attempts, False
        if 300 <= status < 400:
            return f"HTTP {status}: redirects are not followed", HARD_FAILURE_WEIGHT, False
        return f"HTTP {status}", HARD_FAILURE_WEIGHT, False
