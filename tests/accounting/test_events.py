"""UsageEvent v1.0: schema validity, deterministic ids, exact tiling after rendering, golden."""

from __future__ import annotations

import itertools
import uuid
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator, ValidationError  # type: ignore[import-untyped]

from hostagent.accounting.events import (
    EVENT_ID_NAMESPACE,
    build_usage_event,
    event_id,
    parse_time,
    render_time,
    semantic_errors,
)
from hostagent.event_schema import load_schema
from hostagent.model import Owner, Pressure, Usage

S = 1_000_000_000
MAX_NS = 2**63 - 1  # int64 ns (year 2262): what period_ns and i64 consumers can hold
SEED_ORDER = [
    "event_type",
    "version",
    "timestamp",
    "instance_id",
    "user_id",
    "org_id",
    "metrics",
    "period",
]
SEED_METRICS = [
    "cpu_seconds",
    "cpu_percent_avg",
    "memory_gb",
    "memory_percent",
    "storage_gb",
    "network_egress_mb",
    "network_ingress_mb",
    "gpu_seconds",
]
VALIDATOR = Draft202012Validator(load_schema(), format_checker=Draft202012Validator.FORMAT_CHECKER)
OWNER = Owner("user_123456", "org_789012", "account-service")


def make_usage(**kw: Any) -> Usage:
    fields: dict[str, Any] = {
        "instance_id": "instance-abc123",
        "uuid": "6f1c1b8e-0000-4000-8000-000000000001",
        "name": "vm1",
        "incarnation": "boot-1",
        "new_incarnation": False,
        "period_start_ns": 1_626_350_400 * S,
        "period_end_ns": 1_626_350_430 * S,
        "vcpus": 8,
        "memory_alloc_bytes": 8 * 2**30,
        "cpu_ns": 30 * S + 123,
        "cpu_seconds": 30,
        "cpu_percent_avg": 12.5,
        "memory_bytes": 4 * 2**30 + 2**28,
        "memory_source": "balloon",
        "memory_percent": 53.125,
        "storage_bytes": 25 * 2**30 + 3 * 2**28,
        "storage_capacity_bytes": 40 * 2**30,
        "net_egress_bytes": 15 * 2**20 + 2**18,
        "net_ingress_bytes": 8 * 2**20 + 2**19,
        "disk_read_bytes": 2**20,
        "disk_write_bytes": 3 * 2**20,
        "gpu_count": 0,
        "gpu_seconds": 0,
        "gpu_util_avg": None,
    }
    fields.update(kw)
    return Usage(**fields)


def build(u: Usage, fmt: Any = "unix", owner: Owner = OWNER, host: str = "hv-01") -> dict[str, Any]:
    out = build_usage_event(u, owner, host, time_format=fmt)
    doc: dict[str, Any] = orjson.loads(out.payload)
    return doc


# --- golden: the seed 003 shape -------------------------------------------------------------------


def test_golden_event_matches_seed_003_shape() -> None:
    out = build_usage_event(make_usage(), OWNER, "hv-01", time_format="unix")
    eid = "0d7c5fee-326e-57ef-8f81-e76079cfc28f"
    expected = {
        "event_type": "resource_usage",
        "version": "1.0",
        "timestamp": 1626350430,
        "instance_id": "instance-abc123",
        "user_id": "user_123456",
        "org_id": "org_789012",
        "metrics": {
            "cpu_seconds": 30,
            "cpu_percent_avg": 12.5,
            "memory_gb": 4.25,
            "memory_percent": 53.125,
            "storage_gb": 25.75,
            "network_egress_mb": 15.25,
            "network_ingress_mb": 8.5,
            "gpu_seconds": 0,
            "cpu_ns": 30_000_000_123,
            "disk_read_mb": 1.0,
            "disk_write_mb": 3.0,
            "gpu_count": 0,
            "storage_capacity_gb": 40.0,
            "memory_source": "balloon",
        },
        "period": {"start": 1626350400, "end": 1626350430},
        "event_id": eid,
        "host": "hv-01",
        "incarnation": "boot-1",
        "period_ns": {"start": 1626350400 * S, "end": 1626350430 * S},
        "owner_source": "account-service",
    }
    assert out.payload == orjson.dumps(expected)  # byte-exact, key order included
    assert list(orjson.loads(out.payload))[:8] == SEED_ORDER
    assert (out.event_id, out.kind, out.instance_id) == (eid, "resource_usage", "instance-abc123")
    assert (out.period_start_ns, out.period_end_ns) == (1626350400 * S, 1626350430 * S)
    assert b" " not in out.payload  # compact


def test_rfc3339_golden_matches_seed_004_times() -> None:
    doc = build(make_usage(period_start_ns=1689431370 * S, period_end_ns=1689431400 * S), "rfc3339")
    assert doc["timestamp"] == "2023-07-15T14:30:00Z"
    assert doc["period"] == {"start": "2023-07-15T14:29:30Z", "end": "2023-07-15T14:30:00Z"}


def test_seed_examples_validate() -> None:
    metrics = {
        "cpu_seconds": 30,
        "cpu_percent_avg": 12.5,
        "memory_gb": 4.2,
        "memory_percent": 52.5,
        "storage_gb": 25.7,
        "network_egress_mb": 15.2,
        "network_ingress_mb": 8.7,
        "gpu_seconds": 0,
    }
    seed_003 = {
        "event_type": "resource_usage",
        "version": "1.0",
        "timestamp": 1626350430,
        "instance_id": "instance-abc123",
        "user_id": "user_123456",
        "org_id": "org_789012",
        "metrics": metrics,
        "period": {"start": 1626350400, "end": 1626350430},
    }
    seed_004 = seed_003 | {
        "timestamp": "2023-07-15T14:30:00Z",
        "period": {"start": "2023-07-15T14:29:30Z", "end": "2023-07-15T14:30:00Z"},
    }
    for doc in (seed_003, seed_004):
        VALIDATOR.validate(doc)
        assert semantic_errors(doc) == []


# --- time rendering -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("t_ns", "unix", "rfc"),
    [
        (0, 0, "1970-01-01T00:00:00Z"),
        (1689431400 * S + 250_000_000, 1689431400, "2023-07-15T14:30:00.25Z"),
        (1689431400 * S + 1, 1689431400, "2023-07-15T14:30:00.000000001Z"),
        (1689431400 * S + S - 1, 1689431400, "2023-07-15T14:30:00.999999999Z"),
        (MAX_NS, MAX_NS // S, "2262-04-11T23:47:16.854775807Z"),
        (253_402_300_799 * S, 253_402_300_799, "9999-12-31T23:59:59Z"),
    ],
)
def test_render_time(t_ns: int, unix: int, rfc: str) -> None:
    assert render_time(t_ns, "unix") == unix
    assert render_time(t_ns, "rfc3339") == rfc
    assert parse_time(rfc) == t_ns
    assert parse_time(unix) == unix * S


def test_parse_time_rejects_other_shapes() -> None:
    for bad in ("2023-07-15T14:30:00+00:00", "2023-07-15 14:30:00Z", "2023-07-15T14:30:00.Z"):
        with pytest.raises(ValueError, match="RFC 3339"):
            parse_time(bad)


@settings(max_examples=150, deadline=None)
@given(
    st.integers(0, MAX_NS // 2),
    st.lists(st.integers(1, 10**12), min_size=1, max_size=20),
    st.sampled_from(["unix", "rfc3339"]),
)
def test_periods_tile_exactly_after_rendering(t0: int, lengths: list[int], fmt: Any) -> None:
    bounds = list(itertools.accumulate(lengths, initial=t0))
    docs = [
        build(make_usage(period_start_ns=a, period_end_ns=b), fmt)
        for a, b in itertools.pairwise(bounds)
    ]
    for prev, nxt in itertools.pairwise(docs):
        assert nxt["period"]["start"] == prev["period"]["end"]
        assert nxt["period_ns"]["start"] == prev["period_ns"]["end"]
    for doc, (a, b) in zip(docs, itertools.pairwise(bounds), strict=True):
        assert doc["timestamp"] == doc["period"]["end"]
        if fmt == "rfc3339":  # exact to the ns
            assert (parse_time(doc["period"]["start"]), parse_time(doc["period"]["end"])) == (a, b)
        else:  # floored seconds
            assert (doc["period"]["start"], doc["period"]["end"]) == (a // S, b // S)


# --- event_id -------------------------------------------------------------------------------------


def test_event_id_is_deterministic_uuid5_and_sensitive_to_every_part() -> None:
    parts = ("hv-01", "instance-abc123", "boot-1", 1626350400 * S)
    eid = event_id(*parts)
    assert eid == "0d7c5fee-326e-57ef-8f81-e76079cfc28f"  # pinned: the namespace never changes
    assert eid == str(
        uuid.uuid5(EVENT_ID_NAMESPACE, "hv-01|instance-abc123|boot-1|" + str(parts[3]))
    )
    assert uuid.UUID(eid).version == 5
    changed = [
        event_id("hv-02", *parts[1:]),
        event_id(parts[0], "instance-abc124", *parts[2:]),
        event_id(*parts[:2], "boot-2", parts[3]),
        event_id(*parts[:3], parts[3] + 1),
    ]
    assert len({eid, *changed}) == 5


@given(st.text(), st.text(), st.text(), st.integers(min_value=0, max_value=2**63))
def test_event_id_is_exactly_the_standard_uuid5(host: str, instance: str, incarnation: str,
                                                start_ns: int) -> None:
    # the hand-rolled form (no UUID object) must give the library's bytes for every input
    assume_encodable = f"{host}|{instance}|{incarnation}|{start_ns}"
    try:
        assume_encodable.encode()
    except UnicodeEncodeError:  # lone surrogates: uuid5 refuses them too
        return
    assert event_id(host, instance, incarnation, start_ns) == str(
        uuid.uuid5(EVENT_ID_NAMESPACE, assume_encodable))


def test_event_id_ignores_everything_but_its_key() -> None:
    a = build_usage_event(make_usage(), OWNER, "hv-01", time_format="unix")
    b = build_usage_event(
        make_usage(cpu_ns=1, period_end_ns=1626350460 * S),
        Owner("someone-else", None, "metadata"),
        "hv-01",
        time_format="rfc3339",
    )
    assert a.event_id == b.event_id
    assert a.payload == build_usage_event(make_usage(), OWNER, "hv-01", time_format="unix").payload


# --- missing and unknown values -------------------------------------------------------------------


def test_unknown_seed_numbers_are_zero_and_named_in_missing() -> None:
    u = make_usage(
        cpu_percent_avg=None,
        memory_bytes=None,
        memory_source=None,
        memory_percent=None,
        storage_bytes=None,
        storage_capacity_bytes=None,
        missing={"memory": "balloon driver absent", "cpu": "cgroup unreadable"},
    )
    doc = build(u)
    VALIDATOR.validate(doc)
    m = doc["metrics"]
    assert (m["memory_gb"], m["memory_percent"], m["storage_gb"], m["cpu_percent_avg"]) == (
        0.0,
        0.0,
        0.0,
        0.0,
    )
    assert doc["missing"] == {
        "memory": "balloon driver absent",
        "cpu": "cgroup unreadable",
        "cpu_percent_avg": "cgroup unreadable",
        "memory_gb": "balloon driver absent",
        "memory_percent": "balloon driver absent",
        "storage_gb": "no disk allocation known",
    }
    assert "memory_source" not in m
    assert "storage_capacity_gb" not in m


def test_optional_extras_are_omitted_when_unknown_never_zero() -> None:
    doc = build(make_usage(gpu_count=2, gpu_seconds=60, gpu_util_avg=None, pressure=None))
    assert "gpu_util_avg" not in doc["metrics"]
    assert "pressure" not in doc["metrics"]
    assert "missing" not in doc
    u = make_usage(gpu_count=2, gpu_util_avg=0.0, pressure=Pressure(None, 2.5, float("nan")))
    doc = build(u)
    assert doc["metrics"]["gpu_util_avg"] == 0.0  # a measured zero stays
    assert doc["metrics"]["pressure"] == {"memory": 2.5}


def test_org_id_is_null_without_an_org() -> None:
    doc = build(make_usage(), owner=Owner("user_1", None, "account-service"))
    assert doc["org_id"] is None
    VALIDATOR.validate(doc)


# --- the schema is strict -------------------------------------------------------------------------


def _broken(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    out = orjson.loads(orjson.dumps(doc))
    *parents, leaf = path.split(".")
    node = out
    for p in parents:
        node = node[p]
    if value is KeyError:
        del node[leaf]
    else:
        node[leaf] = value
    return out  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("metrics.cpu_seconds", -1),
        ("metrics.cpu_seconds", 1.5),
        ("metrics.gpu_seconds", "0"),
        ("metrics.memory_gb", -0.5),
        ("metrics.memory_gb", KeyError),
        ("metrics.surprise", 1),
        ("metrics.memory_source", "swap"),
        ("metrics.gpu_util_avg", 101),
        ("surprise", 1),
        ("version", "1.1"),
        ("event_type", "usage"),
        ("org_id", KeyError),
        ("user_id", ""),
        ("period.start", "2021-07-15T12:00:00Z"),  # mixed formats
        ("timestamp", "2021-07-15T12:00:30.500Z"),  # trailing zero in the fraction
        ("event_id", "not-a-uuid"),
        ("period_ns.start", -1),
        ("period_ns.end", 2**63),
        ("missing", {}),
    ],
)
def test_schema_rejects(path: str, value: Any) -> None:
    good = build(make_usage(gpu_count=1, gpu_util_avg=50.0))
    VALIDATOR.validate(good)
    with pytest.raises(ValidationError):
        VALIDATOR.validate(_broken(good, path, value))


def test_schema_documents_every_field() -> None:
    schema = load_schema()
    for name, prop in {**schema["properties"], **schema["$defs"]["metrics"]["properties"]}.items():
        assert prop.get("description"), name
    load_schema()["properties"].clear()  # each call is a fresh dict
    assert load_schema()["properties"]


def test_semantic_errors_catch_what_the_schema_cannot() -> None:
    good = build(make_usage())
    assert semantic_errors(good) == []
    assert semantic_errors(_broken(good, "period.start", 1626350431)) == [
        "period.end is before period.start",
        "period.start does not render period_ns.start",
    ]
    assert semantic_errors(_broken(good, "timestamp", 1)) == ["timestamp is not period.end"]
    assert semantic_errors(_broken(good, "host", "hv-02")) == [
        "event_id does not match host/instance/incarnation/period start"
    ]


# --- many random Usages, both formats -------------------------------------------------------------

ids = st.text(min_size=1, max_size=40)
maybe_pct = st.none() | st.floats(0, 400, allow_nan=False)
maybe_bytes = st.none() | st.integers(0, 2**52)
pct100 = st.none() | st.floats(0, 100)


@st.composite
def usages(draw: st.DrawFn) -> Usage:
    start = draw(st.integers(0, MAX_NS - 10**13))
    memory = draw(maybe_bytes)
    return make_usage(
        instance_id=draw(ids),
        incarnation=draw(ids),
        period_start_ns=start,
        period_end_ns=start + draw(st.integers(1, 10**13)),
        cpu_ns=draw(st.integers(0, 10**15)),
        cpu_seconds=draw(st.integers(0, 10**6)),
        cpu_percent_avg=draw(maybe_pct),
        memory_bytes=memory,
        memory_source=None
        if memory is None
        else draw(st.sampled_from(["balloon", "cgroup", "rss"])),
        memory_percent=draw(maybe_pct),
        storage_bytes=draw(maybe_bytes),
        storage_capacity_bytes=draw(maybe_bytes),
        net_egress_bytes=draw(st.integers(0, 2**52)),
        net_ingress_bytes=draw(st.integers(0, 2**52)),
        disk_read_bytes=draw(st.integers(0, 2**52)),
        disk_write_bytes=draw(st.integers(0, 2**52)),
        gpu_count=draw(st.integers(0, 8)),
        gpu_seconds=draw(st.integers(0, 10**7)),
        gpu_util_avg=draw(st.none() | st.floats(0, 100)),
        pressure=draw(st.none() | st.builds(Pressure, pct100, pct100, pct100)),
        missing=draw(st.dictionaries(ids.map("net:".__add__), st.text(max_size=20), max_size=3)),
    )


@settings(max_examples=300, deadline=None)
@given(
    usages(),
    st.builds(Owner, ids, st.none() | ids, ids),
    ids,
    st.sampled_from(["unix", "rfc3339"]),
)
def test_every_built_event_is_valid(u: Usage, owner: Owner, host: str, fmt: Any) -> None:
    out = build_usage_event(u, owner, host, time_format=fmt)
    doc = orjson.loads(out.payload)
    VALIDATOR.validate(doc)
    assert semantic_errors(doc) == []
    assert list(doc)[:8] == SEED_ORDER
    assert list(doc["metrics"])[:8] == SEED_METRICS
    m = doc["metrics"]
    # Integer billing counters stay exact integers; byte-derived values give the bytes back.
    assert (m["cpu_seconds"], m["gpu_seconds"], m["cpu_ns"]) == (
        u.cpu_seconds,
        u.gpu_seconds,
        u.cpu_ns,
    )
    assert m["network_egress_mb"] * 2**20 == u.net_egress_bytes
    assert m["network_ingress_mb"] * 2**20 == u.net_ingress_bytes
    assert m["disk_write_mb"] * 2**20 == u.disk_write_bytes
    if u.memory_bytes is not None:
        assert m["memory_gb"] * 2**30 == u.memory_bytes
    for name, value in [("memory_gb", u.memory_bytes), ("cpu_percent_avg", u.cpu_percent_avg)]:
        assert (value is None) == (name in doc.get("missing", {}))
    assert ("gpu_util_avg" in m) == (u.gpu_util_avg is not None)
    assert doc["period_ns"] == {"start": u.period_start_ns, "end": u.period_end_ns}
    assert (
        out.event_id
        == doc["event_id"]
        == event_id(host, u.instance_id, u.incarnation, u.period_start_ns)
    )
