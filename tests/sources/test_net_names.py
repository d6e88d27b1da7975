"""The link reader between full link dumps: one RTM_GETSTATS dump over the last link names."""

from __future__ import annotations

import subprocess
import time

import pytest

from hostagent.errors import SourceError
from hostagent.model import Nic
from hostagent.sources import netstats
from hostagent.sources.net import LinkStatsReader, nic_counters
from tests.sources.test_net import ip, needs_netns, netns, pyroute2_links

__all__ = ["netns"]  # the fixture, imported for the tests below


def _veth_with_frames(ns: str, frames: int) -> None:
    """hv0 -> hv1: `frames` 60-byte frames through a raw socket in the namespace."""
    subprocess.run(["ip", "netns", "exec", ns, "python3", "-c",
                    "import socket; s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW);"
                    "s.bind(('hv0', 0)); f = bytes.fromhex('ffffffffffff020000000001') + "
                    f"b'\\x88\\xb5' + bytes(46); [s.send(f) for _ in range({frames})]"],
                   check=True)


@needs_netns
def test_between_link_dumps_only_counters_are_read_and_they_agree(netns: str) -> None:
    ip(netns, "link", "add", "hv0", "type", "veth", "peer", "name", "hv1")
    ip(netns, "tuntap", "add", "mode", "tap", "name", "hatap0")
    ip(netns, "link", "set", "hv0", "up")
    ip(netns, "link", "set", "hv1", "up")
    reader = LinkStatsReader(netns=netns)
    try:
        first = reader.read()
        _veth_with_frames(netns, 3)
        deadline = time.monotonic() + 5
        while (links := reader.read())["hv1"].rx_bytes != 180 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert reader.link_dumps == 1  # every read after the first: counters only
        assert dict(links) == pyroute2_links(netns)  # names, MACs, kinds and new counters
        assert links["hv0"].tx_bytes == 180 and first["hv0"].tx_bytes == 0
        nics = [Nic("52:54:00:00:00:01", "ethernet", "hv0"), Nic("52:54:00:00:00:02",
                                                                 "ethernet", "nope")]
        found, missing = nic_counters(nics, links)
        assert found == nic_counters(nics, dict(links))[0]  # the same as from a plain dict
        assert (found[0].guest_rx_bytes, found[0].guest_tx_bytes) == (180, 0)
        assert "nope not found" in missing["net:52:54:00:00:00:02"]
    finally:
        reader.close()


@needs_netns
def test_a_link_added_removed_or_made_again_is_seen_at_once(netns: str) -> None:
    ip(netns, "tuntap", "add", "mode", "tap", "name", "t1")
    reader = LinkStatsReader(netns=netns)
    try:
        old = reader.read()["t1"].ifindex
        ip(netns, "link", "del", "t1")
        ip(netns, "tuntap", "add", "mode", "tap", "name", "t1")  # same name, new ifindex
        again = reader.read()
        assert again["t1"].ifindex != old
        assert reader.link_dumps == 2
        ip(netns, "tuntap", "add", "mode", "tap", "name", "t2")
        assert "t2" in reader.read()
        ip(netns, "link", "del", "t1")
        assert "t1" not in reader.read()
        assert reader.link_dumps == 4
        assert {n: link.ifindex for n, link in reader.read().items()} == {
            n: link.ifindex for n, link in pyroute2_links(netns).items()}
        assert reader.link_dumps == 4
    finally:
        reader.close()


@needs_netns
def test_names_are_dumped_again_every_names_every_s(netns: str) -> None:
    now = [0.0]
    reader = LinkStatsReader(netns=netns, names_every_s=60, monotonic_s=lambda: now[0])
    try:
        reader.read()
        ip(netns, "link", "set", "lo", "address", "00:00:00:00:00:01")  # same ifindexes
        now[0] = 59.0
        assert reader.read()["lo"].mac == "00:00:00:00:00:00"  # the kept name map
        now[0] = 60.0
        assert reader.read()["lo"].mac == "00:00:00:00:00:01"
        assert reader.link_dumps == 2
    finally:
        reader.close()


@needs_netns
def test_a_kernel_refusing_stats_dumps_gets_full_dumps(netns: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def refused(*_: object) -> dict[int, tuple[int, int]]:
        calls.append(1)
        raise netstats.StatsRefused("netlink stats dump refused: Operation not supported")

    monkeypatch.setattr(netstats, "dump_stats64", refused)
    reader = LinkStatsReader(netns=netns)
    try:
        for _ in range(3):
            assert "lo" in reader.read()
        assert (reader.link_dumps, len(calls)) == (3, 1)  # asked once, then never again
    finally:
        reader.close()


@needs_netns
def test_a_failed_stats_dump_falls_back_to_a_full_dump(netns: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: object) -> dict[int, tuple[int, int]]:
        raise SourceError("netlink stats dump: malformed message header")

    reader = LinkStatsReader(netns=netns)
    try:
        reader.read()
        monkeypatch.setattr(netstats, "dump_stats64", broken)
        assert "lo" in reader.read()
        assert reader.link_dumps == 2
        monkeypatch.undo()
        reader.read()
        assert reader.link_dumps == 2  # stats dumps again
    finally:
        reader.close()
