"""What a pass reads and produces: host facts, source readings, the accounting, the report.

Plain data shared by the collector (which fills them), the daemon (logs, systemd status), the
API view (snapshots of `PassReport`) and the tests.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from hostagent.alerts import state as threshold_state
from hostagent.alerts.rules import Rule
from hostagent.model import Baseline, OutEvent, Owner, Sample, Usage
from hostagent.sources import cgroup as cgroup_src
from hostagent.sources import net as net_src
from hostagent.sources.libvirt import DomainStats

__all__ = ["Accounting", "HostFacts", "PassReport", "Readings"]


@dataclass(frozen=True, slots=True)
class HostFacts:
    """What the host side knows about one QEMU process (found once per incarnation)."""

    pid: int | None
    start_ticks: int | None
    started_wall_ns: int | None
    cgroup: cgroup_src.CgroupPaths | None


@dataclass(slots=True)
class PassReport:
    """What a pass did, for logs, health and the API."""

    started_wall_ns: int = 0
    duration_s: float = 0.0
    cpu_s: float = 0.0
    domains: int = 0
    events: int = 0
    libvirt_path: str = ""
    timed_out: tuple[str, ...] = ()
    missing: int = 0
    committed: bool = False
    error: str | None = None
    usages: tuple[Usage, ...] = ()
    samples: tuple[Sample, ...] = ()
    owners: Mapping[str, Owner] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Accounting:
    """What the pure part of a pass produced, committed together."""

    usages: list[Usage]
    baselines: list[Baseline]
    events: list[OutEvent]
    owners: dict[str, Owner]
    alert_changes: Mapping[str, bytes | None]
    alert_states: Mapping[str, threshold_state.AlertState]
    retired: Mapping[str, Rule] = field(default_factory=dict)  # resolved in this pass


@dataclass(frozen=True, slots=True)
class Readings:
    """Everything the sources returned for one pass."""

    t_wall_ns: int
    domains: tuple[DomainStats, ...]
    path: str
    timed_out: tuple[str, ...]
    links: Mapping[str, net_src.LinkStats] | None
    links_error: str | None
