"""Instance id schemes and owner hints from domain metadata."""

from __future__ import annotations

import hashlib

import pytest

from hostagent.accounting.identity import (
    check_scheme,
    formation_instance_id,
    identify,
    instance_id,
    owner_hint_from_metadata,
)
from hostagent.errors import ConfigError
from hostagent.model import DomainInfo, OwnerHint

UUID = "5f3c2b9e-8f0a-4f5e-9a51-2f1d4c6b7a80"
NODE = "0123456789abcdef0123456789abcdef01234567"  # a node address: 20 bytes as hex
NOVA = """<metadata>
  <nova:instance xmlns:nova="http://openstack.org/xmlns/libvirt/nova/1.1">
    <nova:package version="27.1.0"/>
    <nova:name>web-1</nova:name>
    <nova:flavor name="m1.small"><nova:memory>2048</nova:memory></nova:flavor>
    <nova:owner>
      <nova:user uuid="b2c7e0c6a0a84f3b9e3c0e1f2a3b4c5d">alice</nova:user>
      <nova:project uuid="7d1e2f3a4b5c4d6e8f9a0b1c2d3e4f50">billing-team</nova:project>
    </nova:owner>
    <nova:root type="image" uuid="c0ffee00-0000-4000-8000-000000000000"/>
  </nova:instance>
</metadata>"""
OURS = '<hostagent:owner xmlns:hostagent="urn:hostagent:owner:1" user="{u}" org="{o}"/>'


def dom(name: str = "web-1", metadata: str | None = None) -> DomainInfo:
    return DomainInfo(uuid=UUID, name=name, domid=3, vcpus=2, memory_bytes=2 << 30,
                      max_memory_bytes=2 << 30, metadata_xml=metadata)


def test_uuid_is_the_default_and_name_is_the_name() -> None:
    assert instance_id(dom(), scheme="uuid", node_id=NODE) == UUID
    assert instance_id(dom(), scheme="name", node_id=NODE) == "web-1"


def test_formation_scheme_matches_a_worked_example() -> None:
    # The VM name is the build_id: hex of a 32-byte hash; only its first 20 bytes count.
    build_id = "00112233445566778899aabbccddeeff00112233" + "4455667788990011aabbccdd"
    # XOR byte by byte, build_id[:20] ^ node_id[:20], both hex-DECODED:
    #   00^01=01 11^23=32 22^45=67 33^67=54 44^89=cd 55^ab=fe 66^cd=ab 77^ef=98 88^01=89 99^23=ba
    #   aa^45=ef bb^67=dc cc^89=45 dd^ab=76 ee^cd=23 ff^ef=10 00^01=01 11^23=32 22^45=67 33^67=54
    expected = "01326754cdfeab9889baefdc4576231001326754"
    assert formation_instance_id(build_id, NODE) == expected
    got = identify(dom(name=build_id), scheme="formation", node_id=NODE)
    assert got.instance_id == expected
    assert got.scheme == "formation"
    assert got.fallback_reason is None
    # Upper-case hex decodes to the same bytes; the id is lower-case hex like hex::encode.
    assert formation_instance_id(build_id.upper(), NODE.upper()) == expected
    # Reading the strings as UTF-8 bytes would give another id: the decoding matters.
    utf8 = bytes(a ^ b for a, b in zip(build_id.encode()[:20], NODE.encode()[:20],
                                       strict=True)).hex()
    assert utf8 != expected


def test_formation_with_a_real_style_build_id() -> None:
    # form-pack: build_id = hex(SHA3-256(signer address bytes || formfile name)).
    signer = bytes.fromhex("7e5f4552091a69125d5dfcb7b8c2659029395bdf")
    build_id = hashlib.sha3_256(signer + b"my-app").hexdigest()
    got = formation_instance_id(build_id, NODE)
    want = bytes(a ^ b for a, b in zip(bytes.fromhex(build_id)[:20], bytes.fromhex(NODE),
                                       strict=True)).hex()
    assert got == want
    assert len(got) == 40


@pytest.mark.parametrize(("name", "node", "reason"), [
    ("web-1", NODE, "not hex"),
    ("0x" + "00" * 32, NODE, "not hex"),
    ("00" * 19, NODE, "19 bytes"),
    ("00" * 32, "my-hostname", "node_id 'my-hostname' is not hex"),
    ("00" * 32, "abc", "not hex"),
])
def test_formation_falls_back_to_uuid_and_says_why(name: str, node: str, reason: str) -> None:
    got = identify(dom(name=name), scheme="formation", node_id=node)
    assert got.instance_id == UUID
    assert got.scheme == "uuid"
    assert got.fallback_reason is not None
    assert reason in got.fallback_reason


def test_check_scheme_refuses_a_hostname_node_id_for_formation() -> None:
    with pytest.raises(ConfigError, match=r"host\.node_id"):
        check_scheme("formation", "compute-7", "", "/etc/hostagent.toml")
    check_scheme("formation", NODE, "")
    check_scheme("uuid", "compute-7", "")
    with pytest.raises(ConfigError, match=r"collector\.instance_id_xpath"):
        check_scheme("metadata", NODE, "bogus:instance")
    check_scheme("metadata", NODE, "nova:instance/@uuid")


def test_metadata_preset_is_nova_instance_whose_id_is_the_domain_uuid() -> None:
    got = identify(dom(metadata=NOVA), scheme="metadata", node_id=NODE)
    assert (got.instance_id, got.scheme, got.fallback_reason) == (UUID, "metadata", None)


@pytest.mark.parametrize(("metadata", "reason"), [
    (None, "no <metadata>"),
    ("<metadata/>", "no nova:instance"),
    ("<metadata><unclosed></metadata>", "unparsable"),
])
def test_metadata_preset_falls_back(metadata: str | None, reason: str) -> None:
    got = identify(dom(metadata=metadata), scheme="metadata", node_id=NODE)
    assert got.instance_id == UUID
    assert got.scheme == "uuid"
    assert reason in (got.fallback_reason or "")


APP = """<metadata><app:vm xmlns:app="urn:example:app" name="vm-name">
  <app:id>  tenant-vm-42 </app:id><app:ref uuid="ref-uuid" other="x">text</app:ref>
</app:vm></metadata>"""


@pytest.mark.parametrize(("xpath", "want"), [
    ("{urn:example:app}vm/{urn:example:app}id", "tenant-vm-42"),
    ("{urn:example:app}vm/{urn:example:app}ref", "ref-uuid"),
    ("{urn:example:app}vm/{urn:example:app}ref/@other", "x"),
    ("{urn:example:app}vm/@name", "vm-name"),
    (".//{urn:example:app}id", "tenant-vm-42"),
])
def test_metadata_xpath(xpath: str, want: str) -> None:
    got = identify(dom(metadata=APP), scheme="metadata", node_id=NODE, xpath=xpath)
    assert got.instance_id == want
    assert got.fallback_reason is None


@pytest.mark.parametrize(("xpath", "reason"), [
    ("{urn:example:app}vm/{urn:example:app}missing", "matches nothing"),
    ("{urn:example:app}vm/@absent", "no id"),
    ("nova:instance", "matches nothing"),
    ("/absolute", "bad path"),
    ("nope:thing", "bad path"),
])
def test_metadata_xpath_falls_back(xpath: str, reason: str) -> None:
    got = identify(dom(metadata=APP), scheme="metadata", node_id=NODE, xpath=xpath)
    assert got.instance_id == UUID
    assert reason in (got.fallback_reason or "")


def test_nova_owner_hint() -> None:
    assert owner_hint_from_metadata(NOVA) == OwnerHint(
        user_id="b2c7e0c6a0a84f3b9e3c0e1f2a3b4c5d", org_id="7d1e2f3a4b5c4d6e8f9a0b1c2d3e4f50",
        source="metadata:nova")


def test_our_owner_element_wins_over_nova() -> None:
    both = NOVA.replace("</metadata>", OURS.format(u="0xabc", o="acme") + "</metadata>")
    assert owner_hint_from_metadata(both) == OwnerHint("0xabc", "acme", "metadata:hostagent")


def test_our_owner_element_with_org_only_and_empty_falls_through() -> None:
    org_only = f"<metadata>{OURS.format(u='', o='acme')}</metadata>"
    assert owner_hint_from_metadata(org_only) == OwnerHint(None, "acme", "metadata:hostagent")
    empty = NOVA.replace("</metadata>", OURS.format(u=" ", o="") + "</metadata>")
    hint = owner_hint_from_metadata(empty)
    assert hint is not None
    assert hint.source == "metadata:nova"


def test_an_org_only_owner_element_adds_its_org_to_novas_user() -> None:
    # docs/owners.md: "A hint with only an org adds the org to what follows"; it once hid
    # nova's user entirely (the event went out unassigned)
    both = NOVA.replace("</metadata>", OURS.format(u="", o="ours-org") + "</metadata>")
    assert owner_hint_from_metadata(both) == OwnerHint(
        "b2c7e0c6a0a84f3b9e3c0e1f2a3b4c5d", "ours-org", "metadata:nova")


@pytest.mark.parametrize("value", ["U" * 257, "alice&#10;bob", "x\u202ey", "a&#x85;b", "&#9;"])
def test_an_owner_id_that_is_no_id_is_read_as_absent(value: str) -> None:
    # tenant-written metadata: a 2.5 MB user made every event of the domain 2.5 MB
    bad = f"<metadata>{OURS.format(u=value, o='acme')}</metadata>"
    assert owner_hint_from_metadata(bad) == OwnerHint(None, "acme", "metadata:hostagent")
    longest = f"<metadata>{OURS.format(u='u' * 256, o='acme')}</metadata>"
    assert owner_hint_from_metadata(longest) == OwnerHint("u" * 256, "acme",
                                                          "metadata:hostagent")


@pytest.mark.parametrize("metadata", [None, "", "<metadata/>", "<metadata><x", "not xml",
                                      "<metadata><nova:instance xmlns:nova='http://openstack."
                                      "org/xmlns/libvirt/nova/1.1'/></metadata>"])
def test_no_owner_hint(metadata: str | None) -> None:
    assert owner_hint_from_metadata(metadata) is None
