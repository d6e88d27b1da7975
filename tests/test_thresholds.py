"""Rules of both seed formats, units, the index, and the alert state machine."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostagent import thresholds as th
from hostagent.errors import ConfigError
from hostagent.model import Usage

S = 1_000_000_000
T0 = 1_700_000_000 * S


def usage(iid: str = "vm-1", t: int = 0, **kw: Any) -> Usage:
    """A 30 s Usage ending at T0 + t seconds."""
    base: dict[str, Any] = dict(  # noqa: C408 -- keyword form reads like Usage(...)
        instance_id=iid, uuid="u", name="n", incarnation="i", new_incarnation=False,
        period_start_ns=T0 + (t - 30) * S, period_end_ns=T0 + t * S, vcpus=2,
        memory_alloc_bytes=4 << 30, cpu_ns=30 * S, cpu_seconds=30, cpu_percent_avg=50.0,
        memory_bytes=2 << 30, memory_source="balloon", memory_percent=50.0,
        storage_bytes=10 << 30, storage_capacity_bytes=40 << 30, net_egress_bytes=300 << 20,
        net_ingress_bytes=30 << 20, disk_read_bytes=0, disk_write_bytes=0, gpu_count=0,
        gpu_seconds=0, gpu_util_avg=None)
    base.update(kw)
    return Usage(**base)


NESTED = {"id": "disk-big", "resource_type": "Storage",
          "threshold_type": {"Absolute": {"value": 500, "unit": "GB"}}, "action": "Notify",
          "user_id": "user_123456", "notification_channels": ["email", "api_callback"]}
FLAT = {"id": "disk-big", "resource_type": "storage", "threshold_type": "absolute",
        "threshold_value": 500, "units": "GB", "action": "notify", "user_id": "user_123456",
        "notification_channels": ["email", "api_callback"]}


def test_both_formats_parse_to_the_same_rule() -> None:
    a, b = th.parse_rule(NESTED), th.parse_rule(FLAT)
    assert a == b
    assert a.threshold == 500 * 2**30 and a.measure_unit == "bytes"
    assert a.config_dict()["threshold_type"] == {"Absolute": {"value": 500.0, "unit": "GB"}}


def test_seed_003_percentage_rule() -> None:
    r = th.parse_rule({"id": "cpu-high", "resource_type": "Cpu",
                       "threshold_type": {"Percentage": {"value": 80.0}}, "action": "Notify",
                       "user_id": "*", "notification_channels": ["email"]})
    assert (r.kind, r.threshold, r.measure_unit, r.user_id) == ("percent", 80.0, "percent", "*")
    flat = th.parse_rule({"id": "cpu-high", "resource_type": "cpu",
                          "threshold_type": "percentage", "threshold_value": 80,
                          "action": "notify", "user_id": "*", "notification_channels": ["email"]})
    assert flat == r


def test_flat_rule_without_id_gets_a_stable_id() -> None:
    raw = {k: v for k, v in FLAT.items() if k != "id"}
    assert th.parse_rule(raw).id == th.parse_rule(dict(raw)).id
    assert th.parse_rule(raw).id.startswith("rule-")
    assert th.parse_rule({**raw, "threshold_value": 501}).id != th.parse_rule(raw).id


@pytest.mark.parametrize(("patch", "key"), [
    ({"units": "seconds"}, "rules[3].units"),  # seconds for storage
    ({"resource_type": "Disk"}, "rules[3].resource_type"),
    ({"threshold_type": "relative"}, "rules[3].threshold_type"),
    ({"threshold_value": -1}, "rules[3].threshold_value"),
    ({"threshold_value": "500"}, "rules[3].threshold_value"),
    ({"action": "Page"}, "rules[3].action"),
    ({"user_id": ""}, "rules[3].user_id"),
    ({"notification_channels": "email"}, "rules[3].notification_channels"),
    ({"treshold_value": 5}, "rules[3].treshold_value"),
    ({"for_passes": 0}, "rules[3].for_passes"),
])
def test_invalid_rules_name_the_key(patch: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        th.parse_rule({**FLAT, **patch}, source="rules.json", index=3)
    assert e.value.key == key and e.value.file == "rules.json"


def test_unit_mismatches_are_errors() -> None:
    with pytest.raises(ConfigError, match="percent"):
        th.parse_rule({**FLAT, "threshold_type": "percentage", "units": "GB"})
    with pytest.raises(ConfigError, match="bandwidth"):
        th.parse_rule({**FLAT, "resource_type": "NetworkEgress", "threshold_type": "percentage",
                       "units": "%"})
    with pytest.raises(ConfigError):
        th.parse_rule({**NESTED, "resource_type": "Cpu"})  # GB of CPU
    r = th.parse_rule({**FLAT, "resource_type": "network_egress", "units": "Mbps",
                       "threshold_value": 8})
    assert (r.measure_unit, r.threshold) == ("bytes/s", 1e6)


def test_duplicate_ids_rejected() -> None:
    with pytest.raises(ConfigError, match="unique"):
        th.parse_rules([FLAT, NESTED], source="r.json")


def test_measure_per_resource() -> None:
    u = usage(gpu_count=1, gpu_seconds=30, gpu_util_avg=70.0)

    def m(resource: str, kind: str, unit: str) -> float | None:
        r = th.parse_rule({**FLAT, "resource_type": resource, "threshold_type": kind,
                           "units": unit, "threshold_value": 1})
        return th.measure(r, u)

    assert m("cpu", "percentage", "%") == 50.0
    assert m("cpu", "absolute", "seconds") == 30.0
    assert m("cpu", "absolute", "cores") == 1.0
    assert m("memory", "percentage", "%") == 50.0
    assert m("storage", "percentage", "%") == 25.0
    assert m("storage", "absolute", "GB") == 10 * 2**30
    assert m("network_egress", "absolute", "MB") == 300 * 2**20
    assert m("network_ingress", "absolute", "B/s") == 1 * 2**20
    assert m("gpu", "percentage", "%") == 70.0
    r = th.parse_rule({**FLAT, "resource_type": "storage", "threshold_type": "percentage",
                       "units": "%", "threshold_value": 1})
    assert th.measure(r, usage(storage_capacity_bytes=None)) is None
    net = th.parse_rule({**FLAT, "resource_type": "network_egress", "units": "MB"})
    assert th.measure(net, usage(missing={"net:52:54:00:00:00:01": "gone"})) is None


def test_index_selects_only_applicable_rules() -> None:
    rules = th.parse_rules([
        {**FLAT, "id": "inst", "instance_id": "vm-1", "user_id": "*"},
        {**FLAT, "id": "inst-other-user", "instance_id": "vm-1", "user_id": "bob"},
        {**FLAT, "id": "user", "user_id": "alice"},
        {**FLAT, "id": "user-bob", "user_id": "bob"},
        {**FLAT, "id": "all", "user_id": "*"},
        {**FLAT, "id": "other-inst", "instance_id": "vm-2", "user_id": "*"},
    ])
    idx = th.build_index(rules)
    assert {r.id for r in idx.applicable("vm-1", "alice")} == {"inst", "user", "all"}
    assert {r.id for r in idx.applicable("vm-1", None)} == {"inst", "all"}


# --- the state machine ------------------------------------------------------------------------

CPU = th.parse_rule({"id": "cpu", "resource_type": "Cpu", "action": "Alert", "user_id": "*",
                     "threshold_type": {"Percentage": {"value": 80.0}},
                     "notification_channels": []})


def run(values: list[float | None], settings_: th.Settings | None = None,
        rule: th.Rule = CPU, start: dict[str, th.AlertState] | None = None,
        step_s: int = 30) -> tuple[list[tuple[int, str]], dict[str, th.AlertState]]:
    """Feed cpu_percent values pass by pass; return (pass index, transition kind) pairs."""
    idx = th.build_index([rule], settings_ or th.Settings(repeat_interval_s=0))
    states = dict(start or {})
    out: list[tuple[int, str]] = []
    for i, v in enumerate(values):
        u = usage(t=i * step_s, cpu_percent_avg=v)
        ev = th.evaluate(idx, [u], {}, states, u.period_end_ns)
        for fp, b in ev.changes.items():
            if b is None:
                states.pop(fp, None)
            else:
                states[fp] = th.AlertState.from_bytes(b)
        assert states == dict(ev.states)
        out += [(i, t.kind) for t in ev.transitions]
    return out, states


def test_every_transition() -> None:
    got, states = run([10, 75, 85, 85, 77, 70, 50, 90, 10])
    # 75 ≥ 72 (approach) → approaching; 85 → exceeded; 77 ≥ 76 (resolve) stays;
    # 70 < 76 → resolved (to approaching, 70 ≥ 68.4); 50 → resolved to ok; 90 → exceeded.
    assert got == [(1, "approaching"), (2, "exceeded"), (5, "resolved"), (6, "resolved"),
                   (7, "exceeded"), (8, "resolved")]
    assert states == {}


def test_for_passes_needs_consecutive_breaches() -> None:
    rule = dataclasses.replace(CPU, for_passes=3)
    got, _ = run([90, 90, 50, 90, 90, 90], rule=rule)
    assert got == [(0, "approaching"), (2, "resolved"), (3, "approaching"), (5, "exceeded")]


def test_repeat_interval() -> None:
    got, _ = run([90] * 9, th.Settings(repeat_interval_s=90))
    assert got == [(0, "exceeded"), (3, "repeat"), (6, "repeat")]


def test_cooldown_holds_back_and_catches_up() -> None:
    got, states = run([90, 10, 90, 10, 10, 10, 10], th.Settings(cooldown_s=100,
                                                                repeat_interval_s=0))
    # exceeded at 0; the flaps inside 100 s are held back; at pass 4 (120 s) the latest status
    # (ok) is sent with the count of what was held back.
    assert got == [(0, "exceeded"), (4, "resolved")]
    assert states == {}


def test_missing_data_changes_nothing() -> None:
    got, states = run([90, None, None, 10])
    assert got == [(0, "exceeded"), (3, "resolved")]
    got, states = run([None, None])
    assert got == [] and states == {}


def test_state_survives_a_restart() -> None:
    got1, states = run([75, 90])
    assert got1 == [(0, "approaching"), (1, "exceeded")]
    raw = {fp: s.to_bytes() for fp, s in states.items()}
    restored = th.load_states(raw)
    assert restored == states
    # the firing alert is neither re-notified nor forgotten after the restart
    got2, _ = run([90, 90, 10], start=restored)
    assert got2 == [(2, "resolved")]


def test_removed_rule_and_instance_drop_state() -> None:
    _, states = run([90])
    idx = th.build_index([], th.Settings())
    ev = th.evaluate(idx, [], {}, states, T0)
    assert ev.changes == dict.fromkeys(states) and ev.states == {}
    idx = th.build_index([CPU], th.Settings())
    ev = th.evaluate(idx, [], {}, states, T0, removed_instances=["vm-1"])
    assert ev.states == {}


values = st.lists(st.one_of(st.none(), st.floats(0, 200, allow_nan=False)), max_size=40)


@settings(max_examples=300, deadline=None)
@given(values, st.integers(0, 39))
def test_property_missing_data_never_fires_or_resolves(vs: list[float | None], k: int) -> None:
    with_gap = [*vs[:k], None, None, *vs[k:]]
    got, _ = run(with_gap, th.Settings(repeat_interval_s=0))
    kinds_at_none = [kind for i, kind in got if with_gap[i] is None]
    assert kinds_at_none == []
    # and the gap is invisible: the same notifications as without it
    plain, _ = run(vs, th.Settings(repeat_interval_s=0))
    assert [kind for _, kind in got] == [kind for _, kind in plain]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(76.0, 200, allow_nan=False), min_size=1, max_size=30))
def test_property_hysteresis_no_resolve_above_margin(vs: list[float]) -> None:
    # after firing, values ≥ threshold × (1 − 5 %) = 76 never resolve
    got, _ = run([90.0, *vs])
    assert [k for _, k in got] == ["exceeded"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.none(), st.floats(0, 200, allow_nan=False)), max_size=40))
def test_property_notifications_chain(vs: list[float | None]) -> None:
    # each notification starts from what consumers were last told, and its kind matches the move
    idx = th.build_index([CPU], th.Settings(repeat_interval_s=60))
    states: dict[str, th.AlertState] = {}
    told = "ok"
    rank = {"ok": 0, "approaching": 1, "exceeded": 2}
    for i, v in enumerate(vs):
        u = usage(t=i * 30, cpu_percent_avg=v)
        ev = th.evaluate(idx, [u], {}, states, u.period_end_ns)
        states = dict(ev.states)
        for t in ev.transitions:
            assert t.previous == told
            new = t.state.status
            if t.kind == "repeat":
                assert new == told == "exceeded"
            elif t.kind == "resolved":
                assert rank[new] < rank[told]
            else:
                assert t.kind == new and rank[new] > rank[told]
            told = new
    real = [v for v in vs if v is not None]
    if not real or max(real) < 72:
        assert told == "ok" and states == {}


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 5))
def test_property_repeat_every_interval(n: int) -> None:
    got, _ = run([90.0] * (n * 4 + 1), th.Settings(repeat_interval_s=120))
    assert [i for i, k in got if k == "repeat"] == [4 * j for j in range(1, n + 1)]
