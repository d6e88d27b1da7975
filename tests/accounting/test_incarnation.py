"""Incarnation identity: a process whose start time is unreadable for a pass is not a reboot."""

from __future__ import annotations

import pytest

from hostagent.accounting import sampling
from hostagent.model import Baseline, Sample


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("17:105355", "17:105355", True),
        ("17:105355", "17", True),       # start time unreadable this pass
        ("17", "17:105355", True),       # ... or the previous one
        ("17:105355", "17:999", False),  # same id, another process (host rebooted)
        ("17:105355", "18:105900", False),
        ("17", "18", False),
    ],
)
def test_same_incarnation(a: str, b: str, same: bool) -> None:
    assert sampling.same_incarnation(a, b) is same


def sample(incarnation: str, t_s: int, cpu_s: int) -> Sample:
    return Sample(instance_id="i", uuid="u", name="n", domid=17, incarnation=incarnation,
                  started_wall_ns=None, t_wall_ns=t_s * 10**9, vcpus=1,
                  memory_alloc_bytes=1 << 30, cpu_ns=cpu_s * 10**9, memory=None)


def test_a_pass_without_start_time_does_not_recount_the_process() -> None:
    base = Baseline(instance_id="i", incarnation="17:105355", t_wall_ns=100 * 10**9,
                    cpu_ns=50 * 10**9)
    u1, b1 = sampling.usage(base, sample("17", 130, 53), store_created_ns=0)
    assert u1 is not None
    assert u1.cpu_seconds == 3
    assert not u1.new_incarnation
    assert b1.incarnation == "17:105355"  # the more specific identity is kept
    u2, _ = sampling.usage(b1, sample("17:105355", 160, 56), store_created_ns=0)
    assert u2 is not None
    assert u2.cpu_seconds == 3
    assert not u2.new_incarnation


def test_cpu_average_after_a_gap_covers_the_whole_gap() -> None:
    """A pass without a CPU reading defers the CPU; the catch-up is averaged over both periods."""
    base = Baseline(instance_id="i", incarnation="17:1", t_wall_ns=100 * 10**9,
                    cpu_ns=50 * 10**9)
    gap = Sample(instance_id="i", uuid="u", name="n", domid=17, incarnation="17:1",
                 started_wall_ns=None, t_wall_ns=130 * 10**9, vcpus=1,
                 memory_alloc_bytes=1 << 30, cpu_ns=None, memory=None,
                 missing={"cpu": "libvirt hung"})
    u1, b1 = sampling.usage(base, gap, store_created_ns=0)
    assert u1 is not None
    assert u1.cpu_ns == 0
    assert u1.cpu_percent_avg is None
    # 54 s of CPU over the 60 s since CPU was last read: 90 %, not 180 % over 30 s
    u2, b2 = sampling.usage(b1, sample("17:1", 160, 104), store_created_ns=0)
    assert u2 is not None
    assert u2.cpu_ns == 54 * 10**9
    assert u2.cpu_percent_avg is not None
    assert abs(u2.cpu_percent_avg - 90.0) < 1e-9
    assert b2.cpu_t_wall_ns == 160 * 10**9
    assert Baseline.from_dict(b2.to_dict()) == b2
