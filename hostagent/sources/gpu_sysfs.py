"""Host GPUs as sysfs describes them: PCI vendor/device/class, mdev parents, display controllers.

Blocking file-system reads under a HostRoot (`scan_sysfs` runs in a worker thread). A PCI
function is a GPU when its base class is 0x03 (display controller); a mediated device (mdev/vGPU)
is resolved to its parent PCI function through its sysfs symlink. Used by hostagent.sources.gpu.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from hostagent.model import UUID_RE
from hostagent.sources.files import HostRoot

__all__ = [
    "AMD",
    "INTEL",
    "NVIDIA",
    "MdevInfo",
    "PciInfo",
    "SysfsSnapshot",
    "list_display_devices",
    "read_mdev_info",
    "read_pci_info",
    "scan_sysfs",
]


NVIDIA, AMD, INTEL = 0x10DE, 0x1002, 0x8086
_VENDORS = {NVIDIA: "NVIDIA", AMD: "AMD", INTEL: "Intel"}
# A few data-centre GPUs by PCI id (from pci.ids); anything else is shown as "vendor:device".
_MODELS = {
    (NVIDIA, 0x1DB1): "Tesla V100-SXM2-16GB", (NVIDIA, 0x1DB4): "Tesla V100-PCIE-16GB",
    (NVIDIA, 0x1DB5): "Tesla V100-SXM2-32GB", (NVIDIA, 0x1DB6): "Tesla V100-PCIE-32GB",
    (NVIDIA, 0x1EB8): "Tesla T4", (NVIDIA, 0x20B0): "A100-SXM4-40GB",
    (NVIDIA, 0x20B2): "A100-SXM4-80GB", (NVIDIA, 0x20B5): "A100 80GB PCIe",
    (NVIDIA, 0x20F1): "A100-PCIE-40GB", (NVIDIA, 0x2236): "A10", (NVIDIA, 0x25B6): "A2 / A16",
    (NVIDIA, 0x2330): "H100 SXM5 80GB", (NVIDIA, 0x2331): "H100 PCIe",
    (NVIDIA, 0x26B5): "L40", (NVIDIA, 0x26B9): "L40S", (NVIDIA, 0x27B8): "L4",
    (AMD, 0x738C): "Instinct MI100", (AMD, 0x740C): "Instinct MI250X / MI250",
    (AMD, 0x740F): "Instinct MI210", (INTEL, 0x0BD5): "Data Center GPU Max 1550",
    (INTEL, 0x56C0): "Data Center GPU Flex 170", (INTEL, 0x56C1): "Data Center GPU Flex 140",
}
_PCI_ADDR = re.compile(r"^[0-9a-f]{4,8}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")


@dataclass(frozen=True, slots=True)
class PciInfo:
    """A PCI function as sysfs describes it."""

    address: str
    vendor_id: int
    device_id: int
    class_id: int
    driver: str | None = None

    @property
    def is_gpu(self) -> bool:
        """Display controller (class 0x03xxxx: VGA 0x0300, 3D 0x0302, other 0x0380)."""
        return self.class_id >> 16 == 0x03

    @property
    def ids(self) -> str:
        """`10de:20b5`."""
        return f"{self.vendor_id:04x}:{self.device_id:04x}"

    @property
    def model(self) -> str:
        """`NVIDIA A100 80GB PCIe` from the built-in table, else the ids."""
        name = _MODELS.get((self.vendor_id, self.device_id))
        vendor = _VENDORS.get(self.vendor_id)
        if name is None:
            return f"{vendor} {self.ids}" if vendor else self.ids
        return f"{vendor} {name}"


@dataclass(frozen=True, slots=True)
class MdevInfo:
    """A mediated device: its parent PCI function and mdev type (`nvidia-471`, `GRID A100-10C`)."""

    uuid: str
    parent: str | None
    type_id: str | None
    type_name: str | None


@dataclass(frozen=True, slots=True)
class SysfsSnapshot:
    """PCI functions and mdevs one pass looked up, and every display controller on the host."""

    pci: Mapping[str, PciInfo]
    mdevs: Mapping[str, MdevInfo]
    host_gpus: tuple[str, ...]


def _hex(root: HostRoot, rel: str) -> int | None:
    text = root.read_text(rel)
    try:
        return int(text.strip(), 16) if text else None
    except ValueError:
        return None


def _link_name(root: HostRoot, rel: str) -> str | None:
    try:
        return os.path.basename(os.readlink(root.abspath(rel)).rstrip("/")) or None
    except OSError:
        return None


def read_pci_info(root: HostRoot, address: str) -> PciInfo | None:
    """vendor/device/class/driver of `/sys/bus/pci/devices/<address>`; None if absent."""
    if not _PCI_ADDR.match(address):
        return None
    base = f"sys/bus/pci/devices/{address}"
    vendor, device = _hex(root, f"{base}/vendor"), _hex(root, f"{base}/device")
    cls = _hex(root, f"{base}/class")
    if vendor is None or device is None or cls is None:
        return None
    return PciInfo(address, vendor, device, cls, _link_name(root, f"{base}/driver"))


def read_mdev_info(root: HostRoot, uuid: str) -> MdevInfo | None:
    """Parent and type of `/sys/bus/mdev/devices/<uuid>` (a symlink into its parent device)."""
    if not UUID_RE.match(uuid):
        return None
    rel = f"sys/bus/mdev/devices/{uuid}"
    try:
        target = os.readlink(root.abspath(rel))
    except OSError:
        return None
    parts = target.rstrip("/").split("/")
    parent = parts[-2] if len(parts) >= 2 and _PCI_ADDR.match(parts[-2]) else None
    name = root.read_text(f"{rel}/mdev_type/name")
    return MdevInfo(uuid, parent, _link_name(root, f"{rel}/mdev_type"),
                    name.strip() if name else None)


def list_display_devices(root: HostRoot) -> tuple[str, ...]:
    """PCI addresses of every display controller on the host, sorted."""
    try:
        names = sorted(os.listdir(root.abspath("sys/bus/pci/devices")))
    except OSError:
        return ()
    return tuple(a for a in names if _PCI_ADDR.match(a)
                 and ((_hex(root, f"sys/bus/pci/devices/{a}/class") or 0) >> 16) == 0x03)


def scan_sysfs(root: HostRoot, pci_addrs: Iterable[str],
               mdev_uuids: Iterable[str]) -> SysfsSnapshot:
    """Everything a pass needs from sysfs (blocking; run it in a worker thread)."""
    mdevs = {u: m for u in mdev_uuids if (m := read_mdev_info(root, u)) is not None}
    gpus = list_display_devices(root)
    wanted = set(pci_addrs) | set(gpus) | {m.parent for m in mdevs.values() if m.parent}
    pci = {a: i for a in sorted(wanted) if (i := read_pci_info(root, a)) is not None}
    return SysfsSnapshot(pci, mdevs, tuple(a for a in gpus if a in pci))
