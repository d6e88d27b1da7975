"""The narrow NVML boundary: the few NVML calls hostagent makes, returning plain Python values.

Two implementations keep the same contract: `PynvmlBoundary` (nvidia-ml-py, the real library)
and `tests/fakes/fake_nvml.py` (replays recorded values). Both translate failures into the one
error tree: ``SourceUnavailable`` when NVML is not there at all (library not found, driver not
loaded), ``SourceError`` for every other failure. "Nothing to report" answers (a GPU that is not
in vGPU host mode, no new utilisation sample) are empty lists, not errors.

Every method blocks; callers run a whole pass of them (`collect`) in ONE worker thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from hostagent.errors import SourceError, SourceUnavailable

# "up": initialised; "down": init before use; "unknown": an abandoned call may have left it
# either way, so shut down (ignoring errors) and init again.
NvmlPhase = Literal["down", "up", "unknown"]

_BUS_ID = re.compile(
    r"^(?:([0-9a-fA-F]{1,8}):)?([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2})\.([0-7])$"
)


def normalize_bus_id(bus_id: str) -> str:
    """NVML's `00000000:3B:00.0` → sysfs/libvirt form `0000:3b:00.0`; ValueError if malformed."""
    m = _BUS_ID.match(bus_id.strip())
    if m is None:
        raise ValueError(f"not a PCI bus id: {bus_id!r}")
    domain, bus, slot, fn = m.groups()
    return f"{int(domain or '0', 16):04x}:{int(bus, 16):02x}:{int(slot, 16):02x}.{int(fn)}"


@dataclass(frozen=True, slots=True)
class VgpuSample:
    """One vGPU utilisation sample: NVML's CPU timestamp (µs) and the SM (3D/compute) util."""

    instance: int
    timestamp_us: int
    sm_util_percent: float


class NvmlBoundary(Protocol):
    """The NVML calls hostagent uses; all blocking, all returning plain values."""

    def init(self) -> None:
        """nvmlInit; SourceUnavailable when the library or driver is missing."""
        ...

    def shutdown(self) -> None:
        """nvmlShutdown."""
        ...

    def device_count(self) -> int:
        """Number of GPUs NVML sees (GPUs bound to vfio-pci are not among them)."""
        ...

    def device_pci_address(self, index: int) -> str:
        """The device's PCI address in sysfs form (`0000:3b:00.0`)."""
        ...

    def device_name(self, index: int) -> str:
        """Marketing name (`NVIDIA A100 80GB PCIe`)."""
        ...

    def active_vgpus(self, index: int) -> list[int]:
        """vGPU instance ids running on the device; [] when it is not in vGPU host mode."""
        ...

    def vgpu_mdev_uuid(self, instance: int) -> str:
        """The mdev UUID (lowercase) the vGPU instance was created for."""
        ...

    def vgpu_fb_usage_bytes(self, instance: int) -> int:
        """Framebuffer bytes the vGPU instance uses now."""
        ...

    def vgpu_utilization(self, index: int, last_seen_us: int) -> list[VgpuSample]:
        """vGPU samples newer than `last_seen_us` (0: the latest); [] when there are none."""
        ...


# --- one NVML pass ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VgpuInstance:
    """An active vGPU instance on a device."""

    instance: int
    mdev_uuid: str
    fb_used_bytes: int | None


@dataclass(frozen=True, slots=True)
class NvmlDevice:
    """One GPU as NVML sees it, with its vGPUs and the utilisation samples of this pass."""

    index: int
    address: str
    name: str
    vgpus: tuple[VgpuInstance, ...] = ()
    samples: tuple[VgpuSample, ...] = ()


@dataclass(frozen=True, slots=True)
class NvmlSnapshot:
    """Everything one NVML pass read, keyed by PCI address."""

    devices: Mapping[str, NvmlDevice]


def collect(nvml: NvmlBoundary, last_seen_us: Mapping[str, int]) -> NvmlSnapshot:
    """Read every device, its vGPUs and their samples since `last_seen_us[address]` (blocking)."""
    devices: dict[str, NvmlDevice] = {}
    for index in range(nvml.device_count()):
        address = nvml.device_pci_address(index)
        name = nvml.device_name(index)
        vgpus: list[VgpuInstance] = []
        samples: list[VgpuSample] = []
        instances = nvml.active_vgpus(index)
        for inst in instances:
            # A vGPU that stops between listing and asking is not a failed pass: skip it
            # (no UUID) or leave its framebuffer unknown.
            try:
                mdev_uuid = nvml.vgpu_mdev_uuid(inst).lower()
            except SourceUnavailable:
                raise
            except SourceError:
                continue
            try:
                fb: int | None = nvml.vgpu_fb_usage_bytes(inst)
            except SourceUnavailable:
                raise
            except SourceError:
                fb = None
            vgpus.append(VgpuInstance(inst, mdev_uuid, fb))
        if instances:
            samples = nvml.vgpu_utilization(index, last_seen_us.get(address, 0))
        devices[address] = NvmlDevice(index, address, name, tuple(vgpus), tuple(samples))
    return NvmlSnapshot(devices)


def average_vgpu_util(
    snapshot: NvmlSnapshot, last_seen_us: Mapping[str, int]
) -> tuple[dict[str, float], dict[str, int]]:
    """Mean SM util per mdev UUID over samples newer than each device's last-seen timestamp.

    Returns (util by mdev UUID, new last-seen timestamp by device address).
    """
    util: dict[str, float] = {}
    seen = dict(last_seen_us)
    for address, dev in snapshot.devices.items():
        since = last_seen_us.get(address, 0)
        fresh = [s for s in dev.samples if s.timestamp_us > since]
        if fresh:
            seen[address] = max(s.timestamp_us for s in fresh)
        for vgpu in dev.vgpus:
            mine = [s.sm_util_percent for s in fresh if s.instance == vgpu.instance]
            if mine:
                util[vgpu.mdev_uuid] = sum(mine) / len(mine)
    return util, seen


def quiet_shutdown(nvml: NvmlBoundary) -> None:
    """nvmlShutdown, ignoring failures."""
    with contextlib.suppress(Exception):  # best effort: it may never have been initialised
        nvml.shutdown()


def nvml_pass(nvml: NvmlBoundary, busy: threading.Lock, phase: NvmlPhase,
               last_seen_us: Mapping[str, int]) -> NvmlSnapshot:
    """The one worker-thread call of a pass: (re-)init if needed, then read every device."""
    if not busy.acquire(blocking=False):
        raise SourceError("an earlier NVML call is still running")
    try:
        if phase == "unknown":
            quiet_shutdown(nvml)  # an abandoned call left NVML in an unknown state
        if phase != "up":
            nvml.init()
        try:
            return collect(nvml, last_seen_us)
        except BaseException:
            quiet_shutdown(nvml)  # the next attempt re-inits from a clean library
            raise
    except SourceError:
        raise
    except Exception as err:  # foreign ctypes code: anything it raises is an NVML failure
        raise SourceError(f"NVML binding failed: {err!r}") from err
    finally:
        busy.release()


# --- the real one -----------------------------------------------------------------------------


class PynvmlBoundary:
    """`NvmlBoundary` over nvidia-ml-py (`pynvml`); handles are cached per init."""

    def __init__(self) -> None:
        self._handles: dict[int, Any] = {}
        self._lock = threading.Lock()

    def _call(self, what: str, fn: Any, *args: Any) -> Any:
        import pynvml

        try:
            return fn(*args)
        except pynvml.NVMLError as err:
            raise translate(err, what) from err

    def _handle(self, index: int) -> Any:
        import pynvml

        with self._lock:
            if index not in self._handles:
                self._handles[index] = self._call(
                    "nvmlDeviceGetHandleByIndex", pynvml.nvmlDeviceGetHandleByIndex, index
                )
            return self._handles[index]

    def init(self) -> None:
        """nvmlInit; SourceUnavailable when the library or driver is missing."""
        try:
            import pynvml
        except ImportError as err:  # pragma: no cover - a declared dependency
            raise SourceUnavailable(f"nvidia-ml-py is not importable: {err}") from err
        with self._lock:
            self._handles.clear()
        self._call("nvmlInit", pynvml.nvmlInit)

    def shutdown(self) -> None:
        """nvmlShutdown."""
        import pynvml

        with self._lock:
            self._handles.clear()
        self._call("nvmlShutdown", pynvml.nvmlShutdown)

    def device_count(self) -> int:
        """Number of GPUs NVML sees."""
        import pynvml

        return int(self._call("nvmlDeviceGetCount", pynvml.nvmlDeviceGetCount))

    def device_pci_address(self, index: int) -> str:
        """The device's PCI address in sysfs form."""
        import pynvml

        info = self._call("nvmlDeviceGetPciInfo", pynvml.nvmlDeviceGetPciInfo, self._handle(index))
        bus_id = info.busId
        return normalize_bus_id(bus_id.decode() if isinstance(bus_id, bytes) else str(bus_id))

    def device_name(self, index: int) -> str:
        """Marketing name."""
        import pynvml

        name = self._call("nvmlDeviceGetName", pynvml.nvmlDeviceGetName, self._handle(index))
        return name.decode() if isinstance(name, bytes) else str(name)

    def active_vgpus(self, index: int) -> list[int]:
        """vGPU instance ids on the device; [] when it is not in vGPU host mode."""
        import pynvml

        try:
            raw = pynvml.nvmlDeviceGetActiveVgpus(self._handle(index))
        except pynvml.NVMLError_NotSupported:
            return []  # a GPU without the vGPU host driver: no vGPUs, not a failure
        except pynvml.NVMLError as err:
            raise translate(err, "nvmlDeviceGetActiveVgpus") from err
        return [int(getattr(v, "value", v)) for v in raw]

    def vgpu_mdev_uuid(self, instance: int) -> str:
        """The mdev UUID of the vGPU instance."""
        import pynvml

        raw = self._call("nvmlVgpuInstanceGetMdevUUID", pynvml.nvmlVgpuInstanceGetMdevUUID,
                         instance)
        return (raw.decode() if isinstance(raw, bytes) else str(raw)).strip().lower()

    def vgpu_fb_usage_bytes(self, instance: int) -> int:
        """Framebuffer bytes in use.

        The C function writes an `unsigned long long`; nvidia-ml-py's wrapper passes a 32-bit
        `c_uint`, which wraps at 4 GiB. Call the function pointer with the right width.
        """
        import pynvml

        getter = getattr(pynvml, "_nvmlGetFunctionPointer", None)
        if getter is None:  # pragma: no cover - a future binding without the private helper
            return int(self._call("nvmlVgpuInstanceGetFbUsage",
                                  pynvml.nvmlVgpuInstanceGetFbUsage, instance))
        fn = self._call("nvmlVgpuInstanceGetFbUsage", getter, "nvmlVgpuInstanceGetFbUsage")
        used = ctypes.c_ulonglong(0)
        ret = fn(ctypes.c_uint(instance), ctypes.byref(used))
        if ret != pynvml.NVML_SUCCESS:
            raise translate(pynvml.NVMLError(ret), "nvmlVgpuInstanceGetFbUsage")
        return int(used.value)

    def vgpu_utilization(self, index: int, last_seen_us: int) -> list[VgpuSample]:
        """vGPU samples newer than `last_seen_us`; [] when there are none."""
        import pynvml

        try:
            raw = pynvml.nvmlDeviceGetVgpuUtilization(self._handle(index), last_seen_us)
        except pynvml.NVMLError_NotFound:
            return []  # NVML's "no sample newer than lastSeenTimeStamp"
        except pynvml.NVMLError_NotSupported:
            return []
        except pynvml.NVMLError as err:
            raise translate(err, "nvmlDeviceGetVgpuUtilization") from err
        # vGPU samples are NVML_VALUE_TYPE_UNSIGNED_INT (the wrapper drops the type field).
        return [VgpuSample(int(s.vgpuInstance), int(s.timeStamp), float(s.smUtil.uiVal))
                for s in raw]


# Codes that mean "there is no NVML here", as opposed to "NVML failed".
_ABSENT_CODES = frozenset({9, 12})  # DRIVER_NOT_LOADED, LIBRARY_NOT_FOUND


def translate(err: Exception, what: str) -> SourceError:
    """A pynvml.NVMLError → SourceUnavailable (NVML not there) or SourceError (it failed)."""
    code = getattr(err, "value", None)
    if code in _ABSENT_CODES:
        return SourceUnavailable(f"{what}: {err}")
    return SourceError(f"{what}: {err}")
