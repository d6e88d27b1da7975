"""GpuSource over the fixture sysfs and the replaying fake NVML: states, threads, deadlines."""

from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path

import pytest
import trio

from hostagent.config.schema import GpuConfig
from hostagent.errors import SourceTimeout
from hostagent.model import DomainInfo
from hostagent.sources.gpu import PASSTHROUGH_REASON, GpuReadings, GpuSource
from tests.clocks import FakeClock
from tests.fakes.fake_nvml import FakeNvml
from tests.sources.test_gpu import A10_1, A10_2, GPU, T4_3, T4_4, all_domains, domain

ROOT = str(GPU / "host")
T0_US = 1_700_000_000_000_000


def state_logs(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [str(r.__dict__["nvml_state"]) for r in caplog.records if "nvml_state" in r.__dict__]


def vgpu_util(r: GpuReadings) -> dict[str, float | None]:
    return {g.address: g.util_percent for rs in r.by_uuid.values() for g in rs
            if g.kind == "mdev"}


def gpu_count(r: GpuReadings) -> int:
    return sum(len(rs) for rs in r.by_uuid.values())


async def test_replay_of_two_devices_with_an_nvml_error_mid_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="hostagent.sources.gpu")
    fake, clock, limiter = FakeNvml(), FakeClock(), trio.CapacityLimiter(4)
    src = GpuSource(GpuConfig(), root=ROOT, nvml=fake, clock=clock)
    doms = all_domains()

    r0 = await src.read(doms, limiter)
    assert r0.nvml_state == "ok"
    assert vgpu_util(r0) == {A10_1: 40.0, T4_3: 75.0, A10_2: 10.0, T4_4: 0.0}
    fb = {g.address: g.fb_used_bytes for rs in r0.by_uuid.values() for g in rs}
    assert fb[T4_3] == 3 << 30  # recorded upper-case mdev uuid matched after lowercasing
    assert gpu_count(r0) == 7  # 2 A100 + 1 A6000 + 4 vGPUs; no NIC, NVMe, audio, idle T4

    clock.advance(30)
    r1 = await src.read(doms, limiter)
    # A10_1: samples at +15 s and +30 s averaged; the t0 sample was seen in pass 0
    assert vgpu_util(r1) == {A10_1: 60.0, T4_3: 80.0, A10_2: 20.0, T4_4: None}
    (t4_4,) = r1.of(domain("vdi-3").uuid)
    assert t4_4.util_unavailable_reason == "vgpu: no new NVML utilisation sample this period"
    assert t4_4.fb_used_bytes == 256 << 20

    clock.advance(30)
    r2 = await src.read(doms, limiter)  # the T4 is lost mid-pass
    assert r2.nvml_state == "error: nvmlDeviceGetVgpuUtilization: GPU is lost"
    assert vgpu_util(r2) == {A10_1: None, T4_3: None, A10_2: None, T4_4: None}
    assert gpu_count(r2) == 7  # allocation is still billed
    assert {g.util_unavailable_reason for g in r2.of(domain("vdi-2").uuid)} == {
        "vgpu: utilisation not measured (NVML error: nvmlDeviceGetVgpuUtilization: "
        "GPU is lost)"}
    assert fake.initialized == 0  # shut down, to be re-initialised

    clock.advance(10)  # inside the 15 s backoff: NVML is not touched
    calls = len(fake.calls)
    r3 = await src.read(doms, limiter)
    assert len(fake.calls) == calls
    assert r3.nvml_state == r2.nvml_state

    clock.advance(20)
    r4 = await src.read(doms, limiter)
    assert r4.nvml_state == "ok"
    assert [c.name for c in fake.calls[calls:calls + 2]] == ["init", "device_count"]
    # the T4's last-seen stayed at +30 s through the failed pass; nothing is counted twice
    assert vgpu_util(r4) == {A10_1: 30.0, T4_3: 60.0, A10_2: 25.0, T4_4: 5.0}

    assert state_logs(caplog) == ["ok", r2.nvml_state, "ok"]  # one line per change

    await src.aclose()
    assert fake.initialized == 0
    assert fake.calls[-1].name == "shutdown"


async def test_all_nvml_calls_of_a_pass_run_in_one_worker_thread() -> None:
    fake = FakeNvml()
    src = GpuSource(GpuConfig(), root=ROOT, nvml=fake, clock=FakeClock())
    for _ in range(2):
        await src.read(all_domains(), trio.CapacityLimiter(4))
    for frame in (0, 1):
        threads = fake.threads_of_frame(frame)
        assert len(threads) == 1
        assert threading.get_ident() not in threads
    assert len([c for c in fake.calls if c.name == "init"]) == 1  # nvmlInit once


async def test_library_not_found_is_absent_logged_once_and_retried_with_backoff(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="hostagent.sources.gpu")
    fake, clock = FakeNvml(present=False), FakeClock()
    src = GpuSource(GpuConfig(), root=ROOT, nvml=fake, clock=clock)
    for _ in range(6):
        r = await src.read(all_domains(), trio.CapacityLimiter(4))
        assert r.nvml_state == "absent"
        assert gpu_count(r) == 7
        assert set(vgpu_util(r).values()) == {None}
        clock.advance(30)
    # tries at 0, 30, 60 (backoff 15, 30), then 60 s apart: 120; later passes wait
    assert [c.frame for c in fake.calls if c.name == "init"] == [-1, -1, -1, -1]
    assert state_logs(caplog) == ["absent"]
    await src.aclose()
    assert not [c for c in fake.calls if c.name == "shutdown"]


async def test_init_failures_back_off_then_recover() -> None:
    fake, clock = FakeNvml(init_failures=2), FakeClock()
    src = GpuSource(GpuConfig(), root=ROOT, nvml=fake, clock=clock)
    limiter = trio.CapacityLimiter(4)
    states = []
    for step in (0, 1, 14, 15, 29, 30):  # seconds since the previous read
        clock.advance(step)
        states.append((await src.read(all_domains(), limiter)).nvml_state)
    # reads at 0, 1, 15, 30, 59, 89 s: tries at 0, 15 (backoff 15) and 59 (backoff 30 from 15)
    inits = [c for c in fake.calls if c.name == "init"]
    assert len(inits) == 3
    assert states == ["error: nvmlInit: Unknown Error"] * 4 + ["ok", "ok"]


async def test_nvml_off_never_touches_nvml() -> None:
    fake = FakeNvml()
    src = GpuSource(GpuConfig(nvml="off"), root=ROOT, nvml=fake, clock=FakeClock())
    r = await src.read(all_domains(), trio.CapacityLimiter(4))
    assert (r.nvml_state, fake.calls) == ("off", [])
    assert r.of(domain("vdi-2").uuid)[0].util_unavailable_reason == \
        "vgpu: utilisation not measured (NVML off)"


async def test_a_hung_nvml_call_is_abandoned_and_billing_goes_on() -> None:
    fake, clock = FakeNvml(), FakeClock()
    src = GpuSource(GpuConfig(timeout_s=0.2), root=ROOT, nvml=fake, clock=clock)
    limiter = trio.CapacityLimiter(4)
    gate = fake.block_next_pass()
    t = trio.current_time()
    r = await src.read(all_domains(), limiter)
    assert trio.current_time() - t < 2.0
    assert r.nvml_state == "error: NVML did not answer within 0.2 s"
    assert gpu_count(r) == 7
    assert all(g.util_percent is None for rs in r.by_uuid.values() for g in rs)
    assert fake.blocked.is_set()

    clock.advance(60)  # past the backoff, but the abandoned call still blocks
    calls = len(fake.calls)
    r = await src.read(all_domains(), limiter)
    assert len(fake.calls) == calls
    assert r.nvml_state == "error: NVML did not answer within 0.2 s"

    gate.set()  # the driver answers at last; that late result is discarded
    for _ in range(200):
        clock.advance(60)
        r = await src.read(all_domains(), limiter)
        if r.nvml_state == "ok":
            break
        await trio.sleep(0.01)
    assert r.nvml_state == "ok"
    names = [c.name for c in fake.calls[calls:]]
    assert names[names.index("shutdown"):][:3] == ["shutdown", "init", "device_count"]
    assert fake.initialized == 1  # the reference count stayed balanced
    await src.aclose()
    assert fake.initialized == 0


async def test_unidentified_hostdevs_are_warned_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="hostagent.sources.gpu")
    src = GpuSource(GpuConfig(nvml="off"), root=ROOT, clock=FakeClock())
    for _ in range(3):
        r = await src.read([domain("ghost")], trio.CapacityLimiter(2))
        assert r.by_uuid == {}
    msgs = [r for r in caplog.records if r.getMessage().startswith("hostdev not found")]
    assert len(msgs) == 2


# --- a sysfs read that never returns (a FIFO stands in for a wedged device file) --------------


@pytest.fixture
def wedgeable_root(tmp_path: Path) -> Path:
    root = tmp_path / "host"
    shutil.copytree(GPU / "host", root, symlinks=True)
    return root


def wedge(root: Path, address: str) -> tuple[Path, str]:
    real = (root / "sys/bus/pci/devices" / address / "class").resolve()
    text = real.read_text()
    real.unlink()
    os.mkfifo(real)
    return real, text


def unwedge(wedged: tuple[Path, str]) -> None:
    fifo, text = wedged
    parked = fifo.with_name("class.wedged")
    os.rename(fifo, parked)
    fifo.write_text(text)  # later opens read the real file again
    try:
        fd = os.open(parked, os.O_WRONLY | os.O_NONBLOCK)  # releases readers blocked in open()
    except OSError:
        return  # no reader left waiting
    os.close(fd)


async def test_a_hung_sysfs_scan_reuses_known_identities(wedgeable_root: Path) -> None:
    doms = [domain("train-1"), domain("vdi-1")]
    src = GpuSource(GpuConfig(nvml="off", timeout_s=0.2), root=str(wedgeable_root),
                    clock=FakeClock())
    first = await src.read(doms, trio.CapacityLimiter(4))
    wedged = wedge(wedgeable_root, "0000:3b:00.0")
    try:
        again = await src.read(doms, trio.CapacityLimiter(4))
        assert again.by_uuid == first.by_uuid  # no GPU-second lost to a wedged sysfs
        fresh = GpuSource(GpuConfig(nvml="off", timeout_s=0.2), root=str(wedgeable_root),
                          clock=FakeClock())
        with pytest.raises(SourceTimeout):  # nothing known: fail the pass, the next covers it
            await fresh.read(doms, trio.CapacityLimiter(4))
    finally:
        unwedge(wedged)


async def test_passthrough_reason_is_the_documented_one() -> None:
    src = GpuSource(GpuConfig(nvml="off"), root=ROOT, clock=FakeClock())
    r = await src.read([domain("render-1")], trio.CapacityLimiter(1))
    (g,) = r.of(domain("render-1").uuid)
    assert (g.util_percent, g.util_unavailable_reason, g.model) == (
        None, PASSTHROUGH_REASON, "NVIDIA 10de:2230")
    empty: list[DomainInfo] = []
    r = await src.read(empty, trio.CapacityLimiter(1))
    assert r.by_uuid == {}
    assert len(r.host_gpus) == 7  # dump still lists the host's GPUs
