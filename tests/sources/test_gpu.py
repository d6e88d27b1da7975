"""GPU inventory: hostdev parsing, sysfs identification, readings and the dump view (pure parts)."""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from hostagent.accounting.inventory import parse_domain_xml, parse_hostdevs
from hostagent.model import DomainInfo, Hostdev
from hostagent.sources.files import HostRoot
from hostagent.sources.gpu import (
    PASSTHROUGH_REASON,
    GpuReadings,
    build_readings,
    describe,
)
from hostagent.sources.gpu_sysfs import (
    list_display_devices,
    read_mdev_info,
    read_pci_info,
    scan_sysfs,
)
from hostagent.sources.nvml_boundary import (
    NvmlDevice,
    NvmlSnapshot,
    VgpuInstance,
    VgpuSample,
    average_vgpu_util,
)

GPU = Path(__file__).resolve().parents[2] / "fixtures" / "gpu"
ROOT = HostRoot(GPU / "host")
A10_1 = "5c5f2f6e-3b7a-4a51-9a53-6b0f0c4a1d01"
A10_2 = "5c5f2f6e-3b7a-4a51-9a53-6b0f0c4a1d02"
T4_3 = "9e2b7c10-0d4f-4c3e-8f1a-2b7d5e6f7a03"
T4_4 = "9e2b7c10-0d4f-4c3e-8f1a-2b7d5e6f7a04"


def xml_root(name: str) -> ET.Element:
    return ET.fromstring((GPU / "domains" / f"{name}.xml").read_text())


def domain(name: str) -> DomainInfo:
    root = xml_root(name)
    return DomainInfo(uuid=(root.findtext("uuid") or "").lower(), name=name, domid=1, vcpus=1,
                      memory_bytes=1, max_memory_bytes=1, hostdevs=parse_hostdevs(root))


def all_domains() -> list[DomainInfo]:
    return [domain(n) for n in ("train-1", "render-1", "vdi-1", "vdi-2", "vdi-3", "ghost")]


# --- parse_hostdevs ----------------------------------------------------------------------------


def test_pci_hostdevs_use_the_source_address_not_the_guest_address() -> None:
    devs = parse_hostdevs(xml_root("train-1"))
    assert [d for d in devs if d.kind == "pci"] == [
        Hostdev("pci", "0000:3b:00.0"), Hostdev("pci", "0000:d8:00.0"),
        Hostdev("pci", "0000:5e:00.2"), Hostdev("pci", "0000:d9:00.0"),
    ]
    # <interface type='hostdev'> is a NIC; the lead's inventory lists it under nics
    assert "0000:5e:00.3" not in {d.address for d in devs}
    assert Hostdev("usb", "0529:0620") in devs


def test_mdev_hostdevs_are_lowercased_with_their_model() -> None:
    assert parse_hostdevs(xml_root("vdi-1")) == (
        Hostdev("mdev", A10_1, "vfio-pci"), Hostdev("mdev", T4_3, "vfio-pci"),
    )


def test_malformed_and_capability_hostdevs_are_skipped_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="hostagent.sources.gpu"):
        devs = parse_hostdevs(xml_root("ghost"))
    assert devs == (Hostdev("pci", "0000:e1:00.0"),
                    Hostdev("mdev", "00000000-1111-2222-3333-444444444444", "vfio-pci"))
    assert len([r for r in caplog.records if r.getMessage() == "hostdev ignored"]) == 2


@pytest.mark.parametrize(("attrs", "expected"), [
    ("bus='59' slot='0' function='0'", "0000:3b:00.0"),  # decimal, domain defaults to 0
    ("domain='0x10000' bus='0x01' slot='0x1f' function='7'", "10000:01:1f.7"),  # VMD domain
    ("domain='0' bus='010' slot='0x02' function='0x1'", "0000:08:02.1"),  # strtol octal
])
def test_pci_address_numbers_are_read_like_libvirt(attrs: str, expected: str) -> None:
    root = ET.fromstring(
        "<domain><devices><hostdev mode='subsystem' type='pci'><source>"
        f"<address {attrs}/></source></hostdev>"
        "<hostdev mode='subsystem' type='pci'><source>"
        f"<address {attrs}/></source></hostdev></devices></domain>")
    assert parse_hostdevs(root) == (Hostdev("pci", expected),)  # duplicates collapse


def test_the_inventory_parser_fills_hostdevs_from_this_function() -> None:
    info = parse_domain_xml((GPU / "domains" / "vdi-1.xml").read_text())
    assert info.hostdevs == parse_hostdevs(xml_root("vdi-1"))
    assert info.uuid == "3c9a1e52-7d4b-4f0e-a1c2-d3e4f5a6b701"


# --- sysfs -------------------------------------------------------------------------------------


def test_pci_info_from_sysfs() -> None:
    a100 = read_pci_info(ROOT, "0000:3b:00.0")
    assert a100 is not None
    assert (a100.ids, a100.class_id, a100.driver, a100.is_gpu) == (
        "10de:20b5", 0x030200, "vfio-pci", True)
    assert a100.model == "NVIDIA A100 80GB PCIe"
    a6000 = read_pci_info(ROOT, "0000:af:00.0")
    assert a6000 is not None
    assert a6000.is_gpu
    assert a6000.model == "NVIDIA 10de:2230"
    for not_gpu in ("0000:af:00.1", "0000:5e:00.2", "0000:d9:00.0", "0000:16:00.0"):
        info = read_pci_info(ROOT, not_gpu)
        assert info is not None, not_gpu
        assert not info.is_gpu, not_gpu
    assert read_pci_info(ROOT, "0000:e1:00.0") is None
    assert read_pci_info(ROOT, "../../etc") is None


def test_mdev_parent_and_type_from_the_sysfs_symlink() -> None:
    m = read_mdev_info(ROOT, T4_3)
    assert m is not None
    assert (m.parent, m.type_id, m.type_name) == ("0000:65:00.0", "nvidia-230", "GRID T4-4Q")
    assert read_mdev_info(ROOT, "00000000-1111-2222-3333-444444444444") is None


def test_every_display_controller_is_a_host_gpu() -> None:
    assert list_display_devices(ROOT) == (
        "0000:03:00.0", "0000:17:00.0", "0000:3b:00.0", "0000:65:00.0", "0000:af:00.0",
        "0000:ca:00.0", "0000:d8:00.0",
    )
    assert list_display_devices(HostRoot(GPU / "nowhere")) == ()


# --- readings ----------------------------------------------------------------------------------


def readings(nvml: NvmlSnapshot | None = None, util: dict[str, float] | None = None,
             state: str = "absent") -> GpuReadings:
    doms = all_domains()
    sysfs = scan_sysfs(ROOT, [h.address for d in doms for h in d.hostdevs if h.kind == "pci"],
                       [h.address for d in doms for h in d.hostdevs if h.kind == "mdev"])
    return build_readings(doms, sysfs, nvml, state, util or {})


def test_only_gpus_are_readings_and_passthrough_says_why_no_util() -> None:
    r = readings()
    train = r.of(domain("train-1").uuid)
    assert [g.address for g in train] == ["0000:3b:00.0", "0000:d8:00.0"]  # not the NIC/NVMe
    assert all(g.util_percent is None and g.util_unavailable_reason == PASSTHROUGH_REASON
               and g.kind == "pci" for g in train)
    render = r.of(domain("render-1").uuid)
    assert [g.address for g in render] == ["0000:af:00.0"]  # the audio function is no GPU
    assert r.of(domain("ghost").uuid) == ()
    assert [(u, h.address) for u, h in r.unidentified] == [
        (domain("ghost").uuid, "0000:e1:00.0"),
        (domain("ghost").uuid, "00000000-1111-2222-3333-444444444444"),
    ]


def test_vgpus_without_nvml_are_allocated_but_unmeasured() -> None:
    vdi1 = readings(state="absent").of(domain("vdi-1").uuid)
    assert [(g.kind, g.address, g.model) for g in vdi1] == [
        ("mdev", A10_1, "NVIDIA A10-4Q"), ("mdev", T4_3, "GRID T4-4Q")]
    assert all(g.util_percent is None and g.fb_used_bytes is None for g in vdi1)
    assert vdi1[0].util_unavailable_reason == "vgpu: utilisation not measured (NVML absent)"


def test_host_gpus_list_allocations_and_idle_cards() -> None:
    hosts = {g.address: g for g in readings().host_gpus}
    assert set(hosts) == {"0000:03:00.0", "0000:17:00.0", "0000:3b:00.0", "0000:65:00.0",
                          "0000:af:00.0", "0000:ca:00.0", "0000:d8:00.0"}
    assert [(a.domain_name, a.kind) for a in hosts["0000:3b:00.0"].allocations] == [
        ("train-1", "passthrough")]
    assert [(a.domain_name, a.hostdev) for a in hosts["0000:17:00.0"].allocations] == [
        ("vdi-1", A10_1), ("vdi-2", A10_2)]
    assert hosts["0000:ca:00.0"].allocations == ()
    assert hosts["0000:03:00.0"].model == "1a03:2000"  # the BMC's VGA: listed, never billed


def snapshot() -> NvmlSnapshot:
    a10 = NvmlDevice(0, "0000:17:00.0", "NVIDIA A10",
                     (VgpuInstance(11, A10_1, 2 << 30), VgpuInstance(12, A10_2, 1 << 29)),
                     (VgpuSample(11, 100, 40.0), VgpuSample(11, 200, 60.0),
                      VgpuSample(12, 50, 99.0)))
    t4 = NvmlDevice(1, "0000:65:00.0", "Tesla T4", (VgpuInstance(21, T4_3, None),), ())
    idle = NvmlDevice(2, "0000:ca:00.0", "Tesla T4")
    return NvmlSnapshot({d.address: d for d in (a10, t4, idle)})


def test_vgpu_util_averages_only_samples_newer_than_last_seen() -> None:
    util, seen = average_vgpu_util(snapshot(), {"0000:17:00.0": 60})
    assert util == {A10_1: 50.0}  # instance 12's only sample (t=50) was already seen
    assert seen == {"0000:17:00.0": 200}
    util, seen = average_vgpu_util(snapshot(), seen)
    assert util == {}
    assert seen == {"0000:17:00.0": 200}


def test_vgpu_readings_with_nvml_and_every_reason_why_not() -> None:
    snap = snapshot()
    util, _ = average_vgpu_util(snap, {"0000:17:00.0": 60})
    r = readings(snap, util, "ok")
    vdi1 = {g.address: g for g in r.of(domain("vdi-1").uuid)}
    assert (vdi1[A10_1].util_percent, vdi1[A10_1].fb_used_bytes,
            vdi1[A10_1].util_unavailable_reason) == (50.0, 2 << 30, None)
    assert vdi1[T4_3].util_percent is None
    assert vdi1[T4_3].util_unavailable_reason == \
        "vgpu: no new NVML utilisation sample this period"
    (vdi2,) = r.of(domain("vdi-2").uuid)
    assert (vdi2.util_percent, vdi2.fb_used_bytes) == (None, 1 << 29)
    (vdi3,) = r.of(domain("vdi-3").uuid)
    assert vdi3.util_unavailable_reason == "vgpu: NVML lists no active vGPU for this mdev"
    hosts = {g.address: g for g in r.host_gpus}
    assert hosts["0000:ca:00.0"].model == "Tesla T4"
    assert hosts["0000:ca:00.0"].nvml_visible
    assert not hosts["0000:3b:00.0"].nvml_visible  # vfio-pci bound: NVML cannot see it
    # a vGPU whose parent NVML does not list
    gone = NvmlSnapshot({a: d for a, d in snap.devices.items() if a != "0000:65:00.0"})
    (t4,) = list(readings(gone, util, "ok").of(domain("vdi-3").uuid))
    assert t4.util_unavailable_reason == "vgpu: the parent GPU is not visible to NVML"


def test_describe_rows_for_dump() -> None:
    snap = snapshot()
    util, _ = average_vgpu_util(snap, {})
    rows = describe(readings(snap, util, "ok"))
    keys = {frozenset(r) for r in rows}
    assert len(keys) == 1  # one shape: a table
    by_addr = {r["address"]: r for r in rows}
    a100 = by_addr["0000:3b:00.0"]
    assert a100["kind"] == "passthrough"
    assert a100["billed"] is True
    assert a100["allocation"] == f"passthrough to train-1 ({domain('train-1').uuid})"
    assert a100["domain"] == domain("train-1").uuid
    assert a100["why_no_util"] == PASSTHROUGH_REASON
    assert a100["model"] == "NVIDIA A100 80GB PCIe"
    v = by_addr[A10_1]
    assert (v["kind"], v["parent"], v["util_percent"], v["fb_used_bytes"]) == (
        "vgpu", "0000:17:00.0", 50.0, 2 << 30)
    assert v["allocation"].startswith("vgpu on 0000:17:00.0 for vdi-1 ")
    idle = by_addr["0000:ca:00.0"]
    assert (idle["kind"], idle["billed"], idle["domain"]) == ("host", False, None)
    assert idle["why_no_util"] == "not allocated to any domain: not billed"
    ghost = by_addr["0000:e1:00.0"]
    assert (ghost["billed"], ghost["why_no_util"]) == (
        False, "not found in sysfs: not billed as a GPU")
    assert "0000:17:00.0" not in by_addr  # a vGPU parent shows as its vGPU rows
    assert "0000:5e:00.2" not in by_addr  # a NIC is not a GPU row
