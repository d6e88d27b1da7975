"""Shared fixtures: the lab (real libvirt + QEMU guests) for tests marked `lab`."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests import lab_support

LAB_REQUIRED = os.environ.get("HOSTAGENT_LAB") == "required"


@pytest.fixture(scope="session")
def lab_guests() -> Iterator[list[str]]:
    """Names of running lab guests (at least 2). Skips, or fails under HOSTAGENT_LAB=required."""
    reason = None
    if os.geteuid() != 0:
        reason = "the lab needs root"
    else:
        try:
            guests = lab_support.ensure_lab(2)
        except Exception as err:
            reason = f"lab unavailable: {err}"
    if reason is not None:
        if LAB_REQUIRED:
            pytest.fail(reason)
        pytest.skip(reason)
    return guests
