"""The daemon's worker-thread limiter (hostagent/threads.py): no scheduling round when a
thread is free, the CapacityLimiter's limit and waiting otherwise."""

from __future__ import annotations

import functools
import threading
from pathlib import Path

import pytest
import trio

from hostagent.threads import EagerLimiter, thread_limiter
from tests.concurrency import PeakCounter


def eager(limiter: object) -> EagerLimiter:
    """The EagerLimiter behind the CapacityLimiter-typed handle."""
    assert isinstance(limiter, EagerLimiter)
    return limiter


class Steps(trio.abc.Instrument):
    """Task steps of one task."""

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task, self.steps = task, 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += task is self.task


async def steps_of_one_call(limiter: trio.CapacityLimiter) -> int:
    steps = Steps(trio.lowlevel.current_task())
    trio.lowlevel.add_instrument(steps)
    try:
        await trio.to_thread.run_sync(lambda: None, limiter=limiter)
    finally:
        trio.lowlevel.remove_instrument(steps)
    return steps.steps


async def test_a_free_thread_costs_one_scheduling_round_less() -> None:
    # the task is resumed once for the result, not also after acquiring the token
    assert await steps_of_one_call(trio.CapacityLimiter(4)) == 2
    assert await steps_of_one_call(thread_limiter(4)) == 1


async def test_no_more_threads_than_tokens_and_the_rest_wait() -> None:
    limiter = thread_limiter(2)
    calls = PeakCounter(0.05)
    async with trio.open_nursery() as nursery:
        for _ in range(6):
            nursery.start_soon(functools.partial(trio.to_thread.run_sync, calls.work,
                                                 limiter=limiter))
    assert calls.peak == 2
    assert eager(limiter).borrowed_tokens == 0 and eager(limiter).total_tokens == 2


async def test_a_caller_waiting_for_a_token_can_be_cancelled() -> None:
    limiter = thread_limiter(1)
    release = threading.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(trio.to_thread.run_sync, release.wait,
                                             limiter=limiter))
        await trio.sleep(0.05)
        with trio.move_on_after(0.1) as scope:
            await trio.to_thread.run_sync(lambda: None, limiter=limiter)
        assert scope.cancelled_caught
        release.set()
    assert eager(limiter).borrowed_tokens == 0


def test_the_daemons_blocking_calls_share_one_eager_limiter(tmp_path: Path) -> None:
    from tests.replay import Host, build_daemon, daemon_config

    host = Host(tmp_path, "lab-hybrid")
    daemon = build_daemon(daemon_config(tmp_path, host), host)
    try:
        limiter = daemon.collector.limiter
        assert eager(limiter).total_tokens == daemon.cfg.collector.max_threads
        assert daemon.libvirt._limiter is limiter
    finally:
        daemon.store.close()


@pytest.mark.parametrize("tokens", [1, 3])
async def test_tokens_come_back_after_an_error(tokens: int) -> None:
    limiter = thread_limiter(tokens)

    def boom() -> None:
        raise ValueError("x")

    for _ in range(tokens + 1):
        with pytest.raises(ValueError):
            await trio.to_thread.run_sync(boom, limiter=limiter)
    assert eager(limiter).borrowed_tokens == 0
