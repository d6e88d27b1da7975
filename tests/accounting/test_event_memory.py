"""An event's payload keeps only its own bytes until the commit (not orjson's write buffer)."""

from __future__ import annotations

import tracemalloc

from hostagent.accounting.events import build_usage_event, exact
from hostagent.alerts.state import AlertState
from tests.accounting.test_events import OWNER, make_usage

N = 200


def test_a_built_event_holds_about_its_payload_size_not_a_write_buffer() -> None:
    usages = [make_usage(period_start_ns=1_626_350_400 * 10**9 + i,
                         missing={"net:52:54:00:00:00:01": "tap vnet1 not found " * 3})
              for i in range(N)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        events = [build_usage_event(u, OWNER, "hv-01", time_format="rfc3339") for u in usages]
        held = (tracemalloc.get_traced_memory()[0] - before) / N
    finally:
        tracemalloc.stop()
    size = len(events[0].payload)
    # the payload itself, the OutEvent and its event_id string; orjson's buffer was 8-16 KiB
    assert held < size + 600, (held, size)


def test_exact_is_an_equal_right_sized_copy_and_alert_states_use_it() -> None:
    assert exact(b'{"a":1}') == b'{"a":1}'
    state = AlertState("r1", "i1", "exceeded", 3, 10, "exceeded", None, 0, 1.5)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = [state.to_bytes() for _ in range(N)]
        held = (tracemalloc.get_traced_memory()[0] - before) / N
    finally:
        tracemalloc.stop()
    assert held < len(kept[0]) + 200, held
    assert AlertState.from_bytes(kept[0]) == state
