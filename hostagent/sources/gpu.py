"""GPUs of running domains: what is allocated (billed) and what can be measured (vGPU via NVML).

Billed: every GPU hostdev a running domain holds, a PCI device passed through whole or a
mediated device (mdev/vGPU) whose parent is a GPU. "GPU" is decided from sysfs: PCI base class
0x03 (display controller). A NIC, NVMe drive or a GPU's own HDMI-audio function passed through
is not a GPU. A host GPU given to no domain is listed for operators and never billed.

Measured: only vGPUs, through NVML, in ONE worker-thread call per pass. The host cannot read a
passed-through GPU (the guest driver owns it), so its utilisation is None with the reason; so is
a vGPU's when NVML is absent or failing. Never a made-up number.
a vGPU's when NVML is absent or failing. Never a made-up number.

Reading sysfs (PCI ids and class, mdev parents, the host's display controllers) lives in
hostagent.sources.gpu_sysfs; its public names are re-exported here.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import trio

from hostagent import handoff
from hostagent.clock import Clock
from hostagent.config.schema import GpuConfig
from hostagent.errors import SourceError, SourceTimeout, SourceUnavailable
from hostagent.model import DomainInfo, GpuReading, Hostdev
from hostagent.sources.files import HostRoot
from hostagent.sources.gpu_sysfs import (
    PciInfo,
    SysfsSnapshot,
    scan_sysfs,
)
from hostagent.sources.nvml_boundary import (
    NvmlBoundary,
    NvmlPhase,
    NvmlSnapshot,
    PynvmlBoundary,
    average_vgpu_util,
    nvml_pass,
    quiet_shutdown,
)

log = logging.getLogger(__name__)

PASSTHROUGH_REASON = "passthrough: the host cannot read a passed-through GPU"
_BACKOFF_INITIAL_S = 15.0
_BACKOFF_MAX_S = 300.0


# --- readings ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Allocation:
    """One GPU hostdev of a running domain: a whole device or a vGPU (mdev UUID)."""

    domain_uuid: str
    domain_name: str
    kind: Literal["passthrough", "vgpu"]
    hostdev: str


@dataclass(frozen=True, slots=True)
class HostGpu:
    """A GPU on this host and what it is allocated to (for `hostagent dump`)."""

    address: str
    model: str
    ids: str
    driver: str | None
    nvml_visible: bool
    allocations: tuple[Allocation, ...] = ()


@dataclass(frozen=True, slots=True)
class GpuReadings:
    """One pass: GPU readings per domain UUID, the host's GPUs, and NVML's health."""

    by_uuid: Mapping[str, tuple[GpuReading, ...]]
    host_gpus: tuple[HostGpu, ...]
    nvml_state: str
    # Hostdevs sysfs does not know (root wrong, device gone): not billed, shown in dump.
    unidentified: tuple[tuple[str, Hostdev], ...] = ()

    def of(self, uuid: str) -> tuple[GpuReading, ...]:
        """The GPU readings of one domain (empty when it has none)."""
        return self.by_uuid.get(uuid, ())


def _vgpu_reading(uuid: str, model: str, parent: PciInfo, *, nvml: NvmlSnapshot | None,
                  nvml_state: str, util: Mapping[str, float]) -> GpuReading:
    def unread(reason: str, fb: int | None = None) -> GpuReading:
        return GpuReading(uuid, "mdev", model, None, fb, reason)

    if nvml is None:
        return unread(f"vgpu: utilisation not measured (NVML {nvml_state})")
    dev = nvml.devices.get(parent.address)
    if dev is None:
        return unread("vgpu: the parent GPU is not visible to NVML")
    inst = next((v for v in dev.vgpus if v.mdev_uuid == uuid), None)
    if inst is None:
        return unread("vgpu: NVML lists no active vGPU for this mdev")
    if uuid not in util:
        return unread("vgpu: no new NVML utilisation sample this period", inst.fb_used_bytes)
    return GpuReading(uuid, "mdev", model, util[uuid], inst.fb_used_bytes)


def build_readings(domains: Sequence[DomainInfo], sysfs: SysfsSnapshot,
                   nvml: NvmlSnapshot | None, nvml_state: str,
                   util: Mapping[str, float]) -> GpuReadings:
    """Pure: hostdevs + sysfs + NVML → per-domain GPU readings and the host GPU list."""
    by_uuid: dict[str, tuple[GpuReading, ...]] = {}
    allocs: dict[str, list[Allocation]] = {}
    unidentified: list[tuple[str, Hostdev]] = []
    nvml_names = {a: d.name for a, d in (nvml.devices.items() if nvml else ())}
    for dom in domains:
        out: list[GpuReading] = []
        for hd in dom.hostdevs:
            if hd.kind == "pci":
                info = sysfs.pci.get(hd.address)
                if info is None:
                    unidentified.append((dom.uuid, hd))
                elif info.is_gpu:
                    model = nvml_names.get(info.address, info.model)
                    out.append(GpuReading(hd.address, "pci", model, None, None,
                                          PASSTHROUGH_REASON))
                    allocs.setdefault(info.address, []).append(
                        Allocation(dom.uuid, dom.name, "passthrough", hd.address))
            elif hd.kind == "mdev":
                mdev = sysfs.mdevs.get(hd.address)
                parent = sysfs.pci.get(mdev.parent) if mdev and mdev.parent else None
                if mdev is None or parent is None:
                    unidentified.append((dom.uuid, hd))
                elif parent.is_gpu:
                    model = mdev.type_name or nvml_names.get(parent.address, parent.model)
                    out.append(_vgpu_reading(hd.address, model, parent, nvml=nvml,
                                             nvml_state=nvml_state, util=util))
                    allocs.setdefault(parent.address, []).append(
                        Allocation(dom.uuid, dom.name, "vgpu", hd.address))
        if out:
            by_uuid[dom.uuid] = tuple(out)
    host = tuple(
        HostGpu(a, nvml_names.get(a, sysfs.pci[a].model), sysfs.pci[a].ids, sysfs.pci[a].driver,
                a in nvml_names, tuple(allocs.get(a, ())))
        for a in sysfs.host_gpus
    )
    return GpuReadings(by_uuid, host, nvml_state, tuple(unidentified))


# --- the source --------------------------------------------------------------------------------


_STATE_MESSAGES = {
    "ok": "NVML available: vGPU utilisation is measured",
    "absent": "NVML absent: GPUs are billed by allocation only, no vGPU utilisation",
    "off": "NVML disabled by config: GPUs are billed by allocation only",
    "error": "NVML failing: GPUs are billed by allocation only until it recovers",
}


class GpuSource:
    """Reads the GPUs of running domains each pass; NVML state survives between passes."""

    def __init__(self, cfg: GpuConfig, *, root: str = "/", nvml: NvmlBoundary | None = None,
                 clock: Clock) -> None:
        self._cfg = cfg
        self._root = HostRoot(root)
        self._sysfs = SysfsSnapshot({}, {}, ())  # last good scan: device identity is stable
        self._clock = clock
        self._nvml: NvmlBoundary | None = None
        if cfg.nvml == "auto":
            self._nvml = nvml if nvml is not None else PynvmlBoundary()
        self._phase: NvmlPhase = "down"
        self._state = "unknown"
        self._retry_at_ns = 0
        self._backoff_s = _BACKOFF_INITIAL_S
        self._last_seen_us: dict[str, int] = {}
        self._busy = threading.Lock()
        self._warned: set[tuple[str, str]] = set()

    @property
    def nvml_state(self) -> str:
        """`ok`, `absent`, `off`, `error: ...` (or `unknown` before the first pass)."""
        return self._state

    async def read(self, domains: Sequence[DomainInfo],
                   limiter: trio.CapacityLimiter) -> GpuReadings:
        """GPU readings of `domains` for this pass; raises SourceTimeout if sysfs hangs."""
        pci = sorted({h.address for d in domains for h in d.hostdevs if h.kind == "pci"})
        mdevs = sorted({h.address for d in domains for h in d.hostdevs if h.kind == "mdev"})
        sysfs = await self._scan(pci, mdevs, limiter)
        snapshot = await self._read_nvml(limiter)
        util: dict[str, float] = {}
        if snapshot is not None:
            util, self._last_seen_us = average_vgpu_util(snapshot, self._last_seen_us)
        readings = build_readings(domains, sysfs, snapshot, self._state, util)
        for uuid, hd in readings.unidentified:
            if (uuid, hd.address) not in self._warned:
                self._warned.add((uuid, hd.address))
                log.warning("hostdev not found in sysfs: not billed as a GPU",
                            extra={"domain": uuid, "hostdev": hd.address, "kind": hd.kind})
        return readings

    async def _scan(self, pci: Sequence[str], mdevs: Sequence[str],
                    limiter: trio.CapacityLimiter) -> SysfsSnapshot:
        """This pass's sysfs view; if the scan hangs, the last one if it knows every hostdev.

        A GPU missing from a committed pass would lose its seconds for good, so a hung scan
        either reuses what is known (a PCI function's ids do not change while it is assigned)
        or fails the pass, which the next pass then covers.
        """
        with trio.move_on_after(self._cfg.timeout_s):
            fresh = await handoff.run_sync(scan_sysfs, self._root, pci, mdevs,
                                           limiter=limiter, abandon_on_cancel=True)
            self._sysfs = fresh
            return fresh
        old = self._sysfs
        if all(a in old.pci for a in pci) and all(u in old.mdevs for u in mdevs):
            log.warning("sysfs scan hung: using the last known GPU identities",
                        extra={"root": self._root.root, "timeout_s": self._cfg.timeout_s})
            return old
        raise SourceTimeout(f"sysfs scan under {self._root.root!r} took over "
                            f"{self._cfg.timeout_s} s")

    async def _read_nvml(self, limiter: trio.CapacityLimiter) -> NvmlSnapshot | None:
        if self._nvml is None:
            self._set_state("off")
            return None
        if self._clock.now().monotonic_ns < self._retry_at_ns or self._busy.locked():
            return None  # backing off, or an abandoned call still blocks: keep the state
        phase, self._phase = self._phase, "unknown"  # stays so if we are cancelled mid-call
        snapshot: NvmlSnapshot | None = None
        with trio.move_on_after(self._cfg.timeout_s) as scope:
            try:
                snapshot = await handoff.run_sync(
                    nvml_pass, self._nvml, self._busy, phase, dict(self._last_seen_us),
                    limiter=limiter, abandon_on_cancel=True)
            except SourceUnavailable:
                self._failed("absent")
            except SourceError as err:
                self._failed(f"error: {err}")
        if scope.cancelled_caught:
            self._failed(f"error: NVML did not answer within {self._cfg.timeout_s} s",
                         phase="unknown")
        if snapshot is not None:
            self._phase = "up"
            self._backoff_s = _BACKOFF_INITIAL_S
            self._set_state("ok")
        return snapshot

    def _failed(self, state: str, phase: NvmlPhase = "down") -> None:
        self._phase = phase
        self._retry_at_ns = self._clock.now().monotonic_ns + int(self._backoff_s * 1e9)
        self._backoff_s = min(self._backoff_s * 2, _BACKOFF_MAX_S)
        self._set_state(state)

    def _set_state(self, state: str) -> None:
        if state == self._state:
            return
        key = state.split(":", 1)[0]
        extra: dict[str, Any] = {"nvml_state": state, "previous": self._state}
        if key == "error":
            log.warning(_STATE_MESSAGES[key], extra=extra)
        else:
            log.info(_STATE_MESSAGES[key], extra=extra)
        self._state = state

    async def aclose(self) -> None:
        """nvmlShutdown if NVML was initialised (skipped while an abandoned call blocks)."""
        if self._nvml is None or self._phase == "down":
            return
        if self._busy.locked():
            log.warning("NVML call still blocked at close: not shutting NVML down")
            return
        with trio.move_on_after(self._cfg.timeout_s):
            await handoff.run_sync(quiet_shutdown, self._nvml, abandon_on_cancel=True)
        self._phase = "down"


def describe(readings: GpuReadings) -> list[dict[str, Any]]:
    """One row per host GPU allocation, idle host GPU and unidentified hostdev (for dump)."""
    got = {(u, r.address): r for u, rs in readings.by_uuid.items() for r in rs}
    rows: list[dict[str, Any]] = []

    def row(kind: str, address: str, model: str | None, **kw: Any) -> None:
        rows.append({"kind": kind, "address": address, "model": model, "ids": None,
                     "parent": None, "driver": None, "domain": None, "domain_name": None,
                     "allocation": "unallocated", "billed": False, "util_percent": None,
                     "fb_used_bytes": None, "why_no_util": None} | kw)

    for gpu in readings.host_gpus:
        common = {"ids": gpu.ids, "driver": gpu.driver}
        if not gpu.allocations:
            row("host", gpu.address, gpu.model, **common,
                why_no_util="not allocated to any domain: not billed")
        for a in gpu.allocations:
            r = got.get((a.domain_uuid, a.hostdev))
            where = f"{a.domain_name} ({a.domain_uuid})"
            row(a.kind, a.hostdev, r.model if r else gpu.model, **common,
                parent=gpu.address if a.kind == "vgpu" else None,
                domain=a.domain_uuid, domain_name=a.domain_name,
                allocation=(f"passthrough to {where}" if a.kind == "passthrough"
                            else f"vgpu on {gpu.address} for {where}"),
                billed=r is not None, util_percent=r.util_percent if r else None,
                fb_used_bytes=r.fb_used_bytes if r else None,
                why_no_util=r.util_unavailable_reason if r else None)
    for uuid, hd in readings.unidentified:
        row(hd.kind, hd.address, hd.model, domain=uuid, allocation=f"held by {uuid}",
            why_no_util="not found in sysfs: not billed as a GPU")
    return rows
