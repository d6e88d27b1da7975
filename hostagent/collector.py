"""One pass: sources (in threads, with deadlines) → samples → usage → events → ONE commit.

The pass commits the new baselines and the events they produced in one SQLite transaction. A
crash before the commit repeats the pass from the old baselines; a crash after it resends from
the outbox. A failed commit (disk full) leaves the in-memory baselines untouched too, so the next
successful pass covers the whole gap.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import trio

from hostagent.accounting import events, identity, inventory, sampling
from hostagent.accounting.assemble import build_sample
from hostagent.accounting.readings import Accounting, HostFacts, PassReport, Readings
from hostagent.alerts import state as threshold_state
from hostagent.alerts import violations as alerts
from hostagent.alerts.rules_source import RulesSource
from hostagent.alerts.violations import StormControl
from hostagent.clock import Clock
from hostagent.config.load import Config
from hostagent.errors import SourceError, StateError
from hostagent.model import Baseline, DomainInfo, GpuReading, OutEvent, Owner, Sample, Usage
from hostagent.owners.resolver import Owners
from hostagent.sources import cgroup as cgroup_src
from hostagent.sources import net as net_src
from hostagent.sources import proc
from hostagent.sources.fdcache import FdCache
from hostagent.sources.files import HostRoot
from hostagent.sources.gpu import GpuSource
from hostagent.sources.libvirt import DomainStats, LibvirtSource

log = logging.getLogger(__name__)


def _has_guest_memory(stats: Mapping[str, Any]) -> bool:
    """Balloon stats give the guest's own memory figure: no cgroup fallback needed."""
    return "balloon.available" in stats and (
        "balloon.usable" in stats or "balloon.unused" in stats)


def link_reader_for(cfg: Config) -> net_src.LinkStatsReader | net_src.SysfsLinkReader:
    """Netlink on a real host; /sys/class/net under the root when it points at a recorded tree."""
    if cfg.paths.root in ("/", ""):
        return net_src.LinkStatsReader(timeout_s=cfg.libvirt.call_timeout_s)
    return net_src.SysfsLinkReader(HostRoot(cfg.paths.root))


class Collector:
    """Owns the sources, the inventory and the in-memory baselines; `run_pass()` does one pass."""

    def __init__(
        self,
        cfg: Config,
        *,
        clock: Clock,
        store: Any,
        owners: Owners,
        libvirt_source: LibvirtSource,
        link_reader: Any,
        gpu_source: GpuSource | None,
        limiter: trio.CapacityLimiter,
        rules: RulesSource | None = None,
        storm: StormControl | None = None,
    ) -> None:
        self.cfg = cfg
        self.clock = clock
        self.store = store
        self.owners = owners
        self.libvirt = libvirt_source
        self.links = link_reader
        self.gpu = gpu_source
        self.limiter = limiter
        self.root = HostRoot(cfg.paths.root)
        # Disk bytes come from libvirt (v1 blkio stays 0 on kernel 6.x): never read cgroup io.
        # Kept-open cgroup files, across passes; whoever owns the collector calls close().
        self.cgroups = cgroup_src.CgroupReader(self.root, io=False,
                                               pressure=cfg.collector.pressure, fds=FdCache())
        self.inventory = inventory.Inventory()
        self.baselines: dict[str, Baseline] = store.load_baselines() if store is not None else {}
        self.rules = rules
        self.storm = storm
        raw_states = store.load_alert_state() if store is not None and rules is not None else {}
        self.alert_states: dict[str, threshold_state.AlertState] = threshold_state.load_states(
            {k: v for k, v in raw_states.items() if k != alerts.STORM_KEY})
        if storm is not None:  # the buckets survive a restart
            storm.restore(raw_states.get(alerts.STORM_KEY))
        self._facts: dict[tuple[str, int], HostFacts] = {}
        self._instance_ids: dict[tuple[str, int], str] = {}
        self.last: PassReport | None = None
        self._passes = 0
        self._boot_ns: int | None = None
        self.last_ok_wall_ns: int | None = None

    # --- reading --------------------------------------------------------------------------

    async def read(self) -> Readings:
        """Bulk stats and the link dump, concurrently; each already bounded by its own deadline."""
        links: Mapping[str, net_src.LinkStats] | None = None
        links_error: str | None = None
        bulk: Any = None

        async def read_links() -> None:
            nonlocal links, links_error
            try:
                with trio.fail_after(self.cfg.libvirt.call_timeout_s):
                    links = await trio.to_thread.run_sync(
                        self.links.read, limiter=self.limiter, abandon_on_cancel=True)
            except trio.TooSlowError:
                links_error = "netlink link dump timed out"
            except (SourceError, OSError) as err:
                links_error = f"netlink link dump failed: {err}"

        bulk_error: SourceError | None = None

        async def read_bulk() -> None:
            nonlocal bulk, bulk_error
            try:
                bulk = await self.libvirt.bulk_stats()
            except SourceError as err:  # re-raised below, outside the nursery's group
                bulk_error = err

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_links)
            nursery.start_soon(read_bulk)
        if bulk_error is not None:
            raise bulk_error
        t_wall_ns = self.clock.now().wall_ns
        return Readings(t_wall_ns=t_wall_ns, domains=bulk.domains, path=bulk.path,
                        timed_out=bulk.timed_out, links=links, links_error=links_error)

    async def _refresh_inventory(self, domains: Sequence[DomainStats]) -> None:
        shapes = {d.uuid: inventory.shape_from_stats(d.uuid, d.domid, d.stats) for d in domains}
        want = set(self.inventory.needs_xml(shapes.values()))
        todo = [d for d in domains if d.uuid in want]
        parsed: list[tuple[DomainInfo, inventory.Shape]] = []
        if todo:
            xml = await self.libvirt.domain_xml(todo)
            for d in todo:
                got = xml.get(d.uuid)
                if isinstance(got, str):
                    try:
                        parsed.append((inventory.parse_domain_xml(got), shapes[d.uuid]))
                        continue
                    except SourceError as err:
                        got = err
                log.warning("domain XML unavailable", extra={"domain": d.name, "error": str(got)})
                self.inventory.forget(d.uuid)
        self.inventory.update(parsed, present=shapes)
        live = {(d.uuid, d.domid) for d in domains}
        for key in [k for k in self._facts if k not in live]:
            del self._facts[key]
        for key in [k for k in self._instance_ids if k not in live]:
            del self._instance_ids[key]

    def _host_facts(self, infos: Sequence[DomainInfo]) -> dict[tuple[str, int], HostFacts]:
        """Runs in a worker thread: pid, start time and cgroup paths of new incarnations."""
        out = {}
        for info in infos:
            key = (info.uuid, info.domid)
            facts = self._facts.get(key)
            if facts is None or facts.cgroup is None:
                pid = proc.pid_of(self.root, info.name)
                ticks = proc.process_start_ticks(self.root, pid) if pid else None
                if self._boot_ns is None:  # fixed until reboot: read /proc/stat once
                    self._boot_ns = proc.boot_time_ns(self.root)
                boot_ns = self._boot_ns
                started = (proc.ticks_to_wall_ns(ticks, boot_ns)
                           if ticks is not None and boot_ns is not None else None)
                paths = (cgroup_src.locate(self.root, self.cfg.paths.cgroup_root, pid)
                         if pid else None)
                facts = HostFacts(pid=pid, start_ticks=ticks, started_wall_ns=started,
                                  cgroup=paths)
            out[key] = facts
        return out

    def _read_cgroups(
        self,
        facts: Mapping[tuple[str, int], HostFacts],
        stats: Mapping[tuple[str, int], Mapping[str, Any]],
    ) -> dict[tuple[str, int], cgroup_src.CgroupReading | str]:
        """Runs in a worker thread: per domain, the cgroup files libvirt could not stand in for."""
        out: dict[tuple[str, int], cgroup_src.CgroupReading | str] = {}
        pressure = self.cfg.collector.pressure
        for key, f in facts.items():
            s = stats.get(key, {})
            want_cpu = "cpu.time" not in s
            want_memory = not _has_guest_memory(s)
            if not (want_cpu or want_memory or pressure):
                continue
            if f.cgroup is None:
                out[key] = "cgroup of the QEMU process not found"
                continue
            try:
                out[key] = self.cgroups.read(f.cgroup, cpu=want_cpu, memory=want_memory)
            except SourceError as err:
                out[key] = str(err)
        self.cgroups.sweep()  # closes the files of domains gone since the last pass
        return out

    # --- the pass ---------------------------------------------------------------------------

    async def run_pass(self) -> PassReport:
        """One pass; never raises for source or sink trouble (it is reported and counted)."""
        start = self.clock.now()
        cpu0 = time.process_time()
        report = PassReport(started_wall_ns=start.wall_ns)
        try:
            with trio.fail_after(self.cfg.collector.pass_timeout_s):
                await self._pass(report)
        except SourceError as err:
            # Nothing is committed: baselines stay, and the next good pass covers this one.
            report.error = f"source unavailable: {err}"
        except trio.TooSlowError:
            report.error = f"pass exceeded pass_timeout_s={self.cfg.collector.pass_timeout_s}"
            log.warning("pass timed out", extra={"timeout_s": self.cfg.collector.pass_timeout_s})
        except StateError as err:
            report.error = f"commit failed: {err}"
            log.error("pass not committed; baselines kept", extra={"error": str(err)})
        report.duration_s = (self.clock.now().monotonic_ns - start.monotonic_ns) / 1e9
        report.cpu_s = time.process_time() - cpu0
        if report.committed:
            self.last_ok_wall_ns = start.wall_ns
        self.last = report
        return report

    async def collect(
        self, only: set[str] | None = None
    ) -> tuple[Readings, list[Sample], list[DomainInfo]]:
        """Read every source and build one Sample per running domain (or the `only` UUIDs)."""
        readings = await self.read()
        await self._refresh_inventory(readings.domains)
        running = [(d, info) for d in readings.domains
                   if (only is None or d.uuid in only)
                   and (info := self.inventory.get(d.uuid)) is not None]
        infos = [info for _, info in running]
        facts = await trio.to_thread.run_sync(self._host_facts, infos, limiter=self.limiter)
        self._facts.update(facts)
        stats = {(d.uuid, d.domid): d.stats for d, _ in running}
        cgroups = await trio.to_thread.run_sync(self._read_cgroups, facts, stats,
                                                limiter=self.limiter)
        gpus: Mapping[str, tuple[GpuReading, ...]] = {}
        if self.gpu is not None and any(i.hostdevs for i in infos):
            gpus = (await self.gpu.read(infos, self.limiter)).by_uuid
        samples = [self._sample(d, info, readings, facts, cgroups, gpus) for d, info in running]
        return readings, samples, infos

    async def _pass(self, report: PassReport) -> None:
        readings, samples, infos = await self.collect()
        report.libvirt_path, report.timed_out = readings.path, readings.timed_out
        gone = self._expired_baselines({s.instance_id for s in samples}, readings.t_wall_ns)
        acc = self.account(samples, infos, now_ns=readings.t_wall_ns, gone=gone)
        # Shielded: once the commit starts, the pass deadline must not cancel it, or the store
        # would hold new baselines while memory keeps the old ones and re-bills the period.
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self._commit, acc.baselines, acc.events, gone,
                                          acc.alert_changes, limiter=self.limiter)
            for b in acc.baselines:
                self.baselines[b.instance_id] = b
            for iid in gone:
                self.baselines.pop(iid, None)
            self.alert_states = dict(acc.alert_states)
            if self.rules is not None:  # their resolved notices are committed now
                self.rules.forget_retired(acc.retired)
        report.committed = True
        report.domains = len(samples)
        report.events = len(acc.events)
        report.missing = sum(len(s.missing) for s in samples)
        report.usages, report.samples = tuple(acc.usages), tuple(samples)
        report.owners = acc.owners
        self._passes += 1
        if self._passes % 20 == 0:
            self.owners.retain({s.instance_id for s in samples})

    def _commit(self, bases: Sequence[Baseline], new_events: Sequence[OutEvent],
                gone: Sequence[str] = (),
                alert_changes: Mapping[str, bytes | None] | None = None) -> None:
        self.store.commit_pass(bases, new_events, removed_instances=gone,
                               alert_state=alert_changes or None)

    def _expired_baselines(self, present: set[str], now_wall_ns: int) -> list[str]:
        """Instances not running for longer than baseline_retention_s: their baselines go.

        A domain that comes back later is a first sight again; its process started after the
        store existed, so it is billed from its own start and nothing is lost.
        """
        keep_ns = int(self.cfg.collector.baseline_retention_s * 1e9)
        return [iid for iid, b in self.baselines.items()
                if iid not in present and now_wall_ns - b.t_wall_ns > keep_ns]

    def _instance_id(self, info: DomainInfo) -> str:
        key = (info.uuid, info.domid)
        iid = self._instance_ids.get(key)
        if iid is None:
            iid = identity.instance_id(info, scheme=self.cfg.collector.instance_id,
                                       node_id=self.cfg.host.node_id,
                                       xpath=self.cfg.collector.instance_id_xpath)
            self._instance_ids[key] = iid
        return iid

    def _sample(
        self,
        d: DomainStats,
        info: DomainInfo,
        readings: Readings,
        facts: Mapping[tuple[str, int], HostFacts],
        cgroups: Mapping[tuple[str, int], cgroup_src.CgroupReading | str],
        gpus: Mapping[str, tuple[GpuReading, ...]],
    ) -> Sample:
        key = (info.uuid, info.domid)
        f = facts.get(key)
        cg = cgroups.get(key)
        extra: dict[str, str] = {}
        if isinstance(cg, str):
            extra["cgroup"] = cg
            cg = None
        elif cg is not None:
            extra.update({f"cgroup:{k}": v for k, v in cg.missing.items()})
        if d.name in readings.timed_out:
            extra["libvirt"] = "stats call hung past the deadline"
        netlink_nics = None
        netlink_missing: dict[str, str] = {}
        if readings.links is not None:
            found, netlink_missing = net_src.nic_counters(info.nics, readings.links)
            netlink_nics = {n.mac: n for n in found}
        elif readings.links_error:
            netlink_missing = {f"net:{n.mac}": readings.links_error for n in info.nics}
        return build_sample(
            info=info,
            instance_id=self._instance_id(info),
            stats=d.stats,
            t_wall_ns=readings.t_wall_ns,
            start_ticks=f.start_ticks if f else None,
            started_wall_ns=f.started_wall_ns if f else None,
            cgroup_cpu_ns=cg.cpu_ns if cg else None,
            cgroup_working_set_bytes=cg.memory_working_set_bytes if cg else None,
            pressure=cg.pressure if cg else None,
            netlink_nics=netlink_nics,
            netlink_missing=netlink_missing,
            gpus=gpus.get(info.uuid, ()),
            extra_missing=extra,
        )

    def account(
        self, samples: Sequence[Sample], infos: Sequence[DomainInfo], *, now_ns: int,
        gone: Sequence[str] = (),
    ) -> Accounting:
        """Pure part of the pass: samples + baselines → usage, new baselines, events, alerts."""
        hints = {i.uuid: i.owner_hint for i in infos}
        usages: list[Usage] = []
        bases: list[Baseline] = []
        out: list[OutEvent] = []
        owners: dict[str, Owner] = {}
        for s in samples:
            u, base = sampling.usage(
                self.baselines.get(s.instance_id), s,
                store_created_ns=self.store.created_ns,
                count_preexisting=self.cfg.collector.count_preexisting,
            )
            bases.append(base)
            owner = self.owners.resolve(
                s.instance_id, hints.get(s.uuid),
                build_id=s.name if self.cfg.collector.instance_id == "formation" else None)
            owners[s.instance_id] = owner
            if u is None:
                continue
            usages.append(u)
            out.append(events.build_usage_event(u, owner, self.cfg.host.node_id,
                                                time_format=self.cfg.collector.time_format))
        changes: Mapping[str, bytes | None] = {}
        states: Mapping[str, threshold_state.AlertState] = self.alert_states
        if self.rules is not None:
            unassigned = self.cfg.owners.unassigned
            users = {iid: (None if o.user_id == unassigned else o.user_id)
                     for iid, o in owners.items()}
            ev = threshold_state.evaluate(self.rules.index, usages, users, self.alert_states,
                                          now_ns, gate=self.storm, removed_instances=gone,
                                          retired=dict(self.rules.retired))
            out.extend(alerts.route(ev.transitions, owners, self.cfg.host.node_id,
                                    time_format=self.cfg.collector.time_format,
                                    unassigned=unassigned))
            changes, states = ev.changes, ev.states
            if self.storm is not None and self.storm.dirty:
                changes = {**changes, alerts.STORM_KEY: self.storm.to_bytes()}
        return Accounting(usages=usages, baselines=bases, events=out, owners=owners,
                          alert_changes=changes, alert_states=states,
                          retired=dict(self.rules.retired) if self.rules is not None else {})
