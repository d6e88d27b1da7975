"""Value types of the raw source records: what the host readers return, before accounting.

libvirt's bulk stats of one domain (`DomainStats`), a link's counters from netlink
(`LinkStats`), where a domain's cgroup directories are (`CgroupPaths`, `ControllerDir`) and one
read of them (`CgroupReading`). Plain data, immutable by contract, as in hostagent.model (which
holds the types shared past the readers: inventory, readings, baselines, usage, events).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hostagent.model import CgroupVersion, IoSource, Pressure


@dataclass(slots=True, unsafe_hash=True)  # not frozen: made once per domain and pass
class DomainStats:
    """One active domain's bulk stats (libvirt's flat `group.N.field` dict) and its handle."""

    uuid: str
    name: str
    domid: int
    stats: Mapping[str, Any]
    handle: Any = field(default=None, compare=False, repr=False)


@dataclass(slots=True, unsafe_hash=True)
class LinkStats:
    """Host-side counters of one link (a tap's rx is what the guest sent)."""

    ifindex: int
    ifname: str
    mac: str | None
    rx_bytes: int | None
    tx_bytes: int | None
    kind: str | None = None
    source: str = "netlink"


@dataclass(frozen=True, slots=True)
class ControllerDir:
    """One controller's per-VM directory (host path, without the HostRoot prefix)."""

    path: str
    version: CgroupVersion


@dataclass(frozen=True, slots=True)
class CgroupPaths:
    """Where a domain's counters live; `missing` says why a controller has no per-VM dir."""

    cpu: ControllerDir | None
    memory: ControllerDir | None
    io: ControllerDir | None
    unified: str | None
    missing: Mapping[str, str] = field(default_factory=dict)


@dataclass(slots=True, unsafe_hash=True)
class CgroupReading:
    """One read of a domain's cgroups; None = could not be read (`missing` says why).

    `memory_limit_bytes` is None without a `missing` entry when the cgroup is unlimited.
    `io_source` "v1:blkio.throttle" stays 0 without throttle rules: prefer libvirt block stats.
    """

    cpu_ns: int | None
    memory_current_bytes: int | None
    memory_working_set_bytes: int | None
    memory_limit_bytes: int | None
    io_read_bytes: int | None
    io_write_bytes: int | None
    io_source: IoSource | None
    pressure: Pressure | None
    missing: Mapping[str, str] = field(default_factory=dict)
    # The cpu controller's file was absent: the VM cgroup was removed. A cgroup that holds a
    # process cannot be removed, so the process that was in it has ended (tails.py).
    cpu_gone: bool = False
