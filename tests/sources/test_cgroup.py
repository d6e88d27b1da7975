"""Cgroup location and reading on recorded hosts (hybrid lab, pure-v2 systemd) and odd trees."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from hostagent.errors import SourceError
from hostagent.source_model import CgroupPaths, CgroupReading, ControllerDir
from hostagent.sources import cgroup, cgroup_read, proc
from hostagent.sources.cgroup_read import CgroupReader, ReadAsk
from hostagent.sources.fdcache import FdCache
from hostagent.sources.files import HostRoot
from hostagent.sources.net import LinkStatsReader
from tests import lab_support
from tests.sources.conftest import RealCgroups, fds_on, trusting

HOSTS = Path(__file__).parents[2] / "fixtures" / "hosts"
CG = "/sys/fs/cgroup"


def meta(host: str) -> dict[str, Any]:
    return dict(json.loads((HOSTS / host / "meta.json").read_text()))


def bulk_cpu_time_ns(host: str, t: str, name: str) -> int:
    for dom in json.loads((HOSTS / host / t / "libvirt" / "bulk_stats.json").read_text()):
        if dom["name"] == name:
            return int(dom["stats"]["cpu.time"])
    raise AssertionError(f"{name} not in {host}/{t} bulk stats")


def write(root: Path, rel: str, text: str) -> None:
    path = root / rel.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def systemd_dir(domid: int, name: str) -> str:
    escaped = f"qemu-{domid}-{name}".replace("-", "\\x2d")  # systemd's unit-name escaping
    return f"{CG}/machine.slice/machine-{escaped}.scope/libvirt"


# --- the recorded trees -------------------------------------------------------------------------


@pytest.mark.parametrize("t", ["t0", "t1"])
def test_locate_on_the_hybrid_lab(t: str) -> None:
    root = HostRoot(HOSTS / "lab-hybrid" / t)
    for g in meta("lab-hybrid")["guests"]:
        assert proc.pid_of(root, g["name"]) == g["qemu_pid"]
        paths = cgroup.locate(root, CG, g["qemu_pid"])
        vm = f"machine/qemu-{g['domid']}-{g['name']}.libvirt-qemu"
        assert paths == CgroupPaths(
            cpu=ControllerDir(f"{CG}/unified/{vm}", 2),  # parent of .../emulator
            memory=ControllerDir(f"{CG}/memory/{vm}", 1),
            io=ControllerDir(f"{CG}/blkio/{vm}", 1),
            unified=f"{CG}/unified/{vm}",
            missing={},
        )


@pytest.mark.parametrize("t", ["t0", "t1"])
def test_locate_on_pure_v2_systemd(t: str) -> None:
    root = HostRoot(HOSTS / "systemd-v2" / t)
    for g in meta("systemd-v2")["guests"]:
        assert proc.pid_of(root, g["name"]) == g["qemu_pid"]
        paths = cgroup.locate(root, CG, g["qemu_pid"])
        d = systemd_dir(g["domid"], g["name"])
        assert paths == CgroupPaths(cpu=ControllerDir(d, 2), memory=ControllerDir(d, 2),
                                    io=ControllerDir(d, 2), unified=d, missing={})


@pytest.mark.parametrize("host", ["lab-hybrid", "systemd-v2"])
def test_counters_grow_and_agree_with_libvirt(host: str) -> None:
    m = meta(host)
    interval_ns = int(m["interval_s"] * 1e9)
    for g in m["guests"]:
        readings = {}
        for t in ("t0", "t1"):
            root = HostRoot(HOSTS / host / t)
            paths = cgroup.locate(root, CG, g["qemu_pid"])
            assert paths is not None
            r = CgroupReader(root).read(paths)
            assert r.missing == {}
            assert r.cpu_ns is not None
            assert abs(r.cpu_ns - bulk_cpu_time_ns(host, t, g["name"])) <= interval_ns
            assert r.memory_current_bytes is not None
            assert r.memory_current_bytes > 0
            assert r.memory_working_set_bytes is not None
            assert 0 <= r.memory_working_set_bytes <= r.memory_current_bytes
            assert r.pressure is not None
            assert r.pressure.cpu_some_avg10 is not None
            readings[t] = r
        r0, r1 = readings["t0"], readings["t1"]
        assert r0.cpu_ns is not None
        assert r1.cpu_ns is not None
        assert r1.cpu_ns > r0.cpu_ns
        assert r0.io_read_bytes is not None
        assert r1.io_read_bytes is not None
        assert r0.io_write_bytes is not None
        assert r1.io_write_bytes is not None
        assert r1.io_read_bytes >= r0.io_read_bytes
        assert r1.io_write_bytes >= r0.io_write_bytes


@pytest.mark.parametrize(("kept", "batch"), [(False, 256), (True, 256), (False, 2), (True, 4)])
def test_read_many_puts_each_domains_figures_in_its_place(
        kept: bool, batch: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Domains that need different files (all of them; no memory; a v1 layout; no cgroup found
    # at all; PSI kept from an earlier read), in one batch and across batches: every reading is
    # the one that domain would get read alone, and its figures are its own.
    monkeypatch.setattr(cgroup_read, "_BATCH_DOMAINS", batch)
    hybrid, v2 = HostRoot(HOSTS / "lab-hybrid" / "t1"), HostRoot(HOSTS / "systemd-v2" / "t0")
    shutil.copytree(v2.root, tmp_path / "v2")
    shutil.copytree(hybrid.root, tmp_path / "v2" / "hybrid")
    root = HostRoot(tmp_path / "v2")
    asks: list[ReadAsk] = []
    psi = (None, {"cgroup:pressure.cpu": "kept"}) if kept else None
    for host, sub in (("systemd-v2", ""), ("lab-hybrid", "/hybrid")):
        for g in meta(host)["guests"]:
            found = cgroup.locate(HostRoot(HOSTS / host / ("t0" if sub == "" else "t1")), CG,
                                  g["qemu_pid"])
            assert found is not None and found.cpu is not None and found.memory is not None
            paths = dataclasses.replace(
                found, cpu=ControllerDir(sub + found.cpu.path, found.cpu.version),
                memory=ControllerDir(sub + found.memory.path, found.memory.version),
                io=None if found.io is None else ControllerDir(sub + found.io.path,
                                                              found.io.version),
                unified=None if found.unified is None else sub + found.unified)
            asks += [ReadAsk(paths), ReadAsk(paths, memory=False, kept=psi)]
    asks.insert(2, ReadAsk(CgroupPaths(cpu=None, memory=None, io=None, unified=None,
                                              missing={"cpu": "gone", "memory": "gone"})))
    for fds in (None, FdCache(mountinfo=trusting(tmp_path / "v2"))):
        reader = CgroupReader(root, fds=fds)
        batch = reader.read_many(asks)
        alone = [reader.read(a.paths, cpu=a.cpu, memory=a.memory, pressure=a.pressure,
                             kept=a.kept) for a in asks]
        assert batch == alone
        got = [r for r in batch if isinstance(r, CgroupReading)]
        assert len(got) == len(asks)
        cpus = [r.cpu_ns for r in got if r.cpu_ns is not None]
        assert len(cpus) == len(asks) - 1 and len(set(cpus[::2])) == len(cpus) // 2
        for a, r in zip(asks, got, strict=True):
            assert (r.memory_current_bytes is None) == (not a.memory or a.paths.memory is None)
            if a.kept is not None:
                assert r.pressure is None and r.missing["cgroup:pressure.cpu"] == "kept"
        assert got[2].missing["cgroup:cpu_ns"] == "gone"


def test_read_many_keeps_an_error_to_its_own_domain(monkeypatch: pytest.MonkeyPatch) -> None:
    root = HostRoot(HOSTS / "systemd-v2" / "t0")
    asks = [ReadAsk(p) for p in (cgroup.locate(root, CG, g["qemu_pid"])
                                        for g in meta("systemd-v2")["guests"]) if p is not None]
    assert len(asks) == 2
    bad = asks[0].paths.cpu
    real = CgroupReader._cpu

    def cpu(self: CgroupReader, paths: CgroupPaths, got: Any, missing: dict[str, str]) -> Any:
        if paths.cpu == bad:
            raise OSError("the parse of this domain failed")
        return real(self, paths, got, missing)

    monkeypatch.setattr(CgroupReader, "_cpu", cpu)
    first, second = CgroupReader(root).read_many(asks)
    assert isinstance(first, OSError)
    assert isinstance(second, CgroupReading) and second.missing == {}
    assert second.cpu_ns is not None and second.pressure is not None


def test_hybrid_io_is_v1_blkio_and_marked() -> None:
    # LAB-NOTES: v1 blkio.throttle stays 0 without throttle rules; reported, but marked.
    root = HostRoot(HOSTS / "lab-hybrid" / "t1")
    g = meta("lab-hybrid")["guests"][0]
    paths = cgroup.locate(root, CG, g["qemu_pid"])
    assert paths is not None
    r = CgroupReader(root).read(paths)
    assert r.io_source == "v1:blkio.throttle"
    assert (r.io_read_bytes, r.io_write_bytes) == (0, 0)
    assert r.memory_limit_bytes is None  # v1 "unlimited" (PAGE_COUNTER_MAX), not a number


def test_pure_v2_values_come_from_the_v2_files() -> None:
    root = HostRoot(HOSTS / "systemd-v2" / "t0")
    limits: dict[str, int | None] = {}
    for g in meta("systemd-v2")["guests"]:
        d = Path(root.abspath(systemd_dir(g["domid"], g["name"])))
        paths = cgroup.locate(root, CG, g["qemu_pid"])
        assert paths is not None
        r = CgroupReader(root).read(paths)
        usage = int(re.findall(r"^usage_usec (\d+)", (d / "cpu.stat").read_text(), re.M)[0])
        current = int((d / "memory.current").read_text())
        inactive = int(re.findall(r"^inactive_file (\d+)", (d / "memory.stat").read_text(),
                                  re.M)[0])
        io = (d / "io.stat").read_text()
        limit = (d / "memory.max").read_text().strip()
        assert r.cpu_ns == usage * 1000
        assert r.memory_current_bytes == current
        assert r.memory_working_set_bytes == current - inactive
        assert r.memory_limit_bytes == (None if limit == "max" else int(limit))
        assert r.io_read_bytes == sum(int(x) for x in re.findall(r"rbytes=(\d+)", io))
        assert r.io_write_bytes == sum(int(x) for x in re.findall(r"wbytes=(\d+)", io))
        assert r.io_source == "v2:io.stat"
        limits[g["name"]] = r.memory_limit_bytes
    assert limits == {"vm-alpha": None, "vm-beta": 9663676416}  # "max" and a number


@pytest.mark.parametrize("host", ["lab-hybrid", "systemd-v2"])
def test_start_ticks_identify_the_incarnation_across_samples(host: str) -> None:
    for g in meta(host)["guests"]:
        ticks = {t: proc.process_start_ticks(HostRoot(HOSTS / host / t), g["qemu_pid"])
                 for t in ("t0", "t1")}
        assert ticks["t0"] is not None
        assert ticks["t0"] == ticks["t1"]


# --- identity helpers ---------------------------------------------------------------------------


def test_start_ticks_survive_a_comm_with_spaces_and_parens(tmp_path: Path) -> None:
    fields = " ".join(str(n) for n in range(3, 53)).replace("22", "777001", 1)
    write(tmp_path, "/proc/9/stat", f"9 (qemu (x) ) y) S {fields.split(' ', 1)[1]}\n")
    assert proc.process_start_ticks(HostRoot(tmp_path), 9) == 777001
    write(tmp_path, "/proc/10/stat", "10 (short) S 1 2\n")
    with pytest.raises(SourceError, match="no starttime"):
        proc.process_start_ticks(HostRoot(tmp_path), 10)
    assert proc.process_start_ticks(HostRoot(tmp_path), 11) is None  # gone


def test_start_wall_time_matches_psutil() -> None:
    root = HostRoot()
    ticks = proc.process_start_ticks(root, os.getpid())
    boot_ns = proc.boot_time_ns(root)
    assert ticks is not None
    assert boot_ns is not None
    start_ns = proc.ticks_to_wall_ns(ticks, boot_ns)
    assert abs(start_ns / 1e9 - psutil.Process().create_time()) < 0.02
    assert start_ns <= time.time_ns()


def test_boot_time_and_tick_conversion(tmp_path: Path) -> None:
    write(tmp_path, "/proc/stat", "cpu 1 2 3\nintr 5\nbtime 1700000000\nprocesses 9\n")
    boot_ns = proc.boot_time_ns(HostRoot(tmp_path))
    assert boot_ns == 1_700_000_000 * 10**9
    assert proc.ticks_to_wall_ns(250, boot_ns, clk_tck=100) == boot_ns + 2_500_000_000
    assert proc.ticks_to_wall_ns(1, boot_ns, clk_tck=3) == boot_ns + 333_333_333
    write(tmp_path, "/proc/stat", "cpu 1 2 3\n")
    with pytest.raises(SourceError, match="btime"):
        proc.boot_time_ns(HostRoot(tmp_path))
    assert proc.boot_time_ns(HostRoot(tmp_path / "nowhere")) is None


def test_pid_file_edge_cases(tmp_path: Path) -> None:
    root = HostRoot(tmp_path)
    assert proc.pid_of(root, "absent") is None
    write(tmp_path, "/run/libvirt/qemu/empty.pid", "")
    assert proc.pid_of(root, "empty") is None  # being written by libvirt
    write(tmp_path, "/run/libvirt/qemu/junk.pid", "pid=12\n")
    with pytest.raises(SourceError, match=r"junk\.pid"):
        proc.pid_of(root, "junk")
    write(tmp_path, "/run/libvirt/qemu/ok.pid", "4242")
    assert proc.pid_of(root, "ok") == 4242
    assert proc.pid_of(root, "../qemu/ok") is None
    assert proc.pid_of(root, "") is None


# --- locating on odd trees ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "vm"),
    [
        ("/machine/qemu-1-a.libvirt-qemu/emulator", "/machine/qemu-1-a.libvirt-qemu"),
        ("/machine.slice/machine-qemu\\x2d1\\x2da.scope/libvirt/vcpu12",
         "/machine.slice/machine-qemu\\x2d1\\x2da.scope/libvirt"),
        ("/m/x/iothread1", "/m/x"),
        ("/m/x", "/m/x"),
        ("/m/emulator-not", "/m/emulator-not"),
        ("/emulator", "/"),
        ("/", "/"),
    ],
)
def test_vm_cgroup_strips_libvirt_thread_children(path: str, vm: str) -> None:
    assert cgroup.vm_cgroup(path) == vm


def test_v2_mount_detection(tmp_path: Path) -> None:
    assert cgroup.v2_mount(HostRoot(tmp_path), CG) is None
    write(tmp_path, f"{CG}/unified/cgroup.controllers", "")
    assert cgroup.v2_mount(HostRoot(tmp_path), CG) == f"{CG}/unified"
    write(tmp_path, f"{CG}/cgroup.controllers", "cpu io memory")
    assert cgroup.v2_mount(HostRoot(tmp_path), CG + "/") == CG


def test_vanished_pid_has_no_paths(tmp_path: Path) -> None:
    assert cgroup.locate(HostRoot(tmp_path), CG, 12345) is None


def test_pure_v1_host_with_comounted_cpuacct(tmp_path: Path) -> None:
    vm = "/machine/qemu-7-old.libvirt-qemu"
    write(tmp_path, "/proc/7/cgroup",
          f"4:memory:{vm}\n3:blkio:{vm}\n2:cpu,cpuacct:{vm}/emulator\n1:name=systemd:/x\n")
    write(tmp_path, f"{CG}/cpu,cpuacct{vm}/cpuacct.usage", "123456789\n")
    write(tmp_path, f"{CG}/memory{vm}/memory.usage_in_bytes", "1000\n")
    write(tmp_path, f"{CG}/memory{vm}/memory.stat", "cache 5\ntotal_inactive_file 300\n")
    write(tmp_path, f"{CG}/memory{vm}/memory.limit_in_bytes", "4096\n")
    write(tmp_path, f"{CG}/blkio{vm}/blkio.throttle.io_service_bytes",
          "8:0 Read 10\n8:0 Write 20\n8:0 Sync 30\n8:0 Total 30\n8:16 Read 1\n8:16 Write 2\n"
          "Total 33\n")
    root = HostRoot(tmp_path)
    paths = cgroup.locate(root, CG, 7)
    assert paths is not None
    assert paths.cpu == ControllerDir(f"{CG}/cpu,cpuacct{vm}", 1)
    assert paths.unified is None
    assert "no cgroup v2 mount" in paths.missing["pressure"]
    r = CgroupReader(root).read(paths)
    assert r.cpu_ns == 123456789
    assert (r.memory_current_bytes, r.memory_working_set_bytes) == (1000, 700)
    assert r.memory_limit_bytes == 4096  # memory.stat had no hierarchical_memory_limit
    assert (r.io_read_bytes, r.io_write_bytes, r.io_source) == (11, 22, "v1:blkio.throttle")
    assert r.pressure is None
    assert "cgroup:pressure" in r.missing


def test_process_in_the_root_cgroup_has_no_per_vm_counters(tmp_path: Path) -> None:
    write(tmp_path, "/proc/8/cgroup", "4:memory:/\n2:cpuacct:/\n0::/\n")
    write(tmp_path, f"{CG}/unified/cgroup.controllers", "")
    root = HostRoot(tmp_path)
    paths = cgroup.locate(root, CG, 8)
    assert paths is not None
    assert (paths.cpu, paths.memory, paths.io, paths.unified) == (None, None, None, None)
    assert "not per VM" in paths.missing["cpu"]
    r = CgroupReader(root).read(paths)
    assert r.cpu_ns is None
    assert r.memory_current_bytes is None
    assert r.io_read_bytes is None
    assert set(r.missing) >= {"cgroup:cpu_ns", "cgroup:memory_current_bytes",
                              "cgroup:memory_working_set_bytes", "cgroup:memory_limit_bytes",
                              "cgroup:io_read_bytes", "cgroup:io_write_bytes", "cgroup:pressure"}
    assert "not per VM" in r.missing["cgroup:cpu_ns"]


# --- reading odd trees (copies of the recorded ones, then damaged) ------------------------------


@pytest.fixture
def v2_copy(tmp_path: Path) -> tuple[HostRoot, CgroupPaths, Path]:
    """A writable copy of the systemd-v2 t0 tree, located for vm-beta."""
    shutil.copytree(HOSTS / "systemd-v2" / "t0", tmp_path / "root")
    root = HostRoot(tmp_path / "root")
    g = next(g for g in meta("systemd-v2")["guests"] if g["name"] == "vm-beta")
    paths = cgroup.locate(root, CG, g["qemu_pid"])
    assert paths is not None
    assert paths.cpu is not None
    return root, paths, Path(root.abspath(paths.cpu.path))


def test_cgroup_removed_after_locate_reads_as_missing(
    v2_copy: tuple[HostRoot, CgroupPaths, Path],
) -> None:
    root, paths, d = v2_copy
    shutil.rmtree(d)
    r = CgroupReader(root).read(paths)
    assert (r.cpu_ns, r.memory_current_bytes, r.memory_working_set_bytes,
            r.memory_limit_bytes, r.io_read_bytes, r.io_write_bytes, r.pressure) == (None,) * 7
    assert r.missing["cgroup:cpu_ns"].startswith("absent: ")
    assert r.missing["cgroup:io_write_bytes"].startswith("absent: ")
    assert {"cgroup:pressure.cpu", "cgroup:pressure.memory", "cgroup:pressure.io"} <= set(r.missing)


def test_unreadable_file_is_named_and_the_rest_still_read(
    v2_copy: tuple[HostRoot, CgroupPaths, Path],
) -> None:
    root, paths, d = v2_copy
    (d / "cpu.stat").unlink()
    (d / "cpu.stat").mkdir()  # EISDIR: an I/O error, not "gone"
    r = CgroupReader(root).read(paths)
    assert r.cpu_ns is None
    assert r.missing["cgroup:cpu_ns"].startswith("unreadable: cannot read ")
    assert r.memory_current_bytes is not None
    assert r.io_read_bytes is not None
    assert set(r.missing) == {"cgroup:cpu_ns"}


def test_limits_max_and_numbers(v2_copy: tuple[HostRoot, CgroupPaths, Path]) -> None:
    root, paths, d = v2_copy
    (d / "memory.max").write_text("max\n")
    r = CgroupReader(root).read(paths)
    assert r.memory_limit_bytes is None
    assert "cgroup:memory_limit_bytes" not in r.missing
    (d / "memory.max").write_text("1073741824\n")
    assert CgroupReader(root).read(paths).memory_limit_bytes == 1 << 30


def test_v1_unlimited_limit_is_none(tmp_path: Path) -> None:
    vm = "/machine/qemu-1-a.libvirt-qemu"
    write(tmp_path, "/proc/5/cgroup", f"4:memory:{vm}\n")
    write(tmp_path, f"{CG}/memory{vm}/memory.usage_in_bytes", "10\n")
    write(tmp_path, f"{CG}/memory{vm}/memory.stat",
          "hierarchical_memory_limit 9223372036854771712\ntotal_inactive_file 20\n")
    root = HostRoot(tmp_path)
    paths = cgroup.locate(root, CG, 5)
    assert paths is not None
    r = CgroupReader(root).read(paths)
    assert r.memory_limit_bytes is None
    assert r.memory_working_set_bytes == 0  # inactive > usage: clamped like cAdvisor


def test_missing_psi_files(v2_copy: tuple[HostRoot, CgroupPaths, Path]) -> None:
    root, paths, d = v2_copy
    (d / "io.pressure").unlink()
    r = CgroupReader(root).read(paths)
    assert r.pressure is not None
    assert r.pressure.io_some_avg10 is None
    assert r.pressure.cpu_some_avg10 is not None
    assert set(r.missing) == {"cgroup:pressure.io"}
    (d / "cpu.pressure").unlink()
    (d / "memory.pressure").unlink()
    r = CgroupReader(root).read(paths)
    assert r.pressure is None
    assert {k for k in r.missing if k.startswith("cgroup:pressure")} == {
        "cgroup:pressure.cpu", "cgroup:pressure.memory", "cgroup:pressure.io"}
    assert r.cpu_ns is not None


def test_malformed_files(v2_copy: tuple[HostRoot, CgroupPaths, Path]) -> None:
    root, paths, d = v2_copy
    (d / "cpu.stat").write_text("user_usec 5\nusage_usec lots\n")
    (d / "memory.current").write_text("garbage\n")
    (d / "io.stat").write_text("259:0 rbytes=x wbytes=1\n")
    (d / "cpu.pressure").write_text("full avg10=1.00 avg60=0 avg300=0 total=0\n")
    (d / "memory.pressure").write_text("some avg10=abc avg60=0\n")
    r = CgroupReader(root).read(paths)
    assert r.cpu_ns is None
    assert "no usage_usec" in r.missing["cgroup:cpu_ns"]
    assert r.memory_current_bytes is None
    assert "malformed" in r.missing["cgroup:memory_current_bytes"]
    assert r.memory_working_set_bytes is None
    assert "cgroup:memory_working_set_bytes" in r.missing
    assert r.io_read_bytes is None
    assert r.io_write_bytes is None
    assert r.io_source is None
    assert "malformed" in r.missing["cgroup:io_read_bytes"]
    assert r.pressure is not None
    assert r.pressure.cpu_some_avg10 is None
    assert r.pressure.memory_some_avg10 is None
    assert r.pressure.io_some_avg10 is not None
    assert "malformed" in r.missing["cgroup:pressure.cpu"]


def test_empty_io_stat_is_a_real_zero(v2_copy: tuple[HostRoot, CgroupPaths, Path]) -> None:
    root, paths, d = v2_copy
    (d / "io.stat").write_text("")  # the kernel lists no device until the first I/O
    r = CgroupReader(root).read(paths)
    assert (r.io_read_bytes, r.io_write_bytes) == (0, 0)
    assert "cgroup:io_read_bytes" not in r.missing


def test_io_and_pressure_can_be_skipped(v2_copy: tuple[HostRoot, CgroupPaths, Path]) -> None:
    root, paths, _ = v2_copy
    r = CgroupReader(root, io=False, pressure=False).read(paths)
    assert r.cpu_ns is not None
    assert (r.io_read_bytes, r.io_write_bytes, r.io_source, r.pressure) == (None,) * 4
    assert r.missing == {}


def test_the_memory_limit_can_be_skipped(v2_copy: tuple[HostRoot, CgroupPaths, Path]) -> None:
    """limit=False (the daemon's reader) never opens memory.max: an unreadable one costs
    nothing, and usage and working set are read as before."""
    root, paths, d = v2_copy
    (d / "memory.max").unlink()
    (d / "memory.max").mkdir()  # reading it fails (EISDIR)
    with_limit = CgroupReader(root).read(paths)
    assert "cgroup:memory_limit_bytes" in with_limit.missing
    r = CgroupReader(root, limit=False).read(paths)
    assert r.memory_limit_bytes is None
    assert "cgroup:memory_limit_bytes" not in r.missing
    assert (r.memory_current_bytes, r.memory_working_set_bytes) == (
        with_limit.memory_current_bytes, with_limit.memory_working_set_bytes)
    assert r.memory_working_set_bytes is not None
    gone = CgroupReader(root, limit=False).read(CgroupPaths(
        cpu=paths.cpu, memory=None, io=None, unified=None, missing={"memory": "no dir"}))
    assert {k for k in gone.missing if k.startswith("cgroup:memory")} == {
        "cgroup:memory_current_bytes", "cgroup:memory_working_set_bytes"}


def test_the_v1_memory_limit_can_be_skipped(tmp_path: Path) -> None:
    vm = "/machine/qemu-1-a.libvirt-qemu"
    write(tmp_path, "/proc/5/cgroup", f"4:memory:{vm}\n")
    write(tmp_path, f"{CG}/memory{vm}/memory.usage_in_bytes", "100\n")
    write(tmp_path, f"{CG}/memory{vm}/memory.stat", "total_inactive_file 30\n")
    (tmp_path / f"{CG}/memory{vm}/memory.limit_in_bytes".lstrip("/")).mkdir()
    root = HostRoot(tmp_path)
    paths = cgroup.locate(root, CG, 5)
    assert paths is not None
    assert "cgroup:memory_limit_bytes" in CgroupReader(root).read(paths).missing
    r = CgroupReader(root, limit=False).read(paths)
    assert (r.memory_current_bytes, r.memory_working_set_bytes, r.memory_limit_bytes) == (
        100, 70, None)
    assert not any(k.startswith("cgroup:memory") for k in r.missing)


# --- kept-open files (FdCache) -------------------------------------------------------------------


def test_kept_files_give_new_values_each_pass(v2_copy: tuple[HostRoot, CgroupPaths, Path]) -> None:
    root, paths, d = v2_copy
    fds = FdCache(mountinfo=trusting(Path(root.root)))  # keep these plain files as if cgroupfs
    reader = CgroupReader(root, fds=fds)
    first = reader.read(paths)
    assert first.missing == {}
    reader.sweep()
    (d / "cpu.stat").write_text("usage_usec 123456789\nuser_usec 1\n")
    (d / "memory.current").write_text("1048576\n")
    (d / "cpu.pressure").write_text("some avg10=42.50 avg60=0 avg300=0 total=1\n")
    second = reader.read(paths)
    assert second.cpu_ns == 123456789 * 1000
    assert second.memory_current_bytes == 1048576
    assert second.pressure is not None
    assert second.pressure.cpu_some_avg10 == 42.5
    assert dataclasses.replace(second, cpu_ns=first.cpu_ns, memory_current_bytes=None,
                               memory_working_set_bytes=None, pressure=None) == \
        dataclasses.replace(first, memory_current_bytes=None, memory_working_set_bytes=None,
                            pressure=None)
    kept = fds.open_fds
    assert kept == 8  # cpu.stat, memory.current/stat/max, io.stat, 3 PSI files
    assert fds.stats().hits == kept
    reader.sweep()
    reader.read(paths, cpu=False, memory=False)  # a pass that needs only io and PSI
    reader.sweep()
    assert fds.open_fds == 4
    reader.close()
    assert fds.open_fds == 0
    assert fds_on(d / "io.stat") == 0
    assert reader.read(paths).cpu_ns == 123456789 * 1000  # after close: read like cat


def test_plain_fixture_files_are_read_afresh_not_kept(
    v2_copy: tuple[HostRoot, CgroupPaths, Path],
) -> None:
    root, paths, d = v2_copy
    fds = FdCache()
    reader = CgroupReader(root, fds=fds)
    assert reader.read(paths).cpu_ns is not None
    shutil.rmtree(d)  # on a plain filesystem nothing would say ENODEV: nothing was kept
    r = reader.read(paths)
    assert r.cpu_ns is None
    assert r.missing["cgroup:cpu_ns"].startswith("absent: ")
    assert fds.open_fds == 0
    reader.close()


def test_kept_files_of_a_real_cgroup_removed_and_made_again(real_cgroups: RealCgroups) -> None:
    vm = real_cgroups.mkdir("qemu-7-vm.libvirt-qemu")
    memory_dir = (real_cgroups.mkdir("qemu-7-vm.libvirt-qemu", v1_memory=True)
                  if real_cgroups.memory_parent is not None else None)
    paths = CgroupPaths(cpu=ControllerDir(vm, 2),
                        memory=ControllerDir(memory_dir, 1) if memory_dir else None,
                        io=None, unified=vm)
    fds = FdCache()
    reader = CgroupReader(HostRoot("/"), io=False, fds=fds)
    real_cgroups.burn_cpu(vm)
    old = reader.read(paths)
    assert old.cpu_ns is not None
    assert old.cpu_ns >= 40_000_000
    assert old.pressure is not None
    if memory_dir:
        assert old.memory_current_bytes is not None
    kept = fds.open_fds
    assert kept == (6 if memory_dir else 4)  # cpu.stat, 3 PSI files (+ v1 usage, memory.stat)
    # The VM stops and starts again between two passes: its new cgroup has the old path.
    for d in (vm, memory_dir):
        if d:
            os.rmdir(d)
            os.mkdir(d)
    new = reader.read(paths)
    assert new.cpu_ns == 0  # the new cgroup's counter, never the dead one's
    assert fds.stats().stale == kept
    assert fds.open_fds == kept
    # Stopped for good: absent, exactly like cat.
    for d in (vm, memory_dir):
        if d:
            os.rmdir(d)
    gone = reader.read(paths)
    assert gone.cpu_ns is None
    assert gone.missing["cgroup:cpu_ns"] == f"absent: {vm}/cpu.stat"
    assert fds.open_fds == 0
    reader.close()


# --- live lab -----------------------------------------------------------------------------------


@pytest.mark.lab
def test_live_guest_cgroup_and_tap_match_virsh(lab_guests: list[str]) -> None:
    name = lab_guests[0]
    root = HostRoot()
    pid = proc.pid_of(root, name)
    assert pid is not None
    paths = cgroup.locate(root, CG, pid)
    assert paths is not None
    assert paths.cpu is not None
    reader = CgroupReader(root)
    tap = lab_support.virsh_domstats_raw(name)["net.0.name"]
    links = LinkStatsReader()
    try:
        for _ in range(10):  # look for a window without a packet (one ping per second)
            before = reader.read(paths)
            tx0 = links.read()[tap].tx_bytes
            stats = lab_support.virsh_domstats_raw(name)
            tx1 = links.read()[tap].tx_bytes
            after = reader.read(paths)
            assert before.cpu_ns is not None
            assert after.cpu_ns is not None
            cpu_time = int(stats["cpu.time"])
            # usage_usec is truncated to µs: cpu.time lies within [before, after + 1 µs).
            assert before.cpu_ns <= cpu_time < after.cpu_ns + 1000
            rx = int(stats["net.0.rx.bytes"])
            assert tx0 is not None
            assert tx1 is not None
            assert tx0 <= rx <= tx1
            if tx0 == tx1:
                assert rx == tx0  # guest rx is exactly the tap's host-side tx
                break
        else:
            pytest.fail("no quiet window in 10 tries to compare tap bytes exactly")
    finally:
        links.close()
    assert after.memory_current_bytes is not None
    assert after.memory_current_bytes > 0
    assert after.pressure is not None
