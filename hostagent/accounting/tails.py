"""Pure: the in-memory *tails* the daemon keeps per running QEMU process between two passes.

A tail is the last full reading of one incarnation (the *anchor*: the pass's reading, or the one a
STARTED/RESUMED lifecycle read took; kept as its Sample and the few fields the light samples
need, `kept`), the latest light reading after it (cgroup `cpu.stat`, tap bytes, v2 `io.stat`:
hostagent/sources/light.py), the `io.stat` bytes at the anchor (`anchor_io`: the pass reads
them; without them, the first light reading's) and the close reason a STOPPED/CRASHED/UNDEFINED
event gave. Tails are keyed by (uuid, domid): a domain destroyed and started again between two
passes has two, and both incarnations are billed.

Polling stays the source of truth: `ended()` closes a tail only when the pass no longer lists
the domain (nor failed to read it), or reads it with another domid, or lists it with the VM
cgroup it read before removed (`ended_while_listed`: libvirt's answer during a destroy lags the
kernel's). Nothing here is persisted:
a daemon crash loses the tails, which costs exactly what polling alone loses
(docs/billing-tail.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from hostagent.accounting.assemble import sample_of
from hostagent.accounting.closeout import Closing, IoBytes, LightReading
from hostagent.accounting.readings import DomainReading, HostReading
from hostagent.accounting.sampling import incarnation_of, same_incarnation
from hostagent.model import CPU_FROM_CGROUP, Baseline, NicCounters, Sample, nic_key

Key = tuple[str, int]  # (uuid, domid)


_NOTHING: Mapping[str, str] = {}  # shared, never written


def kept(r: DomainReading) -> DomainReading:
    """What a tail keeps of its anchor's reading: identity, facts, tap ids and GPUs, without
    libvirt's stats dict, the cgroup reading and the `missing` maps. Between two passes every
    running domain has a tail; its stats dict alone is ~5.7 KB on a lab guest (47 keys), so
    keeping whole readings held ~30 MB at 5,000 such domains for nothing: the close-out bills
    from the anchor's Sample, made once (`Tail.of`)."""
    return DomainReading(r.info, r.instance_id, r.t_wall_ns, _NOTHING, r.facts, None,
                         r.netlink_nics, _NOTHING, r.gpus, _NOTHING)


@dataclass(slots=True, unsafe_hash=True)
class Tail:
    """One incarnation's last readings since the last pass: its anchor (`kept`) and the
    anchor's Sample, which the close-out starts from (`anchor` alone could not rebuild it)."""

    anchor: DomainReading
    sample: Sample
    latest: LightReading | None = None
    anchor_io: IoBytes | None = None
    reason: str | None = None
    # Taps (ifindexes) a DEVICE_ADDED read found that `sample` lacks: born since the anchor's
    # pass (`with_taps`), billed from zero when gone (accounting/unplug.py).
    born: frozenset[int] = frozenset()

    @classmethod
    def of(cls, reading: DomainReading, sample: Sample | None = None) -> Tail:
        """The tail anchored at a full `reading` (`sample`: its `sample_of`, if made)."""
        return cls(kept(reading), sample_of(reading) if sample is None else sample, None,
                   io_at(reading))

    @property
    def key(self) -> Key:
        """(uuid, domid) of the incarnation."""
        return self.anchor.uuid, self.anchor.info.domid

    def closing(self) -> Closing:
        """The close-out this tail asks for (`ledger.account(closing=...)`)."""
        return Closing(self.anchor, self.latest, self.anchor_io, self.reason or "GONE",
                       self.sample, self.born)


def io_at(r: DomainReading) -> IoBytes | None:
    """The v2 `io.stat` bytes the reading saw (None: not read), which the tail's light readings
    count their disk growth from (`closeout.io_growth`)."""
    cg = r.cgroup
    if cg is None or cg.io_source != "v2:io.stat" or cg.io_read_bytes is None \
            or cg.io_write_bytes is None:
        return None
    return IoBytes(cg.io_read_bytes, cg.io_write_bytes)


def newer_light(old: LightReading | None, light: LightReading) -> LightReading | None:
    """The latest light reading of one process once `light` (read after `old`) came in.

    A reading without CPU (the cgroup is gone: the process ended, or unreadable) or not newer
    than `old` is ignored as a whole, so a sample taken after the destroy never replaces the
    last good one. NICs and `io.stat` missing from `light` keep `old`'s values (a tap deleted
    while the cgroup still had the exiting QEMU in it)."""
    if light.cpu_ns is None or (old is not None and light.t_wall_ns <= old.t_wall_ns):
        return old
    # Per sample and domain (budget 0.015 ms with the read): merge only what the new reading
    # lacks, which is rare (a NIC missing from the dump, io.stat unreadable, a tap no longer
    # followed: a NIC re-plugged on a new tap since, `with_taps`).
    if old is not None and (_lacks_taps(light.nics, old.nics) or (light.io is None and old.io)):
        # By tap (ifindex): NICs may share a MAC, and a re-plugged NIC's old tap keeps its
        # final counters beside its new one.
        nics = {_tap_of(n): n for n in old.nics}
        nics.update({_tap_of(n): n for n in light.nics})
        return dataclasses.replace(light, nics=tuple(nics.values()),
                                   io=light.io if light.io is not None else old.io)
    return light


def _tap_of(n: NicCounters) -> int | str:
    """A light NIC's tap: its ifindex (its NIC key where none is known)."""
    return n.ifindex if n.ifindex is not None else nic_key(n)


def _lacks_taps(new: Sequence[NicCounters], old: Sequence[NicCounters]) -> bool:
    """Some tap of `old` is not in `new` (cheap where both read the same taps in order)."""
    if len(new) < len(old):
        return True
    if len(new) == len(old):
        for a, b in zip(new, old, strict=True):
            if a.ifindex != b.ifindex or a.ifindex is None:
                break
        else:
            return False
    taps = {_tap_of(n) for n in new}
    return any(_tap_of(n) not in taps for n in old)


def with_light(tail: Tail, light: LightReading) -> Tail:
    """`tail` with a light reading of its process merged in (others and stale ones ignored;
    the rule of `newer_light`)."""
    if light.domid != tail.anchor.info.domid or light.t_wall_ns <= tail.anchor.t_wall_ns:
        return tail
    merged = newer_light(tail.latest, light)
    if merged is tail.latest or merged is None:
        return tail
    anchor_io = tail.anchor_io if tail.anchor_io is not None else light.io
    return Tail(tail.anchor, tail.sample, merged, anchor_io, tail.reason, tail.born)


def with_taps(tail: Tail, r: DomainReading) -> Tail:
    """`tail` following the taps of `r`, a full reading of its process taken after libvirt
    said a device was hot-plugged (DEVICE_ADDED): the anchor's XML and tap ids become `r`'s, so
    the light samples read, and the stop watch follows, a tap born since the last pass. The
    anchor's time, its Sample, the light reading and `anchor_io` stay: the next pass and a
    close-out still bill from the last pass. The taps `r` reads that the Sample lacks join
    `born` (kept when a later read no longer finds them: a NIC plugged and unplugged again,
    then another plugged), which accounting/unplug.py bills from zero once gone. `tail`
    itself when `r` is another process or reads the same taps."""
    a = tail.anchor
    if r.uuid != a.uuid or r.info.domid != a.info.domid or r.netlink_nics is None:
        return tail
    taps = [n.ifindex for n in r.netlink_nics.values()]
    if a.netlink_nics is not None and a.info is r.info \
            and [n.ifindex for n in a.netlink_nics.values()] == taps:
        return tail
    known = {n.ifindex for n in tail.sample.nics}
    born = tail.born | {i for i in taps if i is not None and i not in known}
    anchor = dataclasses.replace(a, info=r.info, netlink_nics=r.netlink_nics)
    return Tail(anchor, tail.sample, tail.latest, tail.anchor_io, tail.reason, born)


def gone_keys(tails: Iterable[Key], host: HostReading) -> list[Key]:
    """Tails whose incarnation ended: the domain is neither listed nor failing to read, or a
    reading shows another process (domid) in its place."""
    unreadable = {e.uuid for e in host.errors}
    read = {r.info.uuid: r.info.domid for r in host.domains}
    out = []
    for uuid, domid in tails:
        if uuid in read:
            if read[uuid] != domid:
                out.append((uuid, domid))
        elif uuid not in host.listed and uuid not in unreadable:
            out.append((uuid, domid))
    return out


def taps_gone(tails: Mapping[Key, Tail], host: HostReading) -> list[Key]:
    """Incarnations that `host` reads without a tap their tail follows (its anchor's ifindexes):
    a NIC hot-unplugged, or re-plugged on a new tap, since the anchor.

    The pass asks for their final light sample (`Collector.final_samples`), which carries the
    tap's final counters the stop watch kept (RTM_DELLINK): a tap deleted while the anchor's pass
    read the host (after its link dump, before it stamped its reading) left a light reading
    older than the anchor, which `with_light` drops whole, and no light sample may come before
    the pass that finds the tap gone (tests/test_lab_sweep_nic_plug.py lost 542 of 114,058
    bytes that way). One dict lookup per followed tap where nothing changed."""
    out: list[Key] = []
    get = tails.get
    for r in host.domains:
        info = r.info
        t = get((info.uuid, info.domid))
        if t is None:
            continue
        followed = t.anchor.netlink_nics
        if not followed:
            continue
        read = r.netlink_nics or _NO_TAPS
        for key, n in followed.items():
            if n.ifindex is None:
                continue
            now = read.get(key)
            # Not under its key: maybe under another (its XML re-read), by ifindex then.
            if (now is None or now.ifindex != n.ifindex) \
                    and n.ifindex not in {m.ifindex for m in read.values()}:
                out.append((info.uuid, info.domid))
                break
    return out


_NO_TAPS: Mapping[str, NicCounters] = {}  # shared, never written


def ended_while_listed(tails: Mapping[Key, Tail], baselines: Mapping[str, Baseline],
                       host: HostReading) -> tuple[HostReading, tuple[str, ...]]:
    """`host` without the readings of processes that ended while libvirt still listed them,
    and those domains' uuids: `gone_keys` then closes them out, from their tails.

    libvirt answers a stats call that reaches it just before a `virsh destroy` does only once
    the destroy is done, and still with the VM as running (its old id, its figures from
    before); by then it has removed the VM cgroup (lab: calls started 5–20 ms before the
    destroy held 1.6–2.2 s, the cgroup gone ~1.3 s into the destroy). Billed as a reading,
    it had no CPU and replaced the tail that held the VM's final counters (sampled when its
    cgroup emptied): the close-out at the next pass lost the CPU since the pass before (CI:
    1.2 s of a guest's 5.1 s). A cgroup that holds a process cannot be removed, so its
    removal is the kernel's word that the process ended, and it wins over libvirt's stale
    answer. Only for an incarnation whose CPU was read from that cgroup before (its tail, or
    its baseline): a path that never had the file is a reading problem, not an end. The
    baseline also keeps a later stale answer of the same process (a destroy that outlasts a
    pass) from being billed after its close-out."""
    gone = [r.info.uuid for r in host.domains
            if r.cgroup is not None and r.cgroup.cpu_gone and _cgroup_read_before(
                tails.get((r.info.uuid, r.info.domid)), baselines.get(r.instance_id), r)]
    if not gone:
        return host, ()
    drop = set(gone)
    return dataclasses.replace(
        host, domains=tuple(r for r in host.domains if r.info.uuid not in drop),
        listed={u: n for u, n in host.listed.items() if u not in drop}), tuple(gone)


def _cgroup_read_before(tail: Tail | None, base: Baseline | None, r: DomainReading) -> bool:
    """This incarnation's CPU was read from its VM cgroup before `r`."""
    if tail is not None:
        if tail.sample.cpu_source == CPU_FROM_CGROUP and tail.sample.cpu_ns is not None:
            return True
        if tail.latest is not None and tail.latest.cpu_ns is not None:
            return True
    return (base is not None and base.cpu_source == CPU_FROM_CGROUP and base.cpu_ns is not None
            and same_incarnation(base.incarnation,
                                 incarnation_of(r.info.domid, r.facts.start_ticks)))


def ended(tails: Mapping[Key, Tail], host: HostReading) -> list[Closing]:
    """The close-outs a pass with reading `host` commits, oldest anchor first."""
    return closings(tails, gone_keys(tails, host))


def closings(tails: Mapping[Key, Tail], keys: Iterable[Key]) -> list[Closing]:
    """The close-outs of the incarnations `keys` (`gone_keys`), oldest anchor first."""
    return sorted((tails[k].closing() for k in keys if k in tails),
                  key=lambda c: c.reading.t_wall_ns)


def after_pass(tails: Mapping[Key, Tail], host: HostReading, closed: Iterable[Key],
               samples: Sequence[Sample] | None = None) -> dict[Key, Tail]:
    """The tails after a committed pass: closed ones dropped, every reading a fresh anchor
    (`samples`: the pass's Sample of each reading, in order, so none is made twice)."""
    out = dict(tails)  # a new dict: the caller's is left as it was
    for k in closed:
        out.pop(k, None)
    if samples is None:
        samples = [sample_of(r) for r in host.domains]
    new = Tail  # positional construction: once per domain and pass
    out.update({(r.info.uuid, r.info.domid): new(kept(r), s, None, io_at(r))
                for r, s in zip(host.domains, samples, strict=True)})
    return out


def watch_moved(before: Mapping[Key, Tail], after: Mapping[Key, Tail]) -> bool:
    """The light-samples thread must watch again after a pass turned tails `before` into
    `after`: a tail is new, or its anchor reads other taps (ifindexes) than the tail it
    replaces.

    The stop watch keeps a deleted tap's final counters (RTM_DELLINK) only for the taps it was
    told to follow, and it was told again only for new tails or at a light sample, which a host
    whose passes come more often than its samples never takes (`collector.interval_s` below
    `watched_sample_interval_s`). A NIC hot-plugged into a running VM was therefore never
    followed there: its unplug woke nothing and the pass billed none of its bytes since the pass
    before (on the lab: 67,704 of a hot-plugged NIC's 68,336 bytes; QEMU reads the tap's queue
    as it lets the NIC go, so most of them appear only in the final counters). One identity
    check per domain and pass where nothing changed."""
    for k, t in after.items():
        old = before.get(k)
        if old is None:
            return True
        a, b = old.anchor.netlink_nics, t.anchor.netlink_nics
        if a is b:
            continue
        if a is None or b is None or len(a) != len(b):
            return True
        for key, n in b.items():
            o = a.get(key)
            if o is None or o.ifindex != n.ifindex:
                return True
    return False


def with_reason(tails: Mapping[Key, Tail], uuid: str, reason: str) -> dict[Key, Tail]:
    """A CLOSE event's reason on the uuid's tails that have none yet (logs and metrics only)."""
    return {k: (dataclasses.replace(t, reason=reason) if k[0] == uuid and t.reason is None
                else t) for k, t in tails.items()}
