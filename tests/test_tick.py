"""The daemon's pass waits for its tick in the worker that then reads (hostagent/tick.py).

The wait is real time (a `threading.Event` in a worker thread), kept short here.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from hostagent import handoff
from hostagent.store.outbox import Store
from hostagent.tick import TickWait, WaitInterrupted
from tests.replay import Host
from tests.test_collector import make_collector, v2_host_with_partition
from tests.test_tail_pass import wait_real

WAIT_S = 0.4


def test_a_wait_sleeps_until_its_tick() -> None:
    ev = threading.Event()
    due = time.monotonic() + WAIT_S
    wait = TickWait(due, ev)
    assert 0 < wait.remaining_s() <= WAIT_S
    wait()
    assert time.monotonic() >= due
    assert wait.waited_s >= WAIT_S * 0.9
    assert wait.cpu_at_wake_s is not None
    assert wait.remaining_s() == 0.0


def test_a_wait_past_its_tick_returns_at_once() -> None:
    wait = TickWait(time.monotonic() - 5, threading.Event())
    t0 = time.monotonic()
    wait()
    assert time.monotonic() - t0 < 0.1
    assert wait.waited_s < 0.1


def test_an_interrupted_wait_raises_before_its_tick() -> None:
    ev = threading.Event()
    wait = TickWait(time.monotonic() + 30, ev)
    threading.Timer(0.05, ev.set).start()
    t0 = time.monotonic()
    with pytest.raises(WaitInterrupted):
        wait()
    assert time.monotonic() - t0 < 5
    assert wait.cpu_at_wake_s is None


def test_a_request_standing_at_the_tick_goes_first() -> None:
    """Someone asked for the collector by the time the tick came: give way even so."""
    ev = threading.Event()
    ev.set()
    with pytest.raises(WaitInterrupted):
        TickWait(time.monotonic() - 1, ev)()


def _events(store: Store) -> int:
    with store.reading("count") as c:
        return int(c.execute("SELECT COUNT(*) FROM events").fetchone()[0])


def _counting(calls: list[str], real: Any) -> Any:
    async def counted(fn: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(getattr(fn, "__qualname__", repr(fn)))
        return await real(fn, *args, **kwargs)
    return counted


async def test_a_timed_steady_pass_waits_in_its_first_worker_call(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tick's wait adds no hand-off: the steady pass still makes two (the wait with the
    bulk call and the host files, then the commit), and starts at its tick; the wait is not
    the pass's duration."""
    host = v2_host_with_partition(tmp_path, 1000, 3000)
    coll, store = make_collector(host, tmp_path)
    assert (await coll.run_pass()).committed
    host.move_to_t1()
    calls: list[str] = []
    monkeypatch.setattr(handoff, "run_sync", _counting(calls, handoff.run_sync))
    monkeypatch.setattr(trio.to_thread, "run_sync", _counting(calls, trio.to_thread.run_sync))
    t0 = time.monotonic()
    wall0_ns = time.time_ns()
    report = await coll.run_pass_at(t0 + WAIT_S, stop=lambda: False)
    assert report is not None and report.committed and report.events == report.domains > 0
    assert time.monotonic() - t0 >= WAIT_S
    assert len(calls) == 2, calls
    assert report.duration_s < WAIT_S  # measured from the tick
    assert report.started_wall_ns >= wall0_ns + int(WAIT_S * 0.9e9)
    assert coll.last is report and coll.last_ok_wall_ns == report.started_wall_ns
    store.close()


async def test_a_stop_cuts_the_wait_short_and_nothing_is_read(tmp_path: Path) -> None:
    host = v2_host_with_partition(tmp_path, 1000, 3000)
    coll, store = make_collector(host, tmp_path)
    assert (await coll.run_pass()).committed
    host.move_to_t1()
    stop = trio.Event()
    before = coll.last
    events = _events(store)

    async def stop_soon() -> None:
        await trio.sleep(0.1)
        stop.set()
        coll.interrupt_wait()

    t0 = time.monotonic()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stop_soon)
        with trio.fail_after(5):
            got = await coll.run_pass_at(time.monotonic() + 30, stop=stop.is_set)
    assert got is None
    assert time.monotonic() - t0 < 5
    assert coll.last is before  # no pass ran: nothing read, nothing committed or written
    assert _events(store) == events
    assert (await coll.run_pass()).committed  # nothing left blocked behind the stop
    store.close()


async def test_a_reader_gets_the_collector_during_the_wait_and_the_pass_follows(
        tmp_path: Path) -> None:
    """A lifecycle read or light sample asks (`exclusive`) and queues for `reading`: it
    gets it at once, not at the tick, and the pass still runs at its tick, after it."""
    host = v2_host_with_partition(tmp_path, 1000, 3000)
    coll, store = make_collector(host, tmp_path)
    assert (await coll.run_pass()).committed
    host.move_to_t1()
    order: list[str] = []
    waited: list[float] = []

    async def reader() -> None:
        await trio.sleep(0.1)
        t0 = time.monotonic()
        async with coll.exclusive():
            waited.append(time.monotonic() - t0)
            order.append("reader")
            await trio.sleep(0.05)

    t0 = time.monotonic()
    due = t0 + 2 * WAIT_S
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        report = await coll.run_pass_at(due, stop=lambda: False)
        order.append("pass")
    assert order == ["reader", "pass"]
    assert waited[0] < WAIT_S  # not held until the tick
    assert report is not None and report.committed
    assert time.monotonic() >= due  # the pass still waited for its tick
    store.close()


async def test_a_cancelled_wait_leaves_nothing_behind(tmp_path: Path) -> None:
    """Cancelled while waiting (a daemon shutting down): the worker stops sleeping, reads
    nothing and returns its token; the next pass runs as usual."""
    host = v2_host_with_partition(tmp_path, 1000, 3000)
    coll, store = make_collector(host, tmp_path)
    assert (await coll.run_pass()).committed
    host.move_to_t1()
    with trio.move_on_after(0.1):
        await coll.run_pass_at(time.monotonic() + 30, stop=lambda: False)
    await wait_real(lambda: coll.limiter.borrowed_tokens == 0, 5)  # the worker gave it back
    report = await coll.run_pass()
    assert report.committed and report.libvirt_path == "bulk"  # no bulk call left hanging
    store.close()


async def test_a_pass_after_its_tick_does_not_wait(host: Host, tmp_path: Path) -> None:
    coll, store = make_collector(host, tmp_path)
    t0 = time.monotonic()
    report = await coll.run_pass_at(t0 - 1, stop=lambda: False)
    assert report is not None and report.committed
    assert report.duration_s < 5
    store.close()


@pytest.fixture(params=["lab-hybrid"])
def host(request: pytest.FixtureRequest, tmp_path: Path) -> Host:
    return Host(tmp_path, request.param)


async def test_on_read_runs_after_the_read_and_is_not_the_pass_s_time(tmp_path: Path) -> None:
    """The daemon's `on_read` (close the API gate, let requests in flight finish, up to 1 s)
    runs once the host is read; its time counts neither against `pass_timeout_s` nor in the
    pass's duration."""
    host = v2_host_with_partition(tmp_path, 1000, 3000)
    coll, store = make_collector(host, tmp_path, pass_timeout_s=0.5)
    assert (await coll.run_pass()).committed
    host.move_to_t1()
    seen: list[float | None] = []

    async def on_read() -> None:
        seen.append(coll.read_monotonic_s)  # the host is read by now
        await trio.sleep(0.8)  # a slow request in flight, longer than the pass's deadline

    report = await coll.run_pass_at(time.monotonic(), stop=lambda: False, on_read=on_read)
    assert report is not None and report.committed, report and report.error
    assert seen and seen[0] is not None
    assert report.duration_s < 0.5
    store.close()
