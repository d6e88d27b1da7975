"""dump: counters with rates and sources, the text rendering (incl. GPUs), and `dump --all`
on libvirt's test driver with a domain that cannot be read whole."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import orjson
import pytest

from hostagent.cli.dump import counters, host_doc, render_text
from hostagent.cli.main import main
from hostagent.model import BlockCounters, GpuReading, MemoryReading, NicCounters, Sample

MAC = "52:54:00:4c:ab:01"


def sample(t_s: int, cpu_s: int, tx: int, wr: int) -> Sample:
    return Sample(
        instance_id="i", uuid="u", name="vm", domid=3, incarnation="3:9", started_wall_ns=None,
        t_wall_ns=t_s * 10**9, vcpus=2, memory_alloc_bytes=1 << 30, cpu_ns=cpu_s * 10**9,
        memory=MemoryReading(used_bytes=256 << 20, source="balloon"),
        nics=(NicCounters(mac=MAC, ifname="hatap1", ifindex=37, guest_rx_bytes=100,
                          guest_tx_bytes=tx, source="netlink"),),
        disks=(BlockCounters(target="vda", rd_bytes=0, wr_bytes=wr, allocation_bytes=5,
                             capacity_bytes=64 << 20),),
        gpus=(GpuReading(address="0000:3b:00.0", kind="pci", model="A100", util_percent=None,
                         fb_used_bytes=None, util_unavailable_reason="passthrough"),),
    )


def test_counters_have_values_units_sources_and_rates() -> None:
    got = {c.name: c for c in counters(sample(100, 10, 1000, 0), sample(102, 11, 3000, 4096))}
    assert got["cpu_time"].value == 11 * 10**9
    assert got["cpu_time"].rate_per_s == 0.5 * 10**9
    egress = got[f"net[{MAC}].guest_tx (egress)"]
    assert (egress.value, egress.rate_per_s, egress.unit) == (3000, 1000.0, "bytes")
    assert "netlink tap hatap1 ifindex 37" in egress.source
    assert got["disk[vda].write"].rate_per_s == 2048.0
    assert got["memory_used"].source == "balloon"
    assert got["gpu[0000:3b:00.0].util"].value is None
    assert got["gpu[0000:3b:00.0].util"].source == "passthrough"


def test_a_counter_that_went_down_has_no_rate() -> None:
    got = {c.name: c for c in counters(sample(100, 10, 5000, 0), sample(102, 11, 10, 0))}
    assert got[f"net[{MAC}].guest_tx (egress)"].rate_per_s is None


def test_text_rendering_shows_gpus_and_unallocated_host_gpus() -> None:
    row: dict[str, Any] = {"address": "0000:3b:00.0", "model": "A100", "billed": True,
                           "allocation": "passthrough to vm (u)", "util_percent": None,
                           "why_no_util": "passthrough: the host cannot read it"}
    idle: dict[str, Any] = {"address": "0000:af:00.0", "model": "L4", "billed": False,
                            "allocation": "unallocated", "util_percent": None,
                            "why_no_util": "not allocated to any domain: not billed"}
    doc = {"domain": {"name": "vm", "uuid": "u", "domid": 3, "instance_id": "i",
                      "incarnation": "3:9"},
           "counters": [{"name": "cpu_time", "value": 5, "unit": "ns", "source": "libvirt",
                         "rate_per_s": None}],
           "gpus": [row], "host_gpus": [idle], "missing": {"net:x": "no tap"},
           "event": {"event_type": "resource_usage"}}
    text = render_text([doc])
    assert "gpu 0000:3b:00.0 A100 passthrough to vm (u), billed" in text
    assert "host GPU 0000:af:00.0 L4: not allocated to any domain: not billed" in text
    assert "missing net:x: no tap" in text
    assert '"event_type": "resource_usage"' in text


# --- one bad domain (issue 13 §1), on libvirt's test driver ----------------------------------

LONG_NAME = "x" * 10_000  # /run/libvirt/qemu/<name>.pid gives ENAMETOOLONG


def driver_node(tmp: Path) -> Path:
    """A test-driver node: a healthy domain and one whose pid file cannot be opened."""
    doms = "".join(f"""
  <domain type='test'>
    <name>{name}</name><uuid>{uuid}</uuid>
    <memory>1048576</memory><vcpu>1</vcpu><os><type>hvm</type></os>
  </domain>""" for name, uuid in (("healthy", "11111111-1111-4111-8111-111111111111"),
                                  (LONG_NAME, "22222222-2222-4222-8222-222222222222")))
    node = tmp / "node.xml"
    node.write_text(f"<node>{doms}\n</node>\n")
    return node


def dump_config(tmp: Path, node: Path) -> Path:
    """A config for `dump` on libvirt's test driver `node`, host files under `tmp/root`."""
    (tmp / "root").mkdir(exist_ok=True)
    config = tmp / "hostagent.toml"
    config.write_text(f"""
[libvirt]
uri = "test://{node}"
[paths]
root = "{tmp / 'root'}"
[collector]
state_path = "{tmp / 'state.db'}"
[[sinks]]
type = "jsonl"
path = "{tmp / 'events.jsonl'}"
""")
    return config


def test_dump_all_reports_a_domain_whose_pid_file_cannot_be_opened(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = dump_config(tmp_path, driver_node(tmp_path))
    rc = main(["dump", "--all", "--json", "--interval", "0.05", "--config", str(config)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    docs = {d["domain"]["uuid"]: d for d in orjson.loads(out)}
    healthy = docs["11111111-1111-4111-8111-111111111111"]
    assert healthy["event"] is not None
    assert {c["name"] for c in healthy["counters"]} >= {"cpu_time", "vcpus"}
    bad = docs["22222222-2222-4222-8222-222222222222"]
    assert bad["domain"]["name"] == LONG_NAME
    assert "pid_file" in bad["missing"]["process"]
    assert "name too long" in bad["missing"]["process"]
    assert bad["event"] is not None  # still billed from libvirt's counters


def test_text_rendering_names_an_unreadable_domain() -> None:
    doc = {"domain": {"name": "vm-bad", "uuid": "u-1"},
           "unreadable": {"step": "xml", "error": "domain XML does not parse"},
           "counters": [], "gpus": [], "host_gpus": [], "missing": {}, "event": None}
    text = render_text([doc])
    assert "domain vm-bad  uuid u-1  unreadable (xml): domain XML does not parse" in text


def test_dump_host_shows_the_parent_cgroups_cpu_no_domain_explains() -> None:
    a0, a1 = sample(10, 5, 0, 0), sample(12, 9, 0, 0)
    b0 = dataclasses.replace(a0, uuid="b", incarnation="4:1", cpu_ns=10**9)
    b1 = dataclasses.replace(a1, uuid="b", incarnation="7:2", cpu_ns=3 * 10**9)  # restarted
    doc = host_doc("/sys/fs/cgroup/machine.slice/cpu.stat", (10**10, 10**10 + 5 * 10**9),
                   [a0, b0], [a1, b1])
    h = doc["host"]
    assert (h["parent_cpu_growth_ns"], h["domains_cpu_growth_ns"]) == (5 * 10**9, 4 * 10**9)
    assert h["unattributed_cpu_ns"] == 10**9 and h["interval_s"] == 2.0
    text = render_text([doc])
    assert "unattributed CPU" in text and "1,000.0 ms" in text
    none = render_text([host_doc(None, (None, None), [a0], [a1])])
    assert "no cgroup v2 parent" in none
