"""dump's text output: names, owners, devices, errors and event fields come from libvirt, guests'
owners and sinks; a control character in one is shown escaped, never sent to the terminal (no
ESC sequence, no carriage return rewriting a line, no newline forging one)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hostagent.cli.dump import render_text
from hostagent.cli.main import main
from tests.cli.test_dump import dump_config

# ESC sequences (7-bit and the C1 CSI), CR, LF, TAB, DEL, NEL, bidi override, line separator
HOSTILE = "\x1b[2J\x1b]0;pwned\x07\r\ndomain forged\t\x7f\x85\x9b31m\u202e\u2028x"


def hostile_doc(tag: str) -> dict[str, Any]:
    bad = f"{tag}{HOSTILE}"
    gpu: dict[str, Any] = {"address": bad, "model": bad, "billed": True, "allocation": bad,
                           "util_percent": None, "why_no_util": bad}
    return {"domain": {"name": bad, "uuid": bad, "domid": 3, "instance_id": bad,
                       "incarnation": bad},
            "counters": [{"name": f"net[{bad}].guest_tx (egress)", "value": bad, "unit": bad,
                          "source": f"netlink tap {bad} ifindex 3", "rate_per_s": 1.0},
                         {"name": f"disk[{bad}].read", "value": 7, "unit": "bytes",
                          "source": f"libvirt block {bad}", "rate_per_s": None}],
            "gpus": [gpu], "host_gpus": [gpu], "missing": {bad: bad},
            "event": {"instance_id": bad, "user_id": bad, "org_id": bad}}


def assert_terminal_safe(text: str) -> None:
    for line in text.split("\n"):
        assert line.isprintable(), repr(line)
        assert not line.lstrip().startswith("domain forged"), repr(line)


def test_text_output_escapes_control_characters_in_every_untrusted_field() -> None:
    unreadable: dict[str, Any] = {"domain": {"name": f"u{HOSTILE}", "uuid": f"v{HOSTILE}"},
                  "unreadable": {"step": "xml", "error": f"bad XML{HOSTILE}"},
                  "counters": [], "gpus": [], "host_gpus": [], "missing": {}, "event": None}
    text = render_text([hostile_doc("vm"), unreadable])
    assert_terminal_safe(text)
    assert "domain vm\\x1b[2J\\x1b]0;pwned\\x07\\r\\ndomain forged\\t\\x7f\\x85\\x9b31m" \
           "\\u202e\\u2028x  uuid" in text
    assert "domain u\\x1b[2J" in text and "unreadable (xml): bad XML\\x1b[2J" in text
    # the event keeps its JSON escapes; what JSON lets through raw is escaped too
    assert '"user_id": "vm\\u001b[2J' in text
    assert "\\x85\\x9b31m\\u202e\\u2028x" in text.split('"user_id": ')[1].split("\n")[0]


def test_text_output_leaves_ordinary_names_as_they_are() -> None:
    name = "web-01 Ünïcode 名前 (prod)"
    doc = hostile_doc("")
    doc["domain"] = {"name": name, "uuid": "u-1", "domid": 3, "instance_id": "i-1",
                     "incarnation": "3:9"}
    doc["counters"] = [{"name": "disk[vda].read", "value": 7, "unit": "bytes",
                        "source": "libvirt block vda", "rate_per_s": None}]
    doc["gpus"] = doc["host_gpus"] = []
    doc["missing"] = {"net:x": "no tap"}
    doc["event"] = {"user_id": "Zoë Ålander", "org_id": None}
    text = render_text([doc])
    assert f"domain {name}  uuid u-1  id 3  instance i-1  incarnation 3:9" in text
    assert "libvirt block vda" in text and "missing net:x: no tap" in text
    assert '"user_id": "Zoë Ålander"' in text


def test_dump_of_a_domain_named_with_cr_lf_and_tab_prints_it_escaped(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # libvirt's test driver takes these in a name (XML character references)
    node = tmp_path / "node.xml"
    node.write_text("""<node>
  <domain type='test'>
    <name>evil&#13;x&#10;domain forged&#9;&#x202e;z</name>
    <uuid>11111111-1111-4111-8111-111111111111</uuid>
    <memory>1048576</memory><vcpu>1</vcpu><os><type>hvm</type></os>
  </domain>
</node>
""")
    config = dump_config(tmp_path, node)
    rc = main(["dump", "--all", "--interval", "0.05", "--config", str(config)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert_terminal_safe(out)
    assert "domain evil\\rx\\ndomain forged\\t\\u202ez  uuid 11111111-" in out
