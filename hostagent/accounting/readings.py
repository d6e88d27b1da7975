"""What a pass reads and produces: one `DomainReading` per domain, the host's reading, the
accounting and the report.

Plain data shared by the collector (which fills them), the pure accounting step, the daemon
(logs, systemd status), the API view (snapshots of `PassReport`) and the tests.

A `DomainReading` is the whole of what the host said about one domain at one instant: its
identity (the parsed XML and instance id), its counters from every source, and what could not
be read and why (`missing`). It is self-contained, so a later reading of the same domain (a
light sample, a read on a lifecycle event) can replace it, and `assemble.sample_of` turns it
into the `Sample` accounting uses without looking anything else up.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from hostagent.accounting.unattributed import UnattributedCpu
from hostagent.alerts import state as threshold_state
from hostagent.alerts.rules import Rule
from hostagent.model import (
    Baseline,
    DomainInfo,
    GpuReading,
    NicCounters,
    OutEvent,
    Owner,
    Sample,
    Usage,
)
from hostagent.source_model import CgroupPaths, CgroupReading

__all__ = ["Accounting", "DomainReading", "HostFacts", "HostReading", "PassReport", "ReadError",
           "ReadStep", "brief"]

# The per-domain read steps that can fail on their own (the `reason` label of
# hostagent_domain_read_errors_total; a bounded set, never free text).
ReadStep = Literal["stats", "xml", "identity", "pid_file", "proc", "cgroup", "gpu"]
# An error text kept in a reading or a log line: a 10 KB domain name must not make 10 KB events.
MAX_DETAIL_CHARS = 240


def brief(text: str, limit: int = MAX_DETAIL_CHARS) -> str:
    """`text`, its middle elided when longer than `limit` (the head and the errno stay)."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}…{text[-half:]}"


@dataclass(slots=True, unsafe_hash=True)
class HostFacts:
    """What the host side knows about one QEMU process (found once per incarnation)."""

    pid: int | None
    start_ticks: int | None
    started_wall_ns: int | None
    cgroup: CgroupPaths | None


NO_FACTS = HostFacts(pid=None, start_ticks=None, started_wall_ns=None, cgroup=None)


@dataclass(frozen=True, slots=True)
class ReadError:
    """One domain's read step failed: which domain, which step, and the error text."""

    uuid: str
    name: str
    step: ReadStep
    detail: str


@dataclass(slots=True, unsafe_hash=True)
class DomainReading:
    """Everything read about one domain at `t_wall_ns`: identity, counters, what is missing.

    `stats` is libvirt's flat bulk-stats dict ({} when libvirt gave none), `cgroup` the cgroup
    files read where libvirt could not stand in for them, `netlink_nics` the tap counters by
    NIC key (`Nic.key`: the MAC, or `<mac>@<target dev>` where NICs share a MAC; None: no link
    dump this time) and why a NIC had none there (libvirt's counters may still stand in).
    `missing` maps a reading (`cpu`, `net:<key>`,
    `cgroup`, `process`, ...) to why it could not be taken; it ends up in `Sample.missing`.
    """

    info: DomainInfo
    instance_id: str
    t_wall_ns: int
    stats: Mapping[str, Any]
    facts: HostFacts = NO_FACTS
    cgroup: CgroupReading | None = None
    netlink_nics: Mapping[str, NicCounters] | None = None
    netlink_missing: Mapping[str, str] = field(default_factory=dict)
    gpus: tuple[GpuReading, ...] = ()
    missing: Mapping[str, str] = field(default_factory=dict)

    @property
    def uuid(self) -> str:
        """The domain's UUID (lowercase)."""
        return self.info.uuid


@dataclass(frozen=True, slots=True)
class HostReading:
    """One pass's read of the host: a reading per readable domain, and the per-domain errors.

    A domain listed in `errors` with no reading (XML, identity or GPU failed) is withheld
    from accounting this pass: its baseline stays, and the next good reading covers the gap.
    """

    t_wall_ns: int
    domains: tuple[DomainReading, ...]
    errors: tuple[ReadError, ...] = ()
    path: str = ""
    timed_out: tuple[str, ...] = ()
    # Every running domain libvirt listed (UUID → name), read or not.
    listed: Mapping[str, str] = field(default_factory=dict)


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
    read_errors: tuple[ReadError, ...] = ()
    # Per-domain read errors since the daemon started, by step (a Prometheus counter).
    read_errors_total: Mapping[str, int] = field(default_factory=dict)
    # The parent cgroup's CPU no event billed (accounting/unattributed.py); None: no v2 parent.
    unattributed: UnattributedCpu | None = None

    @property
    def unattributed_cpu_s(self) -> float | None:
        """`hostagent_unattributed_cpu_seconds_total`; None without a v2 parent cgroup."""
        return None if self.unattributed is None else self.unattributed.total_s


@dataclass(frozen=True, slots=True)
class Accounting:
    """What the pure accounting step produced, committed together.

    `baselines` are the new baselines to write, `removed` the instances whose baselines go
    (expired, or closed out), `events` usage events and alert notifications in order.
    """

    usages: list[Usage]
    baselines: list[Baseline]
    events: list[OutEvent]
    owners: dict[str, Owner]
    alert_changes: Mapping[str, bytes | None]
    alert_states: Mapping[str, threshold_state.AlertState]
    removed: tuple[str, ...] = ()
    retired: Mapping[str, Rule] = field(default_factory=dict)  # resolved in this pass
