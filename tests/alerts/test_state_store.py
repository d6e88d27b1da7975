"""Alert state committed with the pass's events survives a restart of the store."""

from __future__ import annotations

from pathlib import Path

from hostagent.alerts import violations
from hostagent.alerts.index import Settings, build_index
from hostagent.alerts.state import evaluate, load_states
from hostagent.store.outbox import Store
from tests.alerts.test_rules_index import CPU, usage
from tests.clocks import FakeClock


def test_alert_state_round_trips_through_the_store(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    idx = build_index([CPU], Settings(repeat_interval_s=0))
    store = Store.open(path, clock=FakeClock(), node_id="h", sink_names=["jsonl"])
    states = load_states(store.load_alert_state())
    kinds = []
    for i, v in enumerate([75.0, 90.0]):
        u = usage(t=i * 30, cpu_percent_avg=v)
        ev = evaluate(idx, [u], {}, states, u.period_end_ns)
        out = violations.route(ev.transitions, {}, "h", time_format="unix")
        store.commit_pass([], out, alert_state=ev.changes)  # ONE transaction
        states = dict(ev.states)
        kinds += [t.kind for t in ev.transitions]
    assert kinds == ["approaching", "exceeded"]
    store.close()

    store = Store.open(path, clock=FakeClock(), node_id="h", sink_names=["jsonl"])
    restored = load_states(store.load_alert_state())
    assert restored == states and len(restored) == 1
    kinds = []
    for i, v in enumerate([95.0, 10.0], start=2):
        u = usage(t=i * 30, cpu_percent_avg=v)
        ev = evaluate(idx, [u], {}, restored, u.period_end_ns)
        store.commit_pass([], [], alert_state=ev.changes)
        restored = dict(ev.states)
        kinds += [t.kind for t in ev.transitions]
    assert kinds == ["resolved"]  # not re-notified as exceeded, and not forgotten
    assert store.load_alert_state() == {}
    assert len(store.pending("jsonl", 10, 2**62)) == 2
    store.close()
