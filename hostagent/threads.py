"""The daemon's worker-thread limiter (`collector.max_threads`), without a scheduling round.

`trio.to_thread.run_sync` acquires its limiter with `CapacityLimiter.acquire_on_behalf_of`,
which yields to the scheduler even when a token is free (a cancel-shielded checkpoint): one
more task step and one more `epoll_wait` per blocking call, two per steady pass. `EagerLimiter`
takes a free token at once and waits like the CapacityLimiter it wraps only when none is free.
The call still checkpoints where it matters: `run_sync` checks for cancellation first and then
waits for the thread's result. trio documents the limiter as any object with these two methods.
"""

from __future__ import annotations

from typing import cast

import trio


class EagerLimiter:
    """A CapacityLimiter whose acquire does not yield when a token is free."""

    def __init__(self, total_tokens: int) -> None:
        self.inner = trio.CapacityLimiter(total_tokens)

    @property
    def total_tokens(self) -> int | float:
        """How many threads may run at once."""
        return self.inner.total_tokens

    @property
    def borrowed_tokens(self) -> int:
        """How many run now."""
        return self.inner.borrowed_tokens

    async def acquire_on_behalf_of(self, borrower: object) -> None:
        """A token for `borrower`: at once when one is free, else wait for one."""
        try:
            self.inner.acquire_on_behalf_of_nowait(borrower)
        except trio.WouldBlock:
            await self.inner.acquire_on_behalf_of(borrower)

    def release_on_behalf_of(self, borrower: object) -> None:
        """Give `borrower`'s token back."""
        self.inner.release_on_behalf_of(borrower)


def thread_limiter(total_tokens: int) -> trio.CapacityLimiter:
    """The limiter to hand to `trio.to_thread.run_sync` (typed as trio's, which it duck-types)."""
    return cast(trio.CapacityLimiter, EagerLimiter(total_tokens))
