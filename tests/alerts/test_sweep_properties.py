"""An adversarial sweep of threshold alerting's pure functions (index, state, violations):
properties against small reference models, boundary values and the defects the sweep found.

Reference models: a Schmitt trigger (fire at >= threshold after `for_passes` consecutive
passes, resolve below threshold × (1 − hysteresis)), a repeat clock, a token bucket bound, a
naive "every applicable rule" loop in place of the index, and a restart at any pass.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostagent.alerts import index as ti
from hostagent.alerts import rules as tr
from hostagent.alerts import state as ts
from hostagent.alerts import violations as tv
from hostagent.model import Usage
from tests.alerts.test_rules_index import CPU, T0, usage

S = 1_000_000_000
NO_APPROACH = ti.Settings(approaching_fraction=1.0, hysteresis_fraction=0.0,
                          repeat_interval_s=0)


def passes(idx: ti.RuleIndex, per_pass: Sequence[Sequence[Usage]], *,
           owners: dict[str, str | None] | None = None, gate: ts.Gate | None = None,
           states: dict[str, ts.AlertState] | None = None, step_s: int = 30,
           ) -> tuple[list[list[ts.Transition]], dict[str, ts.AlertState]]:
    """Run passes (pass i at T0 + i × step_s); the states go through the store's bytes."""
    states = dict(states or {})
    out: list[list[ts.Transition]] = []
    for i, us in enumerate(per_pass):
        ev = ts.evaluate(idx, us, owners or {}, states, T0 + i * step_s * S, gate=gate)
        for fp, raw in ev.changes.items():
            if raw is None:
                states.pop(fp, None)
            else:
                states[fp] = ts.AlertState.from_bytes(raw)
        assert states == dict(ev.states)
        out.append(list(ev.transitions))
    return out, states


def cpu_passes(values: Sequence[float | None], step_s: int = 30) -> list[list[Usage]]:
    return [[usage(t=i * step_s, cpu_percent_avg=v)] for i, v in enumerate(values)]


def schmitt(values: Sequence[float | None], thr: float, hyst: float,
            for_passes: int) -> list[tuple[int, str]]:
    """The notices a firing/resolving alert owes: (pass, "exceeded" | "resolved")."""
    firing, run, out = False, 0, []
    for i, v in enumerate(values):
        if v is None:
            continue
        run = run + 1 if v >= thr else 0
        if not firing and run >= for_passes:
            firing = True
            out.append((i, "exceeded"))
        elif firing and v < thr * (1 - hyst):
            firing, run = False, 0
            out.append((i, "resolved"))
    return out


level = st.one_of(st.none(), st.sampled_from([0.0, 75.9, 76.0, 79.99, 80.0, 80.01, 150.0]),
                  st.floats(0, 200, allow_nan=False))


# --- once per crossing, hysteresis, for_passes -------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(st.lists(level, max_size=40), st.sampled_from([0.0, 0.05, 0.5]), st.integers(1, 4))
def test_property_each_crossing_fires_once_and_resolves_once(
        vs: list[float | None], hyst: float, for_passes: int) -> None:
    """With no approaching level, the notices are exactly the reference trigger's: one
    `exceeded` per crossing (after `for_passes`), one `resolved` per fall below the
    hysteresis level, nothing for missing data. Before the fix, with for_passes > 1 a breach
    shorter than it notified `approaching` and then `resolved` although approaching_fraction
    = 1 means "no approaching state"."""
    rule = dataclasses.replace(CPU, for_passes=for_passes)
    idx = ti.build_index([rule], dataclasses.replace(NO_APPROACH, hysteresis_fraction=hyst))
    got, _ = passes(idx, cpu_passes(vs))
    assert [(i, t.kind) for i, ts_ in enumerate(got) for t in ts_] == schmitt(
        vs, 80.0, hyst, for_passes)


def test_approaching_fraction_one_never_notifies_approaching() -> None:
    rule = dataclasses.replace(CPU, for_passes=3)
    idx = ti.build_index([rule], ti.Settings(approaching_fraction=1.0, repeat_interval_s=0))
    got, states = passes(idx, cpu_passes([90, 90, 10, 90, 90, 90, 10]))
    assert [(i, t.kind) for i, g in enumerate(got) for t in g] == [(5, "exceeded"),
                                                                  (6, "resolved")]
    assert states == {}
    # the breach count is still kept (and stored) between passes while it counts
    _, states = passes(idx, cpu_passes([90, 90]))
    (st_,) = states.values()
    assert (st_.status, st_.notified, st_.breaches) == ("ok", "ok", 2)


def test_a_vm_flapping_every_pass_notifies_each_crossing() -> None:
    """90 / 10 every pass: an `exceeded` and a `resolved` per cycle, none lost, none doubled;
    storm control (cooldown_s, the channel's bucket) is what thins such a stream."""
    idx = ti.build_index([CPU], ti.Settings(repeat_interval_s=0))
    got, _ = passes(idx, cpu_passes([90.0, 10.0] * 10))
    assert [t.kind for g in got for t in g] == ["exceeded", "resolved"] * 10
    cool = ti.build_index([CPU], ti.Settings(repeat_interval_s=0, cooldown_s=300))
    got, states = passes(cool, cpu_passes([90.0, 10.0] * 20 + [10.0] * 2))
    # At most one notice per 300 s (10 passes), each the latest status, with the count of the
    # status changes held back. Before the fix a resolved alert forgot its last notice and
    # the next pass's `exceeded` went out 30 s after the `resolved`: (12, "exceeded", 0).
    assert [(i, t.kind, t.suppressed_before) for i, g in enumerate(got) for t in g] == [
        (0, "exceeded", 0), (11, "resolved", 5), (22, "exceeded", 0), (33, "resolved", 5)]
    assert states != {}  # the resolved alert's cooldown still runs (its last notice: pass 33)
    more, states = passes(cool, cpu_passes([90.0, 10.0] * 20 + [10.0] * 16))
    assert more[:42] == got and more[42:] == [[]] * 14
    assert states == {}  # ... and its row goes once the cooldown is over (pass 43)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([95.0, 85.0, 70.0, 10.0, None]), max_size=40),
       st.sampled_from([30, 60, 100, 300]))
def test_property_the_cooldown_spaces_every_notice_of_an_alert(
        vs: list[float | None], cooldown_s: int) -> None:
    """`cooldown_s`: the least time between two notifications of one alert, across resolves."""
    idx = ti.build_index([CPU], ti.Settings(repeat_interval_s=0, cooldown_s=cooldown_s))
    got, _ = passes(idx, cpu_passes(vs))
    at = [i * 30 for i, g in enumerate(got) for _ in g]
    assert all(b - a >= cooldown_s for a, b in itertools.pairwise(at)), at


# --- repeats -----------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([95.0, 10.0, None]), max_size=30),
       st.sampled_from([30, 60, 90, 45]))
def test_property_repeat_interval_is_honoured(vs: list[float | None], repeat_s: int) -> None:
    """A firing alert repeats exactly when `repeat_interval_s` has passed since its last
    notice, and never while it is not firing."""
    idx = ti.build_index([CPU], dataclasses.replace(NO_APPROACH, repeat_interval_s=repeat_s))
    got, _ = passes(idx, cpu_passes(vs))
    firing, last, want = False, 0, []
    for i, v in enumerate(vs):
        if v is None:
            continue
        if not firing and v >= 80:
            firing, last = True, i * 30
            want.append((i, "exceeded"))
        elif firing and v < 80:
            firing, last = False, i * 30
            want.append((i, "resolved"))
        elif firing and i * 30 - last >= repeat_s:
            last = i * 30
            want.append((i, "repeat"))
    assert [(i, t.kind) for i, g in enumerate(got) for t in g] == want


# --- storm control ------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(st.sampled_from([95.0, 10.0, None]), min_size=6, max_size=6),
                min_size=1, max_size=25),
       st.integers(1, 5), st.sampled_from([1.0, 2.0, 6.0]), st.sampled_from([10, 30, 61]))
def test_property_storm_control_bounds_every_window(
        grid: list[list[float | None]], burst: int, per_minute: float, step_s: int) -> None:
    """Over any run of passes, the notices sent on a channel are at most the burst plus what
    the bucket refills over that time; and none is lost: after quiet passes, every alert's
    consumers know its latest status."""
    gate = tv.StormControl(per_minute=per_minute, burst=burst)
    idx = ti.build_index([CPU], dataclasses.replace(NO_APPROACH, repeat_interval_s=0))
    per_pass = [[usage(f"vm-{k}", t=i * step_s, cpu_percent_avg=v) for k, v in enumerate(row)]
                for i, row in enumerate(grid)]
    # then each instance holds its last reading: what is owed must get out
    last = [next((row[k] for row in reversed(grid) if row[k] is not None), 10.0)
            for k in range(6)]
    quiet = [[usage(f"vm-{k}", t=(len(grid) + j) * step_s, cpu_percent_avg=v)
              for k, v in enumerate(last)] for j in range(80)]
    got, states = passes(idx, per_pass + quiet, gate=gate, step_s=step_s)
    sent = [len(g) for g in got]
    for i in range(len(sent)):
        total = 0
        for j in range(i, len(sent)):
            total += sent[j]
            assert total <= burst + per_minute * (j - i) * step_s / 60 + 1e-9, (i, j, sent)
    for st_ in states.values():  # nothing held back for good
        assert st_.notified == st_.status


def test_storm_control_survives_its_bytes_and_never_refills_past_the_burst() -> None:
    gate = tv.StormControl(per_minute=1, burst=3)
    assert [gate(CPU, "fp", T0) for _ in range(4)] == [True, True, True, False]
    again = tv.StormControl(per_minute=1, burst=3)
    again.restore(gate.to_bytes())
    assert again(CPU, "fp", T0) is False  # a restart does not refill the bucket
    assert again(CPU, "fp", T0 + 60 * S) is True
    smaller = tv.StormControl(per_minute=1, burst=1)
    smaller.restore(gate.to_bytes())  # burst lowered in the config: capped at the new burst
    assert all(b.tokens <= 1 for b in smaller.buckets.values())


# --- restarts ----------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(level, min_size=3, max_size=3), min_size=1, max_size=20),
       st.integers(0, 20), st.integers(1, 3))
def test_property_a_restart_at_any_pass_changes_no_notice(
        grid: list[list[float | None]], cut: int, for_passes: int) -> None:
    """Stopping after any pass and starting again from the stored rows (alert states and the
    storm-control row) gives exactly the notices of an uninterrupted run: nothing re-fired,
    no resolve lost, no repeat moved."""
    rule = dataclasses.replace(CPU, for_passes=for_passes)
    idx = ti.build_index([rule], ti.Settings(repeat_interval_s=60, cooldown_s=30))
    per_pass = [[usage(f"vm-{k}", t=i * 30, cpu_percent_avg=v) for k, v in enumerate(row)]
                for i, row in enumerate(grid)]
    whole, _ = passes(idx, per_pass, gate=tv.StormControl(per_minute=2, burst=2))
    cut = min(cut, len(per_pass))
    gate1 = tv.StormControl(per_minute=2, burst=2)
    first, states = passes(idx, per_pass[:cut], gate=gate1)
    rows = {fp: s.to_bytes() for fp, s in states.items()}
    gate2 = tv.StormControl(per_minute=2, burst=2)
    gate2.restore(gate1.to_bytes())
    states2 = ts.load_states(rows)
    assert states2 == states
    rest: list[list[ts.Transition]] = []
    for i, us in enumerate(per_pass[cut:], start=cut):
        ev = ts.evaluate(idx, us, {}, states2, T0 + i * 30 * S, gate=gate2)
        states2 = dict(ev.states)
        rest.append(list(ev.transitions))
    key = [[(t.fingerprint, t.kind, t.suppressed_before) for t in g] for g in whole]
    assert key == [[(t.fingerprint, t.kind, t.suppressed_before) for t in g]
                   for g in first + rest]


# --- one instance, two usages in one pass (a restart between passes) -----------------------------


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(level, level), min_size=1, max_size=12), st.booleans())
def test_property_two_usages_in_one_pass_step_like_two_passes(
        pairs: list[tuple[float | None, float | None]], with_gate: bool) -> None:
    """A domain restarted between two passes reports twice in the next one: the close-out of
    its old incarnation, then the new one's first period. The second steps on from the first:
    the same notices as two passes at the same time. Before the fix both stepped from the
    pass's starting state: a second `exceeded` for one crossing, or a `resolved` after which
    the firing alert was dropped."""
    idx = ti.build_index([CPU], ti.Settings(repeat_interval_s=0))
    one_pass: dict[str, ts.AlertState] = {}
    two_passes: dict[str, ts.AlertState] = {}
    g1 = tv.StormControl(per_minute=1, burst=1) if with_gate else None
    g2 = tv.StormControl(per_minute=1, burst=1) if with_gate else None
    for i, (a, b) in enumerate(pairs):
        now = T0 + i * 60 * S
        ua = usage(t=i * 60 - 20, cpu_percent_avg=a, incarnation=f"{i}a")
        ub = usage(t=i * 60, cpu_percent_avg=b, incarnation=f"{i}b")
        ev = ts.evaluate(idx, [ua, ub], {}, one_pass, now, gate=g1)
        one_pass = ts.load_states({fp: s.to_bytes() for fp, s in ev.states.items()})
        got = [(t.kind, t.usage.incarnation) for t in ev.transitions]
        want = []
        for u in (ua, ub):
            ev2 = ts.evaluate(idx, [u], {}, two_passes, now, gate=g2)
            two_passes = dict(ev2.states)
            want += [(t.kind, t.usage.incarnation) for t in ev2.transitions]
        assert got == want
        assert one_pass == two_passes
        assert sum(k == "exceeded" for k, _ in got) <= 1


def test_a_restarted_domain_fires_once_and_keeps_firing() -> None:
    idx = ti.build_index([CPU], ti.Settings(repeat_interval_s=0))
    old = usage(t=10, cpu_percent_avg=95.0, incarnation="old")
    new = usage(t=30, cpu_percent_avg=95.0, incarnation="new")
    ev = ts.evaluate(idx, [old, new], {}, {}, new.period_end_ns)
    assert [t.kind for t in ev.transitions] == ["exceeded"]
    # firing, then the old incarnation's last period is low and the new one's high
    low = usage(t=50, cpu_percent_avg=5.0, incarnation="new")
    again = usage(t=60, cpu_percent_avg=95.0, incarnation="newer")
    ev = ts.evaluate(idx, [low, again], {}, dict(ev.states), again.period_end_ns)
    assert [t.kind for t in ev.transitions] == ["resolved", "exceeded"]
    (st_,) = ev.states.values()
    assert (st_.status, st_.notified) == ("exceeded", "exceeded")  # before: dropped


# --- the index against a naive loop ------------------------------------------------------------

_RULE = st.fixed_dictionaries({
    "scope": st.sampled_from(["*", "alice", "bob", "inst-*", "inst-alice", "inst-bob"]),
    "pct": st.sampled_from([0.0, 10.0, 50.0, 79.5, 80.0, 100.0, 150.0, 1e308]),
    "res": st.sampled_from(["Cpu", "Memory"]),
})


def _rules(specs: list[dict[str, object]]) -> list[tr.Rule]:
    out = []
    for i, s in enumerate(specs):
        scope = str(s["scope"])
        raw: dict[str, object] = {
            "id": f"r{i}", "resource_type": s["res"], "action": "Alert",
            "threshold_type": {"Percentage": {"value": s["pct"]}},
            "user_id": scope.removeprefix("inst-")}
        if scope.startswith("inst-"):
            raw["instance_id"] = "vm-0"
        out.append(tr.parse_rule(raw))
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(_RULE, min_size=1, max_size=10),
       st.lists(st.lists(st.one_of(st.none(), st.floats(0, 200, allow_nan=False)),
                         min_size=2, max_size=2), min_size=1, max_size=10),
       st.sampled_from(["alice", "bob", None]))
def test_property_the_index_notifies_like_a_loop_over_every_applicable_rule(
        specs: list[dict[str, object]], grid: list[list[float | None]], owner: str | None,
        ) -> None:
    """Bisecting by level and visiting only open alerts besides is an optimisation: the notices
    are those of stepping every rule that applies (user `*`, the instance's owner, the
    instance's own rules of a matching user; an unassigned instance gets no user's rule)."""
    rules = _rules(specs)
    settings_ = ti.Settings(repeat_interval_s=60)
    idx = ti.build_index(rules, settings_)
    owners = {"vm-0": owner, "vm-1": owner}
    states: dict[str, ts.AlertState] = {}
    naive: dict[str, ts.AlertState] = {}
    for i, (v0, v1) in enumerate(grid):
        now = T0 + i * 30 * S
        us = [usage("vm-0", t=i * 30, cpu_percent_avg=v0, memory_percent=v1),
              usage("vm-1", t=i * 30, cpu_percent_avg=v1, memory_percent=v0)]
        ev = ts.evaluate(idx, us, owners, states, now)
        states = dict(ev.states)
        want = []
        for u in us:
            for r in rules:
                applies = r.user_id in ("*", owner) and r.instance_id in (None, u.instance_id)
                if not applies:
                    continue
                fp = ts.fingerprint(r.id, u.instance_id)
                new, kind, _ = ts.step(r, idx.levels[r.id], naive.get(fp), u.instance_id,
                                       ti.measure(r, u), now, 0, None)
                if new is None:
                    naive.pop(fp, None)
                else:
                    naive[fp] = new
                if kind is not None:
                    want.append((fp, kind))
        assert sorted((t.fingerprint, t.kind) for t in ev.transitions) == sorted(want)
        assert states == naive


def test_wildcard_user_and_unassigned_owners() -> None:
    rules = _rules([{"scope": "*", "pct": 80.0, "res": "Cpu"},
                    {"scope": "alice", "pct": 80.0, "res": "Cpu"},
                    {"scope": "inst-alice", "pct": 80.0, "res": "Cpu"}])
    idx = ti.build_index(rules, ti.Settings(repeat_interval_s=0))
    u = usage("vm-0", cpu_percent_avg=95.0)
    fired = {o: sorted(t.rule.id for t in ts.evaluate(idx, [u], {"vm-0": o}, {}, T0).transitions)
             for o in ("alice", "bob", None)}
    assert fired == {"alice": ["r0", "r1", "r2"], "bob": ["r0"], None: ["r0"]}
    # alice's open alerts while the owner is unknown (unassigned, account service down): kept,
    # neither resolved nor repeated; another owner known: "owner changed", for alice
    states = dict(ts.evaluate(idx, [u], {"vm-0": "alice"}, {}, T0).states)
    low = usage("vm-0", t=30, cpu_percent_avg=1.0)
    ev = ts.evaluate(idx, [low], {"vm-0": None}, states, T0 + 30 * S)
    assert [t.rule.id for t in ev.transitions] == ["r0"]
    assert set(ev.states) == {"r1|vm-0", "r2|vm-0"}
    ev = ts.evaluate(idx, [low], {"vm-0": "bob"}, dict(ev.states), T0 + 60 * S)
    assert sorted((t.rule.id, t.reason, t.for_user) for t in ev.transitions) == [
        ("r1", "owner changed", "alice"), ("r2", "owner changed", "alice")]
    assert ev.states == {}


# --- boundary values -----------------------------------------------------------------------------


def _one(rule: tr.Rule, u: Usage, settings_: ti.Settings | None = None) -> list[str]:
    idx = ti.build_index([rule], settings_ or ti.Settings(repeat_interval_s=0))
    return [t.kind for t in ts.evaluate(idx, [u], {}, {}, u.period_end_ns).transitions]


def _pct(value: float, res: str = "Cpu") -> tr.Rule:
    return tr.parse_rule({"id": "p", "resource_type": res, "action": "Alert", "user_id": "*",
                          "threshold_type": {"Percentage": {"value": value}}})


def test_usage_exactly_at_the_threshold_fires() -> None:
    assert _one(_pct(80.0), usage(cpu_percent_avg=80.0)) == ["exceeded"]
    assert _one(_pct(80.0), usage(cpu_percent_avg=79.999999)) == ["approaching"]
    assert _one(_pct(1e308), usage(cpu_percent_avg=1e308)) == ["exceeded"]
    assert _one(_pct(1e308), usage(cpu_percent_avg=1e300)) == []


def test_a_zero_threshold_fires_on_any_reading_and_never_resolves_by_value() -> None:
    """`>= 0` holds for every reading: such a rule fires at the first pass and stays firing
    (repeats) for as long as the instance reports; only missing data leaves it alone."""
    rule = _pct(0.0)
    idx = ti.build_index([rule], ti.Settings(repeat_interval_s=60))
    got, states = passes(idx, cpu_passes([0.0, 0.0, 0.0, None, 0.0]))
    assert [(i, t.kind) for i, g in enumerate(got) for t in g] == [(0, "exceeded"),
                                                                  (2, "repeat"), (4, "repeat")]
    assert [s.status for s in states.values()] == ["exceeded"]


def test_percentages_above_100_are_thresholds_like_any_other() -> None:
    """Storage allocation can pass its capacity (qcow2 snapshots), CPU its vCPUs for a period
    with hot-plugged vCPUs: 150 % is a valid threshold."""
    rule = _pct(150.0, "Storage")
    assert _one(rule, usage(storage_bytes=70 << 30, storage_capacity_bytes=40 << 30)) == [
        "exceeded"]
    assert _one(rule, usage(storage_bytes=50 << 30, storage_capacity_bytes=40 << 30)) == []


@pytest.mark.parametrize("value", [-1, -1e-300, float("-inf")])
def test_negative_thresholds_are_refused(value: float) -> None:
    with pytest.raises(tr.ConfigError):
        _pct(value)


def test_a_usage_without_a_cpu_rate_leaves_a_firing_alert_alone() -> None:
    """A period whose CPU could not be read (at a counter reset too: `cpu_ns` 0, no rate) is
    missing data, not 0 %: the firing alert neither resolves nor fires again. (A reset itself,
    a new incarnation billed from its own zero, is in tests/test_sweep_alerts_ledger.py.)"""
    idx = ti.build_index([CPU], ti.Settings(repeat_interval_s=0))
    got, states = passes(idx, [[usage(t=0, cpu_percent_avg=95.0)],
                               [usage(t=30, cpu_percent_avg=None, cpu_ns=0,
                                      new_incarnation=True, incarnation="2")],
                               [usage(t=60, cpu_percent_avg=96.0, incarnation="2")]])
    assert [t.kind for g in got for t in g] == ["exceeded"]
    assert [s.notified for s in states.values()] == ["exceeded"]


def test_a_zero_unit_threshold_reports_its_value_in_the_rules_unit() -> None:
    """`current_value` is in the rule's unit. A 0 GB threshold (`percentage` has no meaning
    then: null) once reported the bytes under `"unit": "GB"`."""
    rule = tr.parse_rule({"id": "d", "resource_type": "Storage", "action": "Alert",
                          "user_id": "*", "threshold_type": {"Absolute": {"value": 0,
                                                                          "unit": "GB"}}})
    u = usage(storage_bytes=3 << 30)
    idx = ti.build_index([rule], ti.Settings(repeat_interval_s=0))
    (e,) = tv.route(ts.evaluate(idx, [u], {}, {}, u.period_end_ns).transitions, {}, "h",
                    time_format="unix")
    doc = orjson.loads(e.payload)
    assert (doc["current_value"], doc["unit"], doc["threshold_value"], doc["percentage"]) == (
        3.0, "GB", 0.0, None)
    rate = tr.parse_rule({"id": "n", "resource_type": "NetworkEgress", "action": "Alert",
                          "user_id": "*", "threshold_type": {"Absolute": {"value": 80,
                                                                          "unit": "Mbps"}}})
    u = usage(net_egress_bytes=30 * 100_000_000 // 8)  # 100 Mbps over the 30 s
    (e,) = tv.route(ts.evaluate(ti.build_index([rate]), [u], {}, {},
                                u.period_end_ns).transitions, {}, "h", time_format="unix")
    doc = orjson.loads(e.payload)
    assert (doc["current_value"], doc["percentage"]) == (100.0, 125.0)


# --- the clock ---------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([95.0, 10.0]),
                          st.integers(-86_400, 86_400)), min_size=1, max_size=15))
def test_property_a_stepped_clock_never_doubles_or_loses_a_notice(
        steps: list[tuple[float, int]]) -> None:
    """Wall clock stepped back or forward by up to a day between passes: each status change is
    notified once (no repeat configured), whatever the clock."""
    idx = ti.build_index([CPU], NO_APPROACH)
    states: dict[str, ts.AlertState] = {}
    t, firing = 0, False
    for v, jump in steps:
        t += jump
        u = usage(t=t, cpu_percent_avg=v)
        ev = ts.evaluate(idx, [u], {}, states, u.period_end_ns)
        states = ts.load_states({fp: s.to_bytes() for fp, s in ev.states.items()})
        want = (["exceeded"] if v >= 80 and not firing
                else ["resolved"] if v < 80 and firing else [])
        assert [x.kind for x in ev.transitions] == want
        firing = v >= 80


# --- a VM that stops while its alert fires ---------------------------------------------------


def test_an_ended_instance_resolves_its_open_alerts_after_its_last_usage() -> None:
    """`evaluate(..., ended=...)`: the domain ended in this pass and does not run now. Its last
    usage is evaluated as usual, then each alert consumers were told about resolves with
    "instance stopped" (never held back by storm control: no later pass would send it), and
    its states go. An alert consumers were not told about goes without a word."""
    rules = [CPU, dataclasses.replace(CPU, id="cpu-slow", for_passes=5)]
    idx = ti.build_index(rules, ti.Settings(repeat_interval_s=0))
    ev = ts.evaluate(idx, [usage(t=0, cpu_percent_avg=95.0)], {}, {}, T0)
    assert [t.kind for t in ev.transitions] == ["exceeded", "approaching"]
    last = usage(t=20, cpu_percent_avg=97.0)
    gate = tv.StormControl(per_minute=1, burst=1)
    gate(CPU, "x", T0 + 30 * S)  # the channel's bucket is empty
    ev = ts.evaluate(idx, [last], {}, dict(ev.states), T0 + 30 * S, gate=gate,
                     ended=["vm-1"])
    assert sorted((t.rule.id, t.kind, t.reason, t.previous) for t in ev.transitions) == [
        ("cpu", "resolved", "instance stopped", "exceeded"),
        ("cpu-slow", "resolved", "instance stopped", "approaching")]
    assert all(t.usage is last for t in ev.transitions)
    assert ev.states == {} and set(ev.changes) == {"cpu|vm-1", "cpu-slow|vm-1"}
    (e, _) = tv.route(ev.transitions, {}, "h", time_format="unix")
    assert orjson.loads(e.payload)["reason"] == "instance stopped"
    # not ended (the default): the alert stays open, as before
    ev = ts.evaluate(idx, [last], {}, dict(ts.evaluate(idx, [usage(t=0, cpu_percent_avg=95.0)],
                                                       {}, {}, T0).states), T0 + 30 * S)
    assert ev.transitions == () and len(ev.states) == 2


def test_resolves_of_a_deleted_rule_bypass_the_channel_bucket() -> None:
    """Documents a limit of storm control: the `resolved` notices of a deleted (or changed)
    rule, of an owner change and of an ended instance are not gated: their states go in that
    pass, so a held-back one could never be sent. Deleting a wildcard rule that fires on 50
    instances sends 50 notices in one pass whatever `channel_burst` says."""
    gate = tv.StormControl(per_minute=1, burst=5)
    idx = ti.build_index([CPU], ti.Settings(repeat_interval_s=0))
    states: dict[str, ts.AlertState] = {}
    for p in range(50):  # one token a minute: 50 exceeded take ~45 minutes to get out
        us = [usage(f"vm-{k}", t=p * 60, cpu_percent_avg=95.0) for k in range(50)]
        states = dict(ts.evaluate(idx, us, {}, states, T0 + p * 60 * S, gate=gate).states)
    assert all(s.notified == "exceeded" for s in states.values())
    us = [usage(f"vm-{k}", t=50 * 60, cpu_percent_avg=95.0) for k in range(50)]
    ev = ts.evaluate(ti.build_index([]), us, {}, states, T0 + 50 * 60 * S, gate=gate,
                     retired={"cpu": CPU})
    assert len(ev.transitions) == 50 and {t.reason for t in ev.transitions} == {"rule deleted"}
