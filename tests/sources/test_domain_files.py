"""The pass's one worker call for host files (sources/domain_files.py): PSI on its cadence."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hostagent.accounting.readings import HostFacts
from hostagent.model import DomainInfo
from hostagent.source_model import CgroupReading, LinkStats
from hostagent.sources import cgroup
from hostagent.sources.cgroup_read import CgroupReader
from hostagent.sources.domain_files import PSI_EVERY_S, DomainFiles, FilesResult, Want
from hostagent.sources.fdcache import FdCache
from hostagent.sources.files import HostRoot
from tests.sources.conftest import trusting

HOSTS = Path(__file__).parents[2] / "fixtures" / "hosts"
CG = "/sys/fs/cgroup"
# libvirt gave CPU and balloon memory: the VM cgroup's cpu.stat (the domain's CPU wherever
# that cgroup is found) and PSI are then the only cgroup files a pass reads
LIBVIRT_STATS = {"cpu.time": 1, "balloon.available": 1, "balloon.unused": 1}


class NoLinks:
    def read(self) -> Mapping[str, LinkStats]:
        return {}


class Clock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


def setup(tmp_path: Path) -> tuple[DomainFiles, Want, Path, Clock, FdCache]:
    shutil.copytree(HOSTS / "systemd-v2" / "t0", tmp_path / "root")
    root = HostRoot(tmp_path / "root")
    meta: dict[str, Any] = json.loads((HOSTS / "systemd-v2" / "meta.json").read_text())
    g = next(g for g in meta["guests"] if g["name"] == "vm-beta")
    paths = cgroup.locate(root, CG, g["qemu_pid"])
    assert paths is not None and paths.unified is not None
    fds = FdCache(mountinfo=trusting(Path(root.root)))  # keep these plain files as if cgroupfs
    clock = Clock()
    files = DomainFiles(root, cgroup_root=CG, pressure=True,
                        cgroups=CgroupReader(root, io=False, fds=fds), links=NoLinks(),
                        monotonic_s=clock)
    info = DomainInfo(uuid="u-beta", name="vm-beta", domid=7, vcpus=1, memory_bytes=1 << 30,
                      max_memory_bytes=1 << 30)
    want = Want(info, LIBVIRT_STATS, HostFacts(pid=g["qemu_pid"], start_ticks=1,
                                                started_wall_ns=1, cgroup=paths))
    return files, want, Path(root.abspath(paths.unified)), clock, fds


def psi_cpu(result: FilesResult | None) -> float | None:
    assert result is not None
    got = result.cgroups[("u-beta", 7)]
    assert isinstance(got, CgroupReading) and got.pressure is not None
    return got.pressure.cpu_some_avg10


def test_psi_is_read_every_psi_every_s_and_kept_between(tmp_path: Path) -> None:
    files, want, d, clock, fds = setup(tmp_path)
    (d / "cpu.pressure").write_text("some avg10=1.50 avg60=0 avg300=0 total=1\n")
    assert psi_cpu(files.read([want])) == 1.5
    (d / "cpu.pressure").write_text("some avg10=42.50 avg60=0 avg300=0 total=2\n")
    clock.now_s += 1
    assert psi_cpu(files.read([want])) == 1.5  # last figures, no file read
    clock.now_s += PSI_EVERY_S - 1
    assert psi_cpu(files.read([want])) == 42.5
    # the kept PSI descriptors (and cpu.stat's) survive the passes that do not read them
    assert (fds.stats().opened, fds.stats().swept) == (4, 0)


def test_a_new_incarnation_reads_psi_at_once(tmp_path: Path) -> None:
    files, want, d, clock, _ = setup(tmp_path)
    assert psi_cpu(files.read([want])) is not None
    (d / "cpu.pressure").write_text("some avg10=7.25 avg60=0 avg300=0 total=2\n")
    clock.now_s += 1
    again = Want(dataclasses.replace(want.info, domid=8), want.stats, want.known)
    result = files.read([again])
    assert result is not None
    got = result.cgroups[("u-beta", 8)]
    assert isinstance(got, CgroupReading) and got.pressure is not None
    assert got.pressure.cpu_some_avg10 == 7.25


def test_between_psi_reads_only_cpu_stat_is_read(tmp_path: Path) -> None:
    files, want, d, clock, fds = setup(tmp_path)
    first = files.read([want])
    assert first is not None
    reads = fds.stats().hits + fds.stats().opened + fds.stats().uncached
    clock.now_s += 1
    (d / "cpu.stat").write_text("usage_usec 123456\nuser_usec 1\nsystem_usec 2\n")
    second, third = files.read([want]), files.read([want])
    assert second is not None and third is not None
    # libvirt gave CPU and memory: one file a pass, the VM cgroup's cpu.stat (its counter is
    # the domain's CPU), PSI as last read
    assert fds.stats().hits + fds.stats().opened + fds.stats().uncached == reads + 2
    a, b = first.cgroups[("u-beta", 7)], third.cgroups[("u-beta", 7)]
    assert isinstance(a, CgroupReading) and isinstance(b, CgroupReading)
    assert b.cpu_ns == 123456 * 1000 and b.memory_current_bytes is None
    assert b.pressure == a.pressure


def test_kept_psi_joins_the_cpu_and_memory_read_between_psi_reads(tmp_path: Path) -> None:
    files, want, _, clock, _ = setup(tmp_path)
    bare = Want(want.info, {}, want.known)  # no libvirt figures: cgroup CPU and memory too
    first = files.read([bare])
    clock.now_s += 1
    second = files.read([bare])
    assert first is not None and second is not None
    a, b = first.cgroups[("u-beta", 7)], second.cgroups[("u-beta", 7)]
    assert isinstance(a, CgroupReading) and isinstance(b, CgroupReading)
    assert a == b and a.cpu_ns is not None and a.memory_current_bytes is not None
    assert list(a.missing) == list(b.missing)  # the same keys in the same order


def test_one_domains_cgroup_error_is_its_own_in_the_batch(tmp_path: Path,
                                                          monkeypatch: Any) -> None:
    # The pass reads every domain's cgroup files in one batch; a domain whose figures cannot
    # be made costs only its own reading (a ReadError), the others are read as usual.
    files, want, _, _, _ = setup(tmp_path)
    meta: dict[str, Any] = json.loads((HOSTS / "systemd-v2" / "meta.json").read_text())
    g = next(g for g in meta["guests"] if g["name"] == "vm-alpha")
    root = HostRoot(tmp_path / "root")
    paths = cgroup.locate(root, CG, g["qemu_pid"])
    assert paths is not None
    alpha = Want(dataclasses.replace(want.info, uuid="u-alpha", name="vm-alpha", domid=3), {},
                 HostFacts(pid=g["qemu_pid"], start_ticks=1, started_wall_ns=1, cgroup=paths))
    real = CgroupReader._memory

    def memory(self: CgroupReader, p: Any, got: Any, missing: dict[str, str]) -> Any:
        if p == paths:
            raise ValueError("vm-alpha's memory.stat made no sense")
        return real(self, p, got, missing)

    monkeypatch.setattr(CgroupReader, "_memory", memory)
    result = files.read([alpha, want, alpha])
    assert result is not None
    assert result.cgroups[("u-alpha", 3)] == "vm-alpha's memory.stat made no sense"
    assert [(e.uuid, e.step) for e in result.errors] == [("u-alpha", "cgroup")] * 2
    beta = result.cgroups[("u-beta", 7)]
    assert isinstance(beta, CgroupReading) and beta.cpu_ns is not None and beta.missing == {}
