"""Transitions → threshold_violation events; Log routing; per-channel storm control."""

from __future__ import annotations

import dataclasses
import logging

import orjson
import pytest

from hostagent.alerts import violations
from hostagent.alerts.index import Settings, build_index
from hostagent.alerts.rules import Rule, parse_rule
from hostagent.alerts.state import AlertState, Gate, Transition, evaluate
from hostagent.model import Owner
from tests.alerts.test_rules_index import CPU, FLAT, T0, S, usage

OWNER = Owner("user_123456", "org_789012", "service")


def transitions(rule: Rule, values: list[float], s: Settings | None = None,
                gate: Gate | None = None) -> list[Transition]:
    idx = build_index([rule], s or Settings(repeat_interval_s=0))
    states: dict[str, AlertState] = {}
    out: list[Transition] = []
    for i, v in enumerate(values):
        u = usage(t=i * 30, cpu_percent_avg=v, storage_bytes=int(v * 2**30))
        ev = evaluate(idx, [u], {"vm-1": OWNER.user_id}, states, u.period_end_ns, gate=gate)
        states = dict(ev.states)
        out += ev.transitions
    return out


def test_event_has_seed_fields_and_state() -> None:
    (t,) = transitions(CPU, [90.0])
    ev = violations.build_alert_event(t, OWNER, "host-a", time_format="unix")
    body = orjson.loads(ev.payload)
    assert ev.kind == "threshold_violation" and body["event_type"] == "threshold_violation"
    assert body["config"] == CPU.config_dict()
    assert body["current_value"] == 90.0 and body["threshold_value"] == 80.0
    assert body["percentage"] == 112.5
    assert (body["state"], body["previous_state"], body["transition"]) == (
        "exceeded", "ok", "exceeded")
    assert body["fingerprint"] == "cpu|vm-1" and body["instance_id"] == "vm-1"
    assert (body["user_id"], body["org_id"]) == ("user_123456", "org_789012")
    assert body["timestamp"] == T0 // S and body["period"] == {"start": T0 // S - 30,
                                                               "end": T0 // S}
    # deterministic: the same transition renders the same id and bytes
    again = violations.build_alert_event(t, OWNER, "host-a", time_format="unix")
    assert again == ev and body["event_id"] == ev.event_id
    other_host = violations.build_alert_event(t, OWNER, "host-b", time_format="unix")
    assert other_host.event_id != ev.event_id


def test_notify_alerts_carry_their_channels_for_routing() -> None:
    notify = dataclasses.replace(CPU, action="notify", channels=("queue", "webhook_0badc0de"))
    (t,) = transitions(notify, [90.0])
    ev = violations.build_alert_event(t, OWNER, "host-a", time_format="unix")
    assert ev.channels == {"queue", "webhook_0badc0de"}
    body = orjson.loads(ev.payload)
    # the payload is as it was: the channels and the action stay in it, the id is the same
    assert (body["action"], body["channels"]) == ("notify", ["queue", "webhook_0badc0de"])
    assert list(body)[-3:] == ["channels", "action", "reason"]
    assert body["reason"] == "value"
    (plain,) = transitions(CPU, [90.0])
    assert ev.event_id == violations.build_alert_event(plain, OWNER, "host-a",
                                                   time_format="unix").event_id
    assert violations.payload_channels(ev.kind, ev.payload) == ev.channels  # legacy rows: the same
    # a Notify rule without channels reaches no channel (but the audit log), not every one
    (quiet,) = transitions(dataclasses.replace(CPU, action="notify", channels=()), [90.0])
    quiet_event = violations.build_alert_event(quiet, None, "h", time_format="unix")
    assert quiet_event.channels == frozenset()


def test_alert_rules_and_usage_route_everywhere() -> None:
    rule = dataclasses.replace(CPU, channels=("queue",))  # an Alert rule's channels do not route
    (ev,) = violations.route(transitions(rule, [90.0]), {"vm-1": OWNER}, "h", time_format="unix")
    assert ev.channels is None and orjson.loads(ev.payload)["channels"] == ["queue"]
    assert violations.payload_channels(ev.kind, ev.payload) is None
    assert violations.payload_channels("resource_usage", b'{"action": "notify"}') is None
    assert violations.payload_channels(ev.kind, b"not json") is None  # unreadable: everywhere


def test_absolute_values_are_in_the_rule_unit() -> None:
    rule = parse_rule({**FLAT, "threshold_value": 100, "user_id": "*"})  # 100 GB storage
    (t,) = transitions(rule, [150.0])
    body = orjson.loads(violations.build_alert_event(t, None, "h", time_format="rfc3339").payload)
    assert body["current_value"] == 150.0 and body["unit"] == "GB"
    assert body["percentage"] == 150.0 and body["user_id"] == "unassigned"


def test_log_rules_log_and_emit_nothing(caplog: pytest.LogCaptureFixture) -> None:
    rule = dataclasses.replace(CPU, action="log")
    ts = transitions(rule, [90.0, 10.0])
    with caplog.at_level(logging.WARNING, logger="hostagent.alerts.violations"):
        evs = violations.route(ts, {"vm-1": OWNER}, "h", time_format="unix")
    assert evs == []
    assert [r.__dict__["transition"] for r in caplog.records] == ["exceeded", "resolved"]
    assert len(violations.route(transitions(CPU, [90.0, 10.0]), {}, "h",
                            time_format="unix")) == 2


def test_channel_rate_limit_counts_and_catches_up() -> None:
    gate = violations.StormControl(per_minute=1, burst=1)
    # flapping 90/10 every 30 s: one token per minute lets every other notice through; the
    # held-back ones are counted and the next event says how many were held back.
    ts = transitions(CPU, [90.0, 10.0, 90.0, 10.0, 90.0, 10.0], gate=gate)
    assert [(t.kind, t.suppressed_before) for t in ts] == [
        ("exceeded", 0), ("resolved", 1)]  # the last flap (exceeded, back to ok) was held
    # back whole: consumers' view (ok) is right, and both held-back notices are counted
    assert gate.suppressed == {"alert": 2} and gate.suppressed_total == 2
    unlimited = violations.StormControl(per_minute=0, burst=1)
    assert len(transitions(CPU, [90.0, 10.0, 90.0, 10.0], gate=unlimited)) == 4
