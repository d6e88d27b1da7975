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
