"""Alert lifecycle (issue 17 §4, §2): a deleted or changed rule resolves its open alerts with the
reason; storm-control state survives a restart through the store; a rule naming a channel no
sink serves is refused at load, and the previous set stays in force."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import orjson
import pytest

from hostagent.alerts import violations
from hostagent.alerts.index import Settings
from hostagent.alerts.routing import Route
from hostagent.alerts.rules_source import RulesSource
from hostagent.alerts.state import AlertState, Transition, evaluate
from hostagent.alerts.violations import STORM_KEY, StormControl
from hostagent.errors import ConfigError
from hostagent.model import Owner
from hostagent.store.outbox import Store
from tests.alerts.test_rules_index import CPU, T0, S, usage
from tests.clocks import FakeClock

ROUTES = {"jsonl": Route(None, None), "queue": Route(None, frozenset({"queue"}))}
RAW = {"id": "cpu", "resource_type": "Cpu", "action": "Alert", "user_id": "*",
       "threshold_type": {"Percentage": {"value": 80.0}}, "notification_channels": []}


def run_passes(src: RulesSource, values: list[float], states: dict[str, AlertState],
               t0: int = 0) -> list[Transition]:
    out: list[Transition] = []
    for i, v in enumerate(values):
        u = usage(t=t0 + i * 30, cpu_percent_avg=v)
        ev = evaluate(src.index, [u], {"vm-1": "u"}, states, u.period_end_ns,
                      retired=dict(src.retired))
        src.forget_retired(dict(src.retired))
        states.clear()
        states.update(ev.states)
        out += ev.transitions
    return out


def source(tmp_path: Path, rules: list[dict[str, object]]) -> RulesSource:
    p = tmp_path / "rules.json"
    p.write_text(json.dumps(rules))
    src = RulesSource(p, Settings(repeat_interval_s=0), routes=ROUTES)
    src.load_initial()
    return src


def test_a_deleted_rule_resolves_its_open_alert_with_the_reason(tmp_path: Path) -> None:
    src = source(tmp_path, [RAW])
    states: dict[str, AlertState] = {}
    assert [t.kind for t in run_passes(src, [95.0], states)] == ["exceeded"]
    (tmp_path / "rules.json").write_text("[]")
    assert src.reload()
    (t,) = run_passes(src, [95.0], states, t0=30)
    assert (t.kind, t.reason, t.previous, t.rule.id) == ("resolved", "rule deleted",
                                                          "exceeded", "cpu")
    body = orjson.loads(violations.build_alert_event(t, None, "h", time_format="unix").payload)
    assert (body["transition"], body["reason"], body["state"]) == ("resolved", "rule deleted",
                                                                   "ok")
    assert states == {}
    assert run_passes(src, [95.0], states, t0=60) == []  # nothing left to say


def test_a_changed_rule_resolves_then_fires_under_its_new_definition(tmp_path: Path) -> None:
    src = source(tmp_path, [RAW])
    states: dict[str, AlertState] = {}
    run_passes(src, [95.0], states)
    (tmp_path / "rules.json").write_text(json.dumps([
        {**RAW, "threshold_type": {"Percentage": {"value": 90.0}}}]))
    assert src.reload()
    got = run_passes(src, [95.0], states, t0=30)
    assert [(t.kind, t.reason) for t in got] == [("resolved", "rule changed"),
                                                 ("exceeded", None)]
    assert got[0].rule.threshold == 80.0 and got[1].rule.threshold == 90.0


def test_an_unchanged_reload_resolves_nothing(tmp_path: Path) -> None:
    src = source(tmp_path, [RAW])
    states: dict[str, AlertState] = {}
    run_passes(src, [95.0], states)
    assert src.reload()
    assert run_passes(src, [95.0], states, t0=30) == []


def test_retired_rules_wait_for_the_instance_and_a_committed_pass(tmp_path: Path) -> None:
    src = source(tmp_path, [RAW])
    states: dict[str, AlertState] = {}
    run_passes(src, [95.0], states)
    (tmp_path / "rules.json").write_text("[]")
    src.reload()
    # a pass that fails before committing leaves the notice owed
    kept = dict(src.retired)
    evaluate(src.index, [usage(t=30, cpu_percent_avg=95.0)], {}, states, T0 + 30 * S,
             retired=kept)
    assert set(src.retired) == {"cpu"}


def test_storm_control_survives_a_restart_in_the_store(tmp_path: Path) -> None:
    clock = FakeClock()
    db = tmp_path / "state.db"
    storm = StormControl(per_minute=1, burst=2)
    rule = dataclasses.replace(CPU, action="notify", channels=("queue",))
    assert storm(rule, "fp", T0) and storm(rule, "fp", T0)
    assert not storm(rule, "fp", T0)  # the burst is spent
    assert storm.dirty
    store = Store.open(db, clock=clock, node_id="h", sink_names=["jsonl"])
    store.commit_pass([], [], alert_state={STORM_KEY: storm.to_bytes()})
    store.close()
    assert not storm.dirty
    # a restart: the same buckets, the same count of held-back notices
    again = StormControl(per_minute=1, burst=2)
    store = Store.open(db, clock=clock, node_id="h", sink_names=["jsonl"])
    again.restore(store.load_alert_state()[STORM_KEY])
    store.close()
    assert again.suppressed == {"queue": 1}
    assert not again(rule, "fp", T0 + S)  # still empty: a restart does not refill
    assert again(rule, "fp", T0 + 61 * S)
    broken = StormControl(per_minute=1, burst=2)
    broken.restore(b"{not json")
    assert broken.buckets == {}


def test_a_rule_naming_an_unserved_channel_is_refused_at_load(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="email"):
        source(tmp_path, [{**RAW, "action": "Notify", "notification_channels": ["email"]}])
    src = source(tmp_path, [{**RAW, "action": "Notify", "notification_channels": ["queue"]}])
    (tmp_path / "rules.json").write_text(json.dumps([
        {**RAW, "action": "Notify", "notification_channels": ["queue", "pager"]}]))
    assert src.reload() is False
    assert [r.channels for r in src.index.rules] == [("queue",)]  # the old set stays
    h = src.health()
    assert h["failures"] == 1 and "pager" in h["last_error"]
    # Log rules only log; a webhook registration id needs a webhook sink
    assert source(tmp_path, [{**RAW, "action": "Log", "notification_channels": ["x"]}])
    with pytest.raises(ConfigError, match="webhook_0badc0de"):
        source(tmp_path, [{**RAW, "action": "Notify",
                           "notification_channels": ["webhook_0badc0de"]}])



def test_a_rule_deleted_while_the_daemon_was_down_resolves_after_the_restart(
        tmp_path: Path) -> None:
    def start() -> RulesSource:
        src = RulesSource(tmp_path / "rules.json", Settings(repeat_interval_s=0),
                          routes=ROUTES, in_force_path=tmp_path / "rules-in-force.json")
        src.load_initial()
        return src

    (tmp_path / "rules.json").write_text(json.dumps([RAW, {**RAW, "id": "kept"}]))
    src = start()
    states: dict[str, AlertState] = {}  # the store's alert_state, across the restart
    assert len(run_passes(src, [95.0], states)) == 2
    (tmp_path / "rules.json").write_text(json.dumps([{**RAW, "id": "kept"}]))  # while down
    again = start()
    assert set(again.retired) == {"cpu"}
    (t,) = run_passes(again, [95.0], states, t0=30)
    assert (t.rule.id, t.kind, t.reason) == ("cpu", "resolved", "rule deleted")
    assert start().retired == {}  # an unchanged restart retires nothing


def test_without_rules_only_instances_with_open_alerts_change(tmp_path: Path) -> None:
    # No rule left: the instances whose alert was open either resolve (the rule was retired:
    # its notice is owed) or drop their state silently; the others are not touched.
    src = source(tmp_path, [RAW])
    states: dict[str, AlertState] = {}
    for iid in ("vm-1", "vm-2"):
        u = usage(iid, t=0, cpu_percent_avg=95.0)
        ev = evaluate(src.index, [u], {iid: "u"}, states, u.period_end_ns)
        states.update(ev.states)
    assert {s.instance_id for s in states.values()} == {"vm-1", "vm-2"}
    (tmp_path / "rules.json").write_text("[]")
    assert src.reload()
    vm2 = next(fp for fp, s in states.items() if s.instance_id == "vm-2")
    retired = dict(src.retired)
    us = [usage(iid, t=30, cpu_percent_avg=95.0) for iid in ("vm-3", "vm-1", "vm-4")]
    ev = evaluate(src.index, us, {}, states, us[0].period_end_ns, retired=retired)
    assert [(t.kind, t.reason, t.usage.instance_id) for t in ev.transitions] == [
        ("resolved", "rule deleted", "vm-1")]
    assert ev.states == {} and ev.checked == 0
    assert set(ev.changes) == set(states) and vm2 in ev.changes  # both deleted
    assert all(v is None for v in ev.changes.values())


def test_a_users_open_alert_ends_when_the_instance_moves_to_another_owner(
        tmp_path: Path) -> None:
    """A user's rule stops applying once the instance is known to be another user's: its open
    alert is resolved ("owner changed") to the rule's own user, never stamped with the new
    owner's id, and not left `exceeded` for as long as the instance lives."""
    src = source(tmp_path, [{**RAW, "user_id": "u1"}])
    states: dict[str, AlertState] = {}

    def one(t_s: int, owner: str | None) -> list[Transition]:
        u = usage(t=t_s, cpu_percent_avg=95.0)
        owners = {} if owner is None else {"vm-1": owner}
        ev = evaluate(src.index, [u], owners, states, u.period_end_ns)
        states.clear()
        states.update(ev.states)
        return list(ev.transitions)

    assert [t.kind for t in one(0, "u1")] == ["exceeded"]
    assert one(30, None) == [] and len(states) == 1  # owner unknown: nothing changes
    (t,) = one(60, "u2")
    assert (t.kind, t.reason, t.previous) == ("resolved", "owner changed", "exceeded")
    assert states == {}
    new_owner = {"vm-1": Owner("u2", "org-2", "account-service")}
    (ev,) = violations.route([t], new_owner, "h", time_format="unix")
    body = orjson.loads(ev.payload)
    assert (body["user_id"], body["org_id"]) == ("u1", None)  # the rule's user, not u2
    assert one(90, "u2") == []  # nothing more
    assert [t.kind for t in one(120, "u1")] == ["exceeded"]  # back: fires anew
