"""Usage + owner -> the `resource_usage` v1.0 event of seeds 003/004, as compact UTF-8 JSON.

The seed fields come first and keep the seed's types; documented extras follow (the JSON Schema
in `hostagent/schemas/resource_usage.v1.json` lists them all). Building an event is a pure
function of its inputs: the same Usage renders the same bytes and the same `event_id`, so a
resent event is recognisably the same.

Time: `timestamp` is the period end. Both ends are rendered from the exact ns values with the
same function, so consecutive events tile exactly after rendering: unix seconds are floored;
RFC 3339 is UTC with a fractional part only when non-zero (exact to the ns, e.g.
"2023-07-15T14:30:00.25Z"). `period_ns` carries the exact ns for consumers that tile.

Units are binary: `_gb` = GiB (2**30 bytes), `_mb` = MiB (2**20 bytes). Byte-derived values are
not rounded: bytes / 2**k is exact in a double below 2**53, so `mb * 2**20` gives the exact
bytes back. Percentages are rounded to 6 decimals. Integer billing counters stay integers.
"""

from __future__ import annotations

import functools
import hashlib
import re
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import orjson

from hostagent.model import OutEvent, Owner, Usage

EVENT_TYPE = "resource_usage"
SCHEMA_VERSION = "1.0"
# Fixed forever: changing it changes every event_id and breaks de-duplication downstream.
EVENT_ID_NAMESPACE = uuid.UUID("107614cf-6d93-40f2-aaf5-813edec233e3")

TimeFormat = Literal["unix", "rfc3339"]

NS_PER_S = 1_000_000_000
GIB = 1 << 30
MIB = 1 << 20
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_RFC3339 = re.compile(r"^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?Z$")


# SHA-1 state after the namespace bytes: each event_id copies it and hashes only its name
# (never updated itself, so copies may be taken from any thread).
_NAMESPACE_SHA1 = hashlib.sha1(EVENT_ID_NAMESPACE.bytes, usedforsecurity=False)


def event_id(host: str, instance_id: str, incarnation: str, period_start_ns: int) -> str:
    """Deterministic UUIDv5 of (host, instance, incarnation, period start) as a canonical string.

    Exactly `str(uuid.uuid5(EVENT_ID_NAMESPACE, name))` (RFC 4122 §4.3: SHA-1 of namespace and
    name, version 5, variant 10), without building a UUID object: it runs once per event."""
    sha1 = _NAMESPACE_SHA1.copy()
    sha1.update(f"{host}|{instance_id}|{incarnation}|{period_start_ns}".encode())
    h = sha1.hexdigest()
    # version nibble 5; variant bits 10 on the high bits of byte 8
    return f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:32]}"


_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}


def render_time(t_ns: int, time_format: TimeFormat) -> int | str:
    """Wall time in ns as the event shows it: floored unix seconds or exact RFC 3339 UTC."""
    if time_format == "unix":
        return t_ns // NS_PER_S
    return _rfc3339(t_ns)


@functools.lru_cache(maxsize=4096)
def _rfc3339(t_ns: int) -> str:
    # Cached: every event of a pass ends at the pass's time, and starts at the previous one's.
    seconds, frac_ns = divmod(t_ns, NS_PER_S)
    text = (_EPOCH + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S")
    if frac_ns:
        text += "." + f"{frac_ns:09d}".rstrip("0")
    return text + "Z"


def parse_time(value: int | str) -> int:
    """Inverse of `render_time` to ns (unix seconds give whole seconds); ValueError if malformed."""
    if isinstance(value, int):
        return value * NS_PER_S
    m = _RFC3339.match(value)
    if m is None:
        raise ValueError(f"not an RFC 3339 UTC time: {value!r}")
    whole = datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    frac_ns = int((m.group(2) or "0").ljust(9, "0"))
    return (whole - _EPOCH) // timedelta(seconds=1) * NS_PER_S + frac_ns


def build_usage_event(u: Usage, owner: Owner, host: str, *, time_format: TimeFormat) -> OutEvent:
    """The outbox-ready event for one Usage, billed to `owner`, produced on `host`.

    The seed's f64 fields are not optional: an unknown value is sent as 0.0 and named in
    `missing`, so a consumer can tell "zero" from "unknown". One dict literal and one
    `orjson.dumps` per event (it runs once per domain and pass): keys in this exact order."""
    start_ns, end_ns = u.period_start_ns, u.period_end_ns
    iid, incarnation = u.instance_id, u.incarnation
    eid = event_id(host, iid, incarnation, start_ns)
    had = u.missing
    missing = dict(had) if had else {}
    cpu_percent = u.cpu_percent_avg
    if cpu_percent is not None and cpu_percent - cpu_percent == 0.0:  # finite
        cpu_percent = round(cpu_percent, 6)
    else:
        missing["cpu_percent_avg"] = had.get("cpu", "no CPU rate for the period")
        cpu_percent = 0.0
    memory_bytes = u.memory_bytes
    if memory_bytes is None:
        no_memory = had.get("memory", "no memory reading")
        missing["memory_gb"] = no_memory
        memory_gb = 0.0
    else:
        memory_gb = memory_bytes / GIB
    memory_percent = u.memory_percent
    if memory_percent is not None and memory_percent - memory_percent == 0.0:
        memory_percent = round(memory_percent, 6)
    else:
        missing["memory_percent"] = (no_memory if memory_bytes is None
                                     else "memory allocation unknown")
        memory_percent = 0.0
    storage = u.storage_bytes
    if storage is None:
        missing["storage_gb"] = "no disk allocation known"
        storage_gb = 0.0
    else:
        storage_gb = storage / GIB

    metrics: dict[str, Any] = {
        "cpu_seconds": u.cpu_seconds,
        "cpu_percent_avg": cpu_percent,
        "memory_gb": memory_gb,
        "memory_percent": memory_percent,
        "storage_gb": storage_gb,
        "network_egress_mb": u.net_egress_bytes / MIB,
        "network_ingress_mb": u.net_ingress_bytes / MIB,
        "gpu_seconds": u.gpu_seconds,
        "cpu_ns": u.cpu_ns,
        "disk_read_mb": u.disk_read_bytes / MIB,
        "disk_write_mb": u.disk_write_bytes / MIB,
        "gpu_count": u.gpu_count,
    }
    if u.storage_capacity_bytes is not None:
        metrics["storage_capacity_gb"] = u.storage_capacity_bytes / GIB
    if u.memory_source is not None:
        metrics["memory_source"] = u.memory_source
    gpu_util = u.gpu_util_avg
    if gpu_util is not None and gpu_util - gpu_util == 0.0:
        metrics["gpu_util_avg"] = round(gpu_util, 6)
    p = u.pressure
    if p is not None:
        # PSI some-avg10 percentages that are known (mostly 0.0, which rounds to itself).
        pressure: dict[str, float] = {}
        v = p.cpu_some_avg10
        if v is not None and v - v == 0.0:
            pressure["cpu"] = v if v == 0.0 else _round_psi(v)
        v = p.memory_some_avg10
        if v is not None and v - v == 0.0:
            pressure["memory"] = v if v == 0.0 else _round_psi(v)
        v = p.io_some_avg10
        if v is not None and v - v == 0.0:
            pressure["io"] = v if v == 0.0 else _round_psi(v)
        if pressure:
            metrics["pressure"] = pressure

    if time_format == "unix":
        start: int | str = start_ns // NS_PER_S
        end: int | str = end_ns // NS_PER_S
    else:
        start, end = _rfc3339(start_ns), _rfc3339(end_ns)
    event: dict[str, Any] = {
        "event_type": EVENT_TYPE,
        "version": SCHEMA_VERSION,
        "timestamp": end,
        "instance_id": iid,
        "user_id": owner.user_id,
        "org_id": owner.org_id,
        "metrics": metrics,
        "period": {"start": start, "end": end},
        "event_id": eid,
        "host": host,
        "incarnation": incarnation,
        "period_ns": {"start": start_ns, "end": end_ns},
        "owner_source": owner.source,
    }
    if missing:
        event["missing"] = missing
    return OutEvent(eid, EVENT_TYPE, iid, start_ns, end_ns, exact(orjson.dumps(event)))


@functools.lru_cache(maxsize=4096, typed=True)
def _round_psi(value: float) -> float:
    """`round(value, 6)`, cached: the kernel gives PSI averages to 0.01 %, so a host's events
    carry few distinct values (a cache hit costs a third of a `round`)."""
    return round(value, 6)


def exact(payload: bytes) -> bytes:
    """`payload` in a block of its own size.

    orjson returns its whole write buffer (4 KiB for a 100-byte document, 8–16 KiB for a usage
    event: it reserves worst-case escaping room and never shrinks). An event lives until the
    pass commits, so at 5,000 domains that was ~40 MB of heap per pass for ~5 MB of JSON; the
    copy also makes building an event cheaper (the big buffer is freed and reused at once)."""
    return memoryview(payload).tobytes()


def semantic_errors(event: Mapping[str, Any]) -> list[str]:
    """Cross-field rules JSON Schema cannot state; [] when the (schema-valid) event obeys them."""
    errors: list[str] = []
    period = event["period"]
    try:
        start_ns, end_ns = parse_time(period["start"]), parse_time(period["end"])
    except ValueError as err:
        return [str(err)]
    if end_ns < start_ns:
        errors.append("period.end is before period.start")
    if event["timestamp"] != period["end"]:
        errors.append("timestamp is not period.end")
    exact = event.get("period_ns")
    if exact is not None:
        fmt: TimeFormat = "unix" if isinstance(period["start"], int) else "rfc3339"
        if exact["end"] <= exact["start"]:
            errors.append("period_ns is empty or reversed")
        if render_time(exact["start"], fmt) != period["start"]:
            errors.append("period.start does not render period_ns.start")
        if render_time(exact["end"], fmt) != period["end"]:
            errors.append("period.end does not render period_ns.end")
        host, incarnation = event.get("host"), event.get("incarnation")
        merged = "merged_from" in event  # a merged event's id derives from the ids it replaces
        if (isinstance(host, str) and isinstance(incarnation, str) and "event_id" in event
                and not merged):
            expected = event_id(host, event["instance_id"], incarnation, exact["start"])
            if event["event_id"] != expected:
                errors.append("event_id does not match host/instance/incarnation/period start")
    return errors
