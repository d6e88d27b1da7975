"""A fake NVML behind the same `NvmlBoundary` contract the real pynvml wrapper keeps.

It replays fixtures/gpu/nvml/*.json: one frame per NVML pass (a frame starts at
`device_count`, the first call of `collect`), vGPU instances with their mdev UUIDs and
framebuffer use, and the utilisation samples the driver holds at that moment; like
`nvmlDeviceGetVgpuUtilization` it returns only samples newer than `last_seen_us`. Errors are
raised through the real `translate` (from real `pynvml.NVMLError` objects), so the source sees
exactly what the real boundary would raise. Every call is logged with its thread id.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pynvml

from hostagent.sources.nvml_boundary import VgpuSample, normalize_bus_id, translate

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "gpu" / "nvml"
# Boundary method -> the NVML function the real boundary names in its errors.
NVML_NAMES = {
    "device_count": "nvmlDeviceGetCount", "device_pci_address": "nvmlDeviceGetPciInfo",
    "device_name": "nvmlDeviceGetName", "active_vgpus": "nvmlDeviceGetActiveVgpus",
    "vgpu_mdev_uuid": "nvmlVgpuInstanceGetMdevUUID",
    "vgpu_fb_usage_bytes": "nvmlVgpuInstanceGetFbUsage",
    "vgpu_utilization": "nvmlDeviceGetVgpuUtilization",
}


@dataclass(frozen=True)
class Call:
    """One call the source made: method name, frame it ran in, thread it ran on."""

    name: str
    frame: int
    thread: int


class FakeNvml:
    """Replays a recording; `present=False` behaves like a host without libnvidia-ml.so."""

    def __init__(self, recording: str | Path = "two_devices.json", *, present: bool = True,
                 init_failures: int = 0) -> None:
        path = Path(recording)
        if not path.is_absolute():
            path = FIXTURES / path
        doc: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        self.devices: list[dict[str, Any]] = doc["devices"]
        self.frames: list[dict[str, Any]] = doc["frames"]
        self.present = present
        self.init_failures = init_failures
        self.frame = -1
        self.initialized = 0  # nvmlInit is reference counted
        self.calls: list[Call] = []
        self.gate: threading.Event | None = None  # set: the next device_count blocks on it
        self.blocked = threading.Event()
        self._lock = threading.Lock()

    # --- helpers -----------------------------------------------------------------------------

    def _log(self, name: str) -> None:
        with self._lock:
            self.calls.append(Call(name, self.frame, threading.get_ident()))

    def _fail(self, code: int, what: str) -> None:
        raise translate(pynvml.NVMLError(code), what)

    def _check(self, call: str, index: int | None = None) -> None:
        if not self.initialized:
            self._fail(pynvml.NVML_ERROR_UNINITIALIZED, NVML_NAMES[call])
        err = self._current().get("error")
        if err and err["call"] == call and err.get("device", index) == index:
            self._fail(int(err["code"]), NVML_NAMES[call])

    def _current(self) -> dict[str, Any]:
        return self.frames[min(max(self.frame, 0), len(self.frames) - 1)]

    def block_next_pass(self) -> threading.Event:
        """Make the next `device_count` hang until the returned event is set."""
        self.gate = threading.Event()
        return self.gate

    def threads_of_frame(self, frame: int) -> set[int]:
        """Thread ids of every call made while replaying `frame`."""
        return {c.thread for c in self.calls if c.frame == frame}

    # --- NvmlBoundary ------------------------------------------------------------------------

    def init(self) -> None:
        """nvmlInit."""
        self._log("init")
        if not self.present:
            self._fail(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, "nvmlInit")
        if self.init_failures > 0:
            self.init_failures -= 1
            self._fail(pynvml.NVML_ERROR_UNKNOWN, "nvmlInit")
        self.initialized += 1

    def shutdown(self) -> None:
        """nvmlShutdown."""
        self._log("shutdown")
        if not self.initialized:
            self._fail(pynvml.NVML_ERROR_UNINITIALIZED, "nvmlShutdown")
        self.initialized -= 1

    def device_count(self) -> int:
        """Starts the next frame."""
        self.frame += 1
        self._log("device_count")
        gate, self.gate = self.gate, None
        if gate is not None:
            self.blocked.set()
            gate.wait()
        self._check("device_count")
        return len(self.devices)

    def device_pci_address(self, index: int) -> str:
        """Sysfs form of the recorded NVML bus id."""
        self._log("device_pci_address")
        self._check("device_pci_address", index)
        return normalize_bus_id(self.devices[index]["bus_id"])

    def device_name(self, index: int) -> str:
        """Recorded name."""
        self._log("device_name")
        self._check("device_name", index)
        return str(self.devices[index]["name"])

    def _vgpus(self, index: int) -> dict[str, Any]:
        result: dict[str, Any] = self._current().get("vgpus", {}).get(str(index), {})
        return result

    def _instance(self, instance: int) -> dict[str, Any]:
        for i in range(len(self.devices)):
            found = self._vgpus(i).get(str(instance))
            if found is not None:
                return dict(found)
        self._fail(pynvml.NVML_ERROR_INVALID_ARGUMENT, "vgpu instance")
        raise AssertionError("unreachable")  # pragma: no cover

    def active_vgpus(self, index: int) -> list[int]:
        """Instances of the frame; [] for a device without vGPUs (NOT_SUPPORTED in NVML)."""
        self._log("active_vgpus")
        self._check("active_vgpus", index)
        return [int(k) for k in self._vgpus(index)]

    def vgpu_mdev_uuid(self, instance: int) -> str:
        """Recorded mdev UUID (lowercased, as the real boundary does)."""
        self._log("vgpu_mdev_uuid")
        self._check("vgpu_mdev_uuid")
        return str(self._instance(instance)["mdev"]).lower()

    def vgpu_fb_usage_bytes(self, instance: int) -> int:
        """Recorded framebuffer bytes."""
        self._log("vgpu_fb_usage_bytes")
        self._check("vgpu_fb_usage_bytes")
        return int(self._instance(instance)["fb_bytes"])

    def vgpu_utilization(self, index: int, last_seen_us: int) -> list[VgpuSample]:
        """Samples of the frame newer than `last_seen_us`."""
        self._log("vgpu_utilization")
        self._check("vgpu_utilization", index)
        raw = self._current().get("samples", {}).get(str(index), [])
        return [VgpuSample(int(i), int(ts), float(sm)) for i, ts, sm in raw if ts > last_seen_us]
