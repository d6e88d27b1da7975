"""A dedicated thread owning an asyncio event loop, and the narrow trio interface to it.

nats-py is asyncio-only. The daemon is trio. Instead of running the whole daemon under
trio-asyncio (a second scheduler inside ours), the asyncio world is fenced off in ONE thread
that owns ONE loop; trio talks to it through two calls:

* `await bridge.call(coro_fn, timeout_s)`: run `coro_fn()` as an asyncio task, wait for its
  result in trio without blocking a trio worker thread (the task's completion wakes trio through
  its `TrioToken`). Cancelling the trio caller cancels the asyncio task and returns at once;
  `timeout_s` bounds every call, so a wedged client can never hold a delivery slot forever.
* `await bridge.aclose(cleanup, timeout_s)`: run a last coroutine (close the connection),
  stop the loop and join the thread, all within `timeout_s`; a loop that does not stop is left
  to die with the (daemon) thread instead of hanging shutdown.

Nothing else crosses the boundary: no shared objects are touched from both sides except the
futures, whose callbacks hop threads with `call_soon_threadsafe` / `run_sync_soon`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from hostagent.errors import SinkUnavailable

T = TypeVar("T")


class AsyncioThread:
    """One asyncio loop in one daemon thread, started on first use."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

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

    async def call(self, coro_fn: Callable[[], Awaitable[T]], timeout_s: float) -> T:
        """Run `coro_fn()` in the asyncio loop; its result or exception, in trio.

        SinkUnavailable after `timeout_s` (the asyncio task is cancelled)."""
        return await _run_in(self._start(), coro_fn, timeout_s)

    async def aclose(self, cleanup: Callable[[], Awaitable[object]] | None,
                     timeout_s: float) -> None:
        """Run `cleanup()` in the loop, stop it and join the thread, within `timeout_s`."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._loop = self._thread = None
        with trio.move_on_after(timeout_s) as scope:
            scope.shield = True
            if cleanup is not None:
                # Best effort: the loop is stopped below whatever the cleanup did.
                with contextlib.suppress(Exception):
                    await _run_in(loop, cleanup, timeout_s)
            loop.call_soon_threadsafe(loop.stop)
            await trio.to_thread.run_sync(thread.join, timeout_s)


async def _run_in(loop: asyncio.AbstractEventLoop, coro_fn: Callable[[], Awaitable[T]],
                  timeout_s: float) -> T:
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()

    async def bounded() -> T:
        return await asyncio.wait_for(coro_fn(), timeout_s)

    def wake(_: object) -> None:  # runs in the asyncio thread (or here, if cancelled)
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(done.set)

    fut: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(bounded(), loop)
    fut.add_done_callback(wake)
    try:
        await done.wait()
    finally:
        if not fut.done():
            fut.cancel()  # cancels the asyncio task from its own thread
    try:
        return fut.result()
    except TimeoutError:
        raise SinkUnavailable(f"no answer within {timeout_s}s") from None
