"""The VM partition's CPU reader, and the kernel fact unattributed CPU rests on, checked on real
cgroups: a v2 parent keeps the CPU of a child that was removed."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from hostagent.accounting.unattributed import advance
from hostagent.sources.files import HostRoot
from hostagent.sources.unattributed import parent_cpu_stat, read_parent_cpu_ns
from tests.accounting.test_unattributed import T0, S, u
from tests.sources.conftest import RealCgroups


def test_the_partition_is_found_and_read_from_a_tree(tmp_path: Path) -> None:
    cg = tmp_path / "sys/fs/cgroup"
    (cg / "machine.slice").mkdir(parents=True)
    (cg / "cgroup.controllers").write_text("cpu io memory\n")
    (cg / "machine.slice/cpu.stat").write_text("usage_usec 42\nuser_usec 1\n")
    root = HostRoot(tmp_path)
    path = parent_cpu_stat(root)
    assert path == "/sys/fs/cgroup/machine.slice/cpu.stat"
    assert read_parent_cpu_ns(root, path) == 42_000
    assert parent_cpu_stat(HostRoot(tmp_path / "nothing")) is None


def test_a_v2_parent_keeps_the_cpu_of_a_removed_child(real_cgroups: RealCgroups) -> None:
    parent = real_cgroups.v2_parent
    root = HostRoot("/")
    path = f"{parent}/cpu.stat"
    state = advance(None, read_parent_cpu_ns(root, path), T0, [])
    vm = real_cgroups.mkdir("qemu-1-vm.libvirt-qemu")
    real_cgroups.burn_cpu(vm, 0.1)
    child_ns = int(Path(vm, "cpu.stat").read_text().split()[1]) * 1000
    os.rmdir(vm)  # destroyed after its last reading: the parent keeps its CPU
    parent_ns = read_parent_cpu_ns(root, path)
    assert parent_ns is not None and parent_ns >= child_ns >= 90_000_000
    billed = advance(state, parent_ns, T0 + 30 * S, [u(T0, child_ns)])
    unbilled = advance(state, parent_ns, T0 + 30 * S, [])
    assert billed is not None and unbilled is not None
    assert billed.total_ns <= 5_000_000  # only the parent's own bookkeeping noise
    assert unbilled.total_ns >= child_ns
    assert dataclasses.replace(billed, total_ns=0).total_s == 0
