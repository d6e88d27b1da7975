"""The alert state machine, and `evaluate`: one pass of it over the rule index's matches.

Per (rule, instance) alert: ok → approaching → exceeded, with hysteresis, `for_passes`, repeats
and a cooldown (drawn below). Pure: `evaluate` returns the notifications and the state rows to
write, and the outbox commits those rows in the pass's transaction (`AlertState.to_bytes`).
"""

from __future__ import annotations

import dataclasses
from bisect import bisect_right
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import orjson

from hostagent.alerts.index import (
    NS_PER_S,
    Levels,
    MeasureKey,
    RuleIndex,
    levels_of,
    measure_value,
)
from hostagent.alerts.rules import WILDCARD, Rule
from hostagent.model import Usage

# --- the alert state machine ----------------------------------------------------------------
#
#   ok ──(value ≥ approach)──► approaching ──(value ≥ threshold for `for` passes)──► exceeded
#   exceeded ──(value < threshold × (1 − hysteresis))──► approaching | ok      ("resolved")
#   approaching ──(value < approach × (1 − hysteresis))──► ok                  ("resolved")
#   exceeded, still firing, repeat_interval since the last notice            ("repeat")
#
# Consumers are told about a status through a notification; `notified` is what they were last
# told. A notification held back (cooldown, rate limit) leaves `notified` behind, so it is sent
# as soon as it may be: the latest status always reaches consumers, with a count of what was
# held back. A pass without a value (None) changes nothing at all.

Status = Literal["ok", "approaching", "exceeded"]
TransitionKind = Literal["approaching", "exceeded", "repeat", "resolved"]
_RANK: dict[Status, int] = {"ok": 0, "approaching": 1, "exceeded": 2}
Gate = Callable[[Rule, str, int], bool]


@dataclass(frozen=True, slots=True)
class AlertState:
    """What the store keeps per fingerprint (`rule_id|instance_id`) while it is not plain ok."""

    rule_id: str
    instance_id: str
    status: Status
    breaches: int  # consecutive passes at/above the threshold before it fired
    since_ns: int  # when `status` began
    notified: Status  # what consumers were last told
    notified_ns: int | None  # when they were told
    suppressed: int  # notifications held back since the last one sent
    value: float  # at the last status change

    def to_bytes(self) -> bytes:
        """The store's form (orjson), in a block of its own size (kept until the commit;
        orjson's own is its 4 KiB write buffer: accounting.events.exact)."""
        raw = orjson.dumps({"v": 1, "rule_id": self.rule_id, "instance_id": self.instance_id,
                            "status": self.status, "breaches": self.breaches,
                            "since_ns": self.since_ns, "notified": self.notified,
                            "notified_ns": self.notified_ns, "suppressed": self.suppressed,
                            "value": self.value})
        return memoryview(raw).tobytes()

    @classmethod
    def from_bytes(cls, raw: bytes) -> AlertState:
        """Inverse of `to_bytes`; ValueError on anything else."""
        d = orjson.loads(raw)
        if not isinstance(d, dict) or d.get("v") != 1:
            raise ValueError("unknown alert state version")
        if d["status"] not in _RANK or d["notified"] not in _RANK:
            raise ValueError(f"bad alert status {d['status']!r}")
        return cls(str(d["rule_id"]), str(d["instance_id"]), d["status"], int(d["breaches"]),
                   int(d["since_ns"]), d["notified"],
                   None if d["notified_ns"] is None else int(d["notified_ns"]),
                   int(d["suppressed"]), float(d["value"]))


@dataclass(frozen=True, slots=True)
class Transition:
    """A notification to send: `kind` moved the alert from `previous` to `state.status`."""

    fingerprint: str
    rule: Rule
    usage: Usage
    kind: TransitionKind
    previous: Status
    state: AlertState
    value: float
    levels: Levels
    suppressed_before: int  # notifications of this fingerprint held back before this one
    reason: str | None = None  # why, when not the value: "rule deleted" / "rule changed" /
    # "owner changed"
    # The user the notice is for when the instance is no longer theirs ("owner changed": the
    # rule's own user, never the new owner); None: the instance's owner.
    for_user: str | None = None


@dataclass(frozen=True, slots=True)
class Evaluation:
    """One pass's outcome: notifications, store changes (None deletes), counts."""

    transitions: tuple[Transition, ...]
    changes: Mapping[str, bytes | None]
    states: Mapping[str, AlertState]
    suppressed: int
    checked: int


def fingerprint(rule_id: str, instance_id: str) -> str:
    """The alert's identity: one per (rule, instance)."""
    return f"{rule_id}|{instance_id}"


def next_status(prev: Status, breaches: int, value: float, lv: Levels) -> tuple[Status, int]:
    """Pure core: the status and breach count after one pass with `value`."""
    if value >= lv.threshold:
        breaches += 1
        if prev == "exceeded" or breaches >= lv.for_passes:
            return "exceeded", 0
        # Counting up to `for_passes`: that is approaching only where the rule has an
        # approaching level. With approaching_fraction = 1 ("no approaching state") it once
        # notified `approaching` (and then `resolved`) for every breach shorter than for_passes.
        return ("approaching" if lv.approach < lv.threshold else "ok"), breaches
    if prev == "exceeded" and value >= lv.resolve:
        return "exceeded", 0  # hysteresis: still firing
    if value >= lv.approach and lv.approach < lv.threshold:
        return "approaching", 0
    if prev != "ok" and value >= lv.approach_clear and lv.approach < lv.threshold:
        return "approaching", 0  # hysteresis below the approach level
    return "ok", 0


def step(rule: Rule, lv: Levels, prev: AlertState | None, instance_id: str,
         value: float | None, now_ns: int, cooldown_ns: int, gate: Gate | None,
         ) -> tuple[AlertState | None, TransitionKind | None, bool]:
    """One alert, one pass → (new state or None for ok, notification kind, suppressed?)."""
    if value is None:
        return prev, None, False
    if prev is None:
        if value < lv.approach and value < lv.threshold:
            return None, None, False  # the hot path: nothing to keep, nothing to say
        prev = AlertState(rule.id, instance_id, "ok", 0, now_ns, "ok", None, 0, value)
    elif prev.notified_ns is not None and prev.notified_ns > now_ns:
        # The wall clock went back past the last notice (an NTP step, a host booted with a
        # wrong RTC): count the cooldown and the repeat interval from now. Left as it was,
        # `now - notified_ns` stayed negative, below any cooldown (0 included), and held back
        # every notice of the alert, its resolve too, until the clock caught up again.
        prev = dataclasses.replace(prev, notified_ns=now_ns)
    status, breaches = next_status(prev.status, prev.breaches, value, lv)
    since = prev.since_ns if status == prev.status else now_ns
    # The value at the last status change: an unchanged alert is an unchanged row (no write).
    kept = prev.value if status == prev.status else value
    kind: TransitionKind | None = None
    if status != prev.notified:
        kind = "resolved" if _RANK[status] < _RANK[prev.notified] else status  # type: ignore[assignment]
    elif (status == "exceeded" and lv.repeat_ns > 0 and prev.notified_ns is not None
          and now_ns - prev.notified_ns >= lv.repeat_ns):
        kind = "repeat"
    if kind is None and status == prev.status and breaches == prev.breaches:
        new = prev  # a firing alert that goes on firing (most rows): nothing to build or write
    else:
        new = AlertState(rule.id, instance_id, status, breaches, since, prev.notified,
                         prev.notified_ns, prev.suppressed, kept)
    suppressed = False
    if kind is not None:
        fp = fingerprint(rule.id, instance_id)
        cooling = (prev.notified_ns is not None and now_ns - prev.notified_ns < cooldown_ns)
        if cooling or (gate is not None and not gate(rule, fp, now_ns)):
            suppressed = status != prev.status or kind == "repeat"
            new = AlertState(rule.id, instance_id, status, breaches, since, prev.notified,
                             prev.notified_ns, prev.suppressed + int(suppressed), kept)
            kind = None
        else:
            new = AlertState(rule.id, instance_id, status, breaches, since, status, now_ns, 0,
                             kept)
    if (new.status == "ok" and new.notified == "ok" and new.breaches == 0
            and (new.notified_ns is None or now_ns - new.notified_ns >= cooldown_ns)):
        return None, kind, suppressed
    # A resolved alert keeps its row while its cooldown runs: dropped at once, it forgot when
    # it last notified, and a VM flapping across the threshold every pass got its `exceeded`
    # one pass after each `resolved`, whatever `cooldown_s` said.
    return new, kind, suppressed


def evaluate(index: RuleIndex, usages: Iterable[Usage], owners: Mapping[str, str | None],
             states: Mapping[str, AlertState], now_ns: int, *, gate: Gate | None = None,
             removed_instances: Iterable[str] = (),
             retired: Mapping[str, Rule] | None = None,
             ended: Iterable[str] = (),
             gone: Mapping[str, Usage] | None = None) -> Evaluation:
    """One pass: the rules that apply to each usage → notifications + state changes.

    `owners` maps instance → user_id (None or absent: unknown; then only the rules of user
    `*` apply, the instance's own and the wildcard ones: a user's rule never reaches an
    unassigned instance). Per instance and measure, only rules whose level the value reaches are
    visited (bisect), plus the rules with an open alert for that instance (so it can resolve).
    `retired`: rules deleted or changed since the last pass (their old definitions): an alert
    of one that consumers were told about resolves now, with the reason, and its state starts
    over (a changed rule fires again under its new definition). An open alert of a user's rule
    on an instance now known to be another user's ends too ("owner changed", the notice for
    the rule's user); an unknown owner changes nothing. Other states of rules no longer in the
    index, and of removed instances, are dropped silently.
    `ended`: instances whose domain ended in this pass (stopped, destroyed, migrated away) and
    that do not run now; their usage here is their last. After it, each of their alerts that
    consumers were told about resolves ("instance stopped"), and their states go: an alert
    of a VM that is no more does not stay open.
    `gone`: instances with open alerts that no longer run and have no usage in this pass (they
    stopped while the daemon was down, so no close-out told of their end), each with the
    period its last committed reading ended (`ledger.stopped_unseen`). Their alerts resolve as
    `ended`'s do, without a value evaluated.
    """
    cooldown_ns = int(index.settings.cooldown_s * NS_PER_S)
    levels, by_id = index.levels, index.by_id
    open_by_inst: dict[str, dict[str, AlertState]] = {}
    for st in states.values():
        open_by_inst.setdefault(st.instance_id, {})[st.rule_id] = st
    if not index.rules:
        # No rule applies to anyone: only an instance's open alerts (to resolve, or to end
        # with a retired rule) can change anything; the others need no visit (at 1,000
        # domains without rules, ~1 ms a pass).
        usages = [u for u in usages if u.instance_id in open_by_inst]
    changes: dict[str, bytes | None] = {}
    out_states = dict(states)
    transitions: list[Transition] = []
    suppressed = checked = 0

    def visit(rule: Rule, u: Usage, value: float | None, prev: AlertState | None) -> None:
        nonlocal suppressed
        iid = u.instance_id
        fp = fingerprint(rule.id, iid)
        lv = levels[rule.id]
        new, kind, held = step(rule, lv, prev, iid, value, now_ns, cooldown_ns, gate)
        suppressed += held
        if new is not prev and new != prev:
            changes[fp] = None if new is None else new.to_bytes()
            # An instance may report twice in one pass (the close-out of the incarnation that
            # ended, then the new one's first period): the second usage steps on from the
            # first's state. It once stepped from the pass's starting state again: a second
            # `exceeded` for one crossing, or a `resolved` whose alert was then dropped while
            # the new incarnation's value still fired.
            inst = open_by_inst.setdefault(iid, {})
            if new is None:
                out_states.pop(fp, None)
                inst.pop(rule.id, None)
            else:
                out_states[fp] = new
                inst[rule.id] = new
        if kind is not None and value is not None:
            transitions.append(Transition(fp, rule, u, kind, prev.notified if prev else "ok",
                                          new or _ok(rule.id, iid, now_ns, value), value, lv,
                                          prev.suppressed if prev else 0))

    stopped = set(ended)
    last_usage: dict[str, Usage] = {}
    for u in usages:
        iid = u.instance_id
        user = owners.get(iid)
        if iid in stopped:
            last_usage[iid] = u
        opened = open_by_inst.get(iid, {})
        for rid, old in (retired or {}).items():
            prev = opened.pop(rid, None)
            if prev is None:
                continue
            fp = fingerprint(rid, iid)
            changes[fp] = None
            out_states.pop(fp, None)
            if prev.notified != "ok":
                reason = "rule changed" if rid in by_id else "rule deleted"
                transitions.append(Transition(
                    fp, old, u, "resolved", prev.notified,
                    AlertState(rid, iid, "ok", 0, now_ns, "ok", now_ns, 0, prev.value),
                    prev.value, levels_of(old, index.settings), prev.suppressed, reason))
        done: set[str] = set()
        cache: dict[MeasureKey, float | None] = {}
        buckets = [index.by_instance.get(iid), index.wildcard,
                   index.by_user.get(user) if user is not None else None]
        for bucket in buckets:
            if not bucket:
                continue
            for key, (lows, rules) in bucket.items():
                checked += len(rules)
                if key in cache:
                    value = cache[key]
                else:
                    value = cache[key] = measure_value(key[0], key[1], u)
                if value is None:
                    continue  # missing data: nothing fires, nothing resolves
                for rule in rules[:bisect_right(lows, value)]:
                    if rule.instance_id is not None and rule.user_id not in (WILDCARD, user):
                        continue
                    done.add(rule.id)
                    visit(rule, u, value, opened.get(rule.id))
        for rid, prev in list(opened.items()):  # visit() updates `opened`
            held_rule = by_id.get(rid)
            if rid in done or held_rule is None:
                continue
            if held_rule.user_id not in (WILDCARD, user):
                if user is not None:  # another user's now: the rule no longer applies
                    fp = fingerprint(rid, iid)
                    changes[fp] = None
                    out_states.pop(fp, None)
                    opened.pop(rid, None)
                    if prev.notified != "ok":
                        transitions.append(Transition(
                            fp, held_rule, u, "resolved", prev.notified,
                            _ok(rid, iid, now_ns, prev.value), prev.value, levels[rid],
                            prev.suppressed, "owner changed", for_user=held_rule.user_id))
                continue  # owner unknown (unassigned, account service down): kept as is
            key = (held_rule.resource, held_rule.measure_unit)
            value = cache[key] if key in cache else measure_value(key[0], key[1], u)
            visit(held_rule, u, value, prev)
    if gone:
        last_usage.update({iid: u for iid, u in gone.items() if iid not in last_usage})
    if last_usage:
        for fp, st in list(out_states.items()):
            final = last_usage.get(st.instance_id)
            stopped_rule = by_id.get(st.rule_id)
            if final is None or stopped_rule is None:
                continue
            del out_states[fp]
            changes[fp] = None
            if st.notified != "ok":  # never held back: there is no later pass to send it
                transitions.append(Transition(
                    fp, stopped_rule, final, "resolved", st.notified,
                    _ok(st.rule_id, st.instance_id, now_ns, st.value), st.value,
                    levels[st.rule_id], st.suppressed, "instance stopped"))
    expired = set(removed_instances)
    for fp, st in list(out_states.items()):
        if st.rule_id not in levels or st.instance_id in expired:
            del out_states[fp]
            changes[fp] = None
    return Evaluation(tuple(transitions), changes, out_states, suppressed, checked)


def _ok(rule_id: str, instance_id: str, now_ns: int, value: float) -> AlertState:
    return AlertState(rule_id, instance_id, "ok", 0, now_ns, "ok", now_ns, 0, value)


def load_states(raw: Mapping[str, bytes]) -> dict[str, AlertState]:
    """The store's alert_state rows → states; unreadable rows are skipped (and reported)."""
    out: dict[str, AlertState] = {}
    for fp, b in raw.items():
        try:
            out[fp] = AlertState.from_bytes(b)
        except (ValueError, KeyError, TypeError, orjson.JSONDecodeError):
            continue
    return out
