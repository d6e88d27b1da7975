"""Value types shared by every module: inventory, readings, baselines, usage, events.

All are immutable by contract: nothing assigns to a field after construction (build a new one,
or `dataclasses.replace`). The types made per domain and pass (readings, samples, baselines,
usage, events) are plain slots dataclasses with `unsafe_hash=True` (hashing and equality as if
frozen) instead of `frozen=True`: on CPython 3.11 a frozen `__init__` sets each field through
`object.__setattr__`, ~8x the cost of a plain one, which was ~10 % of a 1,000-domain pass
(issue 16). The rest stay frozen (`Owner` and `OwnerHint` are dict keys and compared by `is`).

Units live in names (`_ns`, `_bytes`, `_s`). A reading that could not be taken is `None`
(typed "missing"), never a made-up zero; `Sample.missing` says why.
Network counters are guest-oriented: `guest_tx_bytes` left the guest (egress, the host tap's
rx), `guest_rx_bytes` entered it (ingress, the host tap's tx).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
MemorySource = Literal["balloon", "cgroup", "rss"]
InstanceIdScheme = Literal["uuid", "name", "metadata", "formation"]
HostdevKind = Literal["pci", "mdev", "usb", "other"]
CgroupVersion = Literal[1, 2]
IoSource = Literal["v2:io.stat", "v1:blkio.throttle"]


# --- inventory (parsed from the domain XML) -------------------------------------------------


@dataclass(frozen=True, slots=True)
class Nic:
    """A guest NIC: `mac` (lowercase), `target` the host tap (may be absent), and `key`, what
    its counters, baseline and `missing` entry (`net:<key>`) go by: the MAC, which is unique in
    a domain as a rule; libvirt also takes NICs that share one, and then each but the last of
    them is `<mac>@<target dev>` (accounting/inventory.keyed_nics). Defaults to the MAC."""

    mac: str
    kind: str
    target: str | None
    model: str | None = None
    key: str = ""

    def __post_init__(self) -> None:
        if not self.key:  # made once per XML parse, never per pass
            object.__setattr__(self, "key", self.mac)


@dataclass(frozen=True, slots=True)
class Disk:
    """A guest block device by its target name (`vda`)."""

    target: str
    device: str
    source: str | None = None


@dataclass(frozen=True, slots=True)
class Hostdev:
    """A host device given to the guest: a PCI address (`0000:3b:00.0`) or an mdev UUID."""

    kind: HostdevKind
    address: str
    model: str | None = None


@dataclass(frozen=True, slots=True)
class OwnerHint:
    """An owner written into the domain's own metadata."""

    user_id: str | None
    org_id: str | None
    source: str


@dataclass(frozen=True, slots=True)
class DomainInfo:
    """What the domain XML says about one running domain (one incarnation)."""

    uuid: str
    name: str
    domid: int
    vcpus: int
    memory_bytes: int
    max_memory_bytes: int
    nics: tuple[Nic, ...] = ()
    disks: tuple[Disk, ...] = ()
    hostdevs: tuple[Hostdev, ...] = ()
    owner_hint: OwnerHint | None = None
    metadata_xml: str | None = None


# --- readings (one domain, one pass) ----------------------------------------------------------


@dataclass(slots=True, unsafe_hash=True)
class NicCounters:
    """Cumulative byte counters of one NIC; `ifindex` changes when a tap is new.

    `key` is its NIC's `Nic.key` (None: the MAC's); its baseline is kept under `nic_key`."""

    mac: str
    ifname: str | None
    ifindex: int | None
    guest_rx_bytes: int
    guest_tx_bytes: int
    source: str
    key: str | None = None


def canonical_nic_key(key: str) -> str:
    """A NIC key (`Nic.key`) as baselines keep it: its MAC part lowercased (a `@<target dev>`
    keeps its case); `key` itself where that is the same."""
    low = key.lower()
    if low == key:
        return key
    at = key.find("@")
    return low if at < 0 else low[:at] + key[at:]


def nic_key(n: NicCounters) -> str:
    """The key a NIC's counters are billed under: `canonical_nic_key` of `n.key`, else of its
    MAC."""
    return canonical_nic_key(n.key if n.key is not None else n.mac)


@dataclass(slots=True, unsafe_hash=True)
class BlockCounters:
    """Cumulative I/O bytes and current sizes of one disk."""

    target: str
    rd_bytes: int | None
    wr_bytes: int | None
    allocation_bytes: int | None
    capacity_bytes: int | None
    physical_bytes: int | None = None


@dataclass(slots=True, unsafe_hash=True)
class MemoryReading:
    """Guest memory in use and where the figure came from."""

    used_bytes: int
    source: MemorySource


@dataclass(slots=True, unsafe_hash=True)
class Pressure:
    """PSI `some avg10` percentages from the domain's cgroup, where the kernel has them."""

    cpu_some_avg10: float | None
    memory_some_avg10: float | None
    io_some_avg10: float | None


@dataclass(slots=True, unsafe_hash=True)
class GpuReading:
    """One GPU allocated to a domain; utilisation is None when the host cannot see it."""

    address: str
    kind: HostdevKind
    model: str | None
    util_percent: float | None
    fb_used_bytes: int | None
    util_unavailable_reason: str | None = None


@dataclass(slots=True, unsafe_hash=True)
class Sample:
    """Everything read for one domain in one pass, at wall time `t_wall_ns`."""

    instance_id: str
    uuid: str
    name: str
    domid: int
    incarnation: str
    started_wall_ns: int | None
    t_wall_ns: int
    vcpus: int
    memory_alloc_bytes: int
    cpu_ns: int | None
    memory: MemoryReading | None
    nics: tuple[NicCounters, ...] = ()
    disks: tuple[BlockCounters, ...] = ()
    gpus: tuple[GpuReading, ...] = ()
    pressure: Pressure | None = None
    missing: Mapping[str, str] = field(default_factory=dict)
    # Which counter `cpu_ns` is (CPU_FROM_CGROUP where the VM cgroup is found; None: not said,
    # libvirt's `cpu.time` as a rule), and libvirt's `cpu.time` beside a cgroup reading when
    # libvirt gave it too (sampling.py bills a change of counter with it).
    cpu_source: str | None = None
    cpu_time_ns: int | None = None
    # Taps the last pass read that are gone now (a NIC hot-unplugged, or re-plugged as a new
    # tap), with their last counters from the light samples: (ifindex, guest rx, guest tx).
    # sampling.py bills each up to them (accounting/unplug.py).
    gone_taps: tuple[tuple[int, int, int], ...] = ()
    # A GPU hot-plugged or unplugged in this period (libvirt's DEVICE_ADDED/REMOVED of a
    # hostdev): (the GPUs held before, wall ns of the change); sampling.py bills the period
    # with that many up to the change and with `gpus` after it (accounting/gpu_change.py).
    gpu_change: tuple[int, int] | None = None
    # Taps born since the last pass (a NIC hot-plugged, libvirt's DEVICE_ADDED) and gone again
    # before this one, with their final counters: (ifindex, guest rx, guest tx). No pass read
    # them, so sampling.py bills each from zero (accounting/unplug.py).
    born_taps: tuple[tuple[int, int, int], ...] = ()

    @property
    def cpu_counter(self) -> str:
        """The counter `cpu_ns` is in: `cpu_source`, libvirt's where unlabelled."""
        return self.cpu_source or CPU_FROM_LIBVIRT


# The two counters a domain's CPU is read from. They are the same on the lab (libvirt reads the
# VM cgroup's cpu.stat), but not provably everywhere: one incarnation is billed from one of them.
CPU_FROM_CGROUP = "cgroup"
CPU_FROM_LIBVIRT = "libvirt"


# --- baselines (persisted per instance) -------------------------------------------------------


@dataclass(slots=True, unsafe_hash=True)
class NicBase:
    """Last good counters of one NIC; None counters: seen but never read (baseline unknown).

    Kept in `Baseline.nics` by the NIC's key (`Nic.key`: its MAC, or `<mac>@<target dev>`
    where NICs of the domain share a MAC; older versions kept one entry per MAC)."""

    ifindex: int | None
    guest_rx_bytes: int | None
    guest_tx_bytes: int | None


@dataclass(slots=True, unsafe_hash=True)
class DiskBase:
    """Last good I/O counters of one disk."""

    rd_bytes: int | None
    wr_bytes: int | None


@dataclass(slots=True, unsafe_hash=True)
class Baseline:
    """Where the next period of an instance starts: its end time and last good counters."""

    instance_id: str
    incarnation: str
    t_wall_ns: int
    cpu_ns: int | None
    cpu_carry_ns: int = 0
    gpu_carry_ns: int = 0
    nics: Mapping[str, NicBase] = field(default_factory=dict)
    disks: Mapping[str, DiskBase] = field(default_factory=dict)
    # When `cpu_ns` was read; earlier than t_wall_ns after passes without a CPU reading, so a
    # catch-up delta is averaged over the time it really covers.
    cpu_t_wall_ns: int | None = None
    # Which counter `cpu_ns` is (Sample.cpu_source); None: not recorded (`cpu_counter`).
    cpu_source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the store's on-disk form)."""
        out = {
            "v": 1,
            "instance_id": self.instance_id,
            "incarnation": self.incarnation,
            "t_wall_ns": self.t_wall_ns,
            "cpu_ns": self.cpu_ns,
            "cpu_carry_ns": self.cpu_carry_ns,
            "gpu_carry_ns": self.gpu_carry_ns,
            "nics": {
                mac: [n.ifindex, n.guest_rx_bytes, n.guest_tx_bytes] for mac, n in self.nics.items()
            },
            "disks": {t: [d.rd_bytes, d.wr_bytes] for t, d in self.disks.items()},
            "cpu_t_wall_ns": self.cpu_t_wall_ns,
        }
        if self.cpu_source is not None:  # not written unrecorded: older stores read the same
            out["cpu_source"] = self.cpu_source
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Baseline:
        """Inverse of `to_dict`; raises KeyError/TypeError/ValueError on a malformed dict."""
        if raw.get("v") != 1:
            raise ValueError(f"unknown baseline version {raw.get('v')!r}")
        return cls(
            instance_id=str(raw["instance_id"]),
            incarnation=str(raw["incarnation"]),
            t_wall_ns=int(raw["t_wall_ns"]),
            cpu_ns=None if raw["cpu_ns"] is None else int(raw["cpu_ns"]),
            cpu_carry_ns=int(raw["cpu_carry_ns"]),
            gpu_carry_ns=int(raw["gpu_carry_ns"]),
            nics={
                str(mac): NicBase(_opt_int(v[0]), _opt_counter(v[1]), _opt_counter(v[2]))
                for mac, v in raw["nics"].items()
            },
            disks={
                str(t): DiskBase(
                    None if v[0] is None else int(v[0]), None if v[1] is None else int(v[1])
                )
                for t, v in raw["disks"].items()
            },
            cpu_t_wall_ns=_opt_int(raw.get("cpu_t_wall_ns")),
            cpu_source=None if raw.get("cpu_source") is None else str(raw["cpu_source"]),
        )

    @property
    def cpu_counter(self) -> str | None:
        """The counter `cpu_ns` is in: `cpu_source`, else libvirt's for a counter above zero
        (stores written before sources were recorded, when `cpu.time` came first); None for a
        zero (a new process's: any counter) or no counter."""
        if self.cpu_source is not None or not self.cpu_ns:
            return self.cpu_source
        return CPU_FROM_LIBVIRT


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _opt_counter(value: Any) -> int | None:
    # Stores written before NicBase allowed None used -1 for "unknown".
    return None if value is None or int(value) < 0 else int(value)


# --- usage and events -------------------------------------------------------------------------


@dataclass(slots=True, unsafe_hash=True)
class Usage:
    """What one instance used in one period [period_start_ns, period_end_ns)."""

    instance_id: str
    uuid: str
    name: str
    incarnation: str
    new_incarnation: bool
    period_start_ns: int
    period_end_ns: int
    vcpus: int
    memory_alloc_bytes: int
    cpu_ns: int
    cpu_seconds: int
    cpu_percent_avg: float | None
    memory_bytes: int | None
    memory_source: MemorySource | None
    memory_percent: float | None
    storage_bytes: int | None
    storage_capacity_bytes: int | None
    net_egress_bytes: int
    net_ingress_bytes: int
    disk_read_bytes: int
    disk_write_bytes: int
    gpu_count: int
    gpu_seconds: int
    gpu_util_avg: float | None
    pressure: Pressure | None = None
    missing: Mapping[str, str] = field(default_factory=dict)



# Largest repeat interval or cooldown of an alert, in seconds (a year; 0 already means never
# repeat): also the largest `repeat_interval_s` a threshold rule may carry. Its nanoseconds
# stay far inside the signed 64-bit integers they are stored and compared as.
MAX_REPEAT_S = 31_536_000


# An owner id longer than this, or holding a control or format character, is no owner id:
# every event of the instance carries it (a 2 MB account address made each event 2 MB; a
# domain's metadata is the tenant's to write). Read as absent: the instance is `unassigned`.
MAX_OWNER_ID_CHARS = 256


def usable_owner_id(text: str) -> bool:
    """Whether `text` can be an event's `user_id` / `org_id` (non-empty, short, printable)."""
    return 0 < len(text) <= MAX_OWNER_ID_CHARS and text.isprintable()


@dataclass(frozen=True, slots=True)
class Owner:
    """Who an instance's usage is billed to, and how we know."""

    user_id: str
    org_id: str | None
    source: str


@dataclass(slots=True, unsafe_hash=True)
class OutEvent:
    """An event ready for the outbox: its id, kind, subject and the exact JSON bytes sinks send.

    `channels` routes, it is never sent: None (usage events, Alert rules' alerts) goes to every
    sink that takes the kind; a set (a Notify rule's channels) only to the sinks answering to
    them (hostagent.alerts.routing). The outbox reads it once, at commit, and does not store it: an
    event loaded back for delivery has None.
    """

    event_id: str
    kind: str
    instance_id: str
    period_start_ns: int
    period_end_ns: int
    payload: bytes
    channels: frozenset[str] | None = None
