"""The lean worker-thread hand-off (hostagent/handoff.py): trio.to_thread.run_sync's contract
where hostagent relies on it (results, exceptions, context, the limiter, abandoning on
cancellation, shielded waits), with one turn of trio's run loop per call instead of two."""

from __future__ import annotations

import ast
import contextvars
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from hostagent import handoff
from hostagent.threads import thread_limiter
from tests.concurrency import PeakCounter, turns_of

REQUEST = contextvars.ContextVar("REQUEST", default="none")


async def eventually(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    with trio.fail_after(timeout_s):
        while not check():  # noqa: ASYNC110 - the state changes in worker threads
            await trio.sleep(0.01)


async def test_the_result_and_the_arguments() -> None:
    assert await handoff.run_sync(lambda a, b: a * b, 6, 7) == 42
    assert await handoff.run_sync(threading.get_ident) != threading.get_ident()


async def test_a_parked_worker_keeps_nothing_of_its_last_call_alive() -> None:
    """A worker waiting for its next call holds neither the last call's arguments nor its
    result (the pass commit's arguments hold all its events: megabytes on a large host)."""

    class Big:
        pass

    arg = Big()
    arg_ref = weakref.ref(arg)
    got = await handoff.run_sync(lambda _: Big(), arg)
    got_ref = weakref.ref(got)
    del arg, got
    await eventually(lambda: arg_ref() is None and got_ref() is None, timeout_s=2)


async def test_the_calls_exception_is_raised_in_the_caller() -> None:
    def boom() -> None:
        raise KeyError("gone")

    with pytest.raises(KeyError, match="gone") as info:
        await handoff.run_sync(boom)
    assert info.traceback[-1].name == "boom"


async def test_the_callers_context_variables_are_visible_in_the_call() -> None:
    REQUEST.set("pass-7")
    assert await handoff.run_sync(REQUEST.get) == "pass-7"


async def test_one_turn_of_the_run_loop_per_call_where_trio_takes_two() -> None:
    def work() -> None:
        time.sleep(0.02)  # the task really waits for the thread

    limiter = thread_limiter(4)
    ours = await turns_of(lambda: handoff.run_sync(work, limiter=limiter))
    trios = await turns_of(lambda: trio.to_thread.run_sync(work, limiter=limiter))
    assert ours == 1
    assert trios == 2


async def test_no_more_calls_at_once_than_tokens_and_every_token_comes_back() -> None:
    limiter = trio.CapacityLimiter(3)
    calls = PeakCounter(0.03)
    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(lambda: handoff.run_sync(calls.work, limiter=limiter))
    assert calls.peak == 3
    assert limiter.borrowed_tokens == 0


async def test_cancelled_while_waiting_the_call_is_abandoned_and_finishes_alone() -> None:
    limiter = trio.CapacityLimiter(1)
    release, finished = threading.Event(), threading.Event()

    def hung() -> str:
        release.wait(10)
        finished.set()
        return "late"

    t0 = time.monotonic()
    with trio.move_on_after(0.05) as scope:
        await handoff.run_sync(hung, limiter=limiter, abandon_on_cancel=True)
    assert scope.cancelled_caught
    assert time.monotonic() - t0 < 1.0  # at once, not when the call returns
    # the abandoned call keeps its token until its thread is done: nothing else runs past it
    assert limiter.borrowed_tokens == 1
    release.set()
    await eventually(lambda: limiter.borrowed_tokens == 0)
    assert finished.is_set()
    # the limiter and a worker serve the next call as before
    assert await handoff.run_sync(lambda: "next", limiter=limiter) == "next"


async def test_an_abandoned_calls_exception_is_dropped() -> None:
    release = threading.Event()

    def fails_late() -> None:
        release.wait(10)
        raise RuntimeError("nobody listens")

    with trio.move_on_after(0.05):
        await handoff.run_sync(fails_late, abandon_on_cancel=True)
    release.set()
    assert await handoff.run_sync(lambda: 1) == 1


async def test_without_abandon_the_wait_is_shielded_and_the_call_completes() -> None:
    done: list[str] = []

    def commit() -> str:
        time.sleep(0.2)
        done.append("committed")
        return "ok"

    t0 = time.monotonic()
    with trio.move_on_after(0.05) as scope:
        got = await handoff.run_sync(commit)
        assert got == "ok"
        assert done == ["committed"]
        await trio.lowlevel.checkpoint()  # the cancellation arrives at the next checkpoint
    assert scope.cancelled_caught
    assert time.monotonic() - t0 >= 0.2


async def test_already_cancelled_the_call_does_not_start() -> None:
    started: list[int] = []
    with trio.CancelScope() as scope:
        scope.cancel()
        await handoff.run_sync(lambda: started.append(1))
    assert started == []


async def test_idle_workers_are_kept_up_to_a_cap_and_the_rest_exit() -> None:
    # (workers still busy with another test's abandoned call are not this test's)
    busy_before = handoff.workers_alive() - handoff.workers_idle()
    gate = threading.Barrier(handoff.MAX_IDLE + 4, timeout=10)
    async with trio.open_nursery() as nursery:
        for _ in range(handoff.MAX_IDLE + 4):
            nursery.start_soon(handoff.run_sync, gate.wait)
    await eventually(lambda: handoff.workers_alive() <= busy_before + handoff.MAX_IDLE)
    assert handoff.workers_idle() == handoff.MAX_IDLE
    # and the kept ones serve again without new threads
    before = handoff.workers_alive()
    for _ in range(20):
        await handoff.run_sync(lambda: None)
    assert handoff.workers_alive() == before


def test_a_call_abandoned_by_a_run_that_ended_cleans_up_quietly(
        monkeypatch: pytest.MonkeyPatch) -> None:
    errors: list[Any] = []
    monkeypatch.setattr(threading, "excepthook", errors.append)
    release, done = threading.Event(), threading.Event()

    def outlives_the_run() -> None:
        release.wait(10)
        done.set()

    async def main() -> None:
        with trio.move_on_after(0.05):
            await handoff.run_sync(outlives_the_run, limiter=trio.CapacityLimiter(1),
                                   abandon_on_cancel=True)

    trio.run(main)
    release.set()
    assert done.wait(5)
    time.sleep(0.1)  # the worker's clean-up after the call (the token's run is over)

    async def again() -> object:
        return await handoff.run_sync(lambda: "still serving")

    assert trio.run(again) == "still serving"
    assert errors == []


async def test_a_call_after_an_idle_spell_longer_than_trios_runs_on_a_kept_thread(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # trio's cached threads exit after IDLE_TIMEOUT (10 s; 50 ms here): at the daemon's 30 s
    # interval every such call would start an OS thread. A parked worker here waits on.
    import trio._core._thread_cache as thread_cache
    monkeypatch.setattr(thread_cache, "IDLE_TIMEOUT", 0.05)
    first = await handoff.run_sync(threading.current_thread)  # (idents are reused)
    via_trio = await trio.to_thread.run_sync(threading.current_thread)
    await trio.sleep(0.3)
    assert await handoff.run_sync(threading.current_thread) is first
    assert await trio.to_thread.run_sync(threading.current_thread) is not via_trio  # premise


def _uses_to_thread(node: ast.AST) -> bool:
    if isinstance(node, ast.ImportFrom):
        return node.module == "trio" and any(a.name == "to_thread" for a in node.names)
    return isinstance(node, ast.Attribute) and node.attr == "to_thread"


def test_no_module_of_the_daemon_calls_trio_to_thread() -> None:
    # Every blocking call goes through handoff.run_sync (its module docstring says why).
    pkg = Path(handoff.__file__).parent
    found = [f"{path.relative_to(pkg.parent)}:{node.lineno}"  # type: ignore[attr-defined]
             for path in sorted(pkg.rglob("*.py"))
             for node in ast.walk(ast.parse(path.read_text(), str(path)))
             if _uses_to_thread(node)]
    assert found == []
