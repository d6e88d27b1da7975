"""Instance identity and owner hints, from what the domain XML says (pure).

Schemes (`[collector] instance_id`):

- `uuid`: the libvirt domain UUID (default).
- `name`: the domain name.
- `metadata`: an ElementTree path into the domain's `<metadata>`; the found element's `uuid`
  attribute, else its text, is the id (a trailing `/@attr` picks another attribute). Prefixes
  `nova:` and `hostagent:` may be used. The empty path is the OpenStack preset: a domain with
  `nova:instance` metadata is a nova instance whose id IS the domain UUID.
- `formation`: Formation's `build_instance_id` (form-pack/src/helpers/utils/mod.rs):
  `hex(hex_decode(build_id)[:20] XOR hex_decode(node_id)[:20])`, where the VM name is the
  build_id (hex of a 32-byte SHA3-256) and node_id is the hex of the node's 20-byte address.
  Both are hex-DECODED, not taken as UTF-8.

When a scheme cannot produce an id for a domain, the UUID is used and the reason is returned,
so an event is never dropped for want of an id.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from hostagent.errors import ConfigError
from hostagent.model import DomainInfo, InstanceIdScheme, OwnerHint, usable_owner_id

NOVA_NS = "http://openstack.org/xmlns/libvirt/nova/1.1"
HOSTAGENT_OWNER_NS = "urn:hostagent:owner:1"
NAMESPACES = {"nova": NOVA_NS, "hostagent": HOSTAGENT_OWNER_NS}

_HEX = re.compile(r"(?:[0-9a-fA-F]{2})+")
_ATTR_SUFFIX = re.compile(r"^(?P<path>.*?)/?@(?P<attr>[A-Za-z_][\w.:-]*)$")
_FORMATION_BYTES = 20


@dataclass(frozen=True, slots=True)
class Identity:
    """The id of one domain, the scheme that produced it, and why it fell back (if it did)."""

    instance_id: str
    scheme: InstanceIdScheme
    fallback_reason: str | None = None


def instance_id(info: DomainInfo, *, scheme: InstanceIdScheme, node_id: str,
                xpath: str = "") -> str:
    """The instance id of a domain under `scheme` (UUID when the scheme has nothing)."""
    return identify(info, scheme=scheme, node_id=node_id, xpath=xpath).instance_id


def identify(info: DomainInfo, *, scheme: InstanceIdScheme, node_id: str,
             xpath: str = "") -> Identity:
    """Like `instance_id`, also saying which scheme answered and why it fell back."""
    if scheme == "uuid":
        return Identity(info.uuid, "uuid")
    if scheme == "name":
        return Identity(info.name, "name")
    if scheme == "formation":
        try:
            return Identity(formation_instance_id(info.name, node_id), "formation")
        except ValueError as err:
            return Identity(info.uuid, "uuid", f"formation: {err}")
    value, reason = _from_metadata(info, xpath)
    if value is None:
        return Identity(info.uuid, "uuid", f"metadata: {reason}")
    return Identity(value, "metadata")


def formation_instance_id(build_id: str, node_id: str) -> str:
    """hex(build_id[:20] XOR node_id[:20]), both hex-decoded, as form-pack computes it."""
    left = _decode_hex(build_id, "build_id (the VM name)")
    right = _decode_hex(node_id, "node_id")
    return bytes(a ^ b for a, b in zip(left[:_FORMATION_BYTES], right[:_FORMATION_BYTES],
                                       strict=True)).hex()


def _decode_hex(text: str, what: str) -> bytes:
    # Rust's hex::decode: no 0x, no whitespace, even length; upstream then slices [..20].
    if not _HEX.fullmatch(text):
        raise ValueError(f"{what} {text!r} is not hex")
    raw = bytes.fromhex(text)
    if len(raw) < _FORMATION_BYTES:
        raise ValueError(f"{what} has {len(raw)} bytes, needs at least {_FORMATION_BYTES}")
    return raw


def _parse(metadata_xml: str) -> ET.Element:
    # The XML is libvirt's own dump of a domain the host runs; expat (>= 2.4.1) refuses
    # entity-expansion bombs, and the text never reaches a shell or a file.
    return ET.fromstring(metadata_xml)  # noqa: S314


def _from_metadata(info: DomainInfo, xpath: str) -> tuple[str | None, str]:
    if not info.metadata_xml:
        return None, "the domain has no <metadata>"
    try:
        root = _parse(info.metadata_xml)
    except ET.ParseError as err:
        return None, f"unparsable <metadata>: {err}"
    if not xpath:
        if root.find("nova:instance", NAMESPACES) is None:
            return None, "no nova:instance element"
        # nova names the libvirt domain by the instance's own uuid.
        return info.uuid, ""
    path, attr = xpath, None
    m = _ATTR_SUFFIX.match(xpath)
    if m:
        path, attr = m.group("path") or ".", m.group("attr")
    try:
        el = root.find(path, NAMESPACES)
    except (SyntaxError, KeyError, TypeError, ValueError) as err:
        return None, f"bad path {xpath!r}: {err}"
    if el is None:
        return None, f"{xpath!r} matches nothing"
    value = el.get(_qualify(attr)) if attr is not None else (el.get("uuid") or el.text)
    value = value.strip() if value else ""
    if not value:
        return None, f"{xpath!r} matched an element with no id"
    return value, ""


def _qualify(attr: str) -> str:
    prefix, sep, local = attr.partition(":")
    if sep and prefix in NAMESPACES:
        return f"{{{NAMESPACES[prefix]}}}{local}"
    return attr


def check_scheme(scheme: InstanceIdScheme, node_id: str, xpath: str,
                 source: str = "<config>") -> None:
    """Refuse, at startup, a scheme that could never produce an id on this host."""
    if scheme == "formation":
        try:
            _decode_hex(node_id, "node_id")
        except ValueError as err:
            raise ConfigError(source, "host.node_id", "the node's address as hex (40 digits)",
                              node_id, f"instance_id = \"formation\" needs it: {err}") from err
    if xpath:  # checked whatever the scheme: a broken path is a broken config either way
        m = _ATTR_SUFFIX.match(xpath)
        path = (m.group("path") or ".") if m else xpath
        try:
            ET.Element("metadata").find(path, NAMESPACES)
        except (SyntaxError, KeyError, TypeError, ValueError) as err:  # "[[[": TypeError
            raise ConfigError(source, "collector.instance_id_xpath",
                              "an ElementTree path ({namespace}tag or nova:/hostagent: prefix)",
                              xpath, str(err)) from err


def owner_hint_from_metadata(metadata_xml: str | None) -> OwnerHint | None:
    """The owner a domain's metadata names: hostagent:owner first, then nova:owner."""
    if not metadata_xml:
        return None
    try:
        root = _parse(metadata_xml)
    except ET.ParseError:
        return None
    ours = root.find("hostagent:owner", NAMESPACES)
    hint = None if ours is None else _hint(ours.get("user"), ours.get("org"),
                                           "metadata:hostagent")
    if hint is not None and hint.user_id is not None:
        return hint
    nova = root.find("nova:instance/nova:owner", NAMESPACES)
    if nova is not None:
        user = nova.find("nova:user", NAMESPACES)
        project = nova.find("nova:project", NAMESPACES)
        found = _hint(None if user is None else user.get("uuid"),
                      None if project is None else project.get("uuid"), "metadata:nova")
        if hint is not None and found is not None and found.user_id is not None:
            # an org-only hostagent hint adds its org to what follows (docs/owners.md)
            return OwnerHint(user_id=found.user_id, org_id=hint.org_id, source=found.source)
        return hint or found
    return hint


def _owner_id(value: str | None) -> str | None:
    """The metadata's owner id, or None where it cannot be one (`model.usable_owner_id`): the
    owner then comes from the account service or is `unassigned`."""
    text = (value or "").strip()
    return text if usable_owner_id(text) else None


def _hint(user: str | None, org: str | None, source: str) -> OwnerHint | None:
    user_id, org_id = _owner_id(user), _owner_id(org)
    if user_id is None and org_id is None:
        return None
    return OwnerHint(user_id=user_id, org_id=org_id, source=source)
