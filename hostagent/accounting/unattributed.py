"""Billing completeness for the whole host: CPU the VMs' parent cgroup used that no event billed.

On cgroup v2 the parent of the VM cgroups (`machine.slice` with systemd, `/machine` without)
keeps counting the CPU of children that are gone: its `cpu.stat` `usage_usec` only grows
across a destroy (LAB-NOTES). So, over the same stretch of time,

    unattributed = growth of the parent's CPU - Σ cpu_ns of the events that cover that stretch

is what no event billed: the tail of a destroyed VM after its last reading (at most one sample
interval of its CPU), domains never billed (pre-existing, or ones whose reading kept failing),
and any non-libvirt process in that slice. Near zero means complete.

Only events whose period starts at or after the tracker's start count, so a restarted daemon
does not count growth from before it started (the first pass after a start bills from older
baselines). Deferred CPU (a domain's CPU reading missing this pass, billed by the next good
one) makes the raw difference (`raw_ns`) go up, then down by the same amount. The exported
counter (`total_ns`, `hostagent_unattributed_cpu_seconds_total`) therefore only moves at a
*settled* pass, one after which no domain's CPU is deferred, and then to the maximum of itself
and the raw difference: it never goes down and never counts a deferral. Pure: the pass reads
the parent (hostagent/sources/unattributed.py) and calls `advance` once per pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from hostagent.accounting.sampling import ESTABLISHED
from hostagent.model import Usage


@dataclass(frozen=True, slots=True)
class UnattributedCpu:
    """Tracker state; `total_ns` is the exported counter (ns, monotonic)."""

    since_wall_ns: int  # events whose period starts earlier are not counted
    parent_start_ns: int  # the parent's CPU when counting (re)started
    parent_last_ns: int  # the parent's CPU at the last pass that read it
    accounted_ns: int  # Σ cpu_ns of the counted events since parent_start_ns
    total_ns: int = 0
    banked_ns: int = 0  # unattributed CPU of earlier spans (before the parent restarted)
    raw_ns: int = 0  # this span's difference now, deferrals included (for `dump --host`)

    @property
    def total_s(self) -> float:
        """The counter in seconds, for `hostagent_unattributed_cpu_seconds_total`."""
        return self.total_ns / 1e9


def start(parent_cpu_ns: int, wall_ns: int, *, total_ns: int = 0) -> UnattributedCpu:
    """A tracker starting at a pass that read the parent's CPU at `wall_ns`."""
    return UnattributedCpu(since_wall_ns=wall_ns, parent_start_ns=parent_cpu_ns,
                           parent_last_ns=parent_cpu_ns, accounted_ns=0, total_ns=total_ns,
                           banked_ns=total_ns)


def advance(state: UnattributedCpu | None, parent_cpu_ns: int | None, wall_ns: int,
            usages: Iterable[Usage], *, settled: bool = True) -> UnattributedCpu | None:
    """The tracker after one pass: its events (`usages`), the parent's CPU (None: unread), and
    whether the pass is settled (no domain's CPU reading is deferred after it)."""
    if state is None:
        return None if parent_cpu_ns is None else start(parent_cpu_ns, wall_ns)
    if parent_cpu_ns is not None and parent_cpu_ns < state.parent_last_ns:
        # The parent cgroup was re-created (its counter went down): count anew from here.
        return start(parent_cpu_ns, wall_ns, total_ns=state.total_ns)
    accounted = state.accounted_ns + sum(
        u.cpu_ns for u in usages if u.period_start_ns >= state.since_wall_ns)
    parent = state.parent_last_ns if parent_cpu_ns is None else parent_cpu_ns
    raw = state.banked_ns + (parent - state.parent_start_ns) - accounted
    total = max(state.total_ns, raw) if settled and parent_cpu_ns is not None \
        else state.total_ns
    return replace(state, parent_last_ns=parent, accounted_ns=accounted, total_ns=total,
                   raw_ns=raw)


def settled(usages: Iterable[Usage], errors: Sequence[object]) -> bool:
    """No domain's CPU is deferred after this pass: no usage misses its CPU (other than a first
    baseline) and no domain's reading failed (it keeps its baseline for the next pass)."""
    return not errors and all(u.missing.get("cpu", ESTABLISHED) == ESTABLISHED for u in usages)
