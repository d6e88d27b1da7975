"""Pure close-out: the final Usage of an incarnation that ended between two passes.

Between passes the daemon keeps, per domain, an *anchor* (the last full reading: the pass's
Sample, or the Sample a STARTED/RESUMED lifecycle read took) and the latest *light* reading
(hostagent/sources/light.py: CPU from cgroup `cpu.stat`, tap bytes from one netlink dump, disk
bytes from cgroup v2 `io.stat`). When polling finds the domain gone (or a new incarnation in
its place), its incarnation ends with one final Usage:

* the period runs from the last committed period end (the Baseline) to the time of the last
  reading, whichever of anchor and light is later, and bills all growth seen up to it;
* it goes through `sampling.usage`, so tiling, the fractional carry (cpu/gpu seconds sum to
  the floor of the incarnation's nanoseconds) and `event_id` (host, instance, incarnation,
  period start) hold exactly as for every other event;
* a domain that started after the last pass (no baseline of this incarnation) is billed from
  its own zero: the anchor is then the lifecycle read, and `sampling.usage` counts from zero
  where the process started after the store existed;
* a migrated-away domain is closed the same way with reason MIGRATED; the destination host
  bills its own new incarnation from that QEMU's zero (docs/billing-tail.md).

A light value is used only when it belongs to the anchor's process (same domid) and does not
go below the anchor's value: a counter read after QEMU died is never billed (the lab saw
libvirt report 51 s of CPU for a domain at 319 s after STOPPED). Disk bytes from `io.stat`
are another counter than libvirt's per-disk bytes, so only their growth since the anchor
(`anchor_io`, read with the anchor) is added to the final Usage.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from hostagent.accounting.readings import DomainReading
from hostagent.accounting.sampling import usage
from hostagent.model import Baseline, NicCounters, Sample, Usage, canonical_nic_key, nic_key


@dataclass(slots=True, unsafe_hash=True)
class IoBytes:
    """Σ rbytes / Σ wbytes of a cgroup v2 `io.stat` (all devices of the domain's cgroup)."""

    read_bytes: int
    write_bytes: int


@dataclass(slots=True, unsafe_hash=True)
class LightReading:
    """One light sample of one domain at `t_wall_ns`; None: not read (`missing` says why)."""

    uuid: str
    domid: int
    t_wall_ns: int
    cpu_ns: int | None
    nics: tuple[NicCounters, ...] = ()
    io: IoBytes | None = None
    missing: Mapping[str, str] = field(default_factory=dict)


@dataclass(slots=True, unsafe_hash=True)
class CloseOut:
    """The final Usage of an incarnation (None: nothing since the last commit) and the baseline
    to persist, so the next incarnation of the instance tiles on from the last reading."""

    usage: Usage | None
    baseline: Baseline
    reason: str


@dataclass(slots=True, unsafe_hash=True)
class Closing:
    """An ended incarnation handed to the pass (`ledger.account(closing=...)`): its anchor (the
    last full reading), the latest light reading after it, `io.stat` at the anchor, and why."""

    reading: DomainReading
    light: LightReading | None = None
    anchor_io: IoBytes | None = None
    reason: str = "GONE"
    # The anchor's Sample (a tail's; tails.kept leaves `reading` without libvirt's stats):
    # None = `sample_of(reading)`, a full reading.
    sample: Sample | None = None
    # Taps born since the anchor (`tails.Tail.born`): billed from zero (`overlay`).
    born: frozenset[int] = frozenset()

    @property
    def instance_id(self) -> str:
        """The instance whose incarnation ended."""
        return self.reading.instance_id

    @property
    def key(self) -> tuple[str, int]:
        """(uuid, domid) of the incarnation that ended."""
        return self.reading.uuid, self.reading.info.domid


def overlay(anchor: Sample, light: LightReading | None,
            born: Collection[int] = ()) -> Sample:
    """The last reading of a domain: the anchor with the light counters that belong to it,
    and those of the taps `born` since it (`tails.Tail.born`: a NIC hot-plugged)."""
    if light is None or light.domid != anchor.domid or light.t_wall_ns <= anchor.t_wall_ns:
        return anchor
    cpu_ns, cpu_time_ns = anchor.cpu_ns, anchor.cpu_time_ns
    if light.cpu_ns is not None and (anchor.cpu_ns is None or light.cpu_ns >= anchor.cpu_ns):
        # The VM cgroup's counter (sources/light.py): the anchor's too wherever that cgroup
        # is found (its label stays); libvirt's figure beside it is the anchor's, not now's.
        cpu_ns, cpu_time_ns = light.cpu_ns, None
    fresh = {nic_key(n): n for n in light.nics}  # by NIC key: NICs may share a MAC
    by_tap = {n.ifindex: n for n in light.nics if n.ifindex is not None}
    nics = []
    for old in anchor.nics:
        new = by_tap.get(old.ifindex) if old.ifindex is not None else None
        if new is None:
            new = fresh.get(nic_key(old))
        same_tap = new is not None and (old.ifindex is None or new.ifindex == old.ifindex)
        grew = (new is not None and new.guest_rx_bytes >= old.guest_rx_bytes
                and new.guest_tx_bytes >= old.guest_tx_bytes)
        nics.append(new if new is not None and same_tap and grew else old)
    missing = anchor.missing
    if born:
        # Each billed from zero (sampling.usage: a tap the baseline lacks counts from zero);
        # not a NIC the anchor read without a tap id (libvirt's counters: maybe that tap).
        keyed = {nic_key(n) for n in anchor.nics if n.ifindex is None}
        new_taps = [n for i, n in by_tap.items() if i in born and nic_key(n) not in keyed]
        if new_taps:
            nics.extend(new_taps)
            # A NIC the anchor listed with its tap not found is read now, on its new tap.
            now_read = {canonical_nic_key(nic_key(n)) for n in new_taps}
            missing = {k: v for k, v in missing.items()
                       if not (k.startswith("net:") and canonical_nic_key(k[4:]) in now_read)}
    return dataclasses.replace(anchor, t_wall_ns=light.t_wall_ns, cpu_ns=cpu_ns,
                               nics=tuple(nics), cpu_time_ns=cpu_time_ns, missing=missing)


def io_growth(anchor_io: IoBytes | None, light: LightReading | None,
              anchor: Sample) -> tuple[int, int]:
    """Disk bytes `io.stat` saw after the anchor (0, 0 when either side is unknown or reset)."""
    if (anchor_io is None or light is None or light.io is None or light.domid != anchor.domid
            or light.t_wall_ns <= anchor.t_wall_ns):
        return 0, 0
    rd = light.io.read_bytes - anchor_io.read_bytes
    wr = light.io.write_bytes - anchor_io.write_bytes
    return max(rd, 0), max(wr, 0)


def close_out(
    prev: Baseline | None,
    anchor: Sample,
    light: LightReading | None,
    *,
    reason: str,
    store_created_ns: int,
    anchor_io: IoBytes | None = None,
    count_preexisting: bool = False,
    born: Collection[int] = (),
) -> CloseOut:
    """The final Usage of `anchor`'s incarnation up to its last reading, and the new baseline
    (`born`: `overlay`'s)."""
    last = overlay(anchor, light, born)
    if last.gone_taps or last.born_taps:
        # The anchor's pass billed those taps (a tail keeps that pass's filled Sample): never
        # again here.
        last = dataclasses.replace(last, gone_taps=(), born_taps=())
    final, baseline = usage(prev, last, store_created_ns=store_created_ns,
                            count_preexisting=count_preexisting)
    if final is not None:
        rd, wr = io_growth(anchor_io, light, anchor)
        if rd or wr:
            final = dataclasses.replace(final, disk_read_bytes=final.disk_read_bytes + rd,
                                        disk_write_bytes=final.disk_write_bytes + wr)
    return CloseOut(usage=final, baseline=baseline, reason=reason)
