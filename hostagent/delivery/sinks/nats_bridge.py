"""A dedicated thread owning an asyncio event loop, and the narrow trio interface to it.

nats-py is asyncio-only. The daemon is trio. Instead of running the whole daemon under
trio-asyncio (a second scheduler inside ours), the asyncio world is fenced off in ONE thread
that owns ONE loop; trio talks to it through two calls:

* `await bridge.call(coro_fn, timeout_s)`: run `coro_fn()` as an asyncio task and wait for its
  result in trio without holding a trio worker thread. Cancelling the trio caller, or
  `timeout_s` passing (SinkUnavailable), cancels the asyncio task and returns at once, so a
  wedged client never holds a delivery slot longer than `timeout_s`.
* `await bridge.aclose(cleanup, timeout_s)`: run a last coroutine (close the connection),
  stop the loop and join the thread, all within `timeout_s`; a loop that does not stop is left
  to die with its (daemon) thread instead of hanging shutdown.

Hops are batched: calls queue up in a deque and the asyncio loop is woken once per burst
(`call_soon_threadsafe`), results queue up and trio is woken once per burst (`run_sync_soon`).
With hundreds of publishes in flight that is two wake-ups per burst instead of two per event,
which matters because every wake-up is a syscall and a GIL hand-over between the threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import trio

from hostagent import handoff
from hostagent.errors import SinkUnavailable

T = TypeVar("T")


@dataclass(eq=False)
class _Call(Generic[T]):
    coro_fn: Callable[[], Awaitable[T]]
    token: trio.lowlevel.TrioToken
    done: trio.Event = field(default_factory=trio.Event)
    result: Any = None
    error: BaseException | None = None
    task: asyncio.Future[T] | None = None
    abandoned: bool = False


class AsyncioThread:
    """One asyncio loop in one daemon thread, started on first use."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._inbox: deque[_Call[Any]] = deque()
        self._outbox: dict[trio.lowlevel.TrioToken, deque[_Call[Any]]] = {}

    def _start(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def main() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                try:
                    loop.run_forever()
                finally:
                    loop.close()

            self._thread = threading.Thread(target=main, name=self.name, daemon=True)
            self._thread.start()
            ready.wait()
            self._loop = loop
        return self._loop

    # --- asyncio thread ----------------------------------------------------------------

    def _take_inbox(self) -> None:
        with self._lock:
            calls, self._inbox = self._inbox, deque()
        loop = self._loop
        for c in calls:
            if c.abandoned or loop is None:
                continue
            c.task = asyncio.ensure_future(c.coro_fn(), loop=loop)
            c.task.add_done_callback(functools.partial(self._finished, c))

    def _finished(self, c: _Call[Any], task: asyncio.Future[Any]) -> None:
        if task.cancelled():
            c.error = asyncio.CancelledError()
        elif (err := task.exception()) is not None:
            c.error = err
        else:
            c.result = task.result()
        with self._lock:
            box = self._outbox.setdefault(c.token, deque())
            wake = not box
            box.append(c)
        if wake:
            with contextlib.suppress(trio.RunFinishedError):
                c.token.run_sync_soon(self._take_outbox, c.token)

    # --- trio thread -------------------------------------------------------------------

    def _take_outbox(self, token: trio.lowlevel.TrioToken) -> None:
        with self._lock:
            calls = self._outbox.pop(token, deque())
        for c in calls:
            c.done.set()

    async def call(self, coro_fn: Callable[[], Awaitable[T]], timeout_s: float) -> T:
        """Run `coro_fn()` in the asyncio loop; its result or exception, in trio.

        SinkUnavailable after `timeout_s` (the asyncio task is cancelled)."""
        return await self._call(self._start(), coro_fn, timeout_s)

    async def _call(self, loop: asyncio.AbstractEventLoop,
                    coro_fn: Callable[[], Awaitable[T]], timeout_s: float) -> T:
        c: _Call[T] = _Call(coro_fn, trio.lowlevel.current_trio_token())
        with self._lock:
            wake = not self._inbox
            self._inbox.append(c)
        if wake:
            loop.call_soon_threadsafe(self._take_inbox)
        try:
            with trio.move_on_after(timeout_s):
                await c.done.wait()
        finally:
            if not c.done.is_set():
                c.abandoned = True
                task = c.task
                if task is not None:
                    loop.call_soon_threadsafe(task.cancel)
        if not c.done.is_set():
            raise SinkUnavailable(f"no answer within {timeout_s}s")
        if isinstance(c.error, asyncio.CancelledError):  # never let asyncio's cancel into trio
            raise SinkUnavailable("the asyncio task was cancelled")
        if c.error is not None:
            raise c.error
        return c.result  # type: ignore[no-any-return]

    async def aclose(self, cleanup: Callable[[], Awaitable[object]] | None,
                     timeout_s: float) -> None:
        """Run `cleanup()` in the loop, stop it and join the thread, within `timeout_s`."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        with trio.move_on_after(timeout_s) as scope:
            scope.shield = True
            if cleanup is not None:
                # Best effort: the loop is stopped below whatever the cleanup did.
                with contextlib.suppress(Exception):
                    await self._call(loop, cleanup, timeout_s)
            self._loop = self._thread = None
            loop.call_soon_threadsafe(loop.stop)
            await handoff.run_sync(thread.join, timeout_s)
        self._loop = self._thread = None
