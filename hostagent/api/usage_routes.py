"""Read routes: latest readings, current usage per instance and per user, legacy `/get`.

Ownership: a non-admin sees only instances whose owner or authorized addresses include its
subject. An instance it may not see answers exactly like one that does not exist (404), and a
user id other than its own answers 403 whatever that user has: nothing leaks either way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response

from hostagent.api import seed_shapes
from hostagent.api.auth import Principal
from hostagent.api.openapi import (
    ITEM_FIELDS,
    MAX_LIST_ITEMS,
    MAX_PARAM_CHARS,
    csv_pattern,
)
from hostagent.api.problems import Problem, json_response
from hostagent.api.view import RESOURCES, InstanceView, render_instance, sum_usage
from hostagent.owners.accounts import normalize_address

if TYPE_CHECKING:
    from hostagent.api.app import Api

_CSV = re.compile(csv_pattern(None))
_INT = re.compile(r"-?[0-9]{1,12}")


@dataclass(frozen=True, slots=True)
class Query:
    """Parsed filter, projection and page parameters."""

    user_id: str | None
    instance_ids: frozenset[str] | None
    resources: tuple[str, ...]
    fields: tuple[str, ...] | None
    limit: int
    offset: int


def _csv(request: Request, name: str) -> list[str] | None:
    raw = request.query_params.get(name)
    if raw is None:
        return None
    if len(raw) > MAX_PARAM_CHARS:
        raise Problem(400, f"`{name}` is longer than {MAX_PARAM_CHARS} characters")
    if not _CSV.fullmatch(raw):
        raise Problem(400, f"`{name}` must list 1 to {MAX_LIST_ITEMS} comma-separated values "
                           "(no empty values, no blanks around them)")
    return raw.split(",")


def _int(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not _INT.fullmatch(raw):
        raise Problem(400, f"`{name}` must be a decimal integer")
    v = int(raw)
    if not lo <= v <= hi:
        raise Problem(400, f"`{name}` must be between {lo} and {hi}")
    return v


def parse_query(request: Request, page_size: int, max_page_size: int) -> Query:
    """Validate `user_id`, `instance_id`, `resource`, `fields`, `limit`, `offset`."""
    res = _csv(request, "resource")
    if res is not None and (bad := [r for r in res if r not in RESOURCES]):
        raise Problem(400, f"unknown resource {bad[0]!r}; one of {', '.join(RESOURCES)}")
    fields = _csv(request, "fields")
    if fields is not None and (bad := [f for f in fields if f not in ITEM_FIELDS]):
        raise Problem(400, f"unknown field {bad[0]!r}; one of {', '.join(ITEM_FIELDS)}")
    iids = _csv(request, "instance_id")
    users = _csv(request, "user_id")
    if users is not None and len(users) != 1:
        raise Problem(400, "`user_id` takes one value")
    return Query(
        user_id=users[0] if users else None,
        instance_ids=frozenset(iids) if iids is not None else None,
        resources=tuple(r for r in RESOURCES if res is None or r in res),
        fields=tuple(fields) if fields is not None else None,
        limit=_int(request, "limit", min(page_size, max_page_size), 1, max_page_size),
        offset=_int(request, "offset", 0, 0, 10**9),
    )


def readings(iv: InstanceView) -> dict[str, Any] | None:
    """The raw cumulative readings of the last sample."""
    s = iv.sample
    if s is None:
        return None
    return {
        "incarnation": s.incarnation, "vcpus": s.vcpus, "memory_alloc_bytes": s.memory_alloc_bytes,
        "cpu_ns": s.cpu_ns,
        "memory_used_bytes": s.memory.used_bytes if s.memory else None,
        "memory_source": s.memory.source if s.memory else None,
        "nics": [{"mac": n.mac, "guest_rx_bytes": n.guest_rx_bytes,
                  "guest_tx_bytes": n.guest_tx_bytes} for n in s.nics],
        "disks": [{"target": d.target, "rd_bytes": d.rd_bytes, "wr_bytes": d.wr_bytes,
                   "allocation_bytes": d.allocation_bytes, "capacity_bytes": d.capacity_bytes}
                  for d in s.disks],
        "gpus": [{"address": g.address, "model": g.model, "util_percent": g.util_percent,
                  "fb_used_bytes": g.fb_used_bytes} for g in s.gpus],
    }


class UsageRoutes:
    """Handlers of the read routes."""

    def __init__(self, api: Api) -> None:
        self.api = api

    def _visible(self, p: Principal, q: Query) -> list[InstanceView]:
        snap = self.api.view.snapshot
        if q.user_id is not None:
            pool = snap.for_user(q.user_id)
        elif q.instance_ids is not None:
            pool = [snap.instances[i] for i in sorted(q.instance_ids) if i in snap.instances]
        else:
            pool = list(snap.instances.values())
        if q.instance_ids is not None:
            pool = [iv for iv in pool if iv.instance_id in q.instance_ids]
        if not p.is_admin:
            pool = [iv for iv in pool if iv.visible_to(p.subject)]
        return pool

    def _one(self, p: Principal, instance_id: str) -> InstanceView:
        iv = self.api.view.snapshot.instances.get(instance_id)
        if iv is None or not (p.is_admin or iv.visible_to(p.subject)):
            raise Problem(404, "no such instance on this host", kind="instance-not-found")
        return iv

    def _item(self, iv: InstanceView, q: Query, with_readings: bool) -> dict[str, Any]:
        def make() -> dict[str, Any]:
            out = render_instance(iv, q.resources)
            if with_readings:
                out["readings"] = readings(iv)
            return out

        # Rendered once per snapshot; never mutated afterwards (projection copies).
        item: dict[str, Any] = self.api.view.snapshot.memo(
            ("item", iv.instance_id, q.resources, with_readings), make)
        if q.fields is not None:
            item = {k: item.get(k) for k in q.fields}
        return item

    def _page(self, items: list[InstanceView], q: Query, with_readings: bool) -> dict[str, Any]:
        page = items[q.offset:q.offset + q.limit]
        nxt = q.offset + q.limit if q.offset + q.limit < len(items) else None
        return {"items": [self._item(iv, q, with_readings) for iv in page],
                "total": len(items), "limit": q.limit, "offset": q.offset, "next_offset": nxt}

    def _q(self, request: Request) -> Query:
        return parse_query(request, self.api.cfg.page_size, self.api.cfg.max_page_size)

    async def metrics_list(self, request: Request, p: Principal) -> Response:
        """GET /api/v1/metrics: latest readings of every visible instance, filtered and paged."""
        q = self._q(request)
        return json_response(self._page(self._visible(p, q), q, with_readings=True))

    async def legacy_get(self, request: Request, p: Principal) -> Response:
        """GET /get: upstream's single SystemMetrics (hostagent.api.seed_shapes) of the instance
        named by `instance_id`, or of the only instance the caller sees (400 when several:
        the list is /api/v1/metrics)."""
        if p.kind == "anonymous":  # configured open: the operator accepted host-wide exposure
            p = Principal("anonymous", frozenset({"read", "admin"}), "anonymous")
        q = self._q(request)
        if q.instance_ids is not None and len(q.instance_ids) != 1:
            raise Problem(400, "`instance_id` takes one value on /get")
        visible = self._visible(p, q)
        if not visible:
            raise Problem(404, "no such instance on this host", kind="instance-not-found")
        if len(visible) > 1:
            raise Problem(400, f"{len(visible)} instances are visible: name one with "
                               "?instance_id= (the list is /api/v1/metrics)",
                          kind="instance-ambiguous")
        return json_response(seed_shapes.system_metrics(visible[0]))

    async def metrics_instance(self, request: Request, p: Principal) -> Response:
        """GET /api/v1/metrics/instances/{id}: latest readings of one instance."""
        q = self._q(request)
        return json_response(self._item(self._one(p, request.path_params["instance_id"]), q,
                                        with_readings=True))

    async def instance_current(self, request: Request, p: Principal) -> Response:
        """GET /api/v1/usage/instances/{id}/current: usage of the last period."""
        q = self._q(request)
        return json_response(self._item(self._one(p, request.path_params["instance_id"]), q,
                                        with_readings=False))

    async def user_current(self, request: Request, p: Principal) -> Response:
        """GET /api/v1/usage/users/{id}/current: totals over the user's instances + the list."""
        user_id = request.path_params["user_id"]
        if not p.is_admin and normalize_address(user_id) != normalize_address(p.subject):
            raise Problem(403, "a non-admin may read only its own usage", kind="not-your-user")
        q = self._q(request)
        items = self.api.view.snapshot.for_user(user_id)
        if q.instance_ids is not None:
            items = [iv for iv in items if iv.instance_id in q.instance_ids]
        body = self._page(items, q, with_readings=False)
        snap = self.api.view.snapshot
        totals = snap.memo(("totals", normalize_address(user_id), q.instance_ids),
                           lambda: sum_usage(items))
        return json_response({"user_id": user_id, "totals": totals,
                              "instances": body.pop("items"), **body})
