"""The trio ↔ asyncio bridge: results and exceptions cross, cancellation and timeouts are
bounded and cancel the asyncio task, shutdown is bounded even with a wedged cleanup."""

from __future__ import annotations

import asyncio
import time

import pytest
import trio

from hostagent.delivery.sinks.nats_bridge import AsyncioThread
from hostagent.errors import SinkUnavailable


async def test_results_and_errors_cross_and_run_in_the_loop_thread() -> None:
    bridge = AsyncioThread("t")
    loop_threads: set[str] = set()

    async def work(i: int) -> int:
        import threading

        loop_threads.add(threading.current_thread().name)
        await asyncio.sleep(0.001)
        return i * 2

    async def boom() -> None:
        raise ValueError("x")

    results: list[int] = []

    async def one(i: int) -> None:
        results.append(await bridge.call(lambda: work(i), 5))

    async with trio.open_nursery() as nursery:
        for i in range(200):
            nursery.start_soon(one, i)
    assert sorted(results) == [i * 2 for i in range(200)]
    assert loop_threads == {"t"}
    with pytest.raises(ValueError, match="x"):
        await bridge.call(boom, 5)
    await bridge.aclose(None, 2)


async def test_cancel_and_timeout_return_at_once_and_cancel_the_task() -> None:
    bridge = AsyncioThread("t")
    cancelled = asyncio.Event()
    state = {"cancelled": 0}

    async def hang() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            state["cancelled"] += 1
            cancelled.set()
            raise

    t0 = time.monotonic()
    with trio.move_on_after(0.1):
        await bridge.call(hang, 60)
    with pytest.raises(SinkUnavailable, match=r"no answer within 0\.1s"):
        await bridge.call(hang, 0.1)
    assert time.monotonic() - t0 < 1.0
    await trio.sleep(0.1)
    assert state["cancelled"] == 2  # neither asyncio task is left running
    await bridge.aclose(None, 2)


async def test_shutdown_is_bounded_with_a_wedged_cleanup() -> None:
    bridge = AsyncioThread("t")

    async def nothing() -> None:
        return None

    await bridge.call(nothing, 1)

    async def wedged() -> None:
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                continue  # refuses to be cancelled

    t0 = time.monotonic()
    await bridge.aclose(wedged, 0.3)
    assert time.monotonic() - t0 < 1.5
