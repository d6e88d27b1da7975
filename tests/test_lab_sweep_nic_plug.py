"""A NIC hot-plugged into a running guest and unplugged again, with the daemon's passes more
frequent than its light samples (found by the billing sweep of 2026-12-07).

The stop watch keeps a deleted tap's final counters only for the taps the light-samples thread
told it to follow, and the thread was told again only when a pass brought a new tail (a new
domain or process) or at a light sample, which a host whose passes come more often than
`watched_sample_interval_s` never takes. A hot-plugged NIC keeps its tail's key, so its tap was
never followed: its unplug woke nothing and the next pass, reading the guest without it, billed
none of its bytes since the pass before. QEMU reads the tap's queue as it lets the NIC go, so
on a guest that did not bring the NIC up nearly all of them show only in the final counters:
the sweep saw 632 of 68,336 bytes billed. Now a pass that reads another set of taps for a tail
moves the watch (`tails.watch_moved`): billed exactly the final counters of both taps.

The unit tests of the same rule run on recorded hosts, without the lab
(`test_a_pass_that_finds_a_domain_on_another_tap_has_the_thread_watch_it`, below, and
tests/accounting/test_tails.py).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import lab_support
from tests.test_collector import editable_host, make_collector
from tests.test_lab import DaemonProc, assert_tiles, events_for, write_config

SLOT = 97  # the guest's own tap hatap97; no other test uses it
PLUG = 197  # the hot-plugged NIC's tap hatap197, host end 169.254.197.1/24
PLUG_MAC = "52:54:00:4c:ac:c5"


@pytest.fixture
def guest(lab_guests: list[str]) -> Iterator[str]:
    name = f"hasweep-{os.getpid() % 1000}"
    lab_support.define_extra_guest(name, SLOT)
    try:
        yield name
    finally:
        lab_support.remove_guest(name)
        subprocess.run(["ip", "link", "del", f"{lab_support.TAP_PREFIX}{PLUG}"],
                       capture_output=True, check=False)


def _passes(log: Path) -> int:
    try:
        return log.read_text(errors="replace").count('"msg":"pass committed"')
    except OSError:
        return 0


def _wait_passes(log: Path, k: int, timeout_s: float = 30) -> None:
    want = _passes(log) + k
    deadline = time.monotonic() + timeout_s
    while _passes(log) < want:
        assert time.monotonic() < deadline, f"no {k} passes in {timeout_s} s"
        time.sleep(0.05)


def _virsh(*args: str) -> None:
    subprocess.run(["virsh", "-c", lab_support.URI, *args], check=True, capture_output=True,
                   timeout=60, stdin=subprocess.DEVNULL)


def _send_udp(dst: str, stop: threading.Event) -> None:
    """500-byte datagrams every 20 ms out of the host end of the plugged tap: the guest's
    ingress (it never brings that NIC up, so QEMU leaves them queued until the unplug)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                s.sendto(b"u" * 500, (dst, 9))
            stop.wait(0.02)


def _plugged_nic(tmp_path: Path) -> tuple[Path, str]:
    """The hot-plugged NIC's XML and its tap's name."""
    plug = f"{lab_support.TAP_PREFIX}{PLUG}"
    nic = tmp_path / "nic.xml"
    nic.write_text(f"<interface type='ethernet'><mac address='{PLUG_MAC}'/>"
                   f"<target dev='{plug}'/><model type='virtio'/></interface>")
    return nic, plug


def _plug_send_unplug(guest: str, nic: Path, plug: str, send_s: float) -> tuple[int, int]:
    """Attach the NIC, send datagrams to the guest through it for `send_s`, detach it: the
    plugged tap's final host-side (rx, tx) bytes."""
    from tests.test_lab_billing_tail import TapEnd

    _virsh("attach-device", guest, str(nic), "--live")
    subprocess.run(["sysctl", "-q", "-w", f"net.ipv6.conf.{plug}.disable_ipv6=1"],
                   capture_output=True, check=False)
    for cmd in (["addr", "replace", f"169.254.{PLUG}.1/24", "dev", plug],
                ["link", "set", plug, "up"],
                ["neigh", "replace", f"169.254.{PLUG}.2", "lladdr", PLUG_MAC, "dev", plug]):
        subprocess.run(["ip", *cmd], check=True, capture_output=True)
    stop = threading.Event()
    sender = threading.Thread(target=_send_udp, args=(f"169.254.{PLUG}.2", stop))
    sender.start()
    try:
        time.sleep(send_s)
        plug_end = TapEnd(plug)
        _virsh("detach-device", guest, str(nic), "--live")
        return plug_end.wait()
    finally:
        stop.set()
        sender.join()


def _destroyed_and_billed(tmp_path: Path, guest: str, log: Path, plugged: tuple[int, int],
                          d: DaemonProc, passes: int = 2) -> None:
    """Destroy the guest, let its close-out commit (`passes` later), stop the daemon; its
    events bill every byte of its own tap and of the plugged one, once."""
    from tests.test_lab_billing_tail import TapEnd

    try:
        tap_end = TapEnd(f"{lab_support.TAP_PREFIX}{SLOT}")
        lab_support.destroy_guest(guest)
        own = tap_end.wait()
        _wait_passes(log, passes, timeout_s=60)  # the close-out
    finally:
        assert d.stop() == 0
    evs = events_for(tmp_path / "events.jsonl", guest)
    assert evs and len({e["event_id"] for e in evs}) == len(evs)
    assert_tiles(evs)
    egress = sum(round(e["metrics"]["network_egress_mb"] * 2**20) for e in evs)
    ingress = sum(round(e["metrics"]["network_ingress_mb"] * 2**20) for e in evs)
    print(f"plugged tap final {plugged}, own tap final {own}; billed egress {egress}, "
          f"ingress {ingress}")
    assert plugged[1] > 10_000  # the datagrams reached the plugged tap
    # Host rx is the guest's egress, host tx its ingress: every byte of both taps, once.
    assert (egress, ingress) == (own[0] + plugged[0], own[1] + plugged[1])


@pytest.mark.lab
def test_a_hot_plugged_nic_unplugged_again_is_billed_to_its_final_counters(
        tmp_path: Path, guest: str) -> None:
    log = tmp_path / "daemon.log"
    nic, plug = _plugged_nic(tmp_path)
    d = DaemonProc(write_config(tmp_path, interval_s=1.0), log)  # passes every 1 s: no
    try:  # periodic light sample is ever due (watched_sample_interval_s 10 s)
        _wait_passes(log, 1)
        time.sleep(2)  # the guest starts clearly after the store existed: billed from zero
        lab_support.start_guest(guest)
        _wait_passes(log, 2)
        plugged = _plug_send_unplug(guest, nic, plug, 3.5)  # passes read the plugged NIC
        _wait_passes(log, 2)  # the pass that reads the guest without it, and one more
    except BaseException:
        d.stop()
        raise
    _destroyed_and_billed(tmp_path, guest, log, plugged, d)


@pytest.mark.lab
def test_a_nic_plugged_and_unplugged_between_two_passes_is_billed(
        tmp_path: Path, guest: str) -> None:
    """No pass ever reads the plugged NIC: libvirt's DEVICE_ADDED has the daemon read the
    guest's taps at once, so the stop watch follows the new tap and its end is sampled with
    its final counters; the next pass bills that tap from zero (it was born after the pass
    before). Before, every byte of it was lost (46,044 of 46,044 at a 10 s interval)."""
    log = tmp_path / "daemon.log"
    nic, plug = _plugged_nic(tmp_path)
    d = DaemonProc(write_config(tmp_path, interval_s=12.0), log)
    try:
        _wait_passes(log, 1)
        time.sleep(2)
        lab_support.start_guest(guest)
        _wait_passes(log, 1, timeout_s=40)  # a pass read the guest
        before = _passes(log)
        plugged = _plug_send_unplug(guest, nic, plug, 2.0)
        assert _passes(log) == before, "a pass ran while the NIC was plugged"
        _wait_passes(log, 1, timeout_s=40)  # the pass that bills it
    except BaseException:
        d.stop()
        raise
    _destroyed_and_billed(tmp_path, guest, log, plugged, d, passes=1)


async def test_a_pass_that_finds_a_domain_on_another_tap_has_the_thread_watch_it(
        tmp_path: Path) -> None:
    """Not a lab test: the recorded systemd-v2 host. A NIC hot-plugged or re-plugged into a
    running VM keeps its tail's key: the pass that first reads its tap must still tell the
    light-samples thread (`Collector.on_new_tails`), or the stop watch never follows that tap
    (before, only new tail keys told it: this test failed at the re-plugged tap)."""
    host = editable_host(tmp_path, "systemd-v2")
    coll, store = make_collector(host, tmp_path, lifecycle_events=False)
    told: list[int] = []
    coll.on_new_tails = lambda: told.append(1)
    assert (await coll.run_pass()).committed
    assert len(told) == 1  # the first pass: every tail is new
    host.clock.advance(1.0)
    assert (await coll.run_pass()).committed
    assert len(told) == 1  # the same taps: nothing to watch anew
    anchor = next(t.anchor for t in coll.tails.values() if t.anchor.netlink_nics)
    assert anchor.netlink_nics is not None
    tap = next(iter(anchor.netlink_nics.values()))
    assert tap.ifindex is not None
    # the NIC re-plugged: its tap again under the same name, with a new ifindex
    (host.src / "t0" / "sys" / "class" / "net" / str(tap.ifname) / "ifindex").write_text(
        f"{tap.ifindex + 1000}\n")
    host.clock.advance(1.0)
    assert (await coll.run_pass()).committed
    assert any(n.ifindex == tap.ifindex + 1000 for t in coll.tails.values()
               if t.anchor.netlink_nics for n in t.anchor.netlink_nics.values())
    assert len(told) == 2
    host.clock.advance(1.0)
    assert (await coll.run_pass()).committed
    assert len(told) == 2
    store.close()
