"""End to end: GpuSource readings → Sample.gpus → hostagent.accounting.sampling.usage → gpu_seconds.

Σ gpu_seconds over a run = ⌊allocated devices × running time⌋ (so within 1 s of devices × wall
time), unchanged by NVML failing mid-run, by a daemon restart (baseline to_dict/from_dict) and
per incarnation across a guest reboot.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import trio

from hostagent.accounting import sampling
from hostagent.config.schema import GpuConfig
from hostagent.model import Baseline, DomainInfo, Sample, Usage
from hostagent.sources.gpu import GpuSource
from tests.clocks import FakeClock
from tests.fakes.fake_nvml import FakeNvml
from tests.sources.test_gpu import GPU, domain

NS = 1_000_000_000


@dataclass
class Run:
    """One simulated daemon: a GPU source, baselines and every Usage it produced."""

    clock: FakeClock
    src: GpuSource
    bases: dict[str, Baseline] = field(default_factory=dict)
    usages: dict[str, list[Usage]] = field(default_factory=dict)
    states: list[str] = field(default_factory=list)


def new_run(clock: FakeClock) -> Run:
    return Run(clock, GpuSource(GpuConfig(), root=str(GPU / "host"), nvml=FakeNvml(),
                                clock=clock))


async def one_pass(run: Run, doms: Sequence[DomainInfo], incarnation: dict[str, str],
                   started: dict[str, int], store_created_ns: int) -> None:
    readings = await run.src.read(doms, trio.CapacityLimiter(4))
    run.states.append(readings.nvml_state)
    now = run.clock.now().wall_ns
    for d in doms:
        sample = Sample(instance_id=d.uuid, uuid=d.uuid, name=d.name, domid=d.domid,
                        incarnation=incarnation[d.uuid], started_wall_ns=started[d.uuid],
                        t_wall_ns=now, vcpus=d.vcpus, memory_alloc_bytes=d.memory_bytes,
                        cpu_ns=0, memory=None, gpus=readings.of(d.uuid))
        usage, base = sampling.usage(run.bases.get(d.uuid), sample,
                                     store_created_ns=store_created_ns)
        run.bases[d.uuid] = base
        if usage is not None:
            run.usages.setdefault(d.uuid, []).append(usage)


def intervals(n: int, seed: int) -> list[float]:
    rnd = random.Random(seed)
    return [30 + rnd.uniform(-0.9, 0.9) + rnd.random() * 1e-6 for _ in range(n)]


async def test_gpu_seconds_equal_devices_times_wall_time_through_nvml_failure() -> None:
    clock = FakeClock()
    doms = [domain("train-1"), domain("vdi-1"), domain("vdi-2"), domain("render-1")]
    created = clock.wall_ns - 3600 * NS
    started = {d.uuid: clock.wall_ns - 7 * NS - 123_456_789 for d in doms}
    inc = {d.uuid: "boot-1" for d in doms}
    run = new_run(clock)
    for step in intervals(240, seed=1):  # two hours of passes
        await one_pass(run, doms, inc, started, created)
        clock.advance(step)
    assert "error: nvmlDeviceGetVgpuUtilization: GPU is lost" in run.states  # it did fail
    devices = {"train-1": 2, "vdi-1": 2, "vdi-2": 1, "render-1": 1}
    for d in doms:
        us = run.usages[d.uuid]
        running_ns = us[-1].period_end_ns - started[d.uuid]
        total = sum(u.gpu_seconds for u in us)
        assert total == devices[d.name] * running_ns // NS, d.name
        assert abs(total - devices[d.name] * running_ns / NS) < 1
        assert {u.gpu_count for u in us} == {devices[d.name]}
        for a, b in itertools.pairwise(us):
            assert b.period_start_ns == a.period_end_ns
    train = run.usages[domain("train-1").uuid]
    assert {u.gpu_util_avg for u in train} == {None}  # passthrough: absent, never 0
    vdi2 = [u.gpu_util_avg for u in run.usages[domain("vdi-2").uuid]]
    assert vdi2[:2] == [10.0, 20.0]
    assert vdi2[2] is None  # the pass NVML failed in: unmeasured, not zero


async def test_restart_and_reboot_keep_gpu_seconds_exact() -> None:
    doms = [domain("train-1"), domain("vdi-1")]
    steps = intervals(120, seed=2)
    t_start = FakeClock().wall_ns
    boot1 = t_start - 5 * NS
    boot2: dict[int, int] = {}  # pass index -> when the rebooted QEMU process started

    async def simulate(restart_at: int | None, reboot_at: int | None) -> dict[str, list[Usage]]:
        clock = FakeClock()
        started = {d.uuid: boot1 for d in doms}
        inc = {d.uuid: "boot-1" for d in doms}
        run = new_run(clock)
        for i, step in enumerate(steps):
            if i == restart_at:  # the daemon restarts: baselines come back from the store
                stored = {k: json.dumps(b.to_dict()) for k, b in run.bases.items()}
                run = Run(clock, new_run(clock).src, usages=run.usages,
                          bases={k: Baseline.from_dict(json.loads(v)) for k, v in stored.items()})
            if i == reboot_at:  # a new QEMU process, started 11.5 s before this pass
                boot2[i] = clock.wall_ns - 11_500_000_000
                for d in doms:
                    inc[d.uuid], started[d.uuid] = "boot-2", boot2[i]
            await one_pass(run, doms, inc, started, store_created_ns=t_start - 60 * NS)
            clock.advance(step)
        return {d.name: run.usages[d.uuid] for d in doms}

    def seconds(runs: dict[str, list[Usage]]) -> dict[str, list[int]]:
        return {k: [u.gpu_seconds for u in us] for k, us in runs.items()}

    plain = await simulate(None, None)
    assert seconds(await simulate(restart_at=57, reboot_at=None)) == seconds(plain)

    rebooted = await simulate(restart_at=None, reboot_at=80)
    assert seconds(await simulate(restart_at=81, reboot_at=80)) == seconds(rebooted)
    for name in ("train-1", "vdi-1"):
        us = rebooted[name]
        assert [u.new_incarnation for u in us].index(True, 1) == 80
        # each incarnation: ⌊2 devices × its running time⌋, exactly; the off time is not billed
        assert sum(u.gpu_seconds for u in us[:80]) == 2 * (us[79].period_end_ns - boot1) // NS
        assert sum(u.gpu_seconds for u in us[80:]) == 2 * (us[-1].period_end_ns - boot2[80]) // NS
        assert us[80].gpu_seconds in (22, 23)  # 2 × 11.5 s, not 2 × the ~30 s period
