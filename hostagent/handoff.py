"""Lean hand-offs to worker threads for the pass's blocking calls (libvirt, the commit).

`trio.to_thread.run_sync` costs 0.12–0.14 ms of process CPU per call more than the hand-off
here, on the 2-core lab VM beside 8 TCG guests; most of it on the way back: the worker reports
through `TrioToken.run_sync_soon` (a write to trio's wake-up socket, a step of trio's
entry-queue task, then one more turn of the run loop before the waiting task runs), and it
names the OS thread twice per job (ctypes and prctl). A pass makes two such calls, every pass.
`bench/handoff_cost.py` runs the daemon's skeleton (trio, one wake-up a second, the bulk stats
call in one worker call, a SQLite commit, a JSONL write and fsync in a second one) both ways
side by side: 2.26–2.31 ms a pass through `trio.to_thread.run_sync`, 1.99–2.06 ms through
`run_sync` here (the same work without trio or threads: 1.17–1.20 ms).

`run_sync` hands the call to a kept worker thread through a queue and waits on that worker's
eventfd with `trio.lowlevel.wait_readable`: the worker's write wakes the waiting task itself,
in the same turn of the loop. It keeps trio's contract where hostagent relies on it:
- `limiter`: a token per call, taken before the call and given back when its thread is done
  (after an abandon too: then through the run's `TrioToken` when the call returns);
- `abandon_on_cancel`: cancelled while waiting, the caller gets `Cancelled` at once; the call
  runs to its end in its thread and its result (or exception) is dropped. Without it the wait
  is shielded: the caller gets the result, then any cancellation at its next checkpoint;
- the call's exception is raised in the caller; the caller's context variables are visible in
  the call (it runs in a copy of the caller's context).
Not supported: `trio.from_thread` inside the call (nothing called through here uses it).

Workers are process-wide (like trio's thread cache): at most `MAX_IDLE` wait for work; a worker
that finds that many idle when it is done exits. Linux only (eventfd), as the daemon is.

Every blocking call of the daemon goes through here, not through `trio.to_thread` (a test
walks the package): trio's cached threads exit after 10 s idle (`IDLE_TIMEOUT`), so at the
default 30 s interval each pass's store calls, each outbox upkeep (every 10 s) and each
keepalive check started a fresh OS thread: ~0.50 ms of process CPU a call against ~0.16 ms on
a parked worker here (`trio.sleep(0.05)` between calls, trio's idle timeout cut to 10 ms).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar, TypeVarTuple

import trio

__all__ = ["MAX_IDLE", "run_sync", "workers_alive", "workers_idle"]

R = TypeVar("R")
Ts = TypeVarTuple("Ts")

MAX_IDLE = 8

_RUNNING, _DONE, _ABANDONED, _IDLE = "running", "done", "abandoned", "idle"
_Release = tuple[trio.lowlevel.TrioToken, Any, object] | None  # (token, limiter, borrower)
_Job = tuple[contextvars.Context, Callable[..., Any], tuple[Any, ...], _Release]
_Result = tuple[bool, Any]  # (True, the value) or (False, the exception raised)


def _capture(ctx: contextvars.Context, fn: Callable[..., Any], args: tuple[Any, ...]) -> _Result:
    try:
        return True, ctx.run(fn, *args)
    except BaseException as exc:  # re-raised in the caller, as trio does
        return False, exc


class _Pool:
    """The process's workers: the idle ones, and how many exist."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.idle: list[_Worker] = []
        self.alive = 0


_POOL = _Pool()


class _Worker:
    """One thread, its job queue and its eventfd; one call at a time."""

    __slots__ = ("efd", "jobs", "lock", "result", "state")

    def __init__(self) -> None:
        self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()  # None: exit
        self.lock = threading.Lock()
        self.state = _IDLE
        self.result: _Result | None = None
        with _POOL.lock:
            _POOL.alive += 1
        threading.Thread(target=self._loop, name="hostagent-worker", daemon=True).start()

    def submit(self, job: _Job) -> None:
        self.state = _RUNNING
        self.jobs.put(job)

    def abandon(self) -> bool:
        """The caller stops waiting: True when the call still runs (it cleans up after
        itself), False when it is done already (the caller must `collect` it)."""
        with self.lock:
            if self.state == _RUNNING:
                self.state = _ABANDONED
                return True
            return False

    def collect(self) -> _Result:
        """The result of a done call (its eventfd was written); the worker is idle again."""
        os.eventfd_read(self.efd)
        with self.lock:
            result, self.result, self.state = self.result, None, _IDLE
        assert result is not None
        return result

    def _loop(self) -> None:
        while (job := self.jobs.get()) is not None:
            ctx, fn, args, release = job
            # A parked worker must not keep its last call alive until the next one: the pass
            # commit's arguments hold all its events (~5 MB at 5,000 domains), the bulk call's
            # result every domain's stats and libvirt handle.
            del job
            result = _capture(ctx, fn, args)
            del ctx, fn, args
            with self.lock:
                abandoned = self.state == _ABANDONED
                if abandoned:
                    self.state = _IDLE
                else:
                    self.result, self.state = result, _DONE
                    os.eventfd_write(self.efd, 1)  # under the lock: `abandon` sees DONE + fd
            # The caller collects the result from self.result; an abandoned call's is dropped
            # here, as trio drops it.
            del result
            if not abandoned:
                continue  # the caller collects the result and parks this worker
            if release is not None:
                token, limiter, borrower = release
                with contextlib.suppress(trio.RunFinishedError):  # that run and its limiter
                    token.run_sync_soon(limiter.release_on_behalf_of, borrower)  # are over
            if not _park(self):
                break
        with _POOL.lock:
            _POOL.alive -= 1
        os.close(self.efd)  # idle: no task waits on it


def _take() -> _Worker:
    with _POOL.lock:
        if _POOL.idle:
            return _POOL.idle.pop()
    return _Worker()


def _park(worker: _Worker) -> bool:
    """Park an idle worker; False when `MAX_IDLE` already wait (then it should exit)."""
    with _POOL.lock:
        if len(_POOL.idle) >= MAX_IDLE:
            return False
        _POOL.idle.append(worker)
        return True


def _park_or_end(worker: _Worker) -> None:
    """A collected worker: parked, or told to exit."""
    if not _park(worker):
        worker.jobs.put(None)


async def run_sync(fn: Callable[[*Ts], R], *args: *Ts,
                   limiter: trio.CapacityLimiter | None = None,
                   abandon_on_cancel: bool = False) -> R:
    """`fn(*args)` in a worker thread; see the module docstring for the contract."""
    await trio.lowlevel.checkpoint_if_cancelled()
    borrower = object()
    if limiter is not None:
        await limiter.acquire_on_behalf_of(borrower)
    try:
        worker = _take()
    except BaseException:
        if limiter is not None:
            limiter.release_on_behalf_of(borrower)
        raise
    release: _Release = None if limiter is None else (
        trio.lowlevel.current_trio_token(), limiter, borrower)
    worker.submit((contextvars.copy_context(), fn, args, release))
    try:
        if abandon_on_cancel:
            await trio.lowlevel.wait_readable(worker.efd)
        else:
            with trio.CancelScope(shield=True):
                await trio.lowlevel.wait_readable(worker.efd)
    except BaseException:
        if worker.abandon():
            raise  # the worker gives the token back and parks itself when the call returns
        worker.collect()  # done meanwhile: dropped, as an abandoned call's result is
        if limiter is not None:
            limiter.release_on_behalf_of(borrower)
        _park_or_end(worker)
        raise
    ok, value = worker.collect()
    if limiter is not None:
        limiter.release_on_behalf_of(borrower)
    _park_or_end(worker)
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


def workers_alive() -> int:
    """How many worker threads exist now (idle or busy)."""
    with _POOL.lock:
        return _POOL.alive


def workers_idle() -> int:
    """How many of them wait for work."""
    with _POOL.lock:
        return len(_POOL.idle)
