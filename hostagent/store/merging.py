"""Pure: consecutive pending `resource_usage` events of one instance merged into one
(hostagent.store.upkeep.merge_pending, near the outbox's size cap).

A merged event covers the union of its parts' periods and keeps every billing total:

- counters are summed: every metric named ``*_seconds``, ``*_ns``, ``*_mb`` or ``*_bytes``
  (``cpu_seconds``, ``cpu_ns``, ``gpu_seconds``, ``network_*_mb``, ``disk_*_mb``, and any such
  key a later schema adds); integers stay integers (exact), floats are summed as floats;
- averages (``*_avg``: ``cpu_percent_avg``, ``gpu_util_avg``) are time-weighted by the parts'
  period lengths, leaving out parts whose value was unknown (named in their ``missing``);
- every other metric is a gauge (``memory_gb``, ``storage_gb``, ``memory_percent`` …): the
  latest part's value wins.

Only parts that tile (each starts where the previous ended) and agree on every identity field
(instance, owner, host, incarnation, version …) are merged. The merged event gets a new
deterministic `event_id` (UUIDv5 of the merged ids, in its own namespace) and lists the ids it
replaces in ``merged_from`` (flattened: merging a merged event lists the original ids).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

# Fixed forever: merged ids must be reproducible across restarts and hosts.
MERGE_NAMESPACE = uuid.UUID("6f1d3c9e-2b7a-5e41-9c0d-8a4e6b2f1d70")
SUM_SUFFIXES = ("_seconds", "_ns", "_mb", "_bytes")
AVG_SUFFIX = "_avg"
# Top-level fields that legitimately differ between consecutive events of one instance.
VARYING = frozenset({"event_id", "timestamp", "metrics", "period", "period_ns", "merged_from",
                     "missing"})


def merged_event_id(source_ids: Sequence[str]) -> str:
    """Deterministic id of the event that replaces `source_ids` (in period order)."""
    return str(uuid.uuid5(MERGE_NAMESPACE, "merge|" + "|".join(source_ids)))


def original_ids(payload: Mapping[str, Any]) -> list[str]:
    """The original event ids a payload stands for: its `merged_from`, else its own id."""
    merged = payload.get("merged_from")
    if isinstance(merged, list) and merged:
        return [str(x) for x in merged]
    return [str(payload.get("event_id"))]


def compatible(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """True when two payloads may be merged: same identity fields and same metric shapes."""
    if a.get("event_type") != "resource_usage" or b.get("event_type") != "resource_usage":
        return False
    keys = (set(a) | set(b)) - VARYING
    if any(a.get(k) != b.get(k) for k in keys):
        return False
    ma, mb = a.get("metrics"), b.get("metrics")
    return isinstance(ma, dict) and isinstance(mb, dict)


def _is_sum(key: str) -> bool:
    return key.endswith(SUM_SUFFIXES)


def _num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def merge_metrics(parts: Sequence[Mapping[str, Any]], durations_ns: Sequence[int],
                  missing: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], set[str]]:
    """Merged metrics and the set of average keys unknown in every part."""
    keys: list[str] = []
    for p in parts:
        keys.extend(k for k in p if k not in keys)
    out: dict[str, Any] = {}
    unknown: set[str] = set()
    latest = parts[-1]
    for key in keys:
        values = [p.get(key) for p in parts]
        if _is_sum(key) and all(v is None or _num(v) for v in values):
            nums = [v for v in values if v is not None]
            out[key] = sum(nums) if nums else None
        elif key.endswith(AVG_SUFFIX) and all(v is None or _num(v) for v in values):
            weighted = [(v, d) for v, d, m in zip(values, durations_ns, missing, strict=True)
                        if v is not None and key not in m and d > 0]
            total_ns = sum(d for _, d in weighted)
            if total_ns:
                out[key] = round(sum(v * d for v, d in weighted) / total_ns, 6)
            else:
                out[key] = latest.get(key)
                unknown.add(key)
        else:
            out[key] = latest.get(key)
    return out, unknown


def merge_payloads(parts: Sequence[Mapping[str, Any]],
                   durations_ns: Sequence[int]) -> dict[str, Any]:
    """One payload standing for `parts` (≥ 2, in period order, compatible and tiling)."""
    if len(parts) < 2:
        raise ValueError("merge needs at least two events")
    first, last = parts[0], parts[-1]
    missing = [p.get("missing") or {} for p in parts]
    metrics, unknown_avgs = merge_metrics([p["metrics"] for p in parts], durations_ns, missing)
    merged_from: list[str] = []
    for p in parts:
        merged_from.extend(original_ids(p))
    out: dict[str, Any] = {k: v for k, v in last.items() if k not in ("missing", "merged_from")}
    out["event_id"] = merged_event_id(merged_from)
    out["metrics"] = metrics
    out["period"] = {"start": first["period"]["start"], "end": last["period"]["end"]}
    if "period_ns" in last and "period_ns" in first:
        out["period_ns"] = {"start": first["period_ns"]["start"], "end": last["period_ns"]["end"]}
    # A gauge is as known as the latest part; an average is unknown only if no part knew it.
    gone = {k for k in metrics if k.endswith(AVG_SUFFIX)} - unknown_avgs
    still = {k: v for k, v in missing[-1].items() if k not in gone}
    for m in missing:
        still.update({k: v for k, v in m.items() if k in unknown_avgs})
    if still:
        out["missing"] = still
    out["merged_from"] = merged_from
    return out
