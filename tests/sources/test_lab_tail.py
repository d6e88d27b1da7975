"""The billing tail's parts on a real lab guest (qemu:///system; a throwaway guest of this test,
never halab-*): lifecycle events of start and destroy, light samples of its real cgroup and tap,
and the close-out after `virsh destroy` against libvirt's own `cpu.time` read just before it."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator

import pytest
import trio

from hostagent.accounting.closeout import close_out
from hostagent.accounting.lifecycle import Action, LifecycleEvent, action_for
from hostagent.clock import SystemClock
from hostagent.model import Sample
from hostagent.sources.fdcache import FdCache
from hostagent.sources.files import HostRoot
from hostagent.sources.lifecycle import LifecycleWatcher, Message
from hostagent.sources.light import LightNic, LightSampler, LightTarget
from hostagent.sources.netstats import LinkStats64Reader
from tests import lab_support

pytestmark = pytest.mark.lab

SLOT = 94  # lab slot (tap hatap94) no other test uses
MAC = "52:54:00:00:00:5e"  # only a key here


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
