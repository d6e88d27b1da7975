"""Lifecycle events on the pass's own libvirt connection (the daemon's set-up): libvirtd serves
and pings one client connection instead of two. Real libvirtd (test driver) behind the socket
proxy, which counts the connections and cuts them the way a libvirtd restart does."""

from __future__ import annotations

import uuid

import libvirt
import trio

from hostagent.accounting.lifecycle import LifecycleEvent, Reconnected
from hostagent.clock import SystemClock
from hostagent.config.schema import LibvirtConfig
from hostagent.sources.libvirt import LibvirtSource
from hostagent.sources.lifecycle import LifecycleWatcher, Message
from tests.sources.libvirt_proxy import SocketProxy
from tests.sources.test_lifecycle import LIFE, _collect, _kinds, _life


def shared(proxy: SocketProxy) -> tuple[LibvirtSource, LifecycleWatcher]:
    uri = f"test+unix:///default?socket={proxy.path}"
    lv = LibvirtSource(LibvirtConfig(uri=uri, call_timeout_s=5, reconnect_max_s=0.5),
                       clock=SystemClock(), limiter=trio.CapacityLimiter(4))
    watcher = LifecycleWatcher(uri, clock=SystemClock(), source=lv, keepalive_interval_s=1,
                               keepalive_count=1, reconnect_max_s=0.5)
    return lv, watcher


async def _next_reconnected(recv: trio.MemoryReceiveChannel[Message]) -> Reconnected:
    while True:  # events of the old connection may still be queued
        msg = await recv.receive()
        if isinstance(msg, Reconnected):
            return msg


async def test_events_and_passes_share_one_connection_across_a_cut(proxy: SocketProxy) -> None:
    lv, watcher = shared(proxy)
    send, recv = trio.open_memory_channel[Message](100)
    actor = libvirt.open("test+unix:///default")  # the same daemon, not through the proxy
    try:
        with trio.fail_after(40):
            async with trio.open_nursery() as nursery:
                await nursery.start(watcher.run, send)
                assert isinstance(await recv.receive(), Reconnected)
                assert (await lv.bulk_stats()).path == "bulk"
                assert proxy.connections == 1  # the pass reads on the events' connection
                before = f"lc-{uuid.uuid4().hex[:8]}"
                await trio.to_thread.run_sync(_life(actor, before))
                assert _kinds(await _collect(recv, before, 4)) == LIFE
                proxy.cut()  # libvirtd restarts: the close callback drops it for both
                msg = await _next_reconnected(recv)
                assert msg.reconnects == 1
                assert (await lv.bulk_stats()).path == "bulk"
                assert proxy.connections == 2  # one new connection, not one each
                after = f"lc-{uuid.uuid4().hex[:8]}"
                await trio.to_thread.run_sync(_life(actor, after))
                assert _kinds(await _collect(recv, after, 4)) == LIFE
                # The pass finds the connection broken (an RPC error): the events move with it.
                lv.drop_connection("an RPC error in a pass")
                await trio.sleep(0.6)  # the pass's reconnect backoff
                msg = await _next_reconnected(recv)
                assert msg.reconnects == 2
                assert (await lv.bulk_stats()).path == "bulk"
                assert proxy.connections == 3
                last = f"lc-{uuid.uuid4().hex[:8]}"
                await trio.to_thread.run_sync(_life(actor, last))
                assert _kinds(await _collect(recv, last, 4)) == LIFE
                nursery.cancel_scope.cancel()
        # Cancelled: the callbacks are taken back and the pass keeps its connection.
        assert (await lv.bulk_stats()).path == "bulk"
        assert proxy.connections == 3 and lv.state == "connected"
        gone = f"lc-{uuid.uuid4().hex[:8]}"
        await trio.to_thread.run_sync(_life(actor, gone))
        await trio.sleep(0.3)
        leftovers = []
        while True:
            try:
                leftovers.append(recv.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                break
        assert not [m for m in leftovers if isinstance(m, LifecycleEvent) and m.name == gone]
    finally:
        lv.close()
        actor.close()
    assert watcher.connects == 3 and watcher.callback_errors == 0


async def test_a_connection_opened_before_the_event_loop_is_replaced_once(
        proxy: SocketProxy) -> None:
    """Events and keepalive need libvirt's event loop registered before the connection opens:
    the pass's older connection is closed and the next one carries both."""
    lv, watcher = shared(proxy)
    send, recv = trio.open_memory_channel[Message](100)
    try:
        with trio.fail_after(30):
            await lv.bulk_stats()
            old = lv._conn
            assert old is not None
            old.events_ready = False  # as if opened before the loop (it is process-wide)
            async with trio.open_nursery() as nursery:
                await nursery.start(watcher.run, send)
                assert isinstance(await recv.receive(), Reconnected)
                assert lv._conn is not old and old.closing
                assert lv._conn is not None and lv._conn.events_ready
                assert (await lv.bulk_stats()).path == "bulk"
                assert proxy.connections == 2
                nursery.cancel_scope.cancel()
    finally:
        lv.close()
    assert watcher.connects == 1
