"""Byte-for-byte: what a varied accounting history sends and persists never changes.

golden/pass_history.jsonl was recorded before the accounting step was made faster (issue 16);
every event payload, event_id, baseline `to_dict()` and sample summary must match it exactly.
Re-recorded once since, when baselines began to record their CPU counter: the only change was
the `"cpu_source":"libvirt"` key in the baselines of that history (its domains have no VM
cgroup found, so their CPU is libvirt's as a rule); every event stayed byte for byte.
Re-recorded a second time when a disk without I/O bytes began to say why (`JOB_BUSY` in
accounting/assemble.py, where the domain's `balloon.rss` is absent too): 36 lines changed, each
only in that reason text (was "not reported") and in the samples' `missing` that now name it.
"""

from __future__ import annotations

from dataclasses import fields

from hostagent.model import (
    Baseline,
    BlockCounters,
    MemoryReading,
    NicBase,
    NicCounters,
    OutEvent,
    Owner,
    Sample,
    Usage,
)
from tests.accounting.golden_scenario import GOLDEN, everything


def test_a_varied_history_sends_and_persists_exactly_the_golden_bytes() -> None:
    expected = GOLDEN.read_bytes().split(b"\n")[:-1]
    got = everything()
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g == e, f"line {i + 1} differs"


def test_the_field_orders_positional_construction_relies_on() -> None:
    # sampling.usage, assemble and events build these positionally (keyword binding of 26
    # arguments costs ~1 µs a call): reordering a field must fail here, not mis-bill.
    assert [f.name for f in fields(Usage)] == [
        "instance_id", "uuid", "name", "incarnation", "new_incarnation", "period_start_ns",
        "period_end_ns", "vcpus", "memory_alloc_bytes", "cpu_ns", "cpu_seconds",
        "cpu_percent_avg", "memory_bytes", "memory_source", "memory_percent", "storage_bytes",
        "storage_capacity_bytes", "net_egress_bytes", "net_ingress_bytes", "disk_read_bytes",
        "disk_write_bytes", "gpu_count", "gpu_seconds", "gpu_util_avg", "pressure", "missing"]
    assert [f.name for f in fields(Sample)] == [
        "instance_id", "uuid", "name", "domid", "incarnation", "started_wall_ns", "t_wall_ns",
        "vcpus", "memory_alloc_bytes", "cpu_ns", "memory", "nics", "disks", "gpus", "pressure",
        "missing", "cpu_source", "cpu_time_ns", "gone_taps", "gpu_change",
        "born_taps"]
    assert [f.name for f in fields(Baseline)] == [
        "instance_id", "incarnation", "t_wall_ns", "cpu_ns", "cpu_carry_ns", "gpu_carry_ns",
        "nics", "disks", "cpu_t_wall_ns", "cpu_source"]
    assert [f.name for f in fields(OutEvent)][:6] == [
        "event_id", "kind", "instance_id", "period_start_ns", "period_end_ns", "payload"]
    assert [f.name for f in fields(BlockCounters)] == [
        "target", "rd_bytes", "wr_bytes", "allocation_bytes", "capacity_bytes",
        "physical_bytes"]
    assert [f.name for f in fields(NicCounters)] == [
        "mac", "ifname", "ifindex", "guest_rx_bytes", "guest_tx_bytes", "source", "key"]
    assert [f.name for f in fields(MemoryReading)] == ["used_bytes", "source"]


def test_per_domain_value_types_compare_and_hash_as_before() -> None:
    a, b = NicBase(1, 2, 3), NicBase(1, 2, 3)
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert Owner("u", None, "s").__dataclass_params__.frozen  # type: ignore[attr-defined]
