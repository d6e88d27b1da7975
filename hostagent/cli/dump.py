"""`hostagent dump`: two samples of one domain (or all) `--interval` apart, every counter with its
source and rate, and the event the daemon would emit for that interval. With `--host`, also the
host's billing completeness over the interval: the CPU growth of the VMs' parent cgroup (v2)
against the sum of the domains' (hostagent_unattributed_cpu_seconds_total's figure).

The text output shows every string from libvirt, a guest's owner or the host (names, devices,
errors, the event's fields) through `top_view.printable`, as `top` does: a control character
in a domain name is shown escaped (`\\x1b`, `\\r`, `\\n`), never sent to the terminal."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import trio

from hostagent.accounting import events, sampling
from hostagent.accounting.assemble import sample_of
from hostagent.cli.top_view import printable
from hostagent.clock import Clock, SystemClock
from hostagent.collector import Collector
from hostagent.config.load import Config
from hostagent.errors import DomainNotFound
from hostagent.model import CPU_FROM_CGROUP, Sample
from hostagent.owners.resolver import Owners
from hostagent.sources.files import HostRoot
from hostagent.sources.gpu import GpuSource, describe
from hostagent.sources.libvirt import LibvirtSource
from hostagent.sources.net import link_reader_for
from hostagent.sources.unattributed import parent_cpu_stat, read_parent_cpu_ns


@dataclass(frozen=True, slots=True)
class Counter:
    """One line of the dump."""

    name: str
    value: float | int | str | None
    unit: str
    source: str
    rate_per_s: float | None = None


def _rate(a: int | None, b: int | None, dt_s: float) -> float | None:
    if a is None or b is None or dt_s <= 0 or b < a:
        return None
    return (b - a) / dt_s


def counters(first: Sample, second: Sample) -> list[Counter]:
    """The counters of `second`, with rates against `first`."""
    dt_s = (second.t_wall_ns - first.t_wall_ns) / 1e9
    out = [
        Counter("cpu_time", second.cpu_ns, "ns",
                "cgroup cpu.stat usage_usec" if second.cpu_source == CPU_FROM_CGROUP
                else "libvirt cpu.time", _rate(first.cpu_ns, second.cpu_ns, dt_s)),
        Counter("vcpus", second.vcpus, "count", "libvirt vcpu.current"),
        Counter("memory_allocated", second.memory_alloc_bytes, "bytes", "libvirt balloon.current"),
    ]
    if second.memory is not None:
        out.append(Counter("memory_used", second.memory.used_bytes, "bytes", second.memory.source))
    prev_nics = {n.mac: n for n in first.nics}
    for n in second.nics:
        p = prev_nics.get(n.mac)
        where = f"{n.source} tap {n.ifname} ifindex {n.ifindex}"
        out.append(Counter(f"net[{n.mac}].guest_tx (egress)", n.guest_tx_bytes, "bytes", where,
                           _rate(p.guest_tx_bytes if p else None, n.guest_tx_bytes, dt_s)))
        out.append(Counter(f"net[{n.mac}].guest_rx (ingress)", n.guest_rx_bytes, "bytes", where,
                           _rate(p.guest_rx_bytes if p else None, n.guest_rx_bytes, dt_s)))
    prev_disks = {d.target: d for d in first.disks}
    for d in second.disks:
        pd = prev_disks.get(d.target)
        src = f"libvirt block {d.target}"
        out.append(Counter(f"disk[{d.target}].read", d.rd_bytes, "bytes", src,
                           _rate(pd.rd_bytes if pd else None, d.rd_bytes, dt_s)))
        out.append(Counter(f"disk[{d.target}].write", d.wr_bytes, "bytes", src,
                           _rate(pd.wr_bytes if pd else None, d.wr_bytes, dt_s)))
        out.append(Counter(f"disk[{d.target}].allocation", d.allocation_bytes, "bytes", src))
        out.append(Counter(f"disk[{d.target}].capacity", d.capacity_bytes, "bytes", src))
    if second.pressure is not None:
        for res in ("cpu", "memory", "io"):
            value = getattr(second.pressure, f"{res}_some_avg10")
            out.append(Counter(f"pressure.{res}.some_avg10", value, "%", "cgroup PSI"))
    for g in second.gpus:
        out.append(Counter(f"gpu[{g.address}].util", g.util_percent, "%",
                           g.util_unavailable_reason or f"NVML ({g.kind})"))
    return out


def host_doc(parent: str | None, parent_ns: tuple[int | None, int | None],
             first: Sequence[Sample], second: Sequence[Sample], *,
             interval_s: float | None = None) -> dict[str, Any]:
    """The `--host` document: the parent cgroup's CPU growth no domain's growth explains
    (`interval_s`: between the two reads; by default between the first domain's samples)."""
    before = {s.uuid: s for s in first}
    growth = 0
    for s in second:
        p = before.get(s.uuid)
        if p is not None and p.incarnation == s.incarnation and None not in (p.cpu_ns, s.cpu_ns):
            growth += (s.cpu_ns or 0) - (p.cpu_ns or 0)
    p0, p1 = parent_ns
    parent_growth = None if p0 is None or p1 is None else p1 - p0
    return {"host": {
        "parent_cgroup": parent, "domains": len(second),
        "interval_s": (interval_s if interval_s is not None
                       else (second[0].t_wall_ns - first[0].t_wall_ns) / 1e9
                       if first and second else None),
        "parent_cpu_growth_ns": parent_growth, "domains_cpu_growth_ns": growth,
        "unattributed_cpu_ns": None if parent_growth is None else parent_growth - growth}}


async def collect_dump(cfg: Config, targets: Sequence[str], interval_s: float,
                       *, clock: Clock | None = None, host: bool = False
                       ) -> list[dict[str, Any]]:
    """Take two samples `interval_s` apart and build the dump documents (`host`: every domain
    is read, the `--host` document comes last)."""
    clock = clock or SystemClock()
    limiter = trio.CapacityLimiter(cfg.collector.max_threads)
    lv = LibvirtSource(cfg.libvirt, clock=clock, limiter=limiter)
    gpu = GpuSource(cfg.gpu, root=cfg.paths.root, clock=clock)
    coll = Collector(cfg, clock=clock, store=None, owners=Owners(cfg.owners, clock, None),
                     libvirt_source=lv, link_reader=link_reader_for(cfg), gpu_source=gpu,
                     limiter=limiter)
    try:
        listing = await coll.read_host(only=set())
        if targets:
            ids = {}
            for uuid in listing.listed:
                info = coll.inventory.get(uuid)
                if info is not None:
                    ids[uuid] = info.domid
            wanted = {find_domain(t, listing.listed, ids) for t in targets}
        else:
            wanted = set(listing.listed)
        root = HostRoot(cfg.paths.root)
        parent = parent_cpu_stat(root, cfg.paths.cgroup_root) if host else None
        read = wanted if not host else set(listing.listed)
        # The parent right after each read: both windows shifted alike, no bias.
        first_read = await coll.read_host(only=read)
        p0 = read_parent_cpu_ns(root, parent) if parent else None
        await trio.sleep(interval_s)
        second_read = await coll.read_host(only=read)
        p1 = read_parent_cpu_ns(root, parent) if parent else None
        infos = [r.info for r in second_read.domains]
        # Always scanned (cheap sysfs reads): operators also want the GPUs no VM holds.
        gpu_view = describe(await gpu.read(infos, limiter))
    finally:
        lv.close()
        coll.cgroups.close()
    first_all = [sample_of(r) for r in first_read.domains]
    second_all = [sample_of(r) for r in second_read.domains]
    first = [s for s in first_all if s.uuid in wanted]
    second = [s for s in second_all if s.uuid in wanted]
    unreadable = {e.uuid: e for e in (*first_read.errors, *second_read.errors)}
    docs = []
    before = {s.uuid: s for s in first}
    info_by_uuid = {i.uuid: i for i in infos}
    for s in second:
        p = before.get(s.uuid)
        if p is None:
            continue
        _, base = sampling.usage(None, p, store_created_ns=2**62)
        usage, _ = sampling.usage(base, s, store_created_ns=2**62)
        info = info_by_uuid[s.uuid]
        owner = coll.owners.resolve(s.instance_id, info.owner_hint)
        event = None
        if usage is not None:
            ev = events.build_usage_event(usage, owner, cfg.host.node_id,
                                          time_format=cfg.collector.time_format)
            event = orjson.loads(ev.payload)
        docs.append({
            "domain": {"name": s.name, "uuid": s.uuid, "domid": s.domid,
                       "instance_id": s.instance_id, "incarnation": s.incarnation,
                       "vcpus": s.vcpus, "memory_allocated_bytes": s.memory_alloc_bytes,
                       "nics": [{"mac": n.mac, "kind": n.kind, "tap": n.target}
                                for n in info.nics],
                       "disks": [{"target": d.target, "device": d.device, "source": d.source}
                                 for d in info.disks]},
            "interval_s": (s.t_wall_ns - p.t_wall_ns) / 1e9,
            "counters": [_as_dict(c) for c in counters(p, s)],
            "gpus": [g for g in gpu_view if g.get("domain") == s.uuid],
            "host_gpus": [g for g in gpu_view if g.get("domain") is None],
            "missing": dict(s.missing),
            "event": event,
        })
    for uuid, e in sorted(unreadable.items()):
        if uuid not in info_by_uuid:
            docs.append({"domain": {"name": e.name, "uuid": uuid}, "unreadable":
                         {"step": e.step, "error": e.detail}, "counters": [], "gpus": [],
                         "host_gpus": [], "missing": {e.step: e.detail}, "event": None})
    if host:
        docs.append(host_doc(parent, (p0, p1), first_all, second_all,
                             interval_s=(second_read.t_wall_ns - first_read.t_wall_ns) / 1e9))
    return docs


def find_domain(target: str, listed: Mapping[str, str], ids: Mapping[str, int]) -> str:
    """The UUID of the running domain `target` names: its UUID (any case) first, as virsh,
    then its exact name, then its libvirt id (a domain literally named "34" wins over id 34),
    then its name in any case when only one name matches. DomainNotFound otherwise, and when
    several names match in any case (`WEB` with `web` and `Web` running)."""
    if target.lower() in listed:
        return target.lower()
    for uuid, name in listed.items():
        if name == target:
            return uuid
    if target.isascii() and target.isdigit():
        for uuid, domid in ids.items():
            if domid == int(target):
                return uuid
    folded = sorted((name, uuid) for uuid, name in listed.items()
                    if name.casefold() == target.casefold())
    if len(folded) == 1:
        return folded[0][1]
    if folded:
        raise DomainNotFound(f"no running domain named {_quoted(target)}; it matches several "
                             f"in another case: {_names([n for n, _ in folded])}: "
                             "name one exactly")
    raise DomainNotFound(f"no running domain named {_quoted(target)} or with that UUID or id; "
                         f"running: {_names(sorted(listed.values()))}")


def _names(names: Sequence[str], most: int = 20) -> str:
    """Domain names for a one-line message: quoted (a newline shows as \\n), at most `most`."""
    if not names:
        return "none"
    shown = ", ".join(_quoted(n) for n in names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def _quoted(name: str) -> str:
    """A name as a message quotes it: repr, at most 80 characters of it (a DOMAIN argument of
    100,000 characters once made a 100 kB error line)."""
    return repr(name if len(name) <= 80 else name[:77] + "...")


def _as_dict(c: Counter) -> dict[str, Any]:
    return {"name": c.name, "value": c.value, "unit": c.unit, "source": c.source,
            "rate_per_s": c.rate_per_s}


def _p(value: object) -> str:
    """`value` as one line of text for a terminal: control characters shown escaped."""
    return printable("" if value is None else str(value))


def render_text(docs: Sequence[dict[str, Any]]) -> str:
    """Human-readable dump; every string from the host or a guest's owner escaped (`_p`)."""
    lines: list[str] = []
    for doc in docs:
        if "host" in doc:
            lines.extend(_host_lines(doc["host"]))
            continue
        d = doc["domain"]
        if "unreadable" in doc:
            bad = doc["unreadable"]
            lines.append(f"domain {_p(d['name'])}  uuid {_p(d['uuid'])}  unreadable "
                         f"({_p(bad['step'])}): {_p(bad['error'])}")
            lines.append("")
            continue
        lines.append(f"domain {_p(d['name'])}  uuid {_p(d['uuid'])}  id {d['domid']}  "
                     f"instance {_p(d['instance_id'])}  incarnation {_p(d['incarnation'])}")
        lines.append(f"  {'counter':<44} {'value':>16} {'unit':<6} {'rate/s':>12}  source")
        for c in doc["counters"]:
            rate = c["rate_per_s"]
            rate_s = "" if rate is None else f"{rate:,.1f}"
            value = c["value"]
            if isinstance(value, float):
                value_s = f"{value:,.2f}" if not math.isnan(value) else "nan"
            elif value is None:
                value_s = "missing"
            else:
                value_s = f"{value:,}" if isinstance(value, int) else _p(value)
            lines.append(f"  {_p(c['name']):<44} {value_s:>16} {_p(c['unit']):<6} "
                         f"{rate_s:>12}  {_p(c['source'])}")
        for g in doc["gpus"]:
            util = (f"{g['util_percent']:.1f} %" if g["util_percent"] is not None
                    else f"utilisation unknown: {_p(g['why_no_util'])}")
            lines.append(f"  gpu {_p(g['address'])} {_p(g['model'])} {_p(g['allocation'])}, "
                         f"{'billed' if g['billed'] else 'not billed'}, {util}")
        for k, v in doc["missing"].items():
            lines.append(f"  missing {_p(k)}: {_p(v)}")
        lines.append("  event the daemon would emit for this interval:")
        # JSON escapes C0 controls but lets C1 controls, U+2028 and bidi overrides through.
        event = orjson.dumps(doc["event"], option=orjson.OPT_INDENT_2).decode()
        lines.extend("  " + printable(line) for line in event.split("\n"))
        lines.append("")
    host = docs[0].get("host_gpus", []) if docs else []
    for g in host:
        lines.append(f"host GPU {_p(g['address'])} {_p(g['model'])}: {_p(g['why_no_util'])}")
    return "\n".join(lines)


def _host_lines(h: dict[str, Any]) -> list[str]:
    if h["parent_cgroup"] is None:
        return ["host: no cgroup v2 parent of the VMs (machine.slice / machine): no "
                "unattributed-CPU figure", ""]
    def ms(ns: int | None) -> str:
        return "unreadable" if ns is None else f"{ns / 1e6:,.1f} ms"
    over = ("over an unknown interval" if h["interval_s"] is None
            else f"over {h['interval_s']:.2f} s")
    return [f"host: {h['domains']} domains {over}, parent {_p(h['parent_cgroup'])}",
            f"  parent cgroup CPU growth   {ms(h['parent_cpu_growth_ns']):>16}",
            f"  domains' CPU growth        {ms(h['domains_cpu_growth_ns']):>16}",
            f"  unattributed CPU           {ms(h['unattributed_cpu_ns']):>16}  (billing "
            "completeness: near zero when every VM's CPU is billed)", ""]
