"""Pure: one domain's readings from every source → a `Sample`, saying which source gave what.

Preference order (each figure from the first source that has it):
- CPU: libvirt `cpu.time` (ns) → cgroup `cpu.stat usage_usec` × 1000 (the same counter).
- Memory in use: balloon (`available − usable`, what the guest itself reports) → cgroup working
  set (`memory.current − inactive_file`) → QEMU RSS (`balloon.rss`).
- NIC bytes: netlink tap counters (with ifindex, so a re-created tap is seen as a reset) →
  libvirt `net.N.{rx,tx}.bytes` (guest-oriented, already the tap's tx/rx swapped).
- Disk bytes and sizes: libvirt `block.N.*` (v1 blkio stays 0 on this kernel: not used).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hostagent.accounting.readings import DomainReading
from hostagent.accounting.sampling import incarnation_of
from hostagent.model import (
    BlockCounters,
    DomainInfo,
    GpuReading,
    MemoryReading,
    NicCounters,
    Pressure,
    Sample,
)

KIB = 1024


def _int(stats: Mapping[str, Any], key: str) -> int | None:
    value = stats.get(key)
    if isinstance(value, bool) or value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def memory_reading(
    stats: Mapping[str, Any], cgroup_working_set_bytes: int | None
) -> MemoryReading | None:
    """Guest memory in use, from the best source available."""
    available = _int(stats, "balloon.available")
    usable = _int(stats, "balloon.usable")
    if available is not None and usable is not None and 0 <= usable <= available:
        return MemoryReading(used_bytes=(available - usable) * KIB, source="balloon")
    unused = _int(stats, "balloon.unused")
    if available is not None and unused is not None and 0 <= unused <= available:
        caches = _int(stats, "balloon.disk_caches") or 0
        return MemoryReading(used_bytes=max(available - unused - caches, 0) * KIB,
                             source="balloon")
    if cgroup_working_set_bytes is not None:
        return MemoryReading(used_bytes=cgroup_working_set_bytes, source="cgroup")
    rss = _int(stats, "balloon.rss")
    if rss is not None:
        return MemoryReading(used_bytes=rss * KIB, source="rss")
    return None


def libvirt_nics(info: DomainInfo, stats: Mapping[str, Any]) -> dict[str, NicCounters]:
    """NIC counters from bulk stats, keyed by MAC via the tap name in the domain XML."""
    mac_by_tap = {n.target: n.mac for n in info.nics if n.target}
    out: dict[str, NicCounters] = {}
    for i in range(_int(stats, "net.count") or 0):
        name = stats.get(f"net.{i}.name")
        mac = mac_by_tap.get(name) if isinstance(name, str) else None
        rx = _int(stats, f"net.{i}.rx.bytes")
        tx = _int(stats, f"net.{i}.tx.bytes")
        if mac is None or rx is None or tx is None:
            continue
        out[mac] = NicCounters(mac=mac, ifname=str(name), ifindex=None, guest_rx_bytes=rx,
                               guest_tx_bytes=tx, source="libvirt")
    return out


def block_counters(stats: Mapping[str, Any]) -> tuple[BlockCounters, ...]:
    """Per-disk I/O bytes and sizes from bulk stats (top of each backing chain only)."""
    out = []
    for i in range(_int(stats, "block.count") or 0):
        name = stats.get(f"block.{i}.name")
        if not isinstance(name, str):
            continue
        out.append(BlockCounters(
            target=name,
            rd_bytes=_int(stats, f"block.{i}.rd.bytes"),
            wr_bytes=_int(stats, f"block.{i}.wr.bytes"),
            allocation_bytes=_int(stats, f"block.{i}.allocation"),
            capacity_bytes=_int(stats, f"block.{i}.capacity"),
            physical_bytes=_int(stats, f"block.{i}.physical"),
        ))
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
    missing: dict[str, str] = dict(extra_missing or {})
    cpu_ns = _int(stats, "cpu.time")
    if cpu_ns is None:
        cpu_ns = cgroup_cpu_ns
    if cpu_ns is None:
        missing["cpu"] = "neither libvirt cpu.time nor the cgroup cpu.stat could be read"

    memory = memory_reading(stats, cgroup_working_set_bytes)
    if memory is None:
        missing["memory"] = "no balloon stats, cgroup memory or QEMU RSS"

    from_libvirt = libvirt_nics(info, stats)
    nics: list[NicCounters] = []
    for nic in info.nics:
        got = (netlink_nics or {}).get(nic.mac) or from_libvirt.get(nic.mac)
        if got is not None:
            nics.append(got)
        else:
            key = f"net:{nic.mac}"
            missing[key] = (netlink_missing or {}).get(key, "no counters for this NIC")

    disks = block_counters(stats)
    known_targets = {d.target for d in disks}
    for disk in info.disks:
        if disk.device == "disk" and disk.target not in known_targets:
            missing[f"disk:{disk.target}"] = "libvirt reported no block stats for this disk"

    vcpus = _int(stats, "vcpu.current") or info.vcpus
    balloon_kib = _int(stats, "balloon.current")
    alloc_bytes = balloon_kib * KIB if balloon_kib else info.memory_bytes
    return Sample(
        instance_id=instance_id,
        uuid=info.uuid,
        name=info.name,
        domid=info.domid,
        incarnation=incarnation_of(info.domid, start_ticks),
        started_wall_ns=started_wall_ns,
        t_wall_ns=t_wall_ns,
        vcpus=vcpus,
        memory_alloc_bytes=alloc_bytes,
        cpu_ns=cpu_ns,
        memory=memory,
        nics=tuple(nics),
        disks=disks,
        gpus=gpus,
        pressure=pressure,
        missing=missing,
    )


def sample_of(r: DomainReading) -> Sample:
    """The `Sample` of one domain reading: pure, from the reading alone."""
    extra = dict(r.missing)
    cg = r.cgroup
    if cg is not None:
        extra.update({f"cgroup:{k}": v for k, v in cg.missing.items()})
    return build_sample(
        info=r.info,
        instance_id=r.instance_id,
        stats=r.stats,
        t_wall_ns=r.t_wall_ns,
        start_ticks=r.facts.start_ticks,
        started_wall_ns=r.facts.started_wall_ns,
        cgroup_cpu_ns=cg.cpu_ns if cg else None,
        cgroup_working_set_bytes=cg.memory_working_set_bytes if cg else None,
        pressure=cg.pressure if cg else None,
        netlink_nics=r.netlink_nics,
        netlink_missing=r.netlink_missing,
        gpus=r.gpus,
        extra_missing=extra,
    )
