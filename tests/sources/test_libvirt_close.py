"""A libvirt connection is never closed under a call still inside it.

libvirt frees a connection on its last close; an abandoned call (a SIGSTOPped QEMU's monitor
hangs the bulk call past its deadline) that returned afterwards ran on freed memory: the daemon
logged `virObjectGetLockableObj: Object ... (<NULL-class>) is not a virObjectLockable instance`
and died of SIGSEGV at SIGTERM, right after the QEMU answered. The connection below counts the
calls inside it and records how many were inside at each close, as the real one cannot.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import pytest
import trio

from hostagent.config.schema import LibvirtConfig
from hostagent.errors import SourceUnavailable
from hostagent.sources.libvirt import LibvirtSource
from hostagent.sources.libvirt_conn import Calls
from tests.clocks import FakeClock


class Conn:
    """A connection whose calls can hang; it records the calls inside it at every close."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.inside = 0
        self.closed_with_inside: list[int] = []
        self.hang = threading.Event()
        self.release = threading.Event()
        self.closed = threading.Event()

    def _enter(self) -> None:
        with self._lock:
            assert not self.closed_with_inside, "a call on a closed connection"
            self.inside += 1

    def _leave(self) -> None:
        with self._lock:
            self.inside -= 1

    def getAllDomainStats(self, stats: int, flags: int) -> list[Any]:
        self._enter()
        try:
            if self.hang.is_set():
                self.release.wait(30)
            return []
        finally:
            self._leave()

    def listAllDomains(self, flags: int) -> list[Any]:
        self._enter()
        self._leave()
        return []

    def close(self) -> int:
        with self._lock:
            self.closed_with_inside.append(self.inside)
        self.closed.set()
        return 0


def source(conns: list[Conn]) -> LibvirtSource:
    def connect(_uri: str, _readonly: bool) -> Conn:
        conns.append(Conn())
        return conns[-1]
    return LibvirtSource(LibvirtConfig(call_timeout_s=0.2, reconnect_max_s=1),
                         clock=FakeClock(), limiter=trio.CapacityLimiter(8), connector=connect)


async def closed(conn: Conn) -> None:
    assert await trio.to_thread.run_sync(conn.closed.wait, 10)


async def test_close_leaves_a_hung_call_its_connection_and_the_call_closes_it() -> None:
    conns: list[Conn] = []
    lv = source(conns)
    await lv.bulk_stats()
    conn = conns[0]
    conn.hang.set()
    result = await lv.bulk_stats()  # abandoned at 0.2 s; the per-domain path answers
    assert result.path == "per-domain"
    assert conn.inside == 1
    lv.close()  # the daemon's shutdown, the abandoned call still inside
    assert conn.closed_with_inside == []
    conn.release.set()
    await closed(conn)
    assert conn.closed_with_inside == [0]


async def test_close_with_no_call_inside_closes_at_once_and_only_once() -> None:
    conns: list[Conn] = []
    lv = source(conns)
    await lv.bulk_stats()
    lv.close()
    lv.close()
    assert conns[0].closed_with_inside == [0]


async def test_a_dropped_connection_waits_for_its_hung_call_and_the_next_pass_reconnects(
) -> None:
    conns: list[Conn] = []
    lv = source(conns)
    await lv.bulk_stats()
    conns[0].hang.set()
    await lv.bulk_stats()
    lv.drop_connection("an RPC error")  # with the abandoned call still inside
    assert conns[0].closed_with_inside == []
    lv._next_try_ns = 0  # skip the backoff
    assert (await lv.bulk_stats()).path == "per-domain"  # the old call still counts as running
    assert len(conns) == 2 and conns[1].closed_with_inside == []
    conns[0].release.set()
    await closed(conns[0])
    assert conns[0].closed_with_inside == [0]
    assert (await lv.bulk_stats()).path == "bulk"


def test_a_call_after_the_close_raises_and_never_reaches_the_connection() -> None:
    conn = Conn()
    calls = Calls(conn)
    assert calls.close()
    with pytest.raises(SourceUnavailable):
        calls.run(conn.listAllDomains, 0)
    assert conn.closed_with_inside == [0]


def test_racing_calls_and_a_close_close_exactly_once_with_no_call_inside() -> None:
    rng = random.Random(16)
    for _ in range(50):
        conn = Conn()
        calls = Calls(conn)
        start = threading.Barrier(5)

        def caller(c: Calls = calls, b: threading.Barrier = start) -> None:
            b.wait()
            for _ in range(200):
                try:
                    c.run(c.conn.listAllDomains, 0)
                except SourceUnavailable:  # closed: every later call is refused too
                    return

        threads = [threading.Thread(target=caller) for _ in range(4)]
        for t in threads:
            t.start()
        start.wait()
        time.sleep(rng.random() * 0.002)
        calls.close()
        for t in threads:
            t.join()
        assert conn.closed_with_inside == [0]
