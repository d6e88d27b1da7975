"""The pure accounting step of a pass: (baselines, readings, owners, rules, alert states,
settings) → (new baselines, removed baselines, events, alert changes).

Nothing here reads the host, the store or a clock: the collector hands in what it read and
commits what comes out in ONE transaction. Hypothesis drives this function directly
(tests/accounting/test_ledger.py): periods tile, and over any run of passes Σ usage equals the
counter growth, across resets, new incarnations and missing readings.

Three kinds of instance per call:
- read this pass (`readings`): usage since its baseline, new baseline (sampling.usage);
- gone (`closing`: the anchor and latest light reading of an incarnation that ended, from the
  tails the daemon keeps between passes, accounting/tails.py): usage up to its last reading
  (accounting/closeout.close_out), and the baseline moves to that reading — the close-out.
  It is kept (until `baseline_retention_ns`), so the instance's next incarnation tiles on from
  the close-out, and the same process listed again later continues from it, never from zero;
- read this pass without counters for a NIC its tail's light readings followed (a NIC
  hot-unplugged: accounting/unplug.py): that NIC is billed up to its last light reading;
- neither: its baseline is kept (a domain whose reading failed this pass keeps its old
  baseline, so the next good reading covers the gap), unless it is older than
  `baseline_retention_ns`, then it is removed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Protocol

from hostagent.accounting import events, gpu_change, sampling, unplug
from hostagent.accounting.assemble import sample_of
from hostagent.accounting.closeout import Closing, close_out
from hostagent.accounting.events import TimeFormat
from hostagent.accounting.readings import Accounting, DomainReading
from hostagent.accounting.tails import Key, Tail
from hostagent.alerts import state as threshold_state
from hostagent.alerts import violations
from hostagent.alerts.index import RuleIndex
from hostagent.alerts.rules import Rule
from hostagent.model import Baseline, OutEvent, Owner, OwnerHint, Sample, Usage

__all__ = ["OwnerLookup", "Settings", "account", "expired"]


class OwnerLookup(Protocol):
    """Who an instance is billed to right now (owners.resolver.Owners; a dict in tests)."""

    def resolve(self, instance_id: str, hint: OwnerHint | None, *,
                build_id: str | None = None) -> Owner:
        """The owner to bill now; never blocks."""
        ...


@dataclass(frozen=True, slots=True)
class Settings:
    """The configuration the accounting step depends on (fixed for a daemon's life)."""

    node_id: str
    time_format: TimeFormat
    store_created_ns: int
    count_preexisting: bool = False
    baseline_retention_ns: int = 30 * 86_400 * 1_000_000_000  # collector.baseline_retention_s
    unassigned: str = "unassigned"
    # Formation hosts: the VM name is the build id the account service knows.
    name_is_build_id: bool = False


def expired(baselines: Mapping[str, Baseline], present: AbstractSet[str], now_ns: int,
            retention_ns: int) -> list[str]:
    """Instances not read for longer than the retention: their baselines go.

    A domain that comes back later is a first sight again; its process started after the
    store existed, so it is billed from its own start and nothing is lost.
    """
    if baselines.keys() <= present:  # every baseline read (most passes): one check in C
        return []
    return [iid for iid, b in baselines.items()
            if iid not in present and now_ns - b.t_wall_ns > retention_ns]


def stopped_unseen(states: Iterable[threshold_state.AlertState], baselines: Mapping[str, Baseline],
                   running: AbstractSet[str]) -> dict[str, Usage]:
    """The instances with open alerts that a pass reading every running domain did not find
    (`running`: those it read or closed out): they stopped while the daemon was down, and no
    close-out will tell of it. Each maps to an empty period at its last committed reading
    (its baseline), the context of its alerts' "instance stopped" notices. An instance
    without a baseline (expired) is left out: its states are dropped as before."""
    out: dict[str, Usage] = {}
    for st in states:
        iid = st.instance_id
        b = baselines.get(iid)
        if iid in running or iid in out or b is None:
            continue
        out[iid] = Usage(iid, iid, iid, b.incarnation, False, b.t_wall_ns, b.t_wall_ns, 0, 0,
                         0, 0, None, None, None, None, None, None, 0, 0, 0, 0, 0, 0, None)
    return out


def account(
    baselines: Mapping[str, Baseline],
    readings: Sequence[DomainReading],
    *,
    owners: OwnerLookup,
    settings: Settings,
    now_ns: int,
    rules: RuleIndex | None = None,
    alert_states: Mapping[str, threshold_state.AlertState] | None = None,
    gate: threshold_state.Gate | None = None,
    closing: Sequence[Closing | DomainReading] = (),
    retired: Mapping[str, Rule] | None = None,
    live: Mapping[Key, Tail] | None = None,
    gpu_changes: Mapping[str, int] | None = None,
    complete: bool = False,
) -> tuple[Accounting, list[Sample]]:
    """One pass's accounting; also returns the samples it billed (for the report and the API).

    `closing`: ended incarnations (`Closing`, or a bare last reading), closed out oldest first
    before the present readings, so a domain restarted between two passes gets its old
    incarnation's final event and its new one tiles on from that. A closing of the
    incarnation a present reading still shows is no end and is ignored.
    `live`: the tails before this pass (light readings merged); a reading without counters for
    a NIC whose tap they followed takes that NIC's last light counters (accounting/unplug.py).
    `gpu_changes`: uuid → wall ns of the last GPU hot-plug or unplug libvirt told of, for the
    domains whose XML this pass re-read after it: a period in which the GPU count changed is
    billed with the old count up to then (accounting/gpu_change.py).
    `complete`: `readings` are every domain that runs now (the pass read them all, no read
    error): an open alert of an instance neither read nor closed out resolves ("instance
    stopped", `stopped_unseen`: it stopped while the daemon was down).
    """
    samples = [sample_of(r) for r in readings]
    if live:
        samples = unplug.fill(samples, live)
        if gpu_changes:
            samples = gpu_change.fill(samples, live, gpu_changes)
    now = {s.instance_id: s for s in samples}
    usages: list[Usage] = []
    bases: list[Baseline] = []
    out: list[OutEvent] = []
    who: dict[str, Owner] = {}
    closed: dict[str, Baseline] = {}  # instances closed out and not read: their new baseline
    node, time_format = settings.node_id, settings.time_format
    resolve = owners.resolve
    by_name = settings.name_is_build_id
    build = events.build_usage_event
    prevs: Mapping[str, Baseline] = baselines
    ends = sorted((c if isinstance(c, Closing) else Closing(c) for c in closing),
                  key=lambda c: c.reading.t_wall_ns)
    hints = {r.info.uuid: r.info.owner_hint for r in readings}
    if ends:
        hints.update({c.reading.uuid: c.reading.info.owner_hint for c in ends})
        ended = dict(baselines)
        prevs = ended
        for c in ends:
            final = c.sample if c.sample is not None else sample_of(c.reading)
            iid, cur = final.instance_id, now.get(final.instance_id)
            if cur is not None and sampling.same_incarnation(cur.incarnation, final.incarnation):
                continue
            co = close_out(ended.get(iid), final, c.light, reason=c.reason,
                           store_created_ns=settings.store_created_ns, anchor_io=c.anchor_io,
                           count_preexisting=settings.count_preexisting, born=c.born)
            ended[iid] = co.baseline
            if cur is None:
                closed[iid] = co.baseline
            owner = resolve(iid, hints.get(final.uuid), build_id=final.name if by_name else None)
            who[iid] = owner
            if co.usage is not None:
                usages.append(co.usage)
                out.append(build(co.usage, owner, node, time_format=time_format))
        bases.extend(closed.values())
    usage_of = sampling.usage
    store_created_ns, count_preexisting = settings.store_created_ns, settings.count_preexisting
    for s in samples:
        iid = s.instance_id
        u, base = usage_of(prevs.get(iid), s, store_created_ns=store_created_ns,
                           count_preexisting=count_preexisting)
        bases.append(base)
        owner = resolve(iid, hints.get(s.uuid), build_id=s.name if by_name else None)
        who[iid] = owner
        if u is not None:
            usages.append(u)
            out.append(build(u, owner, node, time_format=time_format))
    removed = tuple(expired(baselines, now.keys() | closed.keys() if closed else now.keys(),
                            now_ns, settings.baseline_retention_ns))
    changes: Mapping[str, bytes | None] = {}
    states: Mapping[str, threshold_state.AlertState] = alert_states or {}
    if rules is not None:
        gone = (stopped_unseen(states.values(), baselines, now.keys() | closed.keys())
                if complete and states else None)
        if gone:
            for iid in gone:
                who[iid] = resolve(iid, None, build_id=None)
        users = {iid: (None if o.user_id == settings.unassigned else o.user_id)
                 for iid, o in who.items()}
        ev = threshold_state.evaluate(rules, usages, users, states, now_ns, gate=gate,
                                      removed_instances=removed, retired=dict(retired or {}),
                                      ended=closed.keys(),  # their alerts resolve
                                      gone=gone)
        out.extend(violations.route(ev.transitions, who, settings.node_id,
                                time_format=settings.time_format, unassigned=settings.unassigned))
        changes, states = ev.changes, ev.states
    acc = Accounting(usages=usages, baselines=bases, events=out, owners=who,
                     alert_changes=changes, alert_states=states, removed=removed,
                     retired=dict(retired or {}))
    return acc, samples
