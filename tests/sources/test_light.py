"""Light samples: real cgroups through kept descriptors, one real netlink dump, io.stat; and
proof by import walk that the sampler can reach neither libvirt nor SQLite."""

from __future__ import annotations

import ast
import importlib.util
import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostagent.errors import SourceError
from hostagent.model import Nic, NicCounters
from hostagent.sources import light
from hostagent.sources.fdcache import FdCache
from hostagent.sources.files import HostRoot
from hostagent.sources.light import (
    LightNic,
    LightSampler,
    LightTarget,
    cpu_ns_of,
    light_nics,
    target_for,
)
from hostagent.sources.net import LinkStatsReader
from hostagent.sources.netstats import LinkStats64Reader
from tests.clocks import FakeClock
from tests.sources.conftest import RealCgroups, trusting

MAC = "52:54:00:00:00:01"


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a name inside a module, not a submodule
        return False


def _imports(module: str, seen: set[str]) -> set[str]:
    """Every module `module` imports, following hostagent's own modules transitively."""
    if module in seen:
        return set()
    seen.add(module)
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None
    tree = ast.parse(Path(spec.origin).read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
            for alias in node.names:  # `from hostagent.sources import files`
                sub = f"{node.module}.{alias.name}"
                if sub.startswith("hostagent.") and _is_module(sub):
                    names.append(sub)
        for name in names:
            out.add(name)
            if name.startswith("hostagent."):
                out |= _imports(name, seen)
    return out


def test_the_light_sampler_reaches_neither_libvirt_nor_sqlite() -> None:
    reached = {m.split(".")[0] for m in _imports("hostagent.sources.light", set())}
    assert not reached & {"libvirt", "sqlite3", "hostagent.store"}
    assert "hostagent.sources.libvirt" not in _imports("hostagent.sources.light", set())


def test_accounting_parts_are_pure() -> None:
    for module in ("hostagent.accounting.closeout", "hostagent.accounting.lifecycle",
                   "hostagent.accounting.unattributed"):
        roots = {m.split(".")[0] for m in _imports(module, set())}
        assert not roots & {"libvirt", "sqlite3", "trio", "socket", "os", "pyroute2"}, module


def test_cpu_parsers() -> None:
    assert cpu_ns_of("usage_usec 1234\nuser_usec 1\n", "/x/cpu.stat") == 1_234_000
    assert cpu_ns_of("987\n", "/x/cpuacct.usage") == 987
    assert cpu_ns_of("user_usec 1\n", "/x/cpu.stat") is None


def test_real_cgroup_cpu_through_kept_descriptors(real_cgroups: RealCgroups) -> None:
    vm = real_cgroups.mkdir("qemu-7-vm.libvirt-qemu")
    real_cgroups.burn_cpu(vm, 0.05)
    fds = FdCache()
    sampler = LightSampler(HostRoot("/"), fds=fds, links=None, clock=FakeClock())
    target = LightTarget("u-1", 7, f"{vm}/cpu.stat", None)
    try:
        first = sampler.sample([target])["u-1"]
        usec = int(Path(vm, "cpu.stat").read_text().split()[1])
        assert first.cpu_ns == usec * 1000 and first.cpu_ns >= 40_000_000
        real_cgroups.burn_cpu(vm, 0.05)
        second = sampler.sample([target])["u-1"]
        assert second.cpu_ns is not None and second.cpu_ns >= first.cpu_ns + 40_000_000
        assert fds.stats().hits >= 1  # the second read was a pread on the kept descriptor
        os.rmdir(vm)  # the process ended: the kept descriptor must not answer any more
        gone = sampler.sample([target])["u-1"]
        assert gone.cpu_ns is None and "absent" in gone.missing["cpu"]
    finally:
        fds.close()


def test_stats64_dump_agrees_with_the_link_dump() -> None:
    full, light = LinkStatsReader(), LinkStats64Reader()
    try:
        for _ in range(20):  # counters move between the two dumps; retry for a quiet moment
            by_name, by_index = full.read(), light.read()
            if {v.ifindex: (v.rx_bytes, v.tx_bytes) for v in by_name.values()} == by_index:
                break
        assert {v.ifindex: (v.rx_bytes, v.tx_bytes) for v in by_name.values()} == by_index
    finally:
        full.close()
        light.close()


def test_light_nics_follow_what_the_full_reading_matched() -> None:
    nics = (Nic(MAC, "ethernet", "tap0"), Nic("52:54:00:00:00:09", "direct", "macvtap0"),
            Nic("52:54:00:00:00:0a", "ethernet", "tap9"))
    counters = (NicCounters(MAC, "tap0", 5, 1, 2, "netlink"),
                NicCounters("52:54:00:00:00:09", "macvtap0", 6, 1, 2, "netlink"))
    assert light_nics(nics, counters) == (LightNic(MAC, "tap0", 5, False),
                                          LightNic("52:54:00:00:00:09", "macvtap0", 6, True))


def test_tree_io_stat_and_one_stats_dump(tmp_path: Path) -> None:
    vm = tmp_path / "sys/fs/cgroup/machine.slice/vm.scope/libvirt"
    vm.mkdir(parents=True)
    (vm / "cpu.stat").write_text("usage_usec 5000\nuser_usec 1\nsystem_usec 1\n")
    (vm / "io.stat").write_text("253:0 rbytes=100 wbytes=200 rios=1 wios=1\n"
                                "253:1 rbytes=1 wbytes=2 rios=1 wios=1\n")
    rel = "/sys/fs/cgroup/machine.slice/vm.scope/libvirt"
    lo_index = socket.if_nametoindex("lo")
    nics = (LightNic(MAC, "lo", lo_index), LightNic("52:54:00:00:00:02", "gone0", 99999))
    links = LinkStats64Reader()
    sampler = LightSampler(HostRoot(tmp_path), fds=FdCache(), links=links, clock=FakeClock())
    try:
        got = sampler.sample([LightTarget("u-1", 3, f"{rel}/cpu.stat", f"{rel}/io.stat",
                                          nics)])["u-1"]
        after = links.read()[lo_index]
    finally:
        links.close()
    assert got.cpu_ns == 5_000_000 and got.io is not None
    assert (got.io.read_bytes, got.io.write_bytes) == (101, 202)
    assert [n.mac for n in got.nics] == [MAC] and got.nics[0].ifindex == lo_index
    assert got.nics[0].guest_tx_bytes <= after[0]  # host rx = guest tx, read before `after`
    assert "ifindex 99999 gone" in got.missing["net:52:54:00:00:00:02"]
    assert got.t_wall_ns == FakeClock().now().wall_ns and got.domid == 3


def test_the_cgroup_files_are_read_before_the_link_dump(tmp_path: Path) -> None:
    """A VM's end races with its cgroup's removal, and the link dump waits for the RTNL lock
    that the teardown of its taps holds: the cgroup is removed while the dump waits here, and
    the reading still has the final CPU and disk bytes (the deleted tap's come from its
    RTM_DELLINK)."""
    rel = "/sys/fs/cgroup/machine.slice/vm.scope/libvirt"
    vm = tmp_path / rel.lstrip("/")
    vm.mkdir(parents=True)
    (vm / "cpu.stat").write_text("usage_usec 7000\nuser_usec 1\nsystem_usec 1\n")
    (vm / "io.stat").write_text("253:0 rbytes=10 wbytes=20 rios=1 wios=1\n")

    class RemovedDuringTheDump:
        def read(self) -> dict[int, tuple[int, int]]:
            shutil.rmtree(tmp_path / "sys")  # libvirt removed the cgroup meanwhile
            return {}

    sampler = LightSampler(HostRoot(tmp_path), fds=FdCache(), links=RemovedDuringTheDump(),
                           clock=FakeClock())
    got = sampler.sample([LightTarget("u-1", 3, f"{rel}/cpu.stat", f"{rel}/io.stat",
                                      (LightNic(MAC, "gone0", 41),))],
                         deleted_links={41: (500, 600)})["u-1"]
    assert not (tmp_path / "sys").exists()
    assert got.cpu_ns == 7_000_000 and got.io is not None
    assert (got.io.read_bytes, got.io.write_bytes) == (10, 20)
    assert [(n.guest_rx_bytes, n.guest_tx_bytes) for n in got.nics] == [(600, 500)]
    assert got.missing == {}


def test_without_a_link_reader_nics_are_missing_not_zero(tmp_path: Path) -> None:
    sampler = LightSampler(HostRoot(tmp_path), fds=FdCache(), links=None, clock=FakeClock())
    got = sampler.sample([LightTarget("u-1", 3, None, None, (LightNic(MAC, "t", 4),))])["u-1"]
    assert got.nics == () and got.cpu_ns is None
    assert got.missing == {"cpu": "no per-VM cpu cgroup", f"net:{MAC}": "no link reader"}


def test_targets_from_located_cgroups() -> None:
    from hostagent.sources.cgroup import CgroupPaths, ControllerDir

    v2 = CgroupPaths(cpu=ControllerDir("/cg/vm", 2), memory=None, io=ControllerDir("/cg/vm", 2),
                     unified="/cg/vm")
    t = target_for("u", 4, v2, (LightNic(MAC, "tap0", 5),))
    assert (t.cpu_file, t.io_stat) == ("/cg/vm/cpu.stat", "/cg/vm/io.stat")
    v1 = CgroupPaths(cpu=ControllerDir("/cpuacct/vm", 1), memory=None,
                     io=ControllerDir("/blkio/vm", 1), unified=None)
    t1 = target_for("u", 4, v1, ())
    assert (t1.cpu_file, t1.io_stat) == ("/cpuacct/vm/cpuacct.usage", None)  # v1 blkio: no


_CPU_TEXTS = st.sampled_from([
    "usage_usec 1234\nuser_usec 1\nsystem_usec 2\n", "usage_usec 0\n", "usage_usec 77",
    "usage_usec -5\n", "usage_usec 12a\n", "usage_usec \n", "user_usec 1\nusage_usec 9\n", "",
    "987\n", None,  # None: the file is gone (the VM's cgroup went away)
])


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs=st.lists(st.tuples(_CPU_TEXTS, st.sampled_from(["cpu.stat", "cpuacct.usage",
                                                              None]),
                                st.booleans(), st.sampled_from([(), (5,), (5, 99), (99,)])),
                      min_size=1, max_size=6),
       links_fail=st.booleans(), batch=st.integers(1, 7))
def test_a_batch_sample_reads_each_domain_exactly_as_the_general_path(
    tmp_path: Path, specs: list[tuple[str | None, str | None, bool, tuple[int, ...]]],
    links_fail: bool, batch: int,
) -> None:
    """The inline common case of `sample` (v2 cpu.stat, read in one batch) is only faster:
    every reading equals the general path's, file by file (malformed, v1, gone, io.stat, NICs
    found or gone, a failed link dump)."""
    tree = Path(tempfile.mkdtemp(dir=tmp_path))

    class Links:
        def read(self) -> dict[int, tuple[int, int]]:
            if links_fail:
                raise SourceError("dump refused")
            return {5: (100, 200)}

    targets = []
    for i, (text, name, io, ifindexes) in enumerate(specs):
        d = tree / f"vm{i}"
        d.mkdir()
        cpu_file = None if name is None else f"/vm{i}/{name}"
        if text is not None and name is not None:
            (d / name).write_text(text)
        if io:
            (d / "io.stat").write_text(f"8:0 rbytes={i} wbytes=3 rios=1 wios=1\n")
        nics = tuple(LightNic(f"52:54:00:00:00:{n:02x}", f"tap{n}", n, i % 2 == 0)
                     for n in ifindexes)
        targets.append(LightTarget(f"u{i}", i, cpu_file, f"/vm{i}/io.stat" if io else None,
                                   nics))
    fds = FdCache(mountinfo=trusting(tree))
    sampler = LightSampler(HostRoot(str(tree)), fds=fds, links=Links(), clock=FakeClock())
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(light, "_BATCH", batch)  # batches of 1, 2, ..., as many as 256 domains are
        got = sampler.sample(targets)
    assert list(got) == [t.uuid for t in targets]
    links: dict[int, tuple[int, int]] = {} if links_fail else {5: (100, 200)}
    error = "link stats dump failed: dump refused" if links_fail else None

    def answer(rel: str | None) -> bytes | SourceError | None:
        """The file read on its own, as the batch would have had it."""
        if rel is None:
            return None
        try:
            return fds.read_bytes(str(tree) + rel)
        except SourceError as err:
            return err

    for t in targets:
        assert got[t.uuid] == sampler._general(t, answer(t.cpu_file), answer(t.io_stat),
                                               got[t.uuid].t_wall_ns, links, error)
    fds.close()
    shutil.rmtree(tree)
