"""The NVML boundary: bus-id normalisation, error translation, `collect`, and the real pynvml
wrapper on a host without NVML (this test machine has no GPU and no libnvidia-ml.so)."""

from __future__ import annotations

import ctypes.util
import logging

import pynvml
import pytest
import trio

from hostagent.config.schema import GpuConfig
from hostagent.errors import SourceError, SourceUnavailable
from hostagent.sources.gpu import GpuSource
from hostagent.sources.nvml_boundary import PynvmlBoundary, collect, normalize_bus_id, translate
from tests.clocks import FakeClock
from tests.fakes.fake_nvml import FakeNvml
from tests.sources.test_gpu import A10_1, A10_2, GPU, all_domains

NO_NVML = ctypes.util.find_library("nvidia-ml") is None


@pytest.mark.parametrize(("nvml", "sysfs"), [
    ("00000000:3B:00.0", "0000:3b:00.0"),
    ("0000:3B:00.0", "0000:3b:00.0"),  # busIdLegacy
    ("00010000:01:1F.7", "10000:01:1f.7"),
    ("3b:00.0", "0000:3b:00.0"),
])
def test_bus_ids_are_normalised_to_the_sysfs_form(nvml: str, sysfs: str) -> None:
    assert normalize_bus_id(nvml) == sysfs


@pytest.mark.parametrize("bad", ["", "0000:3b:00", "0000:3b:00.8", "zz:00.0"])
def test_malformed_bus_ids_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        normalize_bus_id(bad)


def test_absent_codes_are_unavailable_and_the_rest_are_errors() -> None:
    for code in (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, pynvml.NVML_ERROR_DRIVER_NOT_LOADED):
        assert type(translate(pynvml.NVMLError(code), "nvmlInit")) is SourceUnavailable
    lost = translate(pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST), "nvmlDeviceGetCount")
    assert type(lost) is SourceError
    assert str(lost) == "nvmlDeviceGetCount: GPU is lost"


def test_collect_skips_a_vgpu_that_vanished_and_keeps_unknown_framebuffers() -> None:
    fake = FakeNvml()
    fake.init()
    fake.frames[0]["error"] = {"call": "vgpu_fb_usage_bytes",
                               "code": pynvml.NVML_ERROR_INVALID_ARGUMENT}
    snap = collect(fake, {})
    a10 = snap.devices["0000:17:00.0"]
    assert [(v.mdev_uuid, v.fb_used_bytes) for v in a10.vgpus] == [(A10_1, None), (A10_2, None)]
    assert len(a10.samples) == 2
    fake.frames[1]["error"] = {"call": "vgpu_mdev_uuid", "code": pynvml.NVML_ERROR_NOT_FOUND}
    snap = collect(fake, {})
    assert [d.vgpus for d in snap.devices.values()] == [(), (), ()]
    assert set(snap.devices) == {"0000:17:00.0", "0000:65:00.0", "0000:ca:00.0"}


def test_collect_lets_a_lost_library_fail_the_pass() -> None:
    fake = FakeNvml()
    fake.init()
    fake.frames[0]["error"] = {"call": "vgpu_fb_usage_bytes",
                               "code": pynvml.NVML_ERROR_DRIVER_NOT_LOADED}
    with pytest.raises(SourceUnavailable):
        collect(fake, {})


@pytest.mark.skipif(not NO_NVML, reason="this host has libnvidia-ml; the absent path needs none")
def test_real_pynvml_without_the_library_is_unavailable() -> None:
    with pytest.raises(SourceUnavailable, match="nvmlInit: NVML Shared Library Not Found"):
        PynvmlBoundary().init()


@pytest.mark.skipif(not NO_NVML, reason="this host has libnvidia-ml; the absent path needs none")
async def test_real_source_without_nvml_bills_allocation_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="hostagent.sources.gpu")
    src = GpuSource(GpuConfig(), root=str(GPU / "host"), clock=FakeClock())  # real pynvml
    r = await src.read(all_domains(), trio.CapacityLimiter(2))
    assert r.nvml_state == "absent"
    assert sum(len(g) for g in r.by_uuid.values()) == 7
    assert {g.util_percent for rs in r.by_uuid.values() for g in rs} == {None}
    assert [m.getMessage() for m in caplog.records if "nvml_state" in m.__dict__] == [
        "NVML absent: GPUs are billed by allocation only, no vGPU utilisation"]
    await src.aclose()
