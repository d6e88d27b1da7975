"""Pure: one domain's readings from every source → a `Sample`, saying which source gave what.

Preference order (each figure from the first source that has it):
- CPU: the VM cgroup's `cpu.stat usage_usec` × 1000 (v1 `cpuacct.usage`) wherever that cgroup
  is found, else libvirt `cpu.time` (ns). The same counter on the lab, but one incarnation is
  billed from one of them (`Sample.cpu_source`; sampling.py bills across a change of source).
- Memory in use: balloon (`available − usable`, what the guest itself reports) → cgroup working
  set (`memory.current − inactive_file`) → QEMU RSS (`balloon.rss`).
- NIC bytes: netlink tap counters (with ifindex, so a re-created tap is seen as a reset) →
  libvirt `net.N.{rx,tx}.bytes` (guest-oriented, already the tap's tx/rx swapped); each NIC
  from its own tap (its target dev), by `Nic.key`: NICs of a domain may share a MAC.
- Disk bytes and sizes: libvirt `block.N.*` (v1 blkio stays 0 on this kernel: not used).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hostagent.accounting.readings import DomainReading
from hostagent.accounting.sampling import incarnation_of
from hostagent.model import (
    CPU_FROM_CGROUP,
    BlockCounters,
    DomainInfo,
    GpuReading,
    MemoryReading,
    Nic,
    NicCounters,
    Pressure,
    Sample,
)

KIB = 1024


def _int(stats: Mapping[str, Any], key: str) -> int | None:
    value = stats.get(key)
    # An int, or absent (the test driver and cgroup-only hosts lack most keys): no call.
    if type(value) is int or value is None:
        return value
    return _as_int(value)


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an infinite float
        return None


_NOTHING_MISSING: Mapping[str, str] = {}  # shared by the samples that miss nothing (read-only)
_NO_TARGETS: frozenset[str] = frozenset()


def _keys(prefix: str, i: int, *fields: str) -> tuple[str, ...]:
    return tuple(f"{prefix}.{i}.{f}" for f in fields)


# The bulk-stats keys of device i, made once (a domain rarely has more than a few devices).
_NET_KEYS = [_keys("net", i, "name", "rx.bytes", "tx.bytes") for i in range(16)]
_BLOCK_KEYS = [_keys("block", i, "name", "rd.bytes", "wr.bytes", "allocation", "capacity",
                     "physical") for i in range(16)]


def memory_reading(
    stats: Mapping[str, Any], cgroup_working_set_bytes: int | None
) -> MemoryReading | None:
    """Guest memory in use, from the best source available."""
    available = _int(stats, "balloon.available")
    if available is not None:
        usable = _int(stats, "balloon.usable")
        if usable is not None and 0 <= usable <= available:
            return MemoryReading((available - usable) * KIB, "balloon")
        unused = _int(stats, "balloon.unused")
        if unused is not None and 0 <= unused <= available:
            caches = _int(stats, "balloon.disk_caches") or 0
            return MemoryReading(max(available - unused - caches, 0) * KIB, "balloon")
    if cgroup_working_set_bytes is not None:
        return MemoryReading(cgroup_working_set_bytes, "cgroup")
    rss = _int(stats, "balloon.rss")
    if rss is not None:
        return MemoryReading(rss * KIB, "rss")
    return None


def libvirt_nics(info: DomainInfo, stats: Mapping[str, Any]) -> dict[str, NicCounters]:
    """NIC counters from bulk stats by NIC key (`Nic.key`), via the tap name in the domain XML
    (one tap, one NIC: NICs may share a MAC)."""
    count = _int(stats, "net.count")
    if not count:
        return {}
    nic_by_tap: dict[str, Nic] = {}
    for n in info.nics:
        if n.target:
            nic_by_tap.setdefault(n.target, n)  # two NICs naming one tap: the first's
    out: dict[str, NicCounters] = {}
    for i in range(count):
        name_key, rx_key, tx_key = _NET_KEYS[i] if i < 16 else _keys(
            "net", i, "name", "rx.bytes", "tx.bytes")
        name = stats.get(name_key)
        nic = nic_by_tap.get(name) if isinstance(name, str) else None
        rx = _int(stats, rx_key)
        tx = _int(stats, tx_key)
        if nic is None or rx is None or tx is None:
            continue
        out[nic.key] = NicCounters(nic.mac, str(name), None, rx, tx, "libvirt", nic.key)
    return out


# Why a disk's I/O bytes are absent when libvirt answered without the domain's job lock.
JOB_BUSY = ("another libvirt client held the domain's job during the stats call (NOWAIT), "
            "also when asked again")


def job_skipped(stats: Mapping[str, Any]) -> bool:
    """libvirt answered without the domain's job (NOWAIT while another client held it): its
    monitor's figures are absent. `balloon.current` comes from the definition, `balloon.rss`
    (the QEMU process's RSS) whenever libvirt held the job (sources/libvirt_busy.py)."""
    return "balloon.current" in stats and "balloon.rss" not in stats


def block_counters(stats: Mapping[str, Any]) -> tuple[BlockCounters, ...]:
    """Per-disk I/O bytes and sizes from bulk stats (top of each backing chain only)."""
    count = _int(stats, "block.count")
    if not count:
        return ()
    out = []
    get = stats.get
    for i in range(count):
        name_key, rd, wr, alloc, cap, phys = _BLOCK_KEYS[i] if i < 16 else _keys(
            "block", i, "name", "rd.bytes", "wr.bytes", "allocation", "capacity", "physical")
        name = get(name_key)
        if not isinstance(name, str):
            continue
        # Inline int check: ~5 values per disk and pass; _as_int for the odd non-int.
        rd_v, wr_v, alloc_v, cap_v, phys_v = get(rd), get(wr), get(alloc), get(cap), get(phys)
        out.append(BlockCounters(
            name, rd_v if type(rd_v) is int else _as_int(rd_v),
            wr_v if type(wr_v) is int else _as_int(wr_v),
            alloc_v if type(alloc_v) is int else _as_int(alloc_v),
            cap_v if type(cap_v) is int else _as_int(cap_v),
            phys_v if type(phys_v) is int else _as_int(phys_v)))
    return tuple(out)


def build_sample(
    *,
    info: DomainInfo,
    instance_id: str,
    stats: Mapping[str, Any],
    t_wall_ns: int,
    start_ticks: int | None,
    started_wall_ns: int | None,
    cgroup_cpu_ns: int | None = None,
    cgroup_working_set_bytes: int | None = None,
    pressure: Pressure | None = None,
    netlink_nics: Mapping[str, NicCounters] | None = None,
    netlink_missing: Mapping[str, str] | None = None,
    gpus: tuple[GpuReading, ...] = (),
    extra_missing: Mapping[str, str] | None = None,
) -> Sample:
    """Combine one domain's readings; every figure no source had is listed in `missing`."""
    return _sample(info, instance_id, stats, t_wall_ns, start_ticks, started_wall_ns,
                   cgroup_cpu_ns, cgroup_working_set_bytes, pressure, netlink_nics,
                   netlink_missing, gpus, dict(extra_missing or {}))


def _sample(info: DomainInfo, instance_id: str, stats: Mapping[str, Any], t_wall_ns: int,
            start_ticks: int | None, started_wall_ns: int | None, cgroup_cpu_ns: int | None,
            cgroup_working_set_bytes: int | None, pressure: Pressure | None,
            netlink_nics: Mapping[str, NicCounters] | None,
            netlink_missing: Mapping[str, str] | None, gpus: tuple[GpuReading, ...],
            missing: dict[str, str], cpu_cgroup: bool = False) -> Sample:
    """`build_sample`, positional and filling `missing` in place (once per domain and pass).

    `cpu_cgroup`: the VM's cpu cgroup is found, and `cgroup_cpu_ns` is its CPU (None: that
    read failed, and the CPU is missing this time; labelled CPU_FROM_CGROUP, with libvirt's
    `cpu.time` beside it when given); otherwise libvirt's `cpu.time`, or the cgroup figure where
    libvirt gave none, unlabelled as before sources were recorded."""
    cpu_time_ns = _int(stats, "cpu.time")
    cpu_source: str | None
    if cpu_cgroup:  # the VM's cpu cgroup is found: its counter is this domain's CPU
        cpu_ns, cpu_source = cgroup_cpu_ns, CPU_FROM_CGROUP
        if cpu_ns is None:  # never libvirt's instead: one counter per incarnation
            missing["cpu"] = "the VM cgroup's cpu.stat could not be read"
    else:  # no VM cgroup found: libvirt's figure (a cgroup one only where given without it)
        cpu_ns = cpu_time_ns if cpu_time_ns is not None else cgroup_cpu_ns
        cpu_source, cpu_time_ns = None, None
        if cpu_ns is None:
            missing["cpu"] = "neither libvirt cpu.time nor the cgroup cpu.stat could be read"

    memory = memory_reading(stats, cgroup_working_set_bytes)
    if memory is None:
        missing["memory"] = "no balloon stats, cgroup memory or QEMU RSS"

    nics: list[NicCounters] = []
    if info.nics:
        from_libvirt: dict[str, NicCounters] | None = None  # only when netlink lacks a NIC
        for nic in info.nics:  # by key, not MAC: NICs may share one (each its own tap)
            got = netlink_nics.get(nic.key) if netlink_nics else None
            if got is None:
                if from_libvirt is None:
                    # No `net.count` (test driver, cgroup-only hosts): no libvirt counters.
                    from_libvirt = libvirt_nics(info, stats) if "net.count" in stats else {}
                got = from_libvirt.get(nic.key)
            if got is not None:
                nics.append(got)
            else:
                key = f"net:{nic.key}"
                missing[key] = (netlink_missing or {}).get(key, "no counters for this NIC")

    disks = block_counters(stats) if "block.count" in stats else ()
    if info.disks:
        # Without block stats (the test driver, a hung stats call) no target is known.
        known_targets = {d.target for d in disks} if disks else _NO_TARGETS
        for disk in info.disks:
            if disk.device == "disk" and disk.target not in known_targets:
                missing[f"disk:{disk.target}"] = "libvirt reported no block stats for this disk"
    for d in disks:
        if d.rd_bytes is None or d.wr_bytes is None:
            why = (JOB_BUSY if job_skipped(stats)  # libvirt_busy.py asked again, in vain
                   else "libvirt reported no I/O bytes for this disk")
            if d.rd_bytes is None:
                missing[f"disk:{d.target}:rd_bytes"] = why
            if d.wr_bytes is None:
                missing[f"disk:{d.target}:wr_bytes"] = why

    vcpus = _int(stats, "vcpu.current") or info.vcpus
    balloon_kib = _int(stats, "balloon.current")
    alloc_bytes = balloon_kib * KIB if balloon_kib else info.memory_bytes
    return Sample(instance_id, info.uuid, info.name,
                  info.domid, incarnation_of(info.domid, start_ticks), started_wall_ns,
                  t_wall_ns, vcpus, alloc_bytes, cpu_ns, memory, tuple(nics), disks, gpus,
                  pressure, missing or _NOTHING_MISSING, cpu_source, cpu_time_ns)


def sample_of(r: DomainReading) -> Sample:
    """The `Sample` of one domain reading: pure, from the reading alone."""
    missing = dict(r.missing) if r.missing else {}
    cg = r.cgroup
    facts = r.facts
    paths = facts.cgroup
    cpu_cgroup = paths is not None and paths.cpu is not None
    if cg is None:
        return _sample(r.info, r.instance_id, r.stats, r.t_wall_ns, facts.start_ticks,
                       facts.started_wall_ns, None, None, None, r.netlink_nics,
                       r.netlink_missing, r.gpus, missing, cpu_cgroup)
    if cg.missing:
        missing.update({f"cgroup:{k}": v for k, v in cg.missing.items()})
    return _sample(r.info, r.instance_id, r.stats, r.t_wall_ns, facts.start_ticks,
                   facts.started_wall_ns, cg.cpu_ns, cg.memory_working_set_bytes, cg.pressure,
                   r.netlink_nics, r.netlink_missing, r.gpus, missing, cpu_cgroup)
