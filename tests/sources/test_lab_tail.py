"""The billing tail's parts on a real lab guest (qemu:///system; a throwaway guest of this test,
never halab-*, which are only read): lifecycle events of start and destroy, light samples of its
real cgroup and tap, the close-out after `virsh destroy` against libvirt's own `cpu.time` read
just before it, and the unattributed CPU of the lab's `machine` partition across both."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from hostagent.accounting.closeout import close_out
from hostagent.accounting.lifecycle import Action, DeviceAdded, LifecycleEvent, action_for
from hostagent.accounting.unattributed import advance
from hostagent.clock import SystemClock
from hostagent.model import Sample, Usage
from hostagent.sources.fdcache import FdCache
from hostagent.sources.files import HostRoot
from hostagent.sources.lifecycle import LifecycleWatcher, Message
from hostagent.sources.light import LightNic, LightSampler, LightTarget
from hostagent.sources.netstats import LinkStats64Reader
from hostagent.sources.unattributed import parent_cpu_stat, read_parent_cpu_ns
from tests import lab_support
from tests.sources.conftest import XmlHooks

pytestmark = pytest.mark.lab

SLOT = 94  # lab slot (tap hatap94) no other test uses
MAC = "52:54:00:00:00:5e"  # only a key here
SAMPLE_S = 0.2


@pytest.fixture
def tail_guest(lab_guests: list[str]) -> Iterator[str]:
    name = f"hatail-{os.getpid() % 1000}"
    lab_support.define_extra_guest(name, SLOT)
    try:
        yield name
    finally:
        lab_support.remove_guest(name)


async def _events_of(recv: trio.MemoryReceiveChannel[Message], name: str,
                     until: str) -> list[LifecycleEvent]:
    out: list[LifecycleEvent] = []
    async for msg in recv:
        if isinstance(msg, LifecycleEvent) and msg.name == name:
            out.append(msg)
            if msg.kind.name == until:
                return out
    return out


async def test_destroy_is_billed_to_the_last_light_sample(tail_guest: str) -> None:
    name = tail_guest
    clock = SystemClock()
    watcher = LifecycleWatcher(lab_support.URI, clock=clock)
    send, recv = trio.open_memory_channel[Message](1000)
    fds, links = FdCache(), LinkStats64Reader()
    try:
        with trio.fail_after(180):
            async with trio.open_nursery() as nursery:
                await nursery.start(watcher.run, send)
                await trio.to_thread.run_sync(lab_support.start_guest, name)
                started = await _events_of(recv, name, "STARTED")
                assert action_for(started[-1]) is Action.READ_NOW and started[-1].domid > 0
                cg = lab_support.vm_cgroup_v2_dir(name)
                qemu_started_ns = lab_support.guest_start_wall_ns(name)
                tap = f"{lab_support.TAP_PREFIX}{SLOT}"
                target = LightTarget("u", started[-1].domid, f"{cg}/cpu.stat", None,
                                     (LightNic(MAC, tap, socket.if_nametoindex(tap)),))
                sampler = LightSampler(HostRoot("/"), fds=fds, links=links, clock=clock)
                anchor_light = sampler.sample([target])["u"]
                await trio.sleep(3)  # the guest pings the host every second: taps move
                last = sampler.sample([target])["u"]
                cpu_time = int(lab_support.virsh_domstats_raw(name)["cpu.time"])
                read_gap_s = (time.time_ns() - last.t_wall_ns) / 1e9
                host_rx, host_tx = lab_support.tap_stats(tap)
                await trio.to_thread.run_sync(lab_support.destroy_guest, name)
                ended = await _events_of(recv, name, "STOPPED")
                after = sampler.sample([target])["u"]
                nursery.cancel_scope.cancel()
    finally:
        fds.close()
        links.close()
    assert [e.kind.name for e in ended][-1] == "STOPPED" and ended[-1].detail == "DESTROYED"
    assert action_for(ended[-1]) is Action.CLOSE
    # After the destroy the cgroup and the tap are gone: nothing is read that is not the VM's.
    assert after.cpu_ns is None and after.nics == ()
    assert last.cpu_ns is not None and last.nics
    # libvirt's cpu.time is the cgroup's counter: read right after the last sample, it is
    # ahead by at most the CPU of that gap (1 vCPU) plus the usec rounding.
    assert 0 <= cpu_time - last.cpu_ns <= int(read_gap_s * 1e9) + 1000
    assert last.nics[0].guest_tx_bytes <= host_rx and last.nics[0].guest_rx_bytes <= host_tx

    # A VM started after the store existed, never seen by a pass: billed from its own zero.
    anchor = Sample(instance_id="i", uuid="u", name=name, domid=started[-1].domid,
                    incarnation=f"{started[-1].domid}:x", started_wall_ns=qemu_started_ns,
                    t_wall_ns=anchor_light.t_wall_ns, vcpus=1, memory_alloc_bytes=160 << 20,
                    cpu_ns=anchor_light.cpu_ns, memory=None, nics=anchor_light.nics)
    out = close_out(None, anchor, last, reason="DESTROYED",
                    store_created_ns=qemu_started_ns - 60 * 10**9)
    assert out.usage is not None
    assert (out.usage.period_start_ns, out.usage.period_end_ns) == (qemu_started_ns,
                                                                    last.t_wall_ns)
    assert out.usage.cpu_ns == last.cpu_ns  # from its own zero to the last reading
    assert out.usage.net_egress_bytes == last.nics[0].guest_tx_bytes > 0
    assert out.usage.net_ingress_bytes == last.nics[0].guest_rx_bytes > 0


def _usage(name: str, start_ns: int, end_ns: int, cpu_ns: int) -> Usage:
    return Usage(
        instance_id=name, uuid=name, name=name, incarnation="1", new_incarnation=False,
        period_start_ns=start_ns, period_end_ns=end_ns, vcpus=1, memory_alloc_bytes=1,
        cpu_ns=cpu_ns, cpu_seconds=cpu_ns // 10**9, cpu_percent_avg=None, memory_bytes=None,
        memory_source=None, memory_percent=None, storage_bytes=None,
        storage_capacity_bytes=None, net_egress_bytes=0, net_ingress_bytes=0,
        disk_read_bytes=0, disk_write_bytes=0, gpu_count=0, gpu_seconds=0, gpu_util_avg=None)


def test_unattributed_cpu_stays_near_zero_across_a_start_and_a_destroy(tail_guest: str) -> None:
    """The lab's `machine` partition grows by exactly what the guests' readings account for,
    a destroyed guest's close-out included; only its tail after the last sample is left, and a
    guest nobody billed shows up in full."""
    root, clock = HostRoot("/"), SystemClock()
    parent = parent_cpu_stat(root)
    assert parent is not None
    # Every VM cgroup in the partition now (the lab may run more guests than this test asked
    # for, started by other tests); the throwaway guest is not started yet.
    running = sorted(str(d) for d in Path(parent).parent.iterdir() if d.is_dir())
    fds = FdCache()
    sampler = LightSampler(root, fds=fds, links=None, clock=clock)

    def targets(names: list[str]) -> list[LightTarget]:
        return [LightTarget(n, 0, f"{lab_support.vm_cgroup_v2_dir(n)}/cpu.stat", None)
                for n in names]

    try:
        before_targets = [LightTarget(d, 0, f"{d}/cpu.stat", None) for d in running]
        p0 = read_parent_cpu_ns(root, parent)
        s0 = sampler.sample(before_targets)
        tracker = advance(None, p0, clock.now().wall_ns, [])
        t0 = clock.now().wall_ns
        lab_support.start_guest(tail_guest)
        mine = targets([tail_guest])
        last = sampler.sample(mine)[tail_guest]
        for _ in range(4):
            time.sleep(0.5)
            last = sampler.sample(mine)[tail_guest]
        # Light samples go on while the guest is destroyed, as the daemon's would.
        killer = threading.Thread(target=lab_support.destroy_guest, args=(tail_guest,))
        killer.start()
        while killer.is_alive():
            now = sampler.sample(mine)[tail_guest]
            if now.cpu_ns is not None:
                last = now
            time.sleep(SAMPLE_S)
        killer.join()
        s1 = sampler.sample(before_targets)
        p1 = read_parent_cpu_ns(root, parent)
        t1 = clock.now().wall_ns
    finally:
        fds.close()
    assert last.cpu_ns is not None and p0 is not None and p1 is not None
    usages = [_usage(n, t0, t1, (s1[n].cpu_ns or 0) - (s0[n].cpu_ns or 0)) for n in running]
    closed = _usage(tail_guest, t0, last.t_wall_ns, last.cpu_ns)  # from its own zero
    billed = advance(tracker, p1, t1, [*usages, closed])
    unbilled = advance(tracker, p1, t1, usages)
    assert billed is not None and unbilled is not None
    print(f"unattributed: {billed.total_ns / 1e6:.1f} ms billed, {unbilled.total_ns / 1e6:.1f} ms "
          f"unbilled; destroyed guest {last.cpu_ns / 1e6:.1f} ms, partition grew "
          f"{(p1 - p0) / 1e6:.1f} ms")
    # Near zero: the destroyed guest's CPU after its last sample (one sample interval, at most
    # both cores of this host), the other guests' CPU between their reads and the parent's,
    # and the usec rounding.
    assert billed.total_ns <= int(SAMPLE_S * 2e9) + 20_000_000, billed
    # A VM no event billed is visible in full, up to the usec rounding: each cgroup's
    # usage_usec is floored on its own, so the partition's growth and the sum of its
    # children's can differ by 1 us per cgroup and read (seen: 1 us short).
    rounding_ns = 1_000 * (2 * len(running) + 1 + 2)
    assert unbilled.total_ns >= last.cpu_ns - rounding_ns


async def test_a_metadata_edit_is_told_to_the_inventory_by_libvirtd(
        tail_guest: str, xml_hooks: XmlHooks) -> None:
    """libvirtd's METADATA_CHANGE reaches `on_xml_change` on a read-only subscription (the
    throwaway guest, defined and not running: its persistent config is edited)."""
    import libvirt

    watcher = LifecycleWatcher("qemu:///system", clock=SystemClock(),
                               on_xml_change=xml_hooks.tell,
                               on_xml_heard=xml_hooks.heard.append)
    send, recv = trio.open_memory_channel[Message](100)
    conn = libvirt.open("qemu:///system")
    try:
        dom = conn.lookupByName(tail_guest)
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                await nursery.start(watcher.run, send)
                await recv.receive()
                assert xml_hooks.heard == [True]
                await trio.to_thread.run_sync(
                    lambda: dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, "<o v='1'/>",
                                            "t", "https://hostagent.example/t",
                                            libvirt.VIR_DOMAIN_AFFECT_CONFIG))
                assert await trio.to_thread.run_sync(xml_hooks.got.wait, 20)
                nursery.cancel_scope.cancel()
        assert xml_hooks.heard == [True, False] and watcher.callback_errors == 0
    finally:
        conn.close()


async def test_a_device_attached_is_sent_and_one_detached_is_told_with_its_alias_and_when(
        tail_guest: str, xml_hooks: XmlHooks, tmp_path: Path) -> None:
    """libvirtd's DEVICE_ADDED of a running guest goes down the channel as `DeviceAdded` (the
    billing tail then reads the guest's new taps: tailing.TailTasks._read_taps), and its
    DEVICE_REMOVED reaches `on_xml_change` with the device's alias and the wall time it was
    heard (what a GPU's hot-unplug is billed from: accounting/gpu_change.py; the lab has no
    GPU, its NIC stands in), sending nothing down the channel. (libvirt deletes the plugged
    tap with the guest.)"""
    plug = f"{lab_support.TAP_PREFIX}{SLOT + 100}"
    nic = tmp_path / "nic.xml"
    nic.write_text("<interface type='ethernet'><mac address='52:54:00:4c:ac:de'/>"
                   f"<target dev='{plug}'/><model type='virtio'/></interface>")
    watcher = LifecycleWatcher(lab_support.URI, clock=SystemClock(),
                               on_xml_change=xml_hooks.tell,
                               on_xml_heard=xml_hooks.heard.append)
    send, recv = trio.open_memory_channel[Message](1000)

    def virsh(*args: str) -> None:
        subprocess.run(["virsh", "-c", lab_support.URI, *args], check=True,
                       capture_output=True, timeout=60, stdin=subprocess.DEVNULL)

    def told_a_device() -> bool:  # (a metadata edit would set `got` without one)
        end = time.monotonic() + 60
        while not xml_hooks.devices and time.monotonic() < end:
            time.sleep(0.05)
        return bool(xml_hooks.devices)

    with trio.fail_after(180):
        async with trio.open_nursery() as nursery:
            await nursery.start(watcher.run, send)
            await trio.to_thread.run_sync(lab_support.start_guest, tail_guest)
            uuid = lab_support.domain_uuid(tail_guest)
            before_ns = time.time_ns()
            await trio.to_thread.run_sync(virsh, "attach-device", tail_guest, str(nic),
                                          "--live")
            added = None
            while added is None:
                msg = await recv.receive()
                if isinstance(msg, DeviceAdded):
                    added = msg
            assert added.uuid == uuid and added.alias == "net1", added
            assert before_ns <= added.t_wall_ns <= time.time_ns()
            assert await trio.to_thread.run_sync(told_a_device)  # the inventory's too
            xml_hooks.devices.clear()
            before_ns = time.time_ns()
            await trio.to_thread.run_sync(
                virsh, "detach-interface", tail_guest, "ethernet",
                "--mac", f"52:54:00:4c:ab:{SLOT:02x}", "--live")
            assert await trio.to_thread.run_sync(told_a_device)
            after_ns = time.time_ns()
            nursery.cancel_scope.cancel()
    (told_uuid, alias, wall_ns), = xml_hooks.devices
    assert told_uuid.lower() == uuid and alias == "net0", xml_hooks.devices
    assert wall_ns is not None and before_ns <= wall_ns <= after_ns
    while True:  # nothing but lifecycle events after it: a removal sends no DeviceAdded
        try:
            assert not isinstance(recv.receive_nowait(), DeviceAdded)
        except trio.WouldBlock:
            break
    assert watcher.callback_errors == 0 and watcher.dropped == 0
