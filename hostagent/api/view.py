"""Read-only snapshot the API serves: per-instance latest usage + owner, and health inputs.

The daemon calls `ApiView.update(report)` after each pass (from `Daemon.on_pass`); the update
builds a new immutable `Snapshot` and swaps one reference, so a request never sees half a pass
and never touches collector state. Everything here runs on the trio thread: no locks needed.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

from hostagent.model import Owner, Sample, Usage
from hostagent.owners.accounts import normalize_address
from hostagent.owners.resolver import UNASSIGNED_SOURCE

GIB = 1024**3
MIB = 1024**2
RESOURCES = ("cpu", "memory", "storage", "network", "disk", "gpu")
CACHE_MAX = 50_000


class PassLike(Protocol):
    """The fields of collector.PassReport the view reads."""

    started_wall_ns: int
    duration_s: float
    domains: int
    events: int
    committed: bool
    error: str | None
    usages: tuple[Usage, ...]
    samples: tuple[Sample, ...]
    owners: Mapping[str, Owner]
    read_errors_total: Mapping[str, int]

    @property
    def unattributed_cpu_s(self) -> float | None:
        """The VMs' parent cgroup's CPU no event billed (None: no v2 parent)."""
        ...


@dataclass(frozen=True, slots=True)
class InstanceView:
    """The latest we know about one running instance."""

    instance_id: str
    uuid: str
    name: str
    owner: Owner | None
    authorized: Mapping[str, str]
    usage: Usage | None
    sample: Sample | None
    updated_wall_ns: int

    @property
    def owner_id(self) -> str | None:
        """The normalised owner; None when unknown (an `unassigned` owner is nobody's)."""
        if self.owner is None or self.owner.source == UNASSIGNED_SOURCE:
            return None
        return normalize_address(self.owner.user_id)

    def visible_to(self, principal: str) -> bool:
        """Owner or any authorized address (any role) may read this instance."""
        p = normalize_address(principal)
        return self.owner_id == p or any(normalize_address(a) == p for a in self.authorized)


@dataclass(frozen=True, slots=True)
class PassInfo:
    """Timing and outcome of the last pass, for health."""

    started_wall_ns: int | None = None
    duration_s: float | None = None
    committed: bool = False
    error: str | None = None
    domains: int = 0
    events: int = 0
    last_ok_wall_ns: int | None = None
    last_ok_duration_s: float | None = None
    passes: int = 0
    failed_passes: int = 0
    # Per-domain read errors since start, by read step (collector.Collector.note_errors).
    read_errors_total: Mapping[str, int] = field(default_factory=dict)
    # hostagent_unattributed_cpu_seconds_total (accounting/unattributed.py); None: no figure.
    unattributed_cpu_s: float | None = None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One consistent picture: instances (sorted by id) and the user → instances index."""

    instances: Mapping[str, InstanceView] = field(default_factory=dict)
    by_user: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    pass_info: PassInfo = field(default_factory=PassInfo)
    # Rendered JSON parts, valid for this snapshot's lifetime (it is immutable); bounded.
    cache: dict[object, Any] = field(default_factory=dict, compare=False, repr=False)

    def memo(self, key: object, make: Callable[[], Any]) -> Any:
        """`make()` once per key for this snapshot (at most CACHE_MAX entries are kept)."""
        hit = self.cache.get(key)
        if hit is None:
            hit = make()
            if len(self.cache) < CACHE_MAX:
                self.cache[key] = hit
        return hit

    def for_user(self, user_id: str) -> list[InstanceView]:
        """Instances the user owns or is authorized for, sorted by instance id."""
        return [self.instances[i] for i in self.by_user.get(normalize_address(user_id), ())]


def build_snapshot(
    report: PassLike,
    previous: Snapshot,
    authorized: Callable[[str], Mapping[str, str]],
) -> Snapshot:
    """Pure: a new snapshot from a pass report (a failed pass keeps the previous instances)."""
    prev = previous.pass_info
    if not report.committed:
        info = PassInfo(report.started_wall_ns, report.duration_s, False, report.error,
                        report.domains, report.events, prev.last_ok_wall_ns,
                        prev.last_ok_duration_s, prev.passes + 1, prev.failed_passes + 1,
                        dict(report.read_errors_total), prev.unattributed_cpu_s)
        return Snapshot(previous.instances, previous.by_user, info)
    usages = {u.instance_id: u for u in report.usages}
    instances: dict[str, InstanceView] = {}
    for s in sorted(report.samples, key=lambda s: s.instance_id):
        old = previous.instances.get(s.instance_id)
        usage = usages.get(s.instance_id)
        if usage is None and old is not None and old.usage is not None \
                and old.usage.incarnation == s.incarnation:
            usage = old.usage  # no new period this pass: the last one is still "current"
        instances[s.instance_id] = InstanceView(
            instance_id=s.instance_id, uuid=s.uuid, name=s.name,
            owner=report.owners.get(s.instance_id),
            authorized=MappingProxyType(dict(authorized(s.instance_id))),
            usage=usage, sample=s, updated_wall_ns=s.t_wall_ns)
    by_user: dict[str, list[str]] = {}
    for iid, iv in instances.items():
        who = {normalize_address(a) for a in iv.authorized}
        if iv.owner_id is not None:
            who.add(iv.owner_id)
        for w in who:
            by_user.setdefault(w, []).append(iid)
    info = PassInfo(report.started_wall_ns, report.duration_s, True, None, report.domains,
                    report.events, report.started_wall_ns, report.duration_s, prev.passes + 1,
                    prev.failed_passes, dict(report.read_errors_total),
                    report.unattributed_cpu_s)
    return Snapshot(MappingProxyType(instances),
                    MappingProxyType({k: tuple(v) for k, v in by_user.items()}), info)


class ApiView:
    """Holds the current snapshot and the callables health and /metrics read on demand."""

    def __init__(
        self,
        *,
        authorized: Callable[[str], Mapping[str, str]] = lambda _iid: {},
        delivery_health: Callable[[], Mapping[str, Any]] | None = None,
        owners_health: Callable[[], Mapping[str, Any]] | None = None,
        libvirt_health: Callable[[], Mapping[str, Any]] | None = None,
        emission_metrics: Callable[[], Any] | None = None,
        rules_health: Callable[[], Mapping[str, Any]] | None = None,
        pass_settings: Callable[[], Mapping[str, float]] | None = None,
        tail_health: Callable[[], Mapping[str, Any]] | None = None,
    ) -> None:
        self.snapshot = Snapshot()
        self.authorized = authorized
        self.delivery_health = delivery_health
        self.owners_health = owners_health
        self.libvirt_health = libvirt_health
        self.emission_metrics = emission_metrics
        self.rules_health = rules_health  # hostagent.alerts.rules_source.RulesSource.health
        self.pass_settings = pass_settings  # {"interval_s", "timeout_s"}: for alert rules
        self.tail_health = tail_health  # hostagent.tailing.TailTasks.health

    def update(self, report: PassLike) -> None:
        """Daemon.on_pass callback: swap in the snapshot of this pass."""
        self.snapshot = build_snapshot(report, self.snapshot, self.authorized)


# --- rendering (pure) ------------------------------------------------------------------------


def iso(ns: int | None) -> str | None:
    """RFC 3339 UTC (Z) of a wall time in ns."""
    if ns is None:
        return None
    return dt.datetime.fromtimestamp(ns / 1e9, tz=dt.UTC).isoformat().replace("+00:00", "Z")


def _r(x: float | None, nd: int = 6) -> float | None:
    return None if x is None else round(x, nd)


def usage_metrics(u: Usage) -> dict[str, dict[str, Any]]:
    """Usage grouped by resource, in the event schema's units plus raw bytes."""
    return {
        "cpu": {"cpu_seconds": u.cpu_seconds, "cpu_percent_avg": _r(u.cpu_percent_avg),
                "vcpus": u.vcpus},
        "memory": {"memory_gb": _r(None if u.memory_bytes is None else u.memory_bytes / GIB),
                   "memory_percent": _r(u.memory_percent), "memory_bytes": u.memory_bytes,
                   "memory_alloc_bytes": u.memory_alloc_bytes},
        "storage": {"storage_gb": _r(None if u.storage_bytes is None else u.storage_bytes / GIB),
                    "storage_bytes": u.storage_bytes,
                    "storage_capacity_bytes": u.storage_capacity_bytes},
        "network": {"network_egress_mb": _r(u.net_egress_bytes / MIB),
                    "network_ingress_mb": _r(u.net_ingress_bytes / MIB),
                    "egress_bytes": u.net_egress_bytes, "ingress_bytes": u.net_ingress_bytes},
        "disk": {"read_bytes": u.disk_read_bytes, "write_bytes": u.disk_write_bytes},
        "gpu": {"gpu_seconds": u.gpu_seconds, "gpu_count": u.gpu_count,
                "gpu_util_avg": _r(u.gpu_util_avg)},
    }


def render_instance(iv: InstanceView, resources: Iterable[str] = RESOURCES) -> dict[str, Any]:
    """One instance as JSON: identity, owner, period and the chosen resources."""
    u = iv.usage
    metrics: dict[str, Any] | None = None
    if u is not None:
        grouped = usage_metrics(u)
        metrics = {k: v for k in resources for k, v in [(k, grouped[k])]}
    return {
        "instance_id": iv.instance_id,
        "name": iv.name,
        "uuid": iv.uuid,
        "user_id": iv.owner.user_id if iv.owner else None,
        "org_id": iv.owner.org_id if iv.owner else None,
        "updated_at": iso(iv.updated_wall_ns),
        "period": None if u is None else {"start": iso(u.period_start_ns),
                                          "end": iso(u.period_end_ns),
                                          "duration_s": (u.period_end_ns - u.period_start_ns)
                                          / 1e9},
        "metrics": metrics,
        "missing": dict(u.missing) if u is not None else
        (dict(iv.sample.missing) if iv.sample else {}),
    }


def sum_usage(items: Iterable[InstanceView]) -> dict[str, Any]:
    """Totals over instances (sums of counters and sizes; averages are not summed)."""
    t = {"instances": 0, "reporting": 0, "vcpus": 0, "cpu_seconds": 0, "memory_bytes": 0,
         "memory_alloc_bytes": 0, "storage_bytes": 0, "egress_bytes": 0, "ingress_bytes": 0,
         "disk_read_bytes": 0, "disk_write_bytes": 0, "gpu_count": 0, "gpu_seconds": 0}
    for iv in items:
        t["instances"] += 1
        u = iv.usage
        if u is None:
            continue
        t["reporting"] += 1
        t["vcpus"] += u.vcpus
        t["cpu_seconds"] += u.cpu_seconds
        t["memory_bytes"] += u.memory_bytes or 0
        t["memory_alloc_bytes"] += u.memory_alloc_bytes
        t["storage_bytes"] += u.storage_bytes or 0
        t["egress_bytes"] += u.net_egress_bytes
        t["ingress_bytes"] += u.net_ingress_bytes
        t["disk_read_bytes"] += u.disk_read_bytes
        t["disk_write_bytes"] += u.disk_write_bytes
        t["gpu_count"] += u.gpu_count
        t["gpu_seconds"] += u.gpu_seconds
    out: dict[str, Any] = dict(t)
    out["memory_gb"] = round(t["memory_bytes"] / GIB, 6)
    out["storage_gb"] = round(t["storage_bytes"] / GIB, 6)
    out["network_egress_mb"] = round(t["egress_bytes"] / MIB, 6)
    out["network_ingress_mb"] = round(t["ingress_bytes"] / MIB, 6)
    return out
