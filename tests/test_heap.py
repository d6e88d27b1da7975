"""The daemon's heap between passes (hostagent/heap.py)."""

from __future__ import annotations

import ctypes.util

import pytest

from hostagent import heap


@pytest.mark.skipif(ctypes.util.find_library("c") is None, reason="no libc found")
def test_large_passes_give_freed_memory_back_small_ones_do_not() -> None:
    assert heap.release_freed(heap.TRIM_AT_DOMAINS - 1) is False
    assert heap.release_freed(heap.TRIM_AT_DOMAINS) is True  # glibc here: malloc_trim ran
