"""Alert transitions → `threshold_violation` events; per-channel storm control; Log rules.

The event keeps seed 000's ThresholdViolation fields (`config`, `current_value`,
`threshold_value`, `percentage`) and adds what a consumer needs to act on one alert::

    {"event_type": "threshold_violation", "version": "1.0", "event_id", "timestamp", "host",
     "instance_id", "user_id", "org_id", "owner_source", "fingerprint", "transition":
     approaching|exceeded|repeat|resolved, "state": ok|approaching|exceeded, "previous_state",
     "since", "period": {"start", "end"}, "config", "current_value", "threshold_value", "unit",
     "percentage", "suppressed_before", "channels", "action", "reason"}

`reason` says why: "value" (the measured value crossed a level), or "rule deleted" / "rule
changed" for the `resolved` notice of an alert whose rule went away or was redefined.

`current_value` and `threshold_value` are in the rule's own unit (`unit`); `percentage` is
current_value as a percentage of threshold_value (100 = at the threshold). `event_id` is a
UUIDv5 of (host, fingerprint, transition, period end): a resent event is recognisably the same.

Routing by action: Log → one structured log line per transition, no event; Alert and Notify →
one event. An Alert event goes to every sink that takes `threshold_violation` (the queue on
its alert topic, every `threshold_violation` webhook registration, the JSONL file). A Notify
event carries the rule's channels as `OutEvent.channels` and the outbox routes it to the sinks
answering to them (alerts.routing): the queue for "queue"; the webhook registrations named,
or all of them for "webhook"/"api_callback"; the JSONL file keeps every event. The payload's
`channels` and `action` say the same; `payload_channels` reads them back (outbox rows written
before events carried their channels).

Storm control: a per-fingerprint cooldown (in the state machine) and a token bucket per
channel (`StormControl`, used as the evaluation's gate). A held-back notification is counted
(`suppressed_total`, per channel), carried in the next event's `suppressed_before`, and the
alert's latest status is sent as soon as the limits allow: nothing is silently lost.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import orjson

from hostagent.accounting.events import TimeFormat, exact, render_time
from hostagent.alerts.rules import Rule, unit_factor
from hostagent.alerts.state import Transition
from hostagent.model import OutEvent, Owner

log = logging.getLogger(__name__)

KIND = "threshold_violation"
VERSION = "1.0"
# Fixed forever: changing it changes every alert event_id.
ALERT_ID_NAMESPACE = uuid.UUID("4f0f9a52-5e0e-4d6b-9a43-0c8b7d3f6a21")
NS_PER_S = 1_000_000_000


def alert_event_id(host: str, fp: str, kind: str, at_ns: int) -> str:
    """Deterministic UUIDv5 of (host, fingerprint, transition kind, pass time)."""
    return str(uuid.uuid5(ALERT_ID_NAMESPACE, f"{host}|{fp}|{kind}|{at_ns}"))


def _in_rule_unit(rule: Rule, measured: float) -> float:
    """A measured value (bytes, bytes/s, percent...) back in the unit the rule was written in.

    By the unit's factor, not threshold ÷ value: a 0 GB threshold once reported its
    `current_value` in bytes under `"unit": "GB"`."""
    return measured / unit_factor(rule)


def channels_of(rule: Rule) -> tuple[str, ...]:
    """Storm-control channels of a rule: "alert" for Alert rules, else its channels."""
    if rule.action == "alert":
        return ("alert",)
    return rule.channels or ("default",)


def routing_channels(action: str, channels: Iterable[str]) -> frozenset[str] | None:
    """`OutEvent.channels` of an alert: a Notify rule's channels, None (everywhere) otherwise."""
    return frozenset(channels) if action == "notify" else None


def payload_channels(kind: str, payload: bytes) -> frozenset[str] | None:
    """The routing channels an event's payload records (None: not a Notify alert, or unreadable:
    every sink of its kind, as before channels were routed)."""
    if kind != KIND:
        return None
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("channels") or [], list):
        return None
    return routing_channels(str(doc.get("action")), map(str, doc.get("channels") or []))


def build_alert_event(t: Transition, owner: Owner | None, host: str, *,
                      time_format: TimeFormat, unassigned: str = "unassigned") -> OutEvent:
    """The outbox-ready `threshold_violation` event for one transition."""
    u, rule = t.usage, t.rule
    at_ns = u.period_end_ns
    current = _in_rule_unit(rule, t.value)
    pct = current / rule.value * 100.0 if rule.value else None
    payload = {
        "event_type": KIND, "version": VERSION,
        "event_id": alert_event_id(host, t.fingerprint, t.kind, at_ns),
        "timestamp": render_time(at_ns, time_format), "host": host,
        "instance_id": u.instance_id,
        "user_id": owner.user_id if owner else unassigned,
        "org_id": owner.org_id if owner else None,
        "owner_source": owner.source if owner else "unknown",
        "fingerprint": t.fingerprint, "transition": t.kind, "state": t.state.status,
        "previous_state": t.previous, "since": render_time(t.state.since_ns, time_format),
        "period": {"start": render_time(u.period_start_ns, time_format),
                   "end": render_time(at_ns, time_format)},
        "config": rule.config_dict(), "current_value": round(current, 6),
        "threshold_value": rule.value, "unit": rule.unit,
        "percentage": None if pct is None else round(pct, 6),
        "suppressed_before": t.suppressed_before, "channels": list(rule.channels),
        "action": rule.action, "reason": t.reason or "value",
    }
    return OutEvent(str(payload["event_id"]), KIND, u.instance_id, u.period_start_ns, at_ns,
                    exact(orjson.dumps(payload)), routing_channels(rule.action, rule.channels))


def route(transitions: Iterable[Transition], owners: Mapping[str, Owner], host: str, *,
          time_format: TimeFormat, unassigned: str = "unassigned") -> list[OutEvent]:
    """Events for Alert/Notify transitions; one log line for each Log transition."""
    out: list[OutEvent] = []
    for t in transitions:
        owner = (owners.get(t.usage.instance_id) if t.for_user is None
                 else Owner(t.for_user, None, "rule"))
        if t.rule.action == "log":
            log.warning("threshold transition", extra={
                "rule_id": t.rule.id, "instance_id": t.usage.instance_id,
                "fingerprint": t.fingerprint, "transition": t.kind, "state": t.state.status,
                "value": t.value, "threshold": t.rule.threshold, "unit": t.rule.measure_unit,
                "user_id": owner.user_id if owner else unassigned})
            continue
        out.append(build_alert_event(t, owner, host, time_format=time_format,
                                     unassigned=unassigned))
    return out


@dataclass
class _Bucket:
    tokens: float
    at_ns: int


STORM_KEY = "~storm"  # its row in the store's alert_state (a fingerprint always holds "|")


@dataclass
class StormControl:
    """Token bucket per channel: `per_minute` notifications, bursts of `burst`; a Gate.

    Its buckets and counts are persisted with the alert state, in the pass's transaction
    (`to_bytes` under STORM_KEY when `dirty`), and restored at start (`restore`): a restart
    neither refills the buckets nor forgets what was held back.
    """

    per_minute: float
    burst: int
    buckets: dict[str, _Bucket] = field(default_factory=dict)
    suppressed: dict[str, int] = field(default_factory=dict)
    dirty: bool = False

    def to_bytes(self) -> bytes:
        """The store's form; clears `dirty`."""
        self.dirty = False
        return orjson.dumps({"v": 1, "buckets": {k: [b.tokens, b.at_ns]
                                                 for k, b in self.buckets.items()},
                             "suppressed": self.suppressed})

    def restore(self, raw: bytes | None) -> None:
        """Load what `to_bytes` wrote; an unreadable row starts with full buckets."""
        if raw is None:
            return
        try:
            d = orjson.loads(raw)
            buckets = {str(k): _Bucket(min(float(t), float(self.burst)), int(at))
                       for k, (t, at) in d["buckets"].items()}
            suppressed = {str(k): int(v) for k, v in d["suppressed"].items()}
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            log.warning("storm-control state unreadable; starting with full buckets")
            return
        self.buckets, self.suppressed = buckets, suppressed

    @property
    def suppressed_total(self) -> int:
        """Notifications held back by the rate limit so far."""
        return sum(self.suppressed.values())

    def __call__(self, rule: Rule, fp: str, now_ns: int) -> bool:
        """May `rule` notify now? Takes a token from each of its channels, or none."""
        del fp
        if self.per_minute <= 0:
            return True
        chans = channels_of(rule)
        self.dirty = True
        buckets = []
        for ch in chans:
            b = self.buckets.get(ch)
            if b is None:
                b = self.buckets[ch] = _Bucket(float(self.burst), now_ns)
            refill = (now_ns - b.at_ns) / NS_PER_S * self.per_minute / 60.0
            b.tokens, b.at_ns = min(float(self.burst), b.tokens + max(refill, 0.0)), now_ns
            buckets.append(b)
        if all(b.tokens >= 1.0 for b in buckets):
            for b in buckets:
                b.tokens -= 1.0
            return True
        for ch in chans:
            self.suppressed[ch] = self.suppressed.get(ch, 0) + 1
        return False
