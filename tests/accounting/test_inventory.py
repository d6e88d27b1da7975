"""Domain XML parsing and the inventory's decision to re-read XML."""

from __future__ import annotations

import dataclasses

import pytest

from hostagent.accounting import inventory
from hostagent.errors import SourceError

XML = """<domain type='kvm' id='7'>
  <name>vm-a</name>
  <uuid>0F8F1A54-2B0C-4C4B-9D3C-0123456789AB</uuid>
  <metadata>
    <hostagent:owner xmlns:hostagent="urn:hostagent:owner:1" user="alice" org="acme"/>
  </metadata>
  <memory unit='KiB'>4194304</memory>
  <currentMemory unit='KiB'>2097152</currentMemory>
  <vcpu placement='static' current='2'>4</vcpu>
  <devices>
    <disk type='file' device='disk'><source file='/img/a.qcow2'/><target dev='vda'/></disk>
    <disk type='file' device='cdrom'><target dev='sda'/></disk>
    <disk type='network' device='disk'><source protocol='rbd' name='pool/img'/>
      <target dev='vdb'/></disk>
    <interface type='ethernet'><mac address='52:54:00:AA:BB:01'/><target dev='tap1'/>
      <model type='virtio'/></interface>
    <interface type='vhostuser'><mac address='52:54:00:aa:bb:02'/>
      <source type='unix' path='/run/vhu.sock' mode='client'/></interface>
    <interface type='hostdev' managed='yes'><mac address='52:54:00:aa:bb:03'/>
      <source><address type='pci' domain='0x0000' bus='0x3b' slot='0x00' function='0x1'/>
      </source></interface>
    <interface type='bridge'><source bridge='br0'/></interface>
  </devices>
</domain>"""


def test_parse_identity_sizes_and_devices() -> None:
    info = inventory.parse_domain_xml(XML)
    assert info.uuid == "0f8f1a54-2b0c-4c4b-9d3c-0123456789ab"
    assert (info.name, info.domid, info.vcpus) == ("vm-a", 7, 2)
    assert info.memory_bytes == 2 * 1024**3
    assert info.max_memory_bytes == 4 * 1024**3
    assert [(d.target, d.device, d.source) for d in info.disks] == [
        ("vda", "disk", "/img/a.qcow2"), ("sda", "cdrom", None), ("vdb", "disk", "pool/img")]
    # NICs keyed by lowercase MAC; one without a MAC cannot be keyed and is skipped
    assert [(n.mac, n.kind, n.target) for n in info.nics] == [
        ("52:54:00:aa:bb:01", "ethernet", "tap1"),
        ("52:54:00:aa:bb:02", "vhostuser", None),
        ("52:54:00:aa:bb:03", "hostdev", None),
    ]
    assert info.owner_hint is not None
    assert (info.owner_hint.user_id, info.owner_hint.org_id) == ("alice", "acme")
    assert info.metadata_xml is not None
    assert "alice" in info.metadata_xml


@pytest.mark.parametrize("bad", ["", "<domain", "<network/>", "<domain><name>x</name></domain>"])
def test_bad_xml_is_a_source_error(bad: str) -> None:
    with pytest.raises(SourceError):
        inventory.parse_domain_xml(bad)


def _named(name_xml: str) -> str:
    return XML.replace("<name>vm-a</name>", f"<name>{name_xml}</name>")


@pytest.mark.parametrize(("name_xml", "name"), [
    ("vm with  spaces ", "vm with  spaces "),  # libvirt keeps the blanks: so does its pid file
    ("  vm-lead", "  vm-lead"),
    ("vm-cr&#13;x", "vm-cr\rx"),
    ("vm-cr\rx", "vm-cr\rx"),  # as libvirt writes it (virBufferEscapeString keeps a \r)
    ("vm-crlf\r\nx &amp; &lt;y&gt;", "vm-crlf\r\nx & <y>"),
    ("vm-nl&#10;x", "vm-nl\nx"),
    ("vm-tab\tx", "vm-tab\tx"),
])
def test_the_name_is_libvirts_as_written(name_xml: str, name: str) -> None:
    # Before: stripped, and a \r read as \n (the XML parser's line-end rule): the pid file,
    # named by libvirt's name, was never found, and every pass missed the domain's CPU.
    assert inventory.parse_domain_xml(_named(name_xml)).name == name


def test_libvirts_own_name_wins_where_given() -> None:
    # virDomainGetName: the name itself, whatever the XML can carry
    info = inventory.parse_domain_xml(_named("vm-cr\nx"), name="vm-cr\rx")
    assert info.name == "vm-cr\rx"
    assert inventory.parse_domain_xml(_named("vm-a"), name="").name == "vm-a"


@pytest.mark.parametrize("blank", ["", "   ", "\n"])
def test_a_blank_name_is_a_source_error(blank: str) -> None:
    with pytest.raises(SourceError, match="no uuid or name"):
        inventory.parse_domain_xml(_named(blank))


def test_a_comment_that_looks_like_the_name_is_not_taken() -> None:
    xml = _named("vm-b\rx").replace("<domain type='kvm' id='7'>",
                                     "<domain type='kvm' id='7'><!-- <name>other\r</name> -->")
    assert inventory.parse_domain_xml(xml).name == "vm-b\rx"
    xml = _named("vm-b").replace("<domain type='kvm' id='7'>",
                                 "<domain type='kvm' id='7'><!-- <name>x\r</name> -->")
    assert inventory.parse_domain_xml(xml).name == "vm-b"


U = "0f8f1a54-2b0c-4c4b-9d3c-0123456789ab"


def _shape(domid: int = 7, taps: tuple[str, ...] = ("tap1",)) -> inventory.Shape:
    return inventory.Shape(uuid=U, domid=domid, taps=taps, disks=("vda",))


def test_xml_read_only_when_new_restarted_reshaped_or_due() -> None:
    inv = inventory.Inventory(refresh_every_passes=3)
    info = inventory.parse_domain_xml(XML)
    assert inv.needs_xml([_shape()]) == [U]                    # new (pass 1, phase 1)
    inv.update([(info, _shape())], present=[U])
    assert inv.needs_xml([_shape()]) == []                     # unchanged: no XML
    assert inv.needs_xml([_shape(taps=("tap1", "tap9"))]) == [U]  # hot-plugged NIC
    inv.update([(info, _shape(taps=("tap1", "tap9")))], present=[U])
    assert inv.needs_xml([_shape(domid=8)]) == [U]           # new QEMU process
    inv.update([(info, _shape(domid=8))], present=[U])
    got = [inv.needs_xml([_shape(domid=8)]) for _ in range(6)]
    # periodic refresh on its phase: once every 3 passes, whatever else read it meanwhile
    assert got == [[], [], [U], [], [], [U]]
    assert inv.reads == {"new": 1, "reshaped": 2, "periodic": 2}


def _known(inv: inventory.Inventory, n: int) -> list[inventory.Shape]:
    """`n` domains, their XML read by one pass (all of them: new)."""
    shapes = [inventory.Shape(uuid=f"{i:08d}-0000-0000-0000-000000000000", domid=i + 1,
                              taps=(), disks=("vda",)) for i in range(n)]
    assert len(inv.needs_xml(shapes)) == n
    info = inventory.parse_domain_xml(XML)
    inv.update([(dataclasses.replace(info, uuid=s.uuid), s) for s in shapes],
               present={s.uuid: s for s in shapes})
    return shapes


def _reread_at(inv: inventory.Inventory, shapes: list[inventory.Shape], passes: int, *,
               per_pass: int) -> dict[str, list[int]]:
    """The passes (0-based) at which each domain's XML was read again; `per_pass` each."""
    seen: dict[str, list[int]] = {s.uuid: [] for s in shapes}
    for n in range(passes):
        want = inv.needs_xml(shapes)
        assert len(want) == per_pass, n
        for u in want:
            seen[u].append(n)
    return seen


def test_periodic_refresh_is_staggered_over_the_passes() -> None:
    """At 1,000 domains and a refresh every 20 passes, each pass re-reads 50 XMLs, not all of
    them every 20th pass; each domain once per 20 passes (a metadata edit seen within 20)."""
    inv = inventory.Inventory(refresh_every_passes=20)
    shapes = _known(inv, 1000)  # first sight: all of them, that pass
    for passes in _reread_at(inv, shapes, 60, per_pass=50).values():
        assert len(passes) == 3 and passes[1] - passes[0] == passes[2] - passes[1] == 20


def test_stopped_domains_are_forgotten() -> None:
    inv = inventory.Inventory()
    info = inventory.parse_domain_xml(XML)
    inv.update([(info, _shape())], present=[info.uuid])
    assert inv.get(info.uuid) is info
    inv.update([], present=[])
    assert inv.get(info.uuid) is None
    assert len(inv) == 0


def test_shape_from_stats_reads_names() -> None:
    stats = {"net.count": 2, "net.0.name": "tap1", "net.1.name": "tap2",
             "block.count": 1, "block.0.name": "vda"}
    s = inventory.shape_from_stats("u", 3, stats)
    assert s == inventory.Shape(uuid="u", domid=3, taps=("tap1", "tap2"), disks=("vda",))


def test_the_periodic_refresh_is_a_time_not_a_pass_count() -> None:
    assert inventory.refresh_passes(30) == 20  # every 10 minutes at the default interval
    assert inventory.refresh_passes(1) == 600
    assert inventory.refresh_passes(3600) == 1
    assert inventory.refresh_passes(0.001) == 600_000


def test_a_domain_libvirt_says_changed_is_read_at_the_next_pass_once() -> None:
    inv = inventory.Inventory(refresh_every_passes=1000)
    shapes = _known(inv, 3)
    assert inv.needs_xml(shapes) == []
    # told changed: it, and a domain not running (nothing to read)
    told = {shapes[1].uuid, "ffffffff-0000-0000-0000-000000000000"}
    assert inv.needs_xml(shapes, told) == [shapes[1].uuid]
    assert inv.needs_xml(shapes) == []
    assert inv.reads == {"new": 3, "changed": 1}


def test_heard_changes_make_the_periodic_reread_a_backstop_still_staggered() -> None:
    """Events heard: every domain once (what changed unheard, `XmlChanges.take`), then each
    one once per `refresh_every_passes` as before, spread evenly; no longer heard: the short
    cadence, nothing re-read for it."""
    inv = inventory.Inventory(refresh_every_passes=4)
    shapes = _known(inv, 120)
    inv.retune(12)  # what the collector does before a pass once they are heard
    assert inv.refresh_every_passes == 12
    assert len(inv.needs_xml(shapes, {s.uuid for s in shapes})) == 120
    seen = _reread_at(inv, shapes, 24, per_pass=10)
    assert all(len(p) == 2 and p[1] - p[0] == 12 for p in seen.values())
    inv.retune(4)
    got = [inv.needs_xml(shapes) for _ in range(8)]
    assert [len(w) for w in got] == [30] * 8
    assert sorted(u for w in got[:4] for u in w) == sorted(s.uuid for s in shapes)
