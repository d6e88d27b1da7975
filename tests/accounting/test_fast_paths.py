"""The per-domain hot paths made faster keep the exact results of the plain forms they replaced.

Each reference below is the code as it was before (perf8): hypothesis checks that the fast form
gives the same value, in the same order, for any input.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from hostagent.accounting import assemble, device_deltas, ledger
from hostagent.accounting.readings import DomainReading
from hostagent.model import Baseline

# Keys made of the parts `missing` keys are made of, so prefixes and colons collide often.
_PARTS = st.sampled_from(["net", "disk", "cpu", "memory", "cgroup", "vda", "rd_bytes",
                          "52:54:00:AA:bb:01", "52:54:00:aa:bb:01", "", ":", "Net", "disk:"])
KEYS = st.lists(_PARTS, min_size=1, max_size=4).map(":".join) | st.text(max_size=12)


def flagged_before(missing: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    net: dict[str, str] = {}
    disk: dict[str, str] = {}
    for key in missing:
        if key.startswith("net:"):
            rest = key[4:]
            mac = rest.lower()
            net[mac] = key if rest == mac else "net:" + mac
        elif key.startswith("disk:") and ":" not in key[5:]:
            disk[key[5:]] = key
    return net, disk


@given(st.lists(KEYS, max_size=8))
def test_flagged_devices_are_found_as_before(keys: list[str]) -> None:
    missing = dict.fromkeys(keys, "why")
    net, disk = device_deltas.flagged(missing)
    net_before, disk_before = flagged_before(missing)
    assert list(net.items()) == list(net_before.items())
    assert list(disk.items()) == list(disk_before.items())


def int_before(stats: Mapping[str, Any], key: str) -> int | None:
    value = stats.get(key)
    return value if type(value) is int else assemble._as_int(value)


VALUES = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, width=32)
          | st.sampled_from(["12", " 7 ", "x", "", "1.5", b"3"]) | st.just([1]))


@given(st.dictionaries(st.sampled_from(["a", "b"]), VALUES), st.sampled_from(["a", "b", "c"]))
def test_int_reads_a_stats_value_as_before(stats: dict[str, Any], key: str) -> None:
    got, before = assemble._int(stats, key), int_before(stats, key)
    assert got == before and type(got) is type(before)


def test_an_infinite_or_nan_stats_value_reads_as_absent() -> None:
    # a float from a broken stats source: that figure is missing, the pass goes on
    for bad in (float("inf"), float("-inf"), float("nan")):
        assert assemble._int({"cpu.time": bad}, "cpu.time") is None


def expired_before(baselines: Mapping[str, Baseline], present: set[str], now_ns: int,
                   retention_ns: int) -> list[str]:
    return [iid for iid, b in baselines.items()
            if iid not in present and now_ns - b.t_wall_ns > retention_ns]


@given(st.dictionaries(st.sampled_from("abcdef"), st.integers(0, 100)),
       st.sets(st.sampled_from("abcdefg")), st.integers(0, 200), st.integers(0, 100))
def test_expired_baselines_are_the_same_in_the_same_order(
        ages: dict[str, int], present: set[str], now_ns: int, retention_ns: int) -> None:
    baselines = {iid: Baseline(iid, "1", t, None) for iid, t in ages.items()}
    present_map = dict.fromkeys(present, 0)
    assert (ledger.expired(baselines, present_map.keys(), now_ns, retention_ns)
            == expired_before(baselines, present, now_ns, retention_ns))


def test_the_field_order_domain_reading_is_built_in() -> None:
    # pass_reads.domain_reading builds it positionally (once per domain and pass).
    assert [f.name for f in fields(DomainReading)] == [
        "info", "instance_id", "t_wall_ns", "stats", "facts", "cgroup", "netlink_nics",
        "netlink_missing", "gpus", "missing"]
