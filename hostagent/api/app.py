"""The ASGI app (starlette): routing, the request guard, problem details, health, /metrics.

Every route goes through `Api.guard`: wait while a collector pass runs (`PassGate`; not
`/health`) → per-address rate limit → credentials → per-principal rate limit → scope.
Handlers only read `ApiView.snapshot` (an immutable snapshot the daemon swaps after each
pass), so a request never blocks or races the collector.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from hostagent import __version__
from hostagent.api import admin_routes, metrics_export, usage_routes
from hostagent.api.auth import Authenticator, Principal
from hostagent.api.openapi import MAX_PARAM_CHARS, PATH_PARAM_PATTERN, openapi_document
from hostagent.api.pass_gate import PassGate
from hostagent.api.problems import Problem, json_response, problem_response
from hostagent.api.ratelimit import RateLimiter
from hostagent.api.seams import RuleStore, WebhookRegistry
from hostagent.api.view import ApiView, iso
from hostagent.clock import Clock, SystemClock
from hostagent.config.schema import ApiConfig

log = logging.getLogger(__name__)
Handler = Callable[[Request, Principal], Awaitable[Response]]
ANONYMOUS = Principal("anonymous", frozenset(), "anonymous")


class Api:
    """Shared state of the routes: config, view, auth, limiters, seams, counters."""

    def __init__(self, cfg: ApiConfig, view: ApiView, auth: Authenticator, *,
                 clock: Clock | None = None, webhooks: WebhookRegistry | None = None,
                 rules: RuleStore | None = None, gate: PassGate | None = None) -> None:
        self.cfg = cfg
        self.gate = gate
        self.view = view
        self.auth = auth
        self.clock = clock or SystemClock()
        self.webhooks = webhooks
        self.rules = rules
        self.by_address = RateLimiter(self.clock, cfg.rate_per_address_s, cfg.burst_per_address)
        self.by_principal = RateLimiter(self.clock, cfg.rate_per_principal_s,
                                        cfg.burst_per_principal)
        self.requests: Counter[tuple[str, str]] = Counter()
        self.started_monotonic_ns = self.clock.now().monotonic_ns  # uptime_seconds in health

    def _limit(self, limiter: RateLimiter, key: str, what: str) -> None:
        wait_s = limiter.take(key)
        if wait_s > 0:
            retry = max(1, int(wait_s + 0.999))
            raise Problem(429, f"rate limit per {what} exceeded; retry in {retry} s",
                          kind="rate-limited", headers={"Retry-After": str(retry)})

    def guard(self, route: str, handler: Handler, need: str | None = "read",
              open_if: Callable[[ApiConfig], bool] = lambda _c: False
              ) -> Callable[[Request], Awaitable[Response]]:
        """Wrap a handler with rate limits, authentication, scope check and counting."""

        async def endpoint(request: Request) -> Response:
            if self.gate is None or route == "/health":  # liveness answers at once
                return await guarded(request)
            async with self.gate.request(self.cfg.yield_to_pass_max_s):
                return await guarded(request)

        async def guarded(request: Request) -> Response:
            status = 500
            try:
                if route != "/health":  # liveness costs what a 429 would: always answered
                    addr = request.client.host if request.client else "unknown"
                    self._limit(self.by_address, addr, "client address")
                principal = ANONYMOUS
                if need is not None and not open_if(self.cfg):
                    principal = self.auth.authenticate(request.headers.get("authorization"),
                                                       request.headers.get("x-api-key"))
                    self._limit(self.by_principal, principal.subject, "principal")
                    _check_scope(principal, need)
                _check_path_params(request)
                resp = await handler(request, principal)
                status = resp.status_code
                return resp
            except Problem as p:
                status = p.status
                return problem_response(p, request.url.path)
            except Exception as err:  # a defect: one 500, logged and counted once, here
                log.exception("api route failed",
                              extra={"path": request.url.path, "error": repr(err)})
                return problem_response(Problem(500, "internal error"), request.url.path)
            finally:
                self.requests[(route, f"{status // 100}xx")] += 1

        return endpoint

    # --- unauthenticated and operational routes -------------------------------------------

    async def health(self, _r: Request, _p: Principal) -> Response:
        """Liveness: the process answers."""
        return PlainTextResponse("healthy")

    async def openapi(self, _r: Request, _p: Principal) -> Response:
        """The OpenAPI document."""
        return json_response(openapi_document(self.cfg.max_page_size))

    async def prometheus(self, _r: Request, _p: Principal) -> Response:
        """Prometheus text exposition."""
        return Response(metrics_export.exposition(self.view, self.requests, self.gate),
                        media_type=metrics_export.CONTENT_TYPE)

    async def health_status(self, _r: Request, _p: Principal) -> Response:
        """Components and whether any is past its bound (503 when degraded)."""
        now_ns = self.clock.now().wall_ns
        pi = self.view.snapshot.pass_info
        reasons: list[str] = []
        age_s = None if pi.last_ok_wall_ns is None else max(now_ns - pi.last_ok_wall_ns, 0) / 1e9
        if age_s is None or age_s > self.cfg.max_pass_age_s:
            reasons.append("no committed pass within api.max_pass_age_s")
        components: dict[str, Any] = {"collector": {
            "last_pass_started_at": iso(pi.started_wall_ns),
            "last_pass_duration_s": pi.duration_s, "last_pass_committed": pi.committed,
            "last_pass_error": pi.error, "last_committed_pass_age_s": age_s,
            "last_committed_pass_duration_s": pi.last_ok_duration_s,
            "instances": len(self.view.snapshot.instances),
            "passes": pi.passes, "failed_passes": pi.failed_passes}}
        if self.view.libvirt_health is not None:
            lv = dict(self.view.libvirt_health())
            components["libvirt"] = lv
            if lv.get("state") != "connected":
                reasons.append("libvirt not connected")
        if self.view.delivery_health is not None:
            dh = dict(self.view.delivery_health())
            components["delivery"] = dh
            for name, s in dh.get("sinks", {}).items():
                if s.get("breaker") != "closed":
                    reasons.append(f"sink {name}: breaker {s.get('breaker')}")
                oldest = s.get("oldest_pending_age_s")
                if oldest is not None and oldest > self.cfg.max_outbox_age_s:
                    reasons.append(f"sink {name}: oldest pending event older than "
                                   "api.max_outbox_age_s")
            if dh.get("store_near_cap"):
                reasons.append("outbox near its size cap")
        if self.view.owners_health is not None:
            oh = dict(self.view.owners_health())
            components["owners"] = oh
            if oh.get("state") not in ("fresh", "disabled"):
                reasons.append(f"owner cache {oh.get('state')}")
        if self.view.rules_health is not None:
            rh = dict(self.view.rules_health())
            components["thresholds"] = rh
            if rh.get("last_error"):
                reasons.append("threshold rules: the last load was refused (previous set kept)")
        # Upstream's shape (form-vm-metrics): "ok", uptime_seconds, version; plus ours.
        status = "degraded" if reasons else "ok"
        uptime_s = (self.clock.now().monotonic_ns - self.started_monotonic_ns) / 1e9
        return json_response({"status": status, "uptime_seconds": round(uptime_s, 3),
                              "version": __version__, "checked_at": iso(now_ns),
                              "reasons": reasons, "components": components},
                             503 if reasons else 200)


_PATH_PARAM = re.compile(PATH_PARAM_PATTERN)

def _check_path_params(request: Request) -> None:
    """Every path parameter is 1 to MAX_PARAM_CHARS characters without a control character,
    as the OpenAPI document says (`PATH_PARAM_PATTERN`): `%00` or `%0a` in a user id used to
    be answered 200 with it echoed back."""
    for name, value in request.path_params.items():
        if not 1 <= len(value) <= MAX_PARAM_CHARS or not _PATH_PARAM.fullmatch(value):
            raise Problem(400, f"`{name}` must be 1 to {MAX_PARAM_CHARS} characters, none of "
                               "them a control character")


def _check_scope(p: Principal, need: str) -> None:
    if need not in p.scopes:
        raise Problem(403, f"this route needs the `{need}` scope", kind="insufficient-scope")


def build_app(api: Api) -> Starlette:
    """The starlette application with every route of the API."""
    usage = usage_routes.UsageRoutes(api)
    admin = admin_routes.AdminRoutes(api)
    g = api.guard
    routes = [
        Route("/health", g("/health", api.health, need=None)),
        Route("/openapi.json", g("/openapi.json", api.openapi, need=None)),
        Route("/metrics", g("/metrics", api.prometheus, need="admin",
                            open_if=lambda c: c.metrics_unauthenticated)),
        Route("/get", g("/get", usage.legacy_get,
                        open_if=lambda c: c.legacy_get_unauthenticated)),
        Route("/api/v1/health/status", g("/api/v1/health/status", api.health_status)),
        Route("/api/v1/metrics", g("/api/v1/metrics", usage.metrics_list)),
        Route("/api/v1/metrics/instances/{instance_id}",
              g("/api/v1/metrics/instances/{id}", usage.metrics_instance)),
        Route("/api/v1/usage/instances/{instance_id}/current",
              g("/api/v1/usage/instances/{id}/current", usage.instance_current)),
        Route("/api/v1/usage/users/{user_id}/current",
              g("/api/v1/usage/users/{id}/current", usage.user_current)),
        Route("/api/v1/webhooks", g("/api/v1/webhooks", admin.webhooks, need="admin"),
              methods=["GET", "POST"]),
        Route("/api/v1/webhooks/{webhook_id}",
              g("/api/v1/webhooks/{id}", admin.webhook_delete, need="admin"),
              methods=["DELETE"]),
        Route("/api/v1/thresholds", g("/api/v1/thresholds", admin.thresholds, need="admin"),
              methods=["GET", "POST"]),
        Route("/api/v1/thresholds/{rule_id}",
              g("/api/v1/thresholds/{id}", admin.threshold_one, need="admin"),
              methods=["GET", "PUT", "DELETE"]),
    ]

    async def http_error(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        headers = dict(exc.headers or {}) if isinstance(exc, HTTPException) else {}
        detail = exc.detail if isinstance(exc, HTTPException) else "internal error"
        if status >= 500:
            log.error("api route failed", extra={"path": request.url.path, "error": repr(exc)})
        elif api.gate is not None:
            # The router's own answers (404 no such path, 405 no such method) wait for a
            # running pass and count against the address's bucket like every other route's:
            # a flood of them got neither (300 at once, 300 answers, found by an API sweep).
            async with api.gate.request(api.cfg.yield_to_pass_max_s):
                return _router_answer(request, status, str(detail), headers)
        else:
            return _router_answer(request, status, str(detail), headers)
        api.requests[("other", f"{status // 100}xx")] += 1
        return problem_response(Problem(status, str(detail), headers=headers), request.url.path)

    def _router_answer(request: Request, status: int, detail: str,
                       headers: dict[str, str]) -> Response:
        addr = request.client.host if request.client else "unknown"
        try:
            api._limit(api.by_address, addr, "client address")
            problem = Problem(status, detail, headers=headers)
        except Problem as limited:  # 429
            problem = limited
        api.requests[("other", f"{problem.status // 100}xx")] += 1
        return problem_response(problem, request.url.path)

    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error,
                                                       Exception: http_error})
    # A trailing slash is another (unknown) path, 404: starlette's redirect would build its
    # Location from the client's Host header.
    app.router.redirect_slashes = False
    return app
