"""Link counters: netlink dump (checked against pyroute2 and real traffic), sysfs, NIC matching."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns

from hostagent.accounting.inventory import keyed_nics
from hostagent.errors import SourceError
from hostagent.model import Nic, NicCounters
from hostagent.sources.files import HostRoot
from hostagent.sources.net import LinkStats, LinkStatsReader, SysfsLinkReader, nic_counters

HOSTS = Path(__file__).parents[2] / "fixtures" / "hosts"


def links_json(host: str, t: str) -> list[dict[str, Any]]:
    return list(json.loads((HOSTS / host / t / "net" / "links.json").read_text()))


# --- sysfs fallback on the recorded trees -------------------------------------------------------


@pytest.mark.parametrize("host", ["lab-hybrid", "systemd-v2"])
@pytest.mark.parametrize("t", ["t0", "t1"])
def test_sysfs_reader_matches_the_recorded_links(host: str, t: str) -> None:
    got = SysfsLinkReader(HostRoot(HOSTS / host / t)).read()
    assert got == {
        link["name"]: LinkStats(ifindex=link["ifindex"], ifname=link["name"], mac=link["mac"],
                                rx_bytes=link["rx_bytes"], tx_bytes=link["tx_bytes"],
                                source="sysfs")
        for link in links_json(host, t)
    }


def test_sysfs_reader_by_name_and_on_an_empty_root(tmp_path: Path) -> None:
    root = HostRoot(HOSTS / "lab-hybrid" / "t0")
    assert set(SysfsLinkReader(root).read(["hatap2", "gone0", "../x"])) == {"hatap2"}
    assert SysfsLinkReader(HostRoot(tmp_path)).read() == {}


def test_one_unreadable_link_costs_only_that_link(tmp_path: Path) -> None:
    """EACCES on one link's counter leaves that link out; the others are still read."""
    import shutil

    shutil.copytree(HOSTS / "lab-hybrid" / "t0", tmp_path / "t0", symlinks=True)
    rx = tmp_path / "t0/sys/class/net/hatap1/statistics/rx_bytes"
    rx.unlink()
    rx.symlink_to("/sys/bus/pci/rescan")  # write-only sysfs file: EACCES even for root
    got = SysfsLinkReader(HostRoot(tmp_path / "t0")).read()
    assert "hatap1" not in got
    assert got["hatap2"].rx_bytes is not None


def test_sysfs_reader_on_this_host_agrees_with_netlink() -> None:
    netlink = LinkStatsReader()
    try:
        by_netlink = netlink.read()
    finally:
        netlink.close()
    by_sysfs = SysfsLinkReader(HostRoot()).read(["lo"])
    assert by_sysfs["lo"].ifindex == by_netlink["lo"].ifindex
    assert by_sysfs["lo"].mac == by_netlink["lo"].mac


# --- matching NICs (pure) -----------------------------------------------------------------------


def test_lab_taps_are_mirrored_and_keyed_by_mac() -> None:
    guests = json.loads((HOSTS / "lab-hybrid" / "meta.json").read_text())["guests"]
    nics = [Nic(mac=g["guest_mac"], kind="ethernet", target=g["tap"]) for g in guests]
    per_t: dict[str, tuple[NicCounters, ...]] = {}
    for t in ("t0", "t1"):
        links = SysfsLinkReader(HostRoot(HOSTS / "lab-hybrid" / t)).read()
        counters, missing = nic_counters(nics, links)
        assert missing == {}
        for c, link in zip(counters, links_json("lab-hybrid", t), strict=True):
            assert c.mac == link["guest_mac"]
            assert c.ifname == link["name"]
            assert c.ifindex == link["ifindex"]
            assert c.guest_rx_bytes == link["tx_bytes"]  # host tx entered the guest
            assert c.guest_tx_bytes == link["rx_bytes"]  # host rx left the guest
            assert c.source == "sysfs"
        per_t[t] = counters
    for c0, c1 in zip(per_t["t0"], per_t["t1"], strict=True):
        assert c1.guest_rx_bytes > c0.guest_rx_bytes
        assert c1.guest_tx_bytes > c0.guest_tx_bytes


def test_systemd_host_nics_without_host_counters_are_named() -> None:
    links = SysfsLinkReader(HostRoot(HOSTS / "systemd-v2" / "t1")).read()
    nics = [
        Nic(mac="52:54:00:a1:00:02", kind="user", target=None, model="virtio"),
        Nic(mac="52:54:00:a1:00:01", kind="network", target="vnet3", model="virtio"),
        Nic(mac="52:54:00:b2:00:01", kind="bridge", target="vnet5", model="virtio"),
        Nic(mac="52:54:00:b2:00:02", kind="hostdev", target=None),
    ]
    counters, missing = nic_counters(nics, links)
    assert [c.mac for c in counters] == ["52:54:00:a1:00:01", "52:54:00:b2:00:01"]
    assert counters[0].guest_rx_bytes == links["vnet3"].tx_bytes
    assert counters[1].guest_tx_bytes == links["vnet5"].rx_bytes
    assert set(missing) == {"net:52:54:00:a1:00:02", "net:52:54:00:b2:00:02"}
    assert "no host tap" in missing["net:52:54:00:a1:00:02"]
    assert "bypasses the host kernel" in missing["net:52:54:00:b2:00:02"]


def test_odd_nics() -> None:
    links = {
        "tap0": LinkStats(ifindex=5, ifname="tap0", mac="fe:00:00:00:00:01", rx_bytes=10,
                          tx_bytes=20, kind="tun"),
        "macvtap0": LinkStats(ifindex=6, ifname="macvtap0", mac=None, rx_bytes=30, tx_bytes=40,
                              kind="macvtap"),
        "macvtap1": LinkStats(ifindex=8, ifname="macvtap1", mac=None, rx_bytes=30, tx_bytes=40,
                              kind="macvtap"),
        "old0": LinkStats(ifindex=7, ifname="old0", mac=None, rx_bytes=None, tx_bytes=None),
    }
    nics = [
        Nic(mac="aa:00:00:00:00:01", kind="vhostuser", target="vhost-user0"),
        Nic(mac="aa:00:00:00:00:02", kind="direct", target="macvtap0"),
        Nic(mac="aa:00:00:00:00:03", kind="ethernet", target="macvtap1"),  # managed='no'
        Nic(mac="aa:00:00:00:00:04", kind="bridge", target="tap9"),
        Nic(mac="aa:00:00:00:00:05", kind="ethernet", target="old0"),
        Nic(mac="aa:00:00:00:00:06", kind="ethernet", target=""),
        Nic(mac="aa:00:00:00:00:07", kind="vdpa", target=None),
        Nic(mac="aa:00:00:00:00:08", kind="ethernet", target="tap0"),
    ]
    counters, missing = nic_counters(nics, links)
    by_mac = {c.mac: c for c in counters}
    # macvtap shares the guest's view: its rx is what the guest received, not swapped.
    assert (by_mac["aa:00:00:00:00:02"].guest_rx_bytes,
            by_mac["aa:00:00:00:00:02"].guest_tx_bytes) == (30, 40)
    assert (by_mac["aa:00:00:00:00:03"].guest_rx_bytes,
            by_mac["aa:00:00:00:00:03"].guest_tx_bytes) == (30, 40)
    assert (by_mac["aa:00:00:00:00:08"].guest_rx_bytes,
            by_mac["aa:00:00:00:00:08"].guest_tx_bytes) == (20, 10)
    assert by_mac["aa:00:00:00:00:08"].source == "netlink"
    assert "user space" in missing["net:aa:00:00:00:00:01"]
    assert "tap9 not found" in missing["net:aa:00:00:00:00:04"]
    assert "no 64-bit" in missing["net:aa:00:00:00:00:05"]
    assert "without a target" in missing["net:aa:00:00:00:00:06"]
    assert "vDPA" in missing["net:aa:00:00:00:00:07"]
    assert len(counters) + len(missing) == len(nics)


def test_nics_sharing_a_mac_each_read_their_own_tap_and_a_tap_counts_once() -> None:
    links = {
        "vnet0": LinkStats(ifindex=50, ifname="vnet0", mac=None, rx_bytes=4, tx_bytes=2),
        "vnet1": LinkStats(ifindex=51, ifname="vnet1", mac=None, rx_bytes=8, tx_bytes=4),
    }
    mac = "52:54:00:de:ad:01"
    nics = keyed_nics([Nic(mac, "network", "vnet0"), Nic(mac, "network", "vnet1"),
                       Nic(mac, "network", "vnet1"), Nic(mac, "network", "vnet9")])
    counters, missing = nic_counters(nics, links)
    # Before: keyed by MAC downstream, both NICs were billed vnet1's bytes.
    assert [(c.key, c.ifindex, c.guest_tx_bytes) for c in counters] == [
        (f"{mac}@vnet0", 50, 4), (f"{mac}@vnet1", 51, 8)]
    assert "counted for another NIC" in missing[f"net:{mac}@vnet1+"]
    assert "vnet9 not found" in missing[f"net:{mac}"]


# --- netlink in a private network namespace -----------------------------------------------------

needs_netns = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2"
)


def ip(ns: str, *args: str, stdin: str | None = None) -> None:
    subprocess.run(["ip", "-n", ns, *args], input=stdin, text=True, check=True,
                   capture_output=True)


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh network namespace without IPv6 chatter; removed afterwards."""
    name = f"hatest{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "sh", "-c",
                        "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6;"
                        "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


def pyroute2_links(ns: str) -> dict[str, LinkStats]:
    """The reference decoding: every attribute parsed by pyroute2."""
    out = {}
    with IPRoute(netns=ns) as ipr:
        for msg in ipr.get_links():
            name = msg.get_attr("IFLA_IFNAME")
            stats = msg.get_attr("IFLA_STATS64")
            info = msg.get_attr("IFLA_LINKINFO")
            out[name] = LinkStats(
                ifindex=msg["index"], ifname=name, mac=msg.get_attr("IFLA_ADDRESS"),
                rx_bytes=stats["rx_bytes"], tx_bytes=stats["tx_bytes"],
                kind=info.get_attr("IFLA_INFO_KIND") if info else None,
            )
    return out


@needs_netns
def test_dump_counts_real_frames_and_agrees_with_pyroute2(netns: str) -> None:
    ip(netns, "link", "add", "hv0", "type", "veth", "peer", "name", "hv1")
    ip(netns, "tuntap", "add", "mode", "tap", "name", "hatapx")
    ip(netns, "link", "set", "hv0", "up")
    ip(netns, "link", "set", "hv1", "up")
    sock = pr_netns.create_socket(netns, family=socket.AF_PACKET, socket_type=socket.SOCK_RAW,
                                  proto=0, flags=0)
    with sock:
        sock.bind(("hv0", 0))
        frame = bytes.fromhex("ffffffffffff020000000001") + b"\x88\xb5" + bytes(46)  # 60 bytes
        for _ in range(3):
            sock.send(frame)
    reader = LinkStatsReader(netns=netns)
    try:
        # Until the frames have arrived and both decoders saw the same moment (a counter that
        # moves between the two dumps is not a disagreement).
        deadline = time.monotonic() + 5
        while True:
            links = reader.read()
            reference = pyroute2_links(netns)
            if (links["hv1"].rx_bytes == 180 and links == reference) or \
                    time.monotonic() > deadline:
                break
            time.sleep(0.01)
        assert links == reference, {n: (links.get(n), reference.get(n))
                                    for n in set(links) | set(reference)
                                    if links.get(n) != reference.get(n)}
    finally:
        reader.close()
    assert (links["hv0"].tx_bytes, links["hv0"].rx_bytes) == (180, 0)
    assert (links["hv1"].rx_bytes, links["hv1"].tx_bytes) == (180, 0)
    assert links["hv0"].kind == "veth"
    assert links["hatapx"].kind == "tun"
    assert links["hatapx"].mac is not None


@needs_netns
def test_a_thousand_links_in_one_dump(netns: str) -> None:
    ip(netns, "-batch", "-", stdin="".join(f"tuntap add mode tap name t{i}\n"
                                           for i in range(1000)))
    reader = LinkStatsReader(netns=netns)
    try:
        links = reader.read()  # spans many 32 KiB netlink batches
        again = reader.read()  # and the kept-open socket serves the next pass
    finally:
        reader.close()
    assert set(links) == {"lo"} | {f"t{i}" for i in range(1000)}
    assert again == links
    reference = pyroute2_links(netns)
    assert {n: link.ifindex for n, link in links.items()} == {
        n: link.ifindex for n, link in reference.items()}


@needs_netns
def test_reader_reopens_a_broken_socket(netns: str) -> None:
    reader = LinkStatsReader(netns=netns)
    try:
        first = reader.read()
        assert reader._sock is not None
        reader._sock.close()  # e.g. closed under us; the next read must not fail the pass
        assert reader.read() == first
        reader.close()
        assert reader.read() == first  # close() then read(): a new socket
    finally:
        reader.close()


def test_reader_is_not_reentrant() -> None:
    reader = LinkStatsReader()
    try:
        # The lock held = a previous (abandoned) read is still on the socket.
        with reader._lock, pytest.raises(SourceError, match="still running"):
            reader.read()
        assert "lo" in reader.read()
    finally:
        reader.close()


@needs_netns
def test_missing_netns_is_a_source_error() -> None:
    with pytest.raises(SourceError, match="link dump failed"):
        LinkStatsReader(netns=f"hostagent-absent-{os.getpid()}").read()
