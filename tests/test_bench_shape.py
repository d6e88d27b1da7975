"""bench/qemu_shape.py: generated domains' bulk answers carry a QEMU guest's keys, and
hostagent's own conversion and assembly read them as a lab guest's (memory from the balloon,
the disk's and the NIC's byte counters, growing from one answer to the next)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import qemu_shape

from hostagent.accounting import assemble, inventory
from hostagent.accounting.readings import DomainReading

ALL = (libvirt.VIR_DOMAIN_STATS_STATE | libvirt.VIR_DOMAIN_STATS_BALLOON
       | libvirt.VIR_DOMAIN_STATS_VCPU | libvirt.VIR_DOMAIN_STATS_INTERFACE
       | libvirt.VIR_DOMAIN_STATS_BLOCK)
XML = """<domain type='test'><name>bench-3</name><uuid>00000000-0000-4000-8000-000000000003</uuid>
<memory unit='KiB'>1048576</memory><vcpu>2</vcpu><os><type>hvm</type></os><devices>
<disk type='file' device='disk'><source file='/var/lib/bench/bench-3.qcow2'/>
<target dev='vda' bus='virtio'/></disk>
<interface type='ethernet'><mac address='52:54:00:00:00:03'/><target dev='bt3'/>
<model type='virtio'/></interface></devices></domain>"""


@pytest.fixture
def conn() -> Iterator[libvirt.virConnect]:
    undo = qemu_shape.install()
    c = libvirt.open("test:///default")  # one state per process: the domain goes at the end
    try:
        yield c
    finally:
        for dom in c.listAllDomains():
            if dom.name() == "bench-3":
                dom.destroy()
        c.close()
        undo()


def test_the_answer_carries_the_groups_asked_and_its_counters_grow(
        conn: libvirt.virConnect) -> None:
    dom = conn.createXML(XML, 0)
    (_, first), = [(d, s) for d, s in conn.getAllDomainStats(ALL, 0) if d.name() == "bench-3"]
    (_, second), = [(d, s) for d, s in conn.domainListGetStats([dom], ALL, 0)]
    assert first["state.state"] == 1 and first["balloon.rss"] > 0
    assert first["net.0.name"] == "bt3" and first["block.0.name"] == "vda"  # bench-3's
    assert "cpu.time" not in first  # not asked
    assert second["block.0.wr.bytes"] > first["block.0.wr.bytes"]
    assert second["net.0.rx.bytes"] > first["net.0.rx.bytes"]
    no_block = conn.domainListGetStats([dom], libvirt.VIR_DOMAIN_STATS_STATE, 0)[0][1]
    assert not any(k.startswith(("block.", "net.", "balloon.")) for k in no_block)


def test_hostagent_reads_a_shaped_answer_as_a_qemu_guests(conn: libvirt.virConnect) -> None:
    dom = conn.createXML(XML, 0)
    stats = conn.domainListGetStats([dom], ALL, 0)[0][1]
    info = inventory.parse_domain_xml(dom.XMLDesc(0))
    sample = assemble.sample_of(DomainReading(info, info.uuid, 1, stats))
    assert sample.memory is not None and sample.memory.source == "balloon"
    assert [d.target for d in sample.disks] == ["vda"] and sample.disks[0].wr_bytes
    assert [n.guest_rx_bytes > 0 for n in sample.nics] == [True]  # libvirt's counters
    assert not sample.missing.keys() - {"cpu"}  # everything else a QEMU guest gives is there


def test_undo_leaves_the_test_driver_as_it_was() -> None:
    qemu_shape.install()()
    c = libvirt.open("test:///default")
    try:
        for dom, stats in c.getAllDomainStats(ALL, 0):
            assert set(stats) == {"state.state", "state.reason"}, dom.name()
    finally:
        c.close()
