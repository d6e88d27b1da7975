"""The daemon's heap between passes (hostagent/heap.py)."""

from __future__ import annotations

import ctypes.util

import pytest

from hostagent import heap


@pytest.mark.skipif(ctypes.util.find_library("c") is None, reason="no libc found")
def test_large_passes_give_freed_memory_back_small_ones_do_not() -> None:
    assert heap.release_freed(heap.TRIM_AT_DOMAINS - 1) is False
    assert heap.release_freed(heap.TRIM_AT_DOMAINS) is True  # glibc here: malloc_trim ran


def test_settling_freezes_the_start_up_heap_and_raises_the_young_threshold() -> None:
    import gc

    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        junk = [[n] for n in range(1000)]  # alive at settling time: frozen, never walked again
        heap.settle_heap()
        assert gc.get_freeze_count() >= len(junk)
        assert gc.get_threshold() == (heap.GEN0_THRESHOLD, 10, 10)
        heap.settle_heap()  # a threshold set higher by the operator is kept
        gc.set_threshold(heap.GEN0_THRESHOLD * 2, 10, 10)
        heap.settle_heap()
        assert gc.get_threshold()[0] == heap.GEN0_THRESHOLD * 2
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_the_young_threshold_follows_the_host_size_never_below_the_settled_one() -> None:
    import gc

    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        heap.settle_heap()
        assert heap.fit_young_generation(8) == heap.GEN0_THRESHOLD
        assert gc.get_threshold() == (heap.GEN0_THRESHOLD, 10, 10)
        big = 5000 * heap.YOUNG_PER_DOMAIN
        assert heap.fit_young_generation(5000) == big
        assert gc.get_threshold() == (big, 10, 10)
        assert heap.fit_young_generation(0) == heap.GEN0_THRESHOLD  # the host shrank again
        gc.set_threshold(heap.GEN0_THRESHOLD * 30, 10, 10)  # an operator's higher setting
        heap.settle_heap()
        assert heap.fit_young_generation(8) == heap.GEN0_THRESHOLD * 30
    finally:
        gc.set_threshold(*before)
        heap.settle_heap()  # the module's floor back to what it was for later tests
        gc.unfreeze()
        gc.set_threshold(*before)


def test_a_pass_over_a_large_host_runs_no_young_collection() -> None:
    # What the threshold is for: the containers a pass holds alive (~20 per domain: the
    # collector's readings, samples and events) trigger no young collection at 5,000
    # domains.
    import gc

    before = gc.get_threshold()
    runs: list[int] = []

    def seen(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            runs.append(info["generation"])

    try:
        heap.settle_heap()
        heap.fit_young_generation(5000)
        gc.collect()
        gc.callbacks.append(seen)
        held = [[[n], {"k": n}, (n, [n])] for n in range(5000 * 5)]  # 25 containers/domain
        gc.callbacks.remove(seen)
        assert len(held) == 25_000
        assert runs == []
        heap.fit_young_generation(8)  # a small host's threshold: the same pass collects
        gc.collect()
        gc.callbacks.append(seen)
        held = [[[n], {"k": n}, (n, [n])] for n in range(5000 * 5)]
        gc.callbacks.remove(seen)
        assert runs
    finally:
        if seen in gc.callbacks:
            gc.callbacks.remove(seen)
        gc.unfreeze()
        gc.set_threshold(*before)


def test_garbage_piling_up_between_large_passes_is_collected_after_the_next() -> None:
    # A large host's threshold lets no young collection run inside a pass; cyclic garbage made
    # between passes (here 25,000 containers in cycles) must not wait for it: the next
    # pass's end collects it.
    import gc

    before = gc.get_threshold()
    runs: list[tuple[int, int]] = []

    def seen(phase: str, info: dict[str, int]) -> None:
        if phase == "stop":
            runs.append((info["generation"], info["collected"]))

    class Cycle:
        def __init__(self) -> None:
            self.me = self

    try:
        heap.settle_heap()
        heap.fit_young_generation(5000)  # the first pass: only remembers the count
        gc.callbacks.append(seen)
        heap.fit_young_generation(5000)  # a steady pass: nothing piled up, nothing run
        assert runs == []
        for _ in range(25_000):
            Cycle()  # unreachable, in a cycle: freed by a collection only
        assert runs == []  # under the large threshold: no collection ran by itself
        heap.fit_young_generation(5000)
        assert runs and runs[0][0] == 0 and runs[0][1] >= 25_000
    finally:
        if seen in gc.callbacks:
            gc.callbacks.remove(seen)
        gc.unfreeze()
        gc.set_threshold(*before)
