"""The worker-side reads of a pass and the per-domain `DomainReading`, for hostagent/collector.py.

A steady pass makes two thread hand-offs: the bulk stats call with everything else a pass
reads from the host (`EarlyReads`: the links, cgroup files and host facts of every domain, and
the VM partition's CPU), then the commit. In the daemon the first one also waits for the pass's
tick before it reads (hostagent/tick.py): the event loop wakes twice a pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from hostagent.accounting.readings import NO_FACTS, DomainReading, HostFacts, HostReading
from hostagent.errors import SourceError
from hostagent.model import CPU_FROM_LIBVIRT, Baseline, DomainInfo, GpuReading, NicCounters
from hostagent.source_model import DomainStats
from hostagent.sources import net as net_src
from hostagent.sources.domain_files import DomainFiles, FilesResult, Want
from hostagent.sources.fdcache import FdCache
from hostagent.sources.files import HostRoot
from hostagent.sources.unattributed import read_parent_cpu_ns

HUNG_STATS = "stats call hung past the deadline"


@asynccontextmanager
async def held(lock: trio.Lock) -> AsyncIterator[None]:
    """`async with lock`, without the scheduling round a free lock costs in trio (acquire's
    checkpoint: one more task step and event-loop wake-up per pass and per light sample)."""
    try:
        lock.acquire_nowait()
    except trio.WouldBlock:
        await lock.acquire()
    try:
        yield
    finally:
        lock.release()


def parent_cpu_ns(root: HostRoot, path: str | None, fds: FdCache) -> int | None:
    """The VM partition's CPU (v2) in ns; None without one or when unreadable."""
    if path is None:
        return None
    try:
        return read_parent_cpu_ns(root, path, fds)
    except SourceError:
        return None


@dataclass(slots=True)
class EarlyReads:
    """The host reads that run in the bulk call's worker call, right after it answers.

    The files need each domain's DomainInfo, known before the call only in steady state: when
    every listed domain is a known incarnation (same domid), its files are read there;
    otherwise (a new or restarted domain) `files` stays None and the collector reads them in a
    call of its own after the XML. Host files are found by libvirt's own name of the domain
    (`DomainStats.name`), which the XML's cannot always equal (inventory._xml_name). `known`
    is the inventory snapshotted in trio. The parent cgroup's CPU is read either way
    (`parent_read`: it ran).
    """

    known: Mapping[str, tuple[DomainInfo, HostFacts | None]]
    files: DomainFiles
    root: HostRoot
    parent_path: str | None
    fds: FdCache
    parent_ns: int | None = None
    parent_read: bool = field(default=False)

    def __call__(self, domains: tuple[DomainStats, ...]) -> FilesResult | None:
        result = self._files(domains)
        self.parent_ns = parent_cpu_ns(self.root, self.parent_path, self.fds)
        self.parent_read = True
        return result

    def _files(self, domains: tuple[DomainStats, ...]) -> FilesResult | None:
        wants = []
        known = self.known
        for d in domains:
            got = known.get(d.uuid)
            if got is None:
                return None
            info, facts = got
            if info.domid != d.domid:
                return None
            wants.append(Want(info, d.stats, facts, d.name))
        return self.files.read(wants)


def read_every_running(host: HostReading) -> bool:
    """The pass read every domain libvirt listed as running (no read error): an instance it
    did not read does not run (`ledger.account(complete=...)`)."""
    if host.errors:
        return False
    read = {r.info.uuid for r in host.domains}
    return all(uuid in read for uuid in host.listed)


def libvirt_cpu_wanted(domains: Sequence[DomainReading],
                       baselines: Mapping[str, Baseline]) -> bool | None:
    """Whether the next stats call must ask libvirt for CPU (`LibvirtSource.ask_cpu`): some
    domain's cpu cgroup is not found (libvirt's `cpu.time` is then its CPU), or some domain's
    baseline is still in libvirt's counter (the pass that moves it to the cgroup's bills up to
    libvirt's figure read beside it: sampling.py). None for no domains."""
    if not domains:
        return None
    for r in domains:
        cg = r.facts.cgroup
        if cg is None or cg.cpu is None:
            return True
        b = baselines.get(r.instance_id)
        if b is not None and b.cpu_counter == CPU_FROM_LIBVIRT:
            return True
    return False


def domain_reading(d: DomainStats, info: DomainInfo, iid: str, t_wall_ns: int,
                   files: FilesResult, gpus: tuple[GpuReading, ...],
                   known_facts: Mapping[tuple[str, int], HostFacts], *,
                   timed_out: bool) -> DomainReading:
    """One domain's reading from this pass's bulk stats, files and GPUs; named as libvirt
    names it (`d.name`: the XML's name cannot always be that, inventory._xml_name)."""
    # Once per domain and pass on the trio thread: positional constructors (keyword binding
    # of DomainReading's 10 fields costs ~0.4 µs), no comprehension for one or two NICs.
    if info.name != d.name:
        info = dataclasses.replace(info, name=d.name)
    key = (info.uuid, info.domid)
    got = files.missing.get(key)
    missing = dict(got) if got else {}
    cg = files.cgroups.get(key)
    if isinstance(cg, str):
        missing["cgroup"] = cg
        cg = None
    if timed_out:
        missing["libvirt"] = HUNG_STATS
    netlink_nics: dict[str, NicCounters] | None = None
    netlink_missing: dict[str, str]
    if files.links is not None:
        found, netlink_missing = net_src.nic_counters(info.nics, files.links)
        netlink_nics = {}
        for n in found:  # by NIC key: NICs may share a MAC, each has its own tap's counters
            netlink_nics[n.key or n.mac] = n
    elif files.links_error:
        netlink_missing = {f"net:{n.key}": files.links_error for n in info.nics}
    else:
        netlink_missing = {}
    facts = files.facts.get(key) or known_facts.get(key) or NO_FACTS
    # DomainReading's field order: info, instance_id, t_wall_ns, stats, facts, cgroup,
    # netlink_nics, netlink_missing, gpus, missing.
    return DomainReading(info, iid, t_wall_ns, d.stats, facts, cg, netlink_nics,
                         netlink_missing, gpus, missing)
