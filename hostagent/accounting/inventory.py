"""Domain XML → `DomainInfo`, and the inventory that parses XML only for new or changed domains.

Pure: the XML text comes from the libvirt source; this module never talks to libvirt.
"""

from __future__ import annotations

import logging
import re
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import NamedTuple

from hostagent.accounting.identity import owner_hint_from_metadata
from hostagent.errors import SourceError
from hostagent.model import UUID_RE, Disk, DomainInfo, Hostdev, Nic

log = logging.getLogger(__name__)

_UNIT_BYTES = {
    "b": 1, "bytes": 1,
    "kb": 1000, "k": 1024, "kib": 1024,
    "mb": 1000**2, "m": 1024**2, "mib": 1024**2,
    "gb": 1000**3, "g": 1024**3, "gib": 1024**3,
    "tb": 1000**4, "t": 1024**4, "tib": 1024**4,
}


def _memory_bytes(el: ET.Element | None) -> int:
    if el is None or el.text is None:
        return 0
    unit = el.get("unit", "KiB").lower()
    return int(el.text.strip()) * _UNIT_BYTES.get(unit, 1024)


def parse_domain_xml(xml_text: str, name: str | None = None) -> DomainInfo:
    """Parse a live domain XML; SourceError if it is not a domain document or is malformed.

    `name`: libvirt's own name of the domain (`DomainStats.name`, virDomainGetName), where the
    caller has it: the domain's name then, since the XML cannot always carry it (see
    `_xml_name`). Every failure is a SourceError (a number that is not one, too:
    `<vcpu>x</vcpu>`), so the collector can set that one domain aside instead of failing the
    pass.
    """
    try:
        root = ET.fromstring(xml_text)  # noqa: S314 - libvirt's own XML, not untrusted input
    except ET.ParseError as err:
        raise SourceError(f"domain XML does not parse: {err}") from err
    try:
        return _domain_info(root, name if name else _xml_name(root, xml_text))
    except (ValueError, TypeError) as err:
        raise SourceError(f"malformed domain XML: {err}") from err


_RAW_NAME = re.compile(r"<name>([^<]*)</name>")
_CHAR_REF = re.compile(r"&(#[0-9]+|#x[0-9a-fA-F]+|lt|gt|amp|apos|quot);")
_ENTITIES = {"lt": "<", "gt": ">", "amp": "&", "apos": "'", "quot": '"'}


def _unescape(text: str) -> str:
    """XML character data with its predefined entities and character references expanded."""
    def one(m: re.Match[str]) -> str:
        ref = m.group(1)
        if ref[0] != "#":
            return _ENTITIES[ref]
        return chr(int(ref[2:], 16) if ref[1] == "x" else int(ref[1:]))
    return _CHAR_REF.sub(one, text)


def _xml_name(root: ET.Element, xml_text: str) -> str:
    r"""The domain's name as libvirt wrote it: not stripped (libvirt takes leading and trailing
    blanks, and names its pid file with them), and with a carriage return kept.
    libvirt writes a `\r` in a name as it is, and an XML parser must read a literal `\r`
    (or `\r\n`) as `\n`: where the document has one, the name is taken from its source
    text, when that source reads as the parsed name."""
    parsed = root.findtext("name") or ""
    if "\r" not in xml_text:  # as good as always: the parsed name is the name
        return parsed
    for m in _RAW_NAME.finditer(xml_text):  # the first that reads as it (not a comment's)
        raw = m.group(1)
        if _unescape(raw.replace("\r\n", "\n").replace("\r", "\n")) == parsed:
            return _unescape(raw)
    return parsed


def keyed_nics(nics: Sequence[Nic]) -> tuple[Nic, ...]:
    """`nics`, each with its key (`Nic.key`): its MAC; where NICs share a MAC (libvirt takes
    that, with any case), the last of them keeps the MAC and each one before it is
    `<mac>@<target dev>` (`<mac>@#<position>` without one), so every NIC's counters are its
    own. The last keeps the MAC because a NIC hot-plugged with a MAC already in use comes
    last (libvirt appends it): the NIC that had the MAC alone is then found by its tap's
    ifindex under its new key, and the new one is compared with the old key's tap and counts
    from zero (accounting/sampling.py)."""
    if len(nics) < 2:
        return tuple(nics)
    last = {n.mac.lower(): i for i, n in enumerate(nics)}
    if len(last) == len(nics):
        return tuple(nics)
    taken = set(last)
    out = []
    for i, n in enumerate(nics):
        mac = n.mac.lower()
        if last[mac] != i:
            key = f"{mac}@{n.target}" if n.target else f"{mac}@#{i}"
            while key in taken:  # two NICs naming one target dev: still two keys
                key += "+"
            taken.add(key)
            out.append(Nic(n.mac, n.kind, n.target, n.model, key))
        else:
            out.append(n)
    return tuple(out)


def _domain_info(root: ET.Element, name: str) -> DomainInfo:
    if root.tag != "domain":
        raise SourceError(f"expected <domain>, found <{root.tag}>")
    uuid = (root.findtext("uuid") or "").strip().lower()
    if not uuid or not name.strip():
        raise SourceError("domain XML has no uuid or name")
    domid = int(root.get("id", "-1"))
    vcpu_el = root.find("vcpu")
    vcpus = int(vcpu_el.get("current", vcpu_el.text or "1")) if vcpu_el is not None else 1
    max_mem = _memory_bytes(root.find("memory"))
    cur_mem = _memory_bytes(root.find("currentMemory")) or max_mem
    devices = root.find("devices")
    nics: list[Nic] = []
    disks: list[Disk] = []
    if devices is not None:
        for iface in devices.findall("interface"):
            mac_el = iface.find("mac")
            if mac_el is None or not mac_el.get("address"):
                continue  # libvirt always assigns a MAC; without one there is nothing to key on
            target = iface.find("target")
            model = iface.find("model")
            nics.append(Nic(
                mac=mac_el.get("address", "").lower(),
                kind=iface.get("type", "unknown"),
                target=target.get("dev") if target is not None else None,
                model=model.get("type") if model is not None else None,
            ))
        for disk in devices.findall("disk"):
            target = disk.find("target")
            if target is None or not target.get("dev"):
                continue
            src = disk.find("source")
            source = None
            if src is not None:
                source = src.get("file") or src.get("dev") or src.get("name") or src.get("volume")
            disks.append(Disk(target=target.get("dev", ""), device=disk.get("device", "disk"),
                              source=source))
    metadata = root.find("metadata")
    metadata_xml = ET.tostring(metadata, encoding="unicode") if metadata is not None else None
    return DomainInfo(
        uuid=uuid,
        name=name,
        domid=domid,
        vcpus=max(vcpus, 1),
        memory_bytes=cur_mem,
        max_memory_bytes=max_mem,
        nics=keyed_nics(nics),
        disks=tuple(disks),
        hostdevs=parse_hostdevs(root),
        owner_hint=owner_hint_from_metadata(metadata_xml),
        metadata_xml=metadata_xml,
    )


# --- hostdevs in the domain XML ---------------------------------------------------------------


def _c_int(text: str | None, default: int | None = None) -> int:
    """An integer the way libvirt reads one (strtol base 0): `0x3b`, `017`, `59`."""
    s = (text or "").strip().lower()
    if not s:
        if default is None:
            raise ValueError("missing value")
        return default
    if s.startswith("0x"):
        return int(s, 16)
    return int(s, 8) if len(s) > 1 and s.startswith("0") else int(s, 10)


def _pci_from_xml(el: ET.Element) -> str:
    domain, bus = _c_int(el.get("domain"), 0), _c_int(el.get("bus"))
    slot, fn = _c_int(el.get("slot")), _c_int(el.get("function"), 0)
    if not (domain <= 0xFFFFFFFF and bus <= 0xFF and slot <= 0x1F and fn <= 7):
        raise ValueError(f"PCI address out of range: {ET.tostring(el, encoding='unicode')}")
    return f"{domain:04x}:{bus:02x}:{slot:02x}.{fn}"


def _mdev_uuid(el: ET.Element) -> str:
    uuid = (el.get("uuid") or "").strip().lower()
    if not UUID_RE.match(uuid):
        raise ValueError(f"mdev without a valid uuid: {uuid!r}")
    return uuid


def parse_hostdevs(domain_xml_root: ET.Element) -> tuple[Hostdev, ...]:
    """`<hostdev mode='subsystem'>` of a `<domain>`: PCI by address, mdev by UUID, USB by ids."""
    out: dict[tuple[str, str], Hostdev] = {}
    for hd in domain_xml_root.findall("./devices/hostdev"):
        if hd.get("mode", "subsystem") != "subsystem":
            continue  # mode='capabilities' hands over block/char devices, not PCI functions
        kind, src = hd.get("type"), hd.find("source")
        addr = src.find("address") if src is not None else None
        dev: Hostdev | None = None
        try:
            if kind == "pci" and addr is not None:
                dev = Hostdev("pci", _pci_from_xml(addr))
            elif kind == "mdev" and addr is not None:
                dev = Hostdev("mdev", _mdev_uuid(addr), hd.get("model"))
            elif kind == "usb" and src is not None:
                vendor, product = src.find("vendor"), src.find("product")
                if vendor is not None and product is not None:
                    ids = f"{_c_int(vendor.get('id')):04x}:{_c_int(product.get('id')):04x}"
                    dev = Hostdev("usb", ids)
                elif addr is not None:
                    dev = Hostdev("usb", f"{_c_int(addr.get('bus')):03d}:"
                                         f"{_c_int(addr.get('device')):03d}")
        except ValueError as err:
            log.warning("hostdev ignored", extra={"error": str(err), "type": kind})
        if dev is not None:
            out.setdefault((dev.kind, dev.address), dev)
    return tuple(out.values())


class Shape(NamedTuple):
    """The cheap fingerprint of a domain seen in bulk stats: changes force an XML re-read.

    A named tuple: built for every domain every pass, it must cost a tuple, not a frozen
    dataclass's `__init__`."""

    uuid: str
    domid: int
    taps: tuple[str, ...]
    disks: tuple[str, ...]


_NET_NAMES: list[str] = []
_BLOCK_NAMES: list[str] = []


def _names(cache: list[str], prefix: str, n: int) -> list[str]:
    """`prefix.0.name` ... `prefix.{n-1}.name`, built once per index, not once per pass."""
    while len(cache) < n:
        cache.append(f"{prefix}.{len(cache)}.name")
    return cache


def shape_from_stats(uuid: str, domid: int, stats: Mapping[str, object]) -> Shape:
    """Fingerprint from bulk stats: domain id plus the tap and disk names libvirt reports."""
    get = stats.get
    n = get("net.count", 0)
    taps = (tuple([str(get(k, "")) for k in _names(_NET_NAMES, "net", n)[:n]])
            if isinstance(n, int) and n > 0 else ())
    n = get("block.count", 0)
    disks = (tuple([str(get(k, "")) for k in _names(_BLOCK_NAMES, "block", n)[:n]])
             if isinstance(n, int) and n > 0 else ())
    return Shape(uuid, domid, taps, disks)


# Each domain's XML is re-read at least this often (metadata edits change nothing in bulk
# stats): every 20 passes at the default 30 s interval. A time, not a pass count, so a short
# interval does not multiply the XMLDesc calls and parses.
XML_REFRESH_S = 600.0
# The same while libvirt's XML change events are heard (metadata edits, device hot-plug and
# unplug: hostagent/xml_changes.py): the periodic re-read is then only a backstop.
XML_REFRESH_HEARD_S = 3600.0


def refresh_passes(interval_s: float, refresh_s: float = XML_REFRESH_S) -> int:
    """Passes between two periodic XML reads of a domain at `interval_s` (`refresh_s`)."""
    return max(round(refresh_s / max(interval_s, 1e-3)), 1)


class Inventory:
    """Known domains by UUID; says which ones need their XML (re-)read this pass.

    A domain's XML is read when it is new, when its domain id changed (a new QEMU process), when
    the tap/disk names in bulk stats differ from those seen when its XML was last read (hot-plug),
    when libvirt said it changed (`changed`: a metadata edit, a device added or removed), and
    once every `refresh_every_passes` passes (a backstop: every 10 minutes, every hour while
    libvirt's change events are heard; the collector `retune`s it).
    The periodic refreshes are staggered: each domain gets a phase when first seen, round robin
    over the `refresh_every_passes` phases, and is refreshed on the passes of its phase, so a
    pass re-reads about 1/`refresh_every_passes` of the domains instead of all of them at once.
    """

    def __init__(self, refresh_every_passes: int = 20) -> None:
        self._by_uuid: dict[str, DomainInfo] = {}
        self._shape: dict[str, Shape] = {}
        self._phase: dict[str, int] = {}
        self._refresh = max(refresh_every_passes, 1)
        self._pass = 0
        self._next_phase = 0
        # XML reads asked for, by why: new, reshaped (new process, hot-plug), changed
        # (libvirt said so), periodic (/metrics: hostagent_domain_xml_reads_total)
        self.reads: Counter[str] = Counter()

    @property
    def refresh_every_passes(self) -> int:
        """The periodic re-read's cadence, in passes."""
        return self._refresh

    def retune(self, refresh_every_passes: int) -> None:
        """The periodic re-read every `refresh_every_passes` passes from now on (an interval
        reloaded, change events heard or no longer), re-staggered over its phases."""
        refresh = max(refresh_every_passes, 1)
        if refresh == self._refresh:
            return
        self._refresh = refresh
        due = self._pass % refresh
        for i, uuid in enumerate(self._phase):  # the next pass's due phase first
            self._phase[uuid] = (due + 1 + i) % refresh
        self._next_phase = len(self._phase) % refresh

    def needs_xml(self, shapes: Iterable[Shape],
                  changed: AbstractSet[str] = frozenset(), *, periodic: bool = True
                  ) -> list[str]:
        """UUIDs whose XML must be fetched this pass; `changed`: those libvirt said changed
        (hostagent/xml_changes.py); `periodic=False`: a read between passes, which neither
        counts as a pass nor makes the periodic re-reads."""
        if periodic:
            self._pass += 1
        due = self._pass % self._refresh
        known, phases = self._shape, self._phase
        want = []
        for s in shapes:
            phase = phases.get(s.uuid)
            if phase is None:
                # Round robin backwards from this pass's phase: the first domains seen
                # together are due again in N passes, N - 1, ..., 1 (the last of N).
                phase = phases[s.uuid] = (due - self._next_phase) % self._refresh
                self._next_phase = (self._next_phase + 1) % self._refresh
                want.append(s.uuid)
                self.reads["new"] += 1
            elif known.get(s.uuid) != s:
                want.append(s.uuid)
                self.reads["reshaped"] += 1
            elif s.uuid in changed:
                want.append(s.uuid)
                self.reads["changed"] += 1
            elif periodic and phase == due:
                want.append(s.uuid)
                self.reads["periodic"] += 1
        return want

    def update(self, infos: Iterable[tuple[DomainInfo, Shape]],
               present: Mapping[str, object] | Iterable[str] | None) -> None:
        """Record freshly parsed domains (with the stats shape seen then); forget the ones not
        `present` (stopped): the UUIDs, or a mapping keyed by them; None: forget nobody (a
        read of some domains only)."""
        for info, shape in infos:
            self._by_uuid[info.uuid] = info
            self._shape[info.uuid] = shape
        if present is None:
            return
        if not isinstance(present, Mapping):
            present = dict.fromkeys(present)
        if not present.keys() >= self._by_uuid.keys():  # a set comparison in C: cheap
            for uuid in [u for u in self._by_uuid if u not in present]:
                self.forget(uuid)
        if len(self._phase) > len(present):
            for uuid in [u for u in self._phase if u not in present]:
                del self._phase[uuid]

    def forget(self, uuid: str) -> None:
        """Drop a domain (it stopped, or its XML could not be read)."""
        self._by_uuid.pop(uuid, None)
        self._shape.pop(uuid, None)

    def items(self) -> list[tuple[str, DomainInfo]]:
        """Every known domain by UUID (a copy)."""
        return list(self._by_uuid.items())

    def get(self, uuid: str) -> DomainInfo | None:
        """The known DomainInfo, if any."""
        return self._by_uuid.get(uuid)

    def __len__(self) -> int:
        return len(self._by_uuid)
