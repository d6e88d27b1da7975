"""The blocking host reads of one pass, done in ONE worker-thread call: the tap link dump, each
new QEMU process's pid file, /proc entry and cgroup location, the VM cgroup's CPU (`cpu.stat`:
the CPU of every domain whose cgroup is found, accounting/assemble.py) and the other cgroup
files libvirt could not stand in for.

One domain's failure is that domain's alone: an unreadable pid file (EACCES, EIO, a name so
long that the path gives ENAMETOOLONG), a /proc or cgroup file that cannot be read, becomes a
`ReadError` for that domain and a `missing` entry in its reading; the other domains are read
as usual. A file that is gone (the process exited) is not an error (files.GONE_ERRNOS).

PSI `some avg10` is a 10-second moving average: it is read every PSI_EVERY_S (and on a
domain's first pass), and the passes between reuse the last figures (at a 1 s interval that
skips 4 of 5 PSI reads, which on a host where libvirt gives balloon memory are, with
`cpu.stat`, the only cgroup files a pass reads).

The caller bounds the whole call with a deadline and abandons it past that (trio's
`abandon_on_cancel`); an abandoned call may still be running when the next pass comes, so
every call takes `busy` without waiting and reports "still blocked" instead of running two
at once over the same kept-open files.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from hostagent.accounting.readings import NO_FACTS, HostFacts, ReadError, ReadStep, brief
from hostagent.model import DomainInfo
from hostagent.source_model import CgroupReading, LinkStats
from hostagent.sources import cgroup as cgroup_src
from hostagent.sources import proc
from hostagent.sources.cgroup_read import READ_ERRORS, CgroupReader, KeptPressure, ReadAsk
from hostagent.sources.files import HostRoot

NO_CGROUP = "cgroup of the QEMU process not found"
# Seconds between two reads of a domain's PSI files (half the window of the avg10 they give).
PSI_EVERY_S = 5.0
PSI_KEY = "cgroup:pressure"  # the `missing` keys of PSI files start with this

Key = tuple[str, int]  # (uuid, domid): one incarnation's key for host facts


class LinkReader(Protocol):
    """The host's links by name (net.LinkStatsReader, net.SysfsLinkReader); blocking."""

    def read(self) -> Mapping[str, LinkStats]:
        """One dump of every link's counters."""
        ...


def has_guest_memory(stats: Mapping[str, Any]) -> bool:
    """Balloon stats give the guest's own memory figure: no cgroup fallback needed."""
    return "balloon.available" in stats and (
        "balloon.usable" in stats or "balloon.unused" in stats)


@dataclass(frozen=True, slots=True)
class Want:
    """One domain to read host files for: its identity, its libvirt stats, known facts, and
    libvirt's own name of it (`DomainStats.name`; None: `info.name`), which its pid file is
    named by: the XML's name cannot always be that (inventory._xml_name)."""

    info: DomainInfo
    stats: Mapping[str, Any]
    known: HostFacts | None = None
    name: str | None = None


@dataclass(slots=True)
class FilesResult:
    """What the worker call read; per domain by (uuid, domid)."""

    links: Mapping[str, LinkStats] | None = None
    links_error: str | None = None
    facts: dict[Key, HostFacts] = field(default_factory=dict)
    cgroups: dict[Key, CgroupReading | str] = field(default_factory=dict)
    missing: dict[Key, dict[str, str]] = field(default_factory=dict)
    errors: list[ReadError] = field(default_factory=list)


@dataclass(slots=True)
class _Kept:
    """A domain's last PSI figures and why some were missing, kept between PSI reads."""

    psi: KeptPressure


class DomainFiles:
    """The pass's blocking reads; `read()` runs in a worker thread, one call per pass."""

    def __init__(self, root: HostRoot, *, cgroup_root: str, pressure: bool,
                 cgroups: CgroupReader, links: LinkReader,
                 monotonic_s: Callable[[], float] = time.monotonic) -> None:
        self.root = root
        self.cgroup_root = cgroup_root
        self.pressure = pressure
        self.cgroups = cgroups
        self.links = links
        self.busy = threading.Lock()
        self._boot_ns: int | None = None
        self._now_s = monotonic_s
        self._psi_read_s = -math.inf
        # The last PSI figures (and why some are missing) per incarnation, between reads.
        self._psi: dict[Key, _Kept] = {}

    def read(self, wants: Sequence[Want]) -> FilesResult | None:
        """Everything for `wants`; None when an abandoned earlier call still holds the files."""
        if not self.busy.acquire(blocking=False):
            return None
        try:
            out = FilesResult()
            try:
                out.links = self.links.read()
            except READ_ERRORS as err:
                out.links_error = brief(f"netlink link dump failed: {err}")
            now_s = self._now_s()
            psi_due = now_s - self._psi_read_s >= PSI_EVERY_S
            if psi_due:
                self._psi_read_s = now_s
            last_psi, self._psi = self._psi, {}
            asks: list[ReadAsk] = []
            asked: list[tuple[DomainInfo, Key]] = []
            for w in wants:
                one = self._one(w, out, psi_due, last_psi)
                if one is not None:
                    asks.append(one[0])
                    asked.append((w.info, one[1]))
            # The cgroup files of every domain, in batches (CgroupReader.read_many: one lock
            # round trip a batch, not two a file); one domain's error is its own.
            got_all = self.cgroups.read_many(asks)
            for (info, key), ask, got in zip(asked, asks, got_all, strict=True):
                if isinstance(got, Exception):
                    out.cgroups[key] = brief(str(got))
                    out.errors.append(_error(info, "cgroup", got))
                    continue
                out.cgroups[key] = got
                if ask.kept is None and self.pressure:  # read now: kept until the next read
                    self._psi[key] = _Kept((got.pressure, {
                        k: v for k, v in got.missing.items() if k.startswith(PSI_KEY)}))
            if psi_due or not self.pressure:
                # Closes the files of domains gone since the last sweep (the PSI files are
                # read only on these passes: sweeping between would close them).
                self.cgroups.sweep()
            return out
        finally:
            self.busy.release()

    def _one(self, w: Want, out: FilesResult, psi_due: bool,
             last_psi: Mapping[Key, _Kept]) -> tuple[ReadAsk, Key] | None:
        """The domain's host facts (found once per incarnation) into `out`; what to read from
        its cgroup, or None where none was found."""
        key = (w.info.uuid, w.info.domid)
        missing: dict[str, str] = {}
        facts = w.known
        if facts is None or facts.cgroup is None or facts.start_ticks is None:
            # Found once per incarnation, tried again each pass until complete.
            facts = self._facts(w.info, w.name, missing, out.errors)
        out.facts[key] = facts
        ask = None
        if facts.cgroup is None:
            out.cgroups[key] = missing.get("cgroup", NO_CGROUP)
        else:
            # Every pass reads the VM cgroup's CPU: its counter is the domain's CPU wherever
            # that cgroup is found (accounting/assemble.py); memory only where libvirt gave
            # none; PSI from the last read between PSI reads.
            kept = None if psi_due or not self.pressure else last_psi.get(key)
            if kept is not None:
                self._psi[key] = kept
            ask = ReadAsk(facts.cgroup, memory=not has_guest_memory(w.stats),
                          kept=None if kept is None else kept.psi)
        missing.pop("cgroup", None)  # reported through out.cgroups
        if missing:
            out.missing[key] = missing
        return None if ask is None else (ask, key)

    def _facts(self, info: DomainInfo, libvirt_name: str | None, missing: dict[str, str],
               errors: list[ReadError]) -> HostFacts:
        """Pid, start time and cgroup dirs of a new incarnation (`libvirt_name`, else
        `info.name`, names the pid file); each step fails on its own."""
        def step(name: ReadStep, key: str, fn: Any, *args: Any) -> Any:
            try:
                return fn(*args)
            except READ_ERRORS as err:
                errors.append(_error(info, name, err))
                missing[key] = brief(f"{name}: {err}")
                return None

        pid = step("pid_file", "process", proc.pid_of, self.root,
                   info.name if libvirt_name is None else libvirt_name)
        if pid is None:
            return NO_FACTS
        ticks = step("proc", "process", proc.process_start_ticks, self.root, pid)
        if self._boot_ns is None:  # fixed until reboot: read /proc/stat once
            self._boot_ns = step("proc", "process", proc.boot_time_ns, self.root)
        started = (proc.ticks_to_wall_ns(ticks, self._boot_ns)
                   if ticks is not None and self._boot_ns is not None else None)
        paths = step("cgroup", "cgroup", cgroup_src.locate, self.root, self.cgroup_root, pid)
        return HostFacts(pid=pid, start_ticks=ticks, started_wall_ns=started, cgroup=paths)


def _error(info: DomainInfo, step: ReadStep, err: BaseException) -> ReadError:
    return ReadError(uuid=info.uuid, name=brief(info.name), step=step, detail=brief(str(err)))
