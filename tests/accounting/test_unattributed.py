"""Unattributed CPU: the pure tracker (examples and properties)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from hostagent.accounting.unattributed import advance
from hostagent.model import Usage

S = 10**9
T0 = 1_700_000_000 * S


def u(start_ns: int, cpu_ns: int) -> Usage:
    return Usage(
        instance_id="i", uuid="u", name="vm", incarnation="1", new_incarnation=False,
        period_start_ns=start_ns, period_end_ns=start_ns + 30 * S, vcpus=1,
        memory_alloc_bytes=1, cpu_ns=cpu_ns, cpu_seconds=cpu_ns // S, cpu_percent_avg=None,
        memory_bytes=None, memory_source=None, memory_percent=None, storage_bytes=None,
        storage_capacity_bytes=None, net_egress_bytes=0, net_ingress_bytes=0,
        disk_read_bytes=0, disk_write_bytes=0, gpu_count=0, gpu_seconds=0, gpu_util_avg=None)


def test_first_pass_events_from_before_the_start_do_not_count() -> None:
    st0 = advance(None, 100 * S, T0, [u(T0 - 30 * S, 7 * S)])
    assert st0 is not None and st0.total_ns == 0 and st0.accounted_ns == 0
    st1 = advance(st0, 110 * S, T0 + 30 * S, [u(T0, 9 * S)])
    assert st1 is not None and st1.total_ns == 1 * S  # 10 s grew, 9 s billed


def test_a_parent_that_went_down_restarts_the_span_and_keeps_the_counter() -> None:
    st0 = advance(None, 100 * S, T0, [])
    st1 = advance(st0, 105 * S, T0 + 30 * S, [])
    assert st1 is not None and st1.total_ns == 5 * S
    st2 = advance(st1, 2 * S, T0 + 60 * S, [u(T0 + 30 * S, S)])
    assert st2 is not None and st2.total_ns == 5 * S
    st3 = advance(st2, 4 * S, T0 + 90 * S, [u(T0 + 60 * S, S)])
    assert st3 is not None and st3.total_ns == 6 * S


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5 * S), st.booleans(), st.integers(0, S)),
                min_size=1, max_size=30))
def test_deferred_billing_is_not_unattributed_and_lost_tails_are(
    passes: list[tuple[int, bool, int]],
) -> None:
    """Per pass: CPU grown, whether its reading was missing (billed by the next good pass),
    and a tail lost by a destroy (in the parent, never billed)."""
    state = advance(None, 0, T0, [])
    parent = deferred = lost = 0
    t = T0
    for grown, missing, tail in passes:
        parent += grown + tail
        lost += tail
        t += 30 * S
        billed = [] if missing else [u(t - 30 * S, grown + deferred)]
        deferred = deferred + grown if missing else 0
        state = advance(state, parent, t, billed, settled=deferred == 0)
        assert state is not None
        assert state.total_ns <= lost  # a deferral is never counted
        assert state.raw_ns == lost + deferred
        if deferred == 0:
            assert state.total_ns == lost
    state = advance(state, parent, t + 30 * S, [u(t, deferred)])
    assert state is not None and state.total_ns == lost
