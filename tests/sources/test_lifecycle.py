"""Lifecycle events from real libvirt: the in-process test driver, and libvirtd's test driver
through a private socket proxy that cuts or freezes our connection (what a libvirtd restart or
a hung daemon looks like to the client) without disturbing the shared daemon."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import libvirt
import pytest
import trio

from hostagent import handoff
from hostagent.accounting.lifecycle import (
    Action,
    LifecycleEvent,
    LifecycleKind,
    Reconnected,
    action_for,
    close_reason,
)
from hostagent.clock import SystemClock
from hostagent.sources.lifecycle import LifecycleWatcher, Message, to_event
from tests.sources.conftest import XmlHooks
from tests.sources.libvirt_proxy import SocketProxy


def domain_xml(name: str) -> str:
    return (f"<domain type='test'><name>{name}</name><uuid>{uuid.uuid4()}</uuid>"
            "<memory>65536</memory><vcpu>1</vcpu><os><type>hvm</type></os></domain>")


def ev(kind: LifecycleKind, detail: str = "", domid: int = 5) -> LifecycleEvent:
    return LifecycleEvent("u", "vm", domid, kind, detail, 0, 0)


def test_classifier() -> None:
    assert action_for(ev(LifecycleKind.STARTED, "BOOTED")) is Action.READ_NOW
    assert action_for(ev(LifecycleKind.RESUMED, "MIGRATED")) is Action.READ_NOW
    for kind in (LifecycleKind.SUSPENDED, LifecycleKind.SHUTDOWN, LifecycleKind.PMSUSPENDED):
        assert action_for(ev(kind)) is Action.READ_BEFORE_GONE
    for kind in (LifecycleKind.STOPPED, LifecycleKind.CRASHED):
        assert action_for(ev(kind, domid=-1)) is Action.CLOSE
    assert action_for(ev(LifecycleKind.UNDEFINED, domid=-1)) is Action.CLOSE
    assert action_for(ev(LifecycleKind.UNDEFINED, domid=7)) is Action.IGNORE  # still running
    assert action_for(ev(LifecycleKind.DEFINED)) is Action.IGNORE
    assert close_reason(ev(LifecycleKind.STOPPED, "MIGRATED")) == "MIGRATED"
    assert ev(LifecycleKind.SUSPENDED, "MIGRATED").migrated


def test_libvirt_numbers_become_names() -> None:
    e = to_event("ABC", "vm", 3, libvirt.VIR_DOMAIN_EVENT_STOPPED,
                 libvirt.VIR_DOMAIN_EVENT_STOPPED_MIGRATED, wall_ns=1, monotonic_ns=2)
    assert e is not None and (e.uuid, e.kind, e.detail) == ("abc", LifecycleKind.STOPPED,
                                                            "MIGRATED")
    assert to_event("a", "vm", 3, 99, 0, wall_ns=1, monotonic_ns=2) is None


async def _collect(recv: trio.MemoryReceiveChannel[Message], name: str,
                   n: int) -> list[LifecycleEvent]:
    out: list[LifecycleEvent] = []
    async for msg in recv:
        if isinstance(msg, LifecycleEvent) and msg.name == name:
            out.append(msg)
            if len(out) == n:
                return out
    return out


def _life(conn: libvirt.virConnect, name: str) -> Callable[[], None]:
    def run() -> None:
        dom = conn.createXML(domain_xml(name), 0)
        dom.suspend()
        dom.resume()
        dom.destroy()
    return run


def _kinds(events: list[LifecycleEvent]) -> list[tuple[str, str]]:
    return [(e.kind.name, e.detail) for e in events]


LIFE = [("STARTED", "BOOTED"), ("SUSPENDED", "PAUSED"), ("RESUMED", "UNPAUSED"),
        ("STOPPED", "DESTROYED")]


async def test_events_of_the_in_process_test_driver() -> None:
    watcher = LifecycleWatcher("test:///default", clock=SystemClock(),
                               connector=libvirt.open)
    send, recv = trio.open_memory_channel[Message](100)
    name = f"lc-{uuid.uuid4().hex[:8]}"
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(watcher.run, send)
            first = await recv.receive()
            assert isinstance(first, Reconnected) and first.reconnects == 0
            conn = libvirt.open("test:///default")
            await trio.to_thread.run_sync(_life(conn, name))
            events = await _collect(recv, name, 4)
            nursery.cancel_scope.cancel()
    conn.close()
    assert _kinds(events) == LIFE
    assert events[0].domid > 0 and len({e.uuid for e in events}) == 1
    assert [action_for(e) for e in events] == [Action.READ_NOW, Action.READ_BEFORE_GONE,
                                               Action.READ_NOW, Action.CLOSE]
    assert watcher.dropped == 0 and watcher.callback_errors == 0



@pytest.mark.parametrize("how", ["cut", "freeze"])
async def test_resubscribes_after_the_connection_dies(proxy: SocketProxy, how: str) -> None:
    """`cut`: EOF, as when libvirtd restarts; `freeze`: a silent peer, found by keepalive."""
    uri = f"test+unix:///default?socket={proxy.path}"
    watcher = LifecycleWatcher(uri, clock=SystemClock(), keepalive_interval_s=1,
                               keepalive_count=1, reconnect_max_s=1.0)
    send, recv = trio.open_memory_channel[Message](100)
    actor = libvirt.open("test+unix:///default")  # the same daemon, not through the proxy
    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                await nursery.start(watcher.run, send)
                assert isinstance(await recv.receive(), Reconnected)
                before = f"lc-{uuid.uuid4().hex[:8]}"
                await trio.to_thread.run_sync(_life(actor, before))
                assert _kinds(await _collect(recv, before, 4)) == LIFE
                proxy.cut() if how == "cut" else proxy.freeze()
                while True:  # events of the old connection may still be queued
                    msg = await recv.receive()
                    if isinstance(msg, Reconnected):
                        break
                assert msg.reconnects == 1 and proxy.connections == 2
                after = f"lc-{uuid.uuid4().hex[:8]}"
                await trio.to_thread.run_sync(_life(actor, after))
                assert _kinds(await _collect(recv, after, 4)) == LIFE
                nursery.cancel_scope.cancel()
    finally:
        actor.close()
        proxy.close()
    assert watcher.connects == 2


async def test_failed_and_late_connections_neither_stall_nor_duplicate() -> None:
    """The first attempt answers after the connect timeout (abandoned: it must close what it
    opened, or its callback would deliver every event twice), the second fails, the third
    subscribes; `run` reports started after the first failure, not after the subscription."""
    attempts: list[float] = []

    def connector(uri: str) -> libvirt.virConnect:
        attempts.append(time.monotonic())
        if len(attempts) == 1:
            time.sleep(0.6)
        elif len(attempts) == 2:
            raise libvirt.libvirtError("refused")
        return libvirt.open(uri)

    watcher = LifecycleWatcher("test:///default", clock=SystemClock(), connector=connector,
                               connect_timeout_s=0.3, reconnect_max_s=0.5)
    send, recv = trio.open_memory_channel[Message](100)
    name = f"lc-{uuid.uuid4().hex[:8]}"
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(watcher.run, send)
            assert watcher.state == "down"
            first = await recv.receive()
            assert isinstance(first, Reconnected) and len(attempts) == 3
            conn = libvirt.open("test:///default")
            await trio.to_thread.run_sync(_life(conn, name))
            events = await _collect(recv, name, 4)
            await trio.sleep(0.5)
            nursery.cancel_scope.cancel()
    conn.close()
    assert _kinds(events) == LIFE
    leftovers = []
    while True:
        try:
            leftovers.append(recv.receive_nowait())
        except trio.WouldBlock:
            break
    assert not [m for m in leftovers if isinstance(m, LifecycleEvent) and m.name == name]
    assert watcher.connects == 1


async def test_a_subscribed_connection_costs_no_wake_ups_while_idle(
        proxy: SocketProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the close callback registered, the watcher sleeps until libvirt calls it (EOF or
    keepalive timeout): no `isAlive` poll, no worker call per keepalive interval."""
    uri = f"test+unix:///default?socket={proxy.path}"
    watcher = LifecycleWatcher(uri, clock=SystemClock(), keepalive_interval_s=1,
                               keepalive_count=1, reconnect_max_s=1.0)
    send, recv = trio.open_memory_channel[Message](100)
    calls: list[str] = []
    real = handoff.run_sync

    async def counted(fn: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(getattr(fn, "__name__", repr(fn)))
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(handoff, "run_sync", counted)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(watcher.run, send)
            assert isinstance(await recv.receive(), Reconnected)
            assert calls == ["_subscribe"]
            await trio.sleep(2.5)  # 2 keepalive intervals
            assert calls == ["_subscribe"]
            proxy.cut()  # still noticed: the close callback ends the wait
            while not isinstance(await recv.receive(), Reconnected):
                pass
            nursery.cancel_scope.cancel()
    assert watcher.connects == 2


async def test_xml_changes_are_told_while_heard_and_taken_back_with_the_subscription(
        xml_hooks: XmlHooks) -> None:
    """A metadata edit and a device added or removed tell the inventory's hook (libvirt's
    thread, the domain's UUID); `on_xml_heard` says when they are heard; after the watcher
    stops, libvirt calls nothing more."""
    watcher = LifecycleWatcher("test:///default", clock=SystemClock(), connector=libvirt.open,
                               on_xml_change=xml_hooks.tell,
                               on_xml_heard=xml_hooks.heard.append)
    send, recv = trio.open_memory_channel[Message](100)
    conn = libvirt.open("test:///default")
    dom = conn.createXML(domain_xml(f"lc-{uuid.uuid4().hex[:8]}"), 0)
    ns = "https://hostagent.example/test"

    def edit(value: str) -> None:
        dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, f"<o v='{value}'/>", "t", ns,
                        libvirt.VIR_DOMAIN_AFFECT_LIVE)

    try:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                await nursery.start(watcher.run, send)
                assert isinstance(await recv.receive(), Reconnected)
                assert xml_hooks.heard == [True]
                await trio.to_thread.run_sync(edit, "a")
                assert await trio.to_thread.run_sync(xml_hooks.got.wait, 20)
                nursery.cancel_scope.cancel()
        assert xml_hooks.heard == [True, False]
        assert set(xml_hooks.told) == {dom.UUIDString()}
        before = len(xml_hooks.told)
        await trio.to_thread.run_sync(edit, "b")
        await trio.sleep(0.3)  # libvirt's loop would have called by now
        assert len(xml_hooks.told) == before
        assert watcher.callback_errors == 0
    finally:
        dom.destroy()
        conn.close()


async def test_a_libvirt_without_xml_change_events_keeps_the_short_cadence() -> None:
    """A refused registration takes back what it registered, and the inventory is never told
    the changes are heard (its 10-minute re-reads stay)."""
    heard: list[bool] = []

    class NoDeviceEvents:
        def __init__(self, uri: str) -> None:
            self.conn = libvirt.open(uri)
            self.ids: list[int] = []

        def domainEventRegisterAny(self, dom: Any, event_id: int, cb: Any, opaque: Any) -> int:
            if event_id == libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED:
                raise libvirt.libvirtError("unsupported event")
            cid = self.conn.domainEventRegisterAny(dom, event_id, cb, opaque)
            self.ids.append(cid)
            return cid

        def domainEventDeregisterAny(self, cid: int) -> None:
            self.ids.remove(cid)
            self.conn.domainEventDeregisterAny(cid)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.conn, name)

    made: list[NoDeviceEvents] = []

    def connect(uri: str) -> NoDeviceEvents:
        made.append(NoDeviceEvents(uri))
        return made[-1]

    watcher = LifecycleWatcher("test:///default", clock=SystemClock(), connector=connect,
                               on_xml_change=lambda _u, _d=None, _t=None: None,
                               on_xml_heard=heard.append)
    send, recv = trio.open_memory_channel[Message](100)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(watcher.run, send)
            assert isinstance(await recv.receive(), Reconnected)
            assert len(made[0].ids) == 1  # the lifecycle callback alone
            nursery.cancel_scope.cancel()
    assert heard == [] and made[0].ids == []
