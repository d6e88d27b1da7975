"""Domains whose names the XML cannot carry as libvirt has them (blanks around it, a `\\r`):
their host files are found by libvirt's own name (`DomainStats.name`), in the bulk call's
worker call (pass_reads.EarlyReads) and in the collector's own files call
(domain_files.Want.name), and their readings are named as libvirt names them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from hostagent import pass_reads
from hostagent.accounting.assemble import sample_of
from hostagent.accounting.inventory import parse_domain_xml
from hostagent.model import DomainInfo
from hostagent.source_model import DomainStats, LinkStats
from hostagent.sources import proc
from hostagent.sources.cgroup_read import CgroupReader
from hostagent.sources.domain_files import DomainFiles, Want
from hostagent.sources.fdcache import FdCache
from hostagent.sources.files import HostRoot
from tests.sources.conftest import trusting

HOSTS = Path(__file__).parent.parent / "fixtures" / "hosts"
CG = "/sys/fs/cgroup"
UUID = "8c9d0e1f-2a3b-4c5d-8e6f-7a8b9c0d1e02"
# The fuzzer's names (/tmp/s21 gen/name_space.node.xml, gen/name_cr.node.xml); libvirt's
# pid file is <run dir>/<name>.pid, the name as it is.
NAMES = ["vm with  spaces ", "vm-cr\rx", "  vm-lead"]


class NoLinks:
    def read(self) -> dict[str, LinkStats]:
        return {}


def host(tmp_path: Path, name: str) -> tuple[DomainFiles, HostRoot, FdCache]:
    """The systemd-v2 fixture host with vm-beta's QEMU process under libvirt's `name`."""
    shutil.copytree(HOSTS / "systemd-v2" / "t0", tmp_path / "root")
    run = tmp_path / "root" / proc.LIBVIRT_RUN_DIR.lstrip("/")
    (run / "vm-beta.pid").rename(run / f"{name}.pid")
    root = HostRoot(tmp_path / "root")
    fds = FdCache(mountinfo=trusting(Path(root.root)))
    files = DomainFiles(root, cgroup_root=CG, pressure=False,
                        cgroups=CgroupReader(root, io=False, fds=fds), links=NoLinks())
    return files, root, fds


def qemu_pid() -> int:
    meta: dict[str, Any] = json.loads((HOSTS / "systemd-v2" / "meta.json").read_text())
    pid: int = next(g for g in meta["guests"] if g["name"] == "vm-beta")["qemu_pid"]
    return pid


def xml_of(name: str) -> str:
    """The live XML libvirt writes: the name as it is (a `\\r` too, unescaped)."""
    escaped = name.replace("&", "&amp;").replace("<", "&lt;")
    return (f"<domain type='kvm' id='4'><name>{escaped}</name><uuid>{UUID}</uuid>"
            "<memory unit='KiB'>1048576</memory><vcpu>1</vcpu></domain>")


@pytest.mark.parametrize("name", NAMES)
def test_a_steady_pass_finds_the_process_by_libvirts_name(tmp_path: Path, name: str) -> None:
    files, root, fds = host(tmp_path, name)
    # what the XML alone gave before: stripped, `\r` read as `\n`
    info = DomainInfo(uuid=UUID, name=name.strip().replace("\r", "\n"), domid=4, vcpus=1,
                      memory_bytes=1 << 30, max_memory_bytes=1 << 30)
    early = pass_reads.EarlyReads({UUID: (info, None)}, files, root, None, fds)
    d = DomainStats(UUID, name, 4, {"cpu.time": 5})
    # Before: the names differed, so the worker call read nothing (`None`: a call of its own
    # after the XML, every pass) and the pid file was looked up under the XML's name.
    got = early((d,))
    assert got is not None
    facts = got.facts[(UUID, 4)]
    assert facts.pid == qemu_pid() and facts.cgroup is not None
    assert not got.errors
    # the reading: named as libvirt names it, its CPU the VM cgroup's
    r = pass_reads.domain_reading(d, info, UUID, 1, got, (), {}, timed_out=False)
    assert r.info.name == name
    s = sample_of(r)
    assert s.name == name and "cpu" not in s.missing and s.cpu_ns is not None


@pytest.mark.parametrize("name", NAMES)
def test_a_new_domains_files_are_found_by_its_parsed_name(tmp_path: Path, name: str) -> None:
    # The collector's own files call (a new or restarted domain) gets the XML's DomainInfo:
    # its name is libvirt's as written (inventory._xml_name), and a Want may name it too.
    files, _, _ = host(tmp_path, name)
    info = parse_domain_xml(xml_of(name))
    assert info.name == name
    got = files.read([Want(info, {"cpu.time": 5})])
    assert got is not None and got.facts[(UUID, 4)].pid == qemu_pid()


def test_a_wants_libvirt_name_is_the_pid_files(tmp_path: Path) -> None:
    files, _, _ = host(tmp_path, "vm-cr\rx")
    info = DomainInfo(uuid=UUID, name="vm-cr\nx", domid=4, vcpus=1, memory_bytes=1 << 30,
                      max_memory_bytes=1 << 30)
    got = files.read([Want(info, {"cpu.time": 5})])
    assert got is not None and got.facts[(UUID, 4)].pid is None  # the XML's name: not found
    files, _, _ = host(tmp_path / "again", "vm-cr\rx")
    got = files.read([Want(info, {"cpu.time": 5}, None, "vm-cr\rx")])
    assert got is not None and got.facts[(UUID, 4)].pid == qemu_pid()


def test_another_domid_is_still_a_new_incarnation(tmp_path: Path) -> None:
    files, root, fds = host(tmp_path, "vm-beta")
    info = DomainInfo(uuid=UUID, name="vm-beta", domid=3, vcpus=1, memory_bytes=1 << 30,
                      max_memory_bytes=1 << 30)
    early = pass_reads.EarlyReads({UUID: (info, None)}, files, root, None, fds)
    assert early((DomainStats(UUID, "vm-beta", 4, {}),)) is None
    assert early.parent_read
