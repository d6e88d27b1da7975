"""Pure delta engine: the persisted Baseline of an instance plus a new Sample -> one Usage.

Billing-grade rules (docs/usage-math.md has the long form):

* Every CPU-ns and byte lands in exactly one Usage; per instance the periods tile wall time
  (the next `period_start_ns` is the previous `period_end_ns`), also across reboots.
* A counter counts "from its own zero" whenever it cannot be compared with its baseline: a new
  QEMU process (incarnation), a counter that went down, a tap re-created (new ifindex), a NIC or
  disk hot-plugged. Deltas are therefore never negative and never huge.
* A missing reading keeps the old baseline value and contributes 0, so the next good reading
  covers the gap (deferred, never lost).
* cpu/gpu seconds are floored per event with the remainder carried in the baseline, so over an
  incarnation the seconds sum to the floor of the total nanoseconds.
* A period of zero or negative length (wall clock stepped back) emits nothing and keeps the old
  baseline; the next sample with a later timestamp covers the whole span.

Integer arithmetic only for the billing counters; floats only for averages and percentages.
"""

from __future__ import annotations

from hostagent.accounting.device_deltas import (
    ESTABLISHED,
    NONE,
    disk_deltas,
    flagged,
    missing_keys,
    nic_deltas,
    storage_of,
)
from hostagent.model import (
    CPU_FROM_LIBVIRT,
    Baseline,
    DiskBase,
    NicBase,
    Sample,
    Usage,
    nic_key,
)

__all__ = ["ESTABLISHED", "NS_PER_S", "SOURCE_CHANGED", "incarnation_of", "same_incarnation",
           "usage"]

NS_PER_S = 1_000_000_000

# The CPU counter changed (libvirt cpu.time <-> the VM cgroup) without the old one beside it:
# the period bills no CPU, and the next one counts on from this reading.
SOURCE_CHANGED = "CPU read from another counter than before; counted on from this reading"


def incarnation_of(domid: int, start_ticks: int | None) -> str:
    """A QEMU process's identity: the domain id and, where known, the process start time."""
    return f"{domid}:{start_ticks}" if start_ticks is not None else str(domid)


def same_incarnation(a: str, b: str) -> bool:
    """Same QEMU process: same domain id, and the start times agree where both are known.

    The start time comes from /proc and can be unreadable for one pass (a pid file not written
    yet); that must not look like a reboot, which would bill the process's counters twice.
    """
    if a == b:
        return True
    dom_a, _, ticks_a = a.partition(":")
    dom_b, _, ticks_b = b.partition(":")
    return dom_a == dom_b and (not ticks_a or not ticks_b)


def _gpu_ns_split(change: tuple[int, int], gpus_after: int, from_ns: int, to_ns: int,
                  plain_ns: int) -> int:
    """GPU-ns of a period in which the GPU count changed at a known time: the GPUs held before
    up to the change, those read now after it (`plain_ns`, every GPU read now over the whole
    period, when the change lies outside it)."""
    gpus_before, at_ns = change
    if not from_ns < at_ns < to_ns:
        return plain_ns
    return gpus_before * (at_ns - from_ns) + gpus_after * (to_ns - at_ns)


def usage(
    prev: Baseline | None,
    cur: Sample,
    *,
    store_created_ns: int,
    count_preexisting: bool = False,
) -> tuple[Usage | None, Baseline]:
    """The Usage since `prev` (None when there is nothing to emit) and the baseline to persist."""
    if prev is None:
        start_ns = _counting_start_ns(cur, store_created_ns, count_preexisting)
        if start_ns is None:
            return None, _observed_baseline(cur)
        # Counting from zero is the same as a baseline at `start_ns` with every counter at 0.
        base = _zero_baseline(cur, start_ns)
        running_from_ns = start_ns
        new_incarnation = True
    elif prev.incarnation != cur.incarnation and not same_incarnation(prev.incarnation,
                                                                      cur.incarnation):
        base = _zero_baseline(cur, prev.t_wall_ns)
        # Devices and vCPUs only exist while the process runs: the tiling period may include
        # the time the instance was off, which must not be billed as GPU time.
        running_from_ns = prev.t_wall_ns
        if cur.started_wall_ns is not None:
            running_from_ns = min(max(cur.started_wall_ns, prev.t_wall_ns), cur.t_wall_ns)
        new_incarnation = True
    else:
        base = prev
        running_from_ns = prev.t_wall_ns
        new_incarnation = False

    period_ns = cur.t_wall_ns - base.t_wall_ns
    if period_ns <= 0:
        # Never emit a zero/negative period; the counters are cumulative, so the next sample
        # with a later timestamp sees everything this one would have.
        return None, prev if prev is not None else base
    running_ns = cur.t_wall_ns - running_from_ns

    missing: dict[str, str] = {}
    # Whole devices flagged missing, found in one walk over `cur.missing` (mostly empty).
    net_flagged, disk_flagged = flagged(cur.missing) if cur.missing else (NONE, NONE)
    cpu_delta_ns, cpu_base, cpu_known = _cpu(base, cur, missing)
    nics, egress_bytes, ingress_bytes = nic_deltas(base, cur, missing, net_flagged)
    disks, read_bytes, write_bytes = disk_deltas(base, cur, missing, disk_flagged)

    cpu_seconds, cpu_carry_ns = divmod(cpu_delta_ns + base.cpu_carry_ns, NS_PER_S)
    gpu_count = len(cur.gpus)
    gpu_ns = gpu_count * running_ns
    if cur.gpu_change is not None and not new_incarnation:
        gpu_ns = _gpu_ns_split(cur.gpu_change, gpu_count, running_from_ns, cur.t_wall_ns, gpu_ns)
    gpu_seconds, gpu_carry_ns = divmod(gpu_ns + base.gpu_carry_ns, NS_PER_S)

    # The CPU delta covers the time since CPU was last read, which is longer than the period
    # when earlier passes lacked a reading: average over that span, not the period.
    cpu_since_ns = base.cpu_t_wall_ns if base.cpu_t_wall_ns is not None else running_from_ns
    cpu_span_ns = cur.t_wall_ns - cpu_since_ns
    cpu_percent: float | None = None
    if cpu_known and cpu_span_ns > 0 and cur.vcpus > 0:
        cpu_percent = cpu_delta_ns / (cpu_span_ns * cur.vcpus) * 100.0
    cpu_read = cur.cpu_ns is not None and not (cur.missing and "cpu" in cur.missing)
    cpu_t_wall_ns = cur.t_wall_ns if cpu_read else (
        base.cpu_t_wall_ns if base.cpu_t_wall_ns is not None else base.t_wall_ns)

    memory = cur.memory
    if memory is None or (cur.missing and "memory" in cur.missing):
        missing["memory"] = cur.missing.get("memory", "not reported")
        memory = None
    memory_percent: float | None = None
    if memory is not None and cur.memory_alloc_bytes > 0:
        # At most 100: the host-side figures (cgroup, RSS) count QEMU's own memory too, which
        # on a small allocation is many times the guest's (1 KiB allocated: 20,479,902 %).
        used = memory.used_bytes
        memory_percent = (100.0 if used >= cur.memory_alloc_bytes
                          else used / cur.memory_alloc_bytes * 100.0)

    storage_bytes, capacity_bytes = storage_of(cur, missing, disk_flagged)
    utils = [g.util_percent for g in cur.gpus if g.util_percent is not None] if gpu_count else ()

    # Positional, in the field order (keyword binding of 26 arguments costs ~1 µs a call).
    result = Usage(
        cur.instance_id,  # instance_id
        cur.uuid,  # uuid
        cur.name,  # name
        cur.incarnation,  # incarnation
        new_incarnation,  # new_incarnation
        base.t_wall_ns,  # period_start_ns
        cur.t_wall_ns,  # period_end_ns
        cur.vcpus,  # vcpus
        cur.memory_alloc_bytes,  # memory_alloc_bytes
        cpu_delta_ns,  # cpu_ns
        cpu_seconds,  # cpu_seconds
        cpu_percent,  # cpu_percent_avg
        None if memory is None else memory.used_bytes,  # memory_bytes
        None if memory is None else memory.source,  # memory_source
        memory_percent,  # memory_percent
        storage_bytes,  # storage_bytes
        capacity_bytes,  # storage_capacity_bytes
        egress_bytes,  # net_egress_bytes
        ingress_bytes,  # net_ingress_bytes
        read_bytes,  # disk_read_bytes
        write_bytes,  # disk_write_bytes
        gpu_count,  # gpu_count
        gpu_seconds,  # gpu_seconds
        sum(utils) / len(utils) if utils else None,  # gpu_util_avg
        cur.pressure,  # pressure
        missing or NONE,  # missing (one shared empty map: most usages miss nothing)
    )
    new_base = Baseline(
        cur.instance_id,
        cur.incarnation if new_incarnation or ":" in cur.incarnation else base.incarnation,
        cur.t_wall_ns,
        cpu_base,
        cpu_carry_ns,
        gpu_carry_ns,
        nics,
        disks,
        cpu_t_wall_ns,
        cur.cpu_counter if cpu_read else base.cpu_source,
    )
    return result, new_base


def _counting_start_ns(cur: Sample, store_created_ns: int, count_preexisting: bool) -> int | None:
    """Where a never-seen instance starts counting from zero, or None when it must not."""
    started = cur.started_wall_ns
    if started is not None and (count_preexisting or started >= store_created_ns):
        return max(started, store_created_ns)
    if count_preexisting:
        return store_created_ns
    return None


def _zero_baseline(cur: Sample, t_wall_ns: int) -> Baseline:
    """A baseline with every counter at zero: the start of a QEMU process's own counters."""
    return Baseline(
        instance_id=cur.instance_id, incarnation=cur.incarnation, t_wall_ns=t_wall_ns, cpu_ns=0
    )


def _observed_baseline(cur: Sample) -> Baseline:
    """A baseline from a first sight we must not bill: only growth from now on counts."""
    cpu = None if "cpu" in cur.missing else cur.cpu_ns
    nics: dict[str, NicBase] = {}
    for n in cur.nics:
        key = nic_key(n)
        if f"net:{key}" not in cur.missing:
            nics[key] = NicBase(n.ifindex, n.guest_rx_bytes, n.guest_tx_bytes)
    for key in missing_keys(cur.missing, "net:"):
        nics[key] = NicBase(None, None, None)
    disks: dict[str, DiskBase] = {}
    for d in cur.disks:
        if f"disk:{d.target}" not in cur.missing:
            disks[d.target] = DiskBase(d.rd_bytes, d.wr_bytes)
    for target in missing_keys(cur.missing, "disk:"):
        disks[target] = DiskBase(None, None)
    return Baseline(
        instance_id=cur.instance_id,
        incarnation=cur.incarnation,
        t_wall_ns=cur.t_wall_ns,
        cpu_ns=cpu,
        nics=nics,
        disks=disks,
        cpu_source=None if cpu is None else cur.cpu_counter,
    )


def _cpu(base: Baseline, cur: Sample, missing: dict[str, str]) -> tuple[int, int | None, bool]:
    """(delta ns, new base, whether the delta is a measurement) for the CPU counter."""
    value = cur.cpu_ns
    if value is None or (cur.missing and "cpu" in cur.missing):
        missing["cpu"] = cur.missing.get("cpu", "not reported")
        return 0, base.cpu_ns, False
    old = base.cpu_ns
    if old is None:
        missing["cpu"] = ESTABLISHED
        return 0, value, False
    # An unlabelled reading is libvirt's as a rule (no VM cgroup found); a baseline's counter
    # is Baseline.cpu_counter (None: a new process's zero, which matches any counter).
    was, now = base.cpu_counter, cur.cpu_counter
    if was is not None and was != now:
        # Another counter than the baseline's (libvirt `cpu.time` ↔ the VM cgroup): where they
        # are not the very same file, one can be lower, and a drop must never bill the whole
        # counter as a reset. Billed in the baseline's counter when this reading has it too
        # (libvirt's beside a cgroup reading), then on from the new one.
        other = cur.cpu_time_ns if was == CPU_FROM_LIBVIRT else None
        if other is not None and other >= old:
            return other - old, value, True
        missing["cpu"] = SOURCE_CHANGED
        return 0, value, False
    return (value if value < old else value - old), value, True
