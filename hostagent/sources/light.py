"""Light samples between passes: the counters that cost no libvirt call and no QEMU monitor.

Per sample, for every domain of the last pass (or of a STARTED lifecycle read):

* CPU: the VM cgroup's v2 `cpu.stat` `usage_usec` (v1: `cpuacct.usage`) through the pass's
  kept-open descriptors (sources/fdcache.py: one pread, and a removed cgroup fails the read
  instead of answering for another process);
* tap bytes: ONE netlink RTM_GETSTATS dump for all domains (sources/netstats.py: only the
  64-bit counters, by ifindex), for the NICs the last full reading matched to a tap: the
  ifindex is the key, so a re-created tap is reported missing, never compared with the old;
* disk bytes: the cgroup v2 `io.stat` Σ rbytes/wbytes, only when the io controller is on for
  the VM cgroups (`LightTarget.io_stat`); libvirt's per-disk bytes stay on the full pass.

Nothing here touches libvirt or SQLite (a test walks the imports); block sizes, balloon and GPU
readings stay on the full pass. Blocking: call `sample()` from a worker thread. Share the
pass's FdCache (one descriptor per file; the pass's `sweep()` closes those of gone domains).
`bench/light_sample.py` measures the cost per domain per sample.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

from hostagent.accounting.closeout import IoBytes, LightReading
from hostagent.clock import Clock
from hostagent.errors import SourceError
from hostagent.model import Nic, NicCounters, canonical_nic_key, nic_key
from hostagent.source_model import CgroupPaths
from hostagent.sources.cgroup_read import sum_io_stat
from hostagent.sources.fdcache import FdCache
from hostagent.sources.files import HostRoot, kv_bytes, kv_value

# v2 `cpu.stat` begins with its `usage_usec` line (kernel/sched/cgroup: cpu_stat_show).
_USAGE_USEC = b"usage_usec "
_USAGE_AT = len(_USAGE_USEC)
# The `missing` of a reading that misses nothing: one shared, read-only empty map.
_NOTHING_MISSING: Mapping[str, str] = MappingProxyType({})
# Cpu files read per `FdCache.read_many` call. Not the whole host at once: with 5,000 domains'
# paths and file contents held together (~1 MB a sample, fresh memory each time) the daemon at
# 5,000 domains and a 10 s interval cost 1-3 % more CPU than before the batching; in batches of
# 256 it costs ~3 % less (both daemons at once, docs/benchmarks.md).
_BATCH = 256


class LinkReader(Protocol):
    """sources/netstats.LinkStats64Reader: (rx_bytes, tx_bytes) by ifindex."""

    def read(self) -> dict[int, tuple[int, int]]:
        """Host-side counters of every link by ifindex."""
        ...


@dataclass(frozen=True, slots=True)
class LightNic:
    """A NIC the last full reading matched to a host link; `shares_view`: macvtap (no swap);
    `key`: its `Nic.key` (None: the MAC's)."""

    mac: str
    ifname: str | None
    ifindex: int
    shares_view: bool = False
    key: str | None = None


def light_nics(nics: Sequence[Nic], counters: Sequence[NicCounters]) -> tuple[LightNic, ...]:
    """The NICs of a full reading that a light sample can follow (those read, with an ifindex)."""
    kinds = {canonical_nic_key(n.key): n.kind for n in nics}
    return tuple(LightNic(c.mac, c.ifname, c.ifindex, kinds.get(nic_key(c)) == "direct",
                          c.key)
                 for c in counters if c.ifindex is not None)


@dataclass(frozen=True, slots=True)
class LightTarget:
    """What to read for one domain: host paths (without the HostRoot prefix) and its NICs."""

    uuid: str
    domid: int
    cpu_file: str | None  # <vm cgroup>/cpu.stat (v2) or <vm cgroup>/cpuacct.usage (v1)
    io_stat: str | None  # <vm cgroup>/io.stat when the v2 io controller is on, else None
    nics: tuple[LightNic, ...] = ()


def target_for(uuid: str, domid: int, paths: CgroupPaths,
               nics: Sequence[LightNic]) -> LightTarget:
    """The light target of a domain whose cgroups the pass located (`cgroup.locate`)."""
    cpu_file: str | None = None
    if paths.cpu is not None:
        cpu_file = (f"{paths.cpu.path}/cpu.stat" if paths.cpu.version == 2
                    else f"{paths.cpu.path}/cpuacct.usage")
    io_stat = f"{paths.io.path}/io.stat" if paths.io is not None and paths.io.version == 2 \
        else None
    return LightTarget(uuid=uuid, domid=domid, cpu_file=cpu_file, io_stat=io_stat,
                       nics=tuple(nics))


def cpu_ns_of(text: str | bytes, path: str) -> int | None:
    """CPU ns from a v2 `cpu.stat` (usage_usec) or a v1 `cpuacct.usage` (ns)."""
    if path.endswith("cpu.stat"):
        usec = (kv_value(text, "usage_usec") if isinstance(text, str)
                else kv_bytes(text, b"usage_usec "))
        return None if usec is None else usec * 1000
    try:
        return int(text)
    except ValueError:
        return None


class LightSampler:
    """Reads light samples of many domains; not re-entrant (one sample at a time)."""

    __slots__ = ("_clock", "_fds", "_links", "_prefix")

    def __init__(self, root: HostRoot, *, fds: FdCache, links: LinkReader | None,
                 clock: Clock) -> None:
        self._prefix = root.abspath("/").rstrip("/")
        self._fds = fds
        self._links = links
        self._clock = clock

    def sample(self, targets: Sequence[LightTarget], *,
               deleted_links: Mapping[int, tuple[int, int]] | None = None
               ) -> dict[str, LightReading]:
        """One LightReading per target, by uuid; a counter that cannot be read is None.

        `deleted_links`: the final (rx, tx) of taps deleted since (sources/stop_watch.py), for
        the ifindexes the dump no longer lists.

        The loop runs for every domain 3 to 15 times a 30 s pass (10 s samples where every
        VM's end is watched, 2 s where not): 15,000 times a pass on a 1,000-domain host at
        worst. Its common case, a v2 `cpu.stat` that
        starts with `usage_usec` and nothing missing, is inline (no helper calls, one shared
        empty `missing`, positional construction); everything else goes the general way."""
        t_wall_ns = self._clock.now().wall_ns
        # The cgroup files first, the link dump after: a VM's end races with its cgroup's
        # removal (the lab: emptied 50 ms after `virsh destroy` began, removed ~1.2 s later),
        # and the dump waits for the RTNL lock, which the teardown of that VM's taps holds.
        prefix = self._prefix
        batches: list[tuple[Sequence[LightTarget], list[bytes | SourceError | None]]] = []
        for at in range(0, len(targets), _BATCH):
            part = targets[at:at + _BATCH]
            paths = [None if t.cpu_file is None else prefix + t.cpu_file for t in part]
            paths += [prefix + t.io_stat for t in part if t.io_stat is not None]
            batches.append((part, self._fds.read_many(paths)))
        links: dict[int, tuple[int, int]] = {}
        links_error: str | None = None
        if any(t.nics for t in targets):
            if self._links is None:
                links_error = "no link reader"
            else:
                try:
                    links = self._links.read()
                except SourceError as err:
                    links_error = f"link stats dump failed: {err}"
            if deleted_links:
                links = {**deleted_links, **links}
        out: dict[str, LightReading] = {}
        for part, files in batches:
            self._parse(part, files, t_wall_ns, links, links_error, out)
        return out

    def _parse(self, part: Sequence[LightTarget], files: Sequence[bytes | SourceError | None],
               t_wall_ns: int, links: dict[int, tuple[int, int]], links_error: str | None,
               out: dict[str, LightReading]) -> None:
        """The readings of one batch of targets into `out`, from their files' answers: the
        cpu files', one a target, then the io.stat files' of the targets that have one."""
        io_at = len(part)
        for t, data in zip(part, files, strict=False):
            io_data: bytes | SourceError | None = None
            if t.io_stat is not None:
                io_data = files[io_at]
                io_at += 1
            cpu_file = t.cpu_file
            if type(data) is bytes and data.startswith(_USAGE_USEC) \
                    and cpu_file is not None and cpu_file.endswith("cpu.stat"):
                end = data.find(b"\n", _USAGE_AT)
                value = data[_USAGE_AT:end] if end > 0 else data[_USAGE_AT:]
                if value.isdigit():
                    missing: dict[str, str] | None = None
                    nics: tuple[NicCounters, ...] = ()
                    io: IoBytes | None = None
                    if t.nics or t.io_stat is not None:
                        missing = {}
                        if t.io_stat is not None:
                            io = self._io(t.io_stat, io_data, missing)
                        if t.nics:
                            nics = self._nics(t.nics, links, links_error, missing)
                    out[t.uuid] = LightReading(t.uuid, t.domid, t_wall_ns, int(value) * 1000,
                                               nics, io, missing or _NOTHING_MISSING)
                    continue
            # Anything else (a v1 cpuacct.usage, a cpu.stat gone, unreadable or malformed) is
            # read the general way, which keeps the reason in `missing`.
            out[t.uuid] = self._general(t, data, io_data, t_wall_ns, links, links_error)

    def _general(self, t: LightTarget, cpu_data: bytes | SourceError | None,
                 io_data: bytes | SourceError | None, t_wall_ns: int,
                 links: dict[int, tuple[int, int]], links_error: str | None) -> LightReading:
        """`sample`'s reading of one target the general way: v1, anything missing."""
        missing: dict[str, str] = {}
        cpu_ns = self._cpu(t.cpu_file, cpu_data, missing)
        io = self._io(t.io_stat, io_data, missing) if t.io_stat is not None else None
        nics: tuple[NicCounters, ...] = ()
        if t.nics:
            nics = self._nics(t.nics, links, links_error, missing)
        return LightReading(uuid=t.uuid, domid=t.domid, t_wall_ns=t_wall_ns, cpu_ns=cpu_ns,
                            nics=nics, io=io, missing=missing)

    @staticmethod
    def _nics(want: Sequence[LightNic], links: dict[int, tuple[int, int]],
              links_error: str | None, missing: dict[str, str]) -> tuple[NicCounters, ...]:
        nics: list[NicCounters] = []
        for n in want:
            counters = links.get(n.ifindex)
            if counters is None:
                missing[f"net:{n.key or n.mac}"] = links_error or f"ifindex {n.ifindex} gone"
                continue
            rx, tx = counters
            # A tap mirrors the guest (host rx = guest tx); a macvtap shares its view.
            # Positional, in NicCounters' field order: mac, ifname, ifindex, guest_rx_bytes,
            # guest_tx_bytes, source, key.
            nics.append(NicCounters(n.mac, n.ifname, n.ifindex, rx if n.shares_view else tx,
                                    tx if n.shares_view else rx, "netlink-stats64", n.key))
        return tuple(nics)

    @staticmethod
    def _usable(rel: str, data: bytes | SourceError | None, key: str,
                missing: dict[str, str]) -> bytes | None:
        """The file's bytes, or None with why in `missing[key]`."""
        if isinstance(data, SourceError):
            missing[key] = f"unreadable: {data}"
            return None
        if data is None:
            missing[key] = f"absent: {rel} (cgroup gone: the process ended)"
        return data

    def _cpu(self, cpu_file: str | None, answer: bytes | SourceError | None,
             missing: dict[str, str]) -> int | None:
        if cpu_file is None:
            missing["cpu"] = "no per-VM cpu cgroup"
            return None
        data = self._usable(cpu_file, answer, "cpu", missing)
        if data is None:
            return None
        cpu_ns = cpu_ns_of(data, cpu_file)
        if cpu_ns is None:
            missing["cpu"] = f"malformed {cpu_file}"
        return cpu_ns

    def _io(self, io_stat: str, answer: bytes | SourceError | None,
            missing: dict[str, str]) -> IoBytes | None:
        data = self._usable(io_stat, answer, "io", missing)
        if data is None:
            return None
        try:
            rd, wr = sum_io_stat(data)
        except ValueError as err:
            missing["io"] = f"malformed {io_stat}: {err}"
            return None
        return IoBytes(rd, wr)
