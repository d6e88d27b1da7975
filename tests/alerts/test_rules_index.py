"""Rules of both seed formats, units, what a rule measures, and the rule index.

The helpers here (`usage`, `NESTED`, `FLAT`, `CPU`) are shared by the other threshold and alert
tests; the state machine's tests are in test_thresholds_state.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from hostagent.alerts import index as ti
from hostagent.alerts import rules as tr
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

CPU = tr.parse_rule({"id": "cpu", "resource_type": "Cpu", "action": "Alert", "user_id": "*",
                     "threshold_type": {"Percentage": {"value": 80.0}},
                     "notification_channels": []})


def test_both_formats_parse_to_the_same_rule() -> None:
    a, b = tr.parse_rule(NESTED), tr.parse_rule(FLAT)
    assert a == b
    assert a.threshold == 500 * 2**30 and a.measure_unit == "bytes"
    assert a.config_dict()["threshold_type"] == {"Absolute": {"value": 500.0, "unit": "GB"}}


def test_seed_003_percentage_rule() -> None:
    r = tr.parse_rule({"id": "cpu-high", "resource_type": "Cpu",
                       "threshold_type": {"Percentage": {"value": 80.0}}, "action": "Notify",
                       "user_id": "*", "notification_channels": ["email"]})
    assert (r.kind, r.threshold, r.measure_unit, r.user_id) == ("percent", 80.0, "percent", "*")
    flat = tr.parse_rule({"id": "cpu-high", "resource_type": "cpu",
                          "threshold_type": "percentage", "threshold_value": 80,
                          "action": "notify", "user_id": "*", "notification_channels": ["email"]})
    assert flat == r


def test_flat_rule_without_id_gets_a_stable_id() -> None:
    raw = {k: v for k, v in FLAT.items() if k != "id"}
    assert tr.parse_rule(raw).id == tr.parse_rule(dict(raw)).id
    assert tr.parse_rule(raw).id.startswith("rule-")
    assert tr.parse_rule({**raw, "threshold_value": 501}).id != tr.parse_rule(raw).id


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
        tr.parse_rule({**FLAT, **patch}, source="rules.json", index=3)
    assert e.value.key == key and e.value.file == "rules.json"


def test_unit_mismatches_are_errors() -> None:
    with pytest.raises(ConfigError, match="percent"):
        tr.parse_rule({**FLAT, "threshold_type": "percentage", "units": "GB"})
    with pytest.raises(ConfigError, match="bandwidth"):
        tr.parse_rule({**FLAT, "resource_type": "NetworkEgress", "threshold_type": "percentage",
                       "units": "%"})
    with pytest.raises(ConfigError):
        tr.parse_rule({**NESTED, "resource_type": "Cpu"})  # GB of CPU
    r = tr.parse_rule({**FLAT, "resource_type": "network_egress", "units": "Mbps",
                       "threshold_value": 8})
    assert (r.measure_unit, r.threshold) == ("bytes/s", 1e6)


def test_duplicate_ids_rejected() -> None:
    with pytest.raises(ConfigError, match="unique"):
        tr.parse_rules([FLAT, NESTED], source="r.json")


def test_measure_per_resource() -> None:
    u = usage(gpu_count=1, gpu_seconds=30, gpu_util_avg=70.0)

    def m(resource: str, kind: str, unit: str) -> float | None:
        r = tr.parse_rule({**FLAT, "resource_type": resource, "threshold_type": kind,
                           "units": unit, "threshold_value": 1})
        return ti.measure(r, u)

    assert m("cpu", "percentage", "%") == 50.0
    assert m("cpu", "absolute", "seconds") == 30.0
    assert m("cpu", "absolute", "cores") == 1.0
    assert m("memory", "percentage", "%") == 50.0
    assert m("storage", "percentage", "%") == 25.0
    assert m("storage", "absolute", "GB") == 10 * 2**30
    assert m("network_egress", "absolute", "MB") == 300 * 2**20
    assert m("network_ingress", "absolute", "B/s") == 1 * 2**20
    assert m("gpu", "percentage", "%") == 70.0
    r = tr.parse_rule({**FLAT, "resource_type": "storage", "threshold_type": "percentage",
                       "units": "%", "threshold_value": 1})
    assert ti.measure(r, usage(storage_capacity_bytes=None)) is None
    net = tr.parse_rule({**FLAT, "resource_type": "network_egress", "units": "MB"})
    assert ti.measure(net, usage(missing={"net:52:54:00:00:00:01": "gone"})) is None


def test_index_selects_only_applicable_rules() -> None:
    rules = tr.parse_rules([
        {**FLAT, "id": "inst", "instance_id": "vm-1", "user_id": "*"},
        {**FLAT, "id": "inst-other-user", "instance_id": "vm-1", "user_id": "bob"},
        {**FLAT, "id": "user", "user_id": "alice"},
        {**FLAT, "id": "user-bob", "user_id": "bob"},
        {**FLAT, "id": "all", "user_id": "*"},
        {**FLAT, "id": "other-inst", "instance_id": "vm-2", "user_id": "*"},
    ])
    idx = ti.build_index(rules)
    assert {r.id for r in idx.applicable("vm-1", "alice")} == {"inst", "user", "all"}
    assert {r.id for r in idx.applicable("vm-1", None)} == {"inst", "all"}
