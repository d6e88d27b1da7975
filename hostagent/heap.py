"""The daemon's heap between passes: what start-up left is frozen once, and the memory a large
pass freed goes back to the kernel.

* `settle_heap()` (after the first pass): `gc.freeze()` moves every object alive then
  (modules, config, connections, caches) out of the collector's sight, so the periodic full
  collections walk only what later passes allocate (a 48,000-object start-up heap cost
  ~14 ms per full collection, about every 20 passes).
* and raises the young generation's threshold from CPython's 700 container allocations to
  `GEN0_THRESHOLD`: a pass at 1,000 domains allocates a few hundred thousand containers, almost
  all freed by reference counting, yet at 700 it ran ~36 young, ~3 middle and every third pass
  a full collection (~22 ms of CPU per pass, measured with `gc.callbacks`). Fewer, larger
  young collections see fewer of the short-lived objects at all; cyclic garbage (trio's
  exceptions and frames) waits a little longer, bounded by the threshold.
* `fit_young_generation(domains)` (after each pass) scales that threshold with the host:
  `YOUNG_PER_DOMAIN` container allocations per domain, never below `GEN0_THRESHOLD`. A pass
  holds ~20 containers per domain alive until it ends (readings, samples, events), so at
  5,000 domains a fixed 20,000 ran ~5 young collections of ~3.7 ms and every other pass a
  middle one of ~18 ms (25 ms of CPU a pass, 6 %, and the reason the cost per domain grew
  with the host), all of them finding nothing to free; at 1,000 domains and below it is
  20,000 as before. Cyclic garbage (trio's exceptions, API connections) must not wait that
  long on a large host: between passes the young count comes back to the same level (the
  survivors, ~31,000 at 5,000 domains), so when it has grown by the settled threshold since
  the previous pass ended, the young generation is collected then, between two passes.
* `release_freed(domains)` (after each pass of `TRIM_AT_DOMAINS` domains or more): glibc keeps
  the memory a pass freed (its readings, samples, events, the bulk stats) for reuse, so RSS
  stays at the largest pass's high-water mark; `malloc_trim(0)` returns it. At 5,000 domains
  RSS goes from ~133 MB to ~106 MB for ~0.8 ms of CPU per pass (0.1 % of that pass); below
  `TRIM_AT_DOMAINS` the gain is a few hundred KB and is not worth the call.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Callable

TRIM_AT_DOMAINS = 100
GEN0_THRESHOLD = 20_000
YOUNG_PER_DOMAIN = 40


class _Young:
    """The young generation as the passes left it."""

    floor = GEN0_THRESHOLD  # settle_heap's threshold (an operator's higher one is kept)
    count_after_pass: int | None = None  # its count when the previous pass ended


def settle_heap() -> None:
    """Collect, then freeze what is alive now (once, after start-up and the first pass), and
    collect the young generation every `GEN0_THRESHOLD` allocations (not fewer)."""
    gc.collect()
    gc.freeze()
    young, middle, old = gc.get_threshold()
    _Young.floor = max(young, GEN0_THRESHOLD)
    gc.set_threshold(_Young.floor, middle, old)


def fit_young_generation(domains: int) -> int:
    """After a pass over `domains` domains: the young generation's threshold for a host that
    size (`YOUNG_PER_DOMAIN` per domain, at least settle_heap's); returns it. Garbage that
    piled up since the previous pass (the young count grew by settle_heap's threshold) is
    collected now, between passes."""
    young, middle, old = gc.get_threshold()
    want = max(_Young.floor, YOUNG_PER_DOMAIN * domains)
    if young != want:
        gc.set_threshold(want, middle, old)
    count = gc.get_count()[0]
    last = _Young.count_after_pass
    if last is not None and count - last >= _Young.floor:
        gc.collect(0)
        count = gc.get_count()[0]
    _Young.count_after_pass = count
    return want


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None (another libc, or none found)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        fn = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


_TRIM = _malloc_trim()


def release_freed(domains: int) -> bool:
    """After a pass over `domains` domains: give freed heap back to the kernel when it is
    worth it; True when it did."""
    if _TRIM is None or domains < TRIM_AT_DOMAINS:
        return False
    _TRIM(0)
    return True
