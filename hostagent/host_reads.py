"""The reading half of a pass: the host read into one `DomainReading` per running domain.

`HostReads` is mixed into hostagent.collector.Collector, which owns the state it reads with
(declared below): the bulk stats call (with the host reads of known domains in its worker call,
pass_reads.EarlyReads), the XML inventory refreshed for new, reshaped or changed domains (and
the GPU change times libvirt told of: hostagent/xml_changes.py), each incarnation's instance id
(hostagent/instance_ids.py), the host files (links, /proc facts, cgroup files) in one bounded
worker call, and the GPUs. One domain's failed step costs only that domain (a `ReadError`);
only a host-wide failure (no libvirt connection) raises. The pass itself (account, commit) is
the collector's.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import trio

from hostagent import handoff, pass_reads
from hostagent.accounting import inventory
from hostagent.accounting.readings import DomainReading, HostFacts, HostReading, ReadError, brief
from hostagent.clock import Clock
from hostagent.config.load import Config
from hostagent.errors import SourceError
from hostagent.instance_ids import InstanceIds
from hostagent.model import Baseline, DomainInfo
from hostagent.source_model import DomainStats
from hostagent.sources.domain_files import DomainFiles, FilesResult, Want
from hostagent.sources.fdcache import FdCache
from hostagent.sources.files import HostRoot
from hostagent.sources.gpu import GpuReadings, GpuSource
from hostagent.sources.libvirt import LibvirtSource, Then
from hostagent.tick import TickWait
from hostagent.xml_changes import XmlChanges

log = logging.getLogger("hostagent.collector")  # its records, as before the split


class HostReads:
    """The collector's reading methods (mixed into Collector, which sets these attributes)."""

    cfg: Config
    clock: Clock
    libvirt: LibvirtSource
    gpu: GpuSource | None
    limiter: trio.CapacityLimiter
    fds: FdCache
    files: DomainFiles
    inventory: inventory.Inventory
    xml_changes: XmlChanges
    baselines: dict[str, Baseline]
    _facts: dict[tuple[str, int], HostFacts]
    _instance_ids: InstanceIds
    _root: HostRoot
    _parent_cpu: str | None
    _early: pass_reads.EarlyReads | None

    # A read of at most this many domains between passes (`only`: a VM started, a device
    # plugged) asks libvirt for those domains alone (`LibvirtSource.stats_of`); a larger
    # one, or a listing (`only=set()`), makes the bulk call.
    TARGETED_MAX = 16

    async def read_host(self, only: set[str] | None = None, *,
                        wait: TickWait | None = None) -> HostReading:
        """One `DomainReading` per running domain (or the `only` UUIDs) and per-domain errors.

        Raises SourceError only for host-wide failures (no libvirt connection), or when a
        targeted read (`TARGETED_MAX`) hung or failed; `wait`: the bulk call's worker first
        waits for the pass's tick (WaitInterrupted: cut short).
        """
        targeted = only is not None and 0 < len(only) <= self.TARGETED_MAX and wait is None
        early = self._early_reads() if only is None else None
        self._early = early
        if targeted:
            assert only is not None
            got: Then[FilesResult | None] = Then(await self.libvirt.stats_of(only))
        else:
            got = await self.libvirt.bulk_stats_then(early, wait=wait)
        bulk = got.bulk
        errors = [ReadError(uuid, brief(name), "stats", brief(why))
                  for uuid, name, why in bulk.failed
                  if only is None or uuid in only]
        await self._refresh_inventory(bulk.domains, errors, partial=targeted)
        wanted = [(d, info) for d in bulk.domains
                  if (info := self.inventory.get(d.uuid)) is not None
                  and (only is None or d.uuid in only)]
        ids = self._instance_ids
        fresh = [info for _, info in wanted if (info.uuid, info.domid) not in ids]
        refused = ids.assign(fresh, self._live(bulk.domains, partial=targeted),
                             self.baselines) if fresh else {}
        running: list[tuple[DomainStats, DomainInfo, str]] = []
        for d, info in wanted:
            iid = ids.get((info.uuid, info.domid))
            if iid is None:
                why = refused.get((info.uuid, info.domid), "no instance id")
                errors.append(ReadError(d.uuid, brief(d.name), "identity", brief(why)))
                continue
            running.append((d, info, iid))
        files = await self._read_files([(d, info) for d, info, _ in running],
                                       early=got.after, ran_out=got.then_ran_out)
        errors.extend(files.errors)
        t_wall_ns = self.clock.now().wall_ns
        gpus, gpu_error = await self._read_gpus([info for _, info, _ in running])
        out: list[DomainReading] = []
        for d, info, iid in running:
            if gpu_error is not None and info.hostdevs:
                # GPU seconds count time, not a counter: billing this period without them
                # would lose them. Withheld, the domain keeps its baseline until GPUs read again.
                errors.append(ReadError(d.uuid, brief(d.name), "gpu", brief(gpu_error)))
                continue
            out.append(pass_reads.domain_reading(
                d, info, iid, t_wall_ns, files, gpus.of(info.uuid) if gpus is not None else (),
                self._facts, timed_out=d.name in bulk.timed_out))
        return HostReading(t_wall_ns=t_wall_ns, domains=tuple(out), errors=tuple(errors),
                           path=bulk.path, timed_out=bulk.timed_out,
                           listed={d.uuid: d.name for d in bulk.domains})

    def _live(self, domains: Sequence[DomainStats], *, partial: bool) -> set[tuple[str, int]]:
        """The incarnations running now, for the instance ids: those read, and after a
        partial read also the others known (a UUID runs once: not its other incarnations)."""
        live = {(d.uuid, d.domid) for d in domains}
        if partial:
            read = {d.uuid for d in domains}
            live.update(k for k in self._instance_ids.holders() if k[0] not in read)
        return live

    async def _refresh_inventory(self, domains: Sequence[DomainStats],
                                 errors: list[ReadError], *, partial: bool = False) -> None:
        """The inventory (domain XML) brought up to date for `domains`; `partial`: they are
        some of the running domains only (a targeted read between passes), so nobody else is
        forgotten, the periodic re-reads stay the passes' and libvirt's change notices stay
        for the next pass (which reads those domains once more)."""
        shapes = {d.uuid: inventory.shape_from_stats(d.uuid, d.domid, d.stats) for d in domains}
        self.inventory.retune(self.xml_refresh_passes())
        changed, everything = (self.xml_changes.peek() if partial
                               else self.xml_changes.take())
        want = set(self.inventory.needs_xml(shapes.values(),
                                            shapes.keys() if everything else changed,
                                            periodic=not partial))
        todo = [d for d in domains if d.uuid in want]
        parsed: list[tuple[DomainInfo, inventory.Shape]] = []
        if todo:
            xml = await self.libvirt.domain_xml(todo)
            for d in todo:
                got = xml.get(d.uuid)
                if isinstance(got, str):
                    try:
                        parsed.append((inventory.parse_domain_xml(got, d.name), shapes[d.uuid]))
                        continue
                    except SourceError as err:
                        got = err
                errors.append(ReadError(d.uuid, brief(d.name), "xml", brief(str(got))))
                self.inventory.forget(d.uuid)
        if partial:
            self.inventory.update(parsed, present=None)
            return
        self.inventory.update(parsed, present=shapes)
        # Keyed by incarnation: more entries than running domains means some are gone (a
        # restart or a stop), and only then is the sweep worth its set.
        if len(self._facts) > len(domains) or len(self._instance_ids) > len(domains):
            live = {(d.uuid, d.domid) for d in domains}
            for key in [k for k in self._facts if k not in live]:
                del self._facts[key]
            self._instance_ids.keep_only(live)

    def xml_refresh_passes(self) -> int:
        """Passes between two periodic XML re-reads of a domain, for the interval in force
        (reloadable) and whether libvirt's XML change events are heard."""
        return inventory.refresh_passes(
            self.cfg.collector.interval_s,
            inventory.XML_REFRESH_HEARD_S if self.xml_changes.heard else inventory.XML_REFRESH_S)

    def _early_reads(self) -> pass_reads.EarlyReads:
        """The host reads for the bulk call's worker call (pass_reads.EarlyReads)."""
        facts = self._facts
        known = {uuid: (info, facts.get((uuid, info.domid)))
                 for uuid, info in self.inventory.items()}
        return pass_reads.EarlyReads(known, self.files, self._root, self._parent_cpu, self.fds)

    async def _read_files(self, running: Sequence[tuple[DomainStats, DomainInfo]], *,
                          early: FilesResult | None = None, ran_out: bool = False
                          ) -> FilesResult:
        """Links, host facts and cgroup files in ONE worker call, bounded by a deadline.

        `early`: they were read in the bulk call's worker call (`_early_reads`); `ran_out`:
        that call ran past its deadline after the bulk call answered. Past
        `libvirt.call_timeout_s` the call is abandoned (a hung cgroupfs or /proc read):
        the pass goes on with those readings missing, and `DomainFiles.busy` keeps later passes
        from starting a second call until the abandoned one returns.
        """
        timeout_s = self.cfg.libvirt.call_timeout_s
        result: FilesResult | None = early
        why = f"host file reads exceeded {timeout_s} s"
        if result is None and not ran_out:
            wants = [Want(info, d.stats, self._facts.get((info.uuid, info.domid)), d.name)
                     for d, info in running]
            with trio.move_on_after(timeout_s):
                result = await handoff.run_sync(self.files.read, wants,
                                                limiter=self.limiter,
                                                abandon_on_cancel=True)
                why = "host file reads of an earlier pass still blocked"
        if result is None:
            log.warning("host file reads skipped", extra={"reason": why})
            return FilesResult(links_error=why, cgroups={
                (info.uuid, info.domid): why for _, info in running})
        self._facts.update(result.facts)
        return result

    async def _read_gpus(self, infos: Sequence[DomainInfo]
                         ) -> tuple[GpuReadings | None, str | None]:
        """This pass's GPU readings (None: no domain holds a hostdev), or why none were taken."""
        if self.gpu is None or not any(i.hostdevs for i in infos):
            return None, None
        try:
            return await self.gpu.read(infos, self.limiter), None
        except SourceError as err:
            return None, str(err)

