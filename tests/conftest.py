"""Shared fixtures: the lab (real libvirt + QEMU guests) for tests marked `lab`, and small
tmpfs mounts for disk-full tests. Both need root: under `make test` (HOSTAGENT_LAB=required)
a missing prerequisite fails the test instead of skipping it."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from tests import lab_support
from tests.sources.libvirt_proxy import LIBVIRTD_SOCK, SocketProxy

LAB_REQUIRED = os.environ.get("HOSTAGENT_LAB") == "required"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests on trio's mock clock run `alone` (`make test` runs them after the parallel
    ones, one at a time): the clock jumps ahead whenever every task waits, and on a loaded
    machine a real server's answer still on its way looks like such a wait (a 0.2 s send
    timeout jumped past: a chaos drain that never ended, with two test workers on 2 cores)."""
    alone = pytest.mark.alone
    for item in items:
        if "mock_clock" in getattr(item, "fixturenames", ()):
            item.add_marker(alone)


def unavailable(reason: str) -> NoReturn:
    """Skip when a root-only prerequisite is missing, but fail under `make test`."""
    if LAB_REQUIRED:
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def lab_guests() -> list[str]:
    """Names of running lab guests (at least 2)."""
    if os.geteuid() != 0:
        unavailable("the lab needs root")
    try:
        return lab_support.ensure_lab(2)
    except Exception as err:  # any failure to bring the lab up
        unavailable(f"lab unavailable: {err}")


@pytest.fixture
def tmpfs() -> Iterator[Callable[[str], Path]]:
    """`tmpfs("2m")` mounts a tmpfs of that size for the test (root only); unmounted after."""
    mounts: list[Path] = []

    def mount(size: str) -> Path:
        if os.geteuid() != 0:
            unavailable("mounting a tmpfs needs root")
        mnt = Path(tempfile.mkdtemp(prefix="hostagent-tmpfs-"))
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                           capture_output=True, text=True, check=False)
        if r.returncode != 0:
            mnt.rmdir()
            unavailable(f"cannot mount tmpfs: {r.stderr.strip()}")
        mounts.append(mnt)
        return mnt

    yield mount
    for mnt in mounts:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        mnt.rmdir()


@pytest.fixture
def proxy() -> Iterator[SocketProxy]:
    """A socket proxy in front of libvirtd (test driver): cut or freeze OUR connections the
    way a libvirtd restart or hang looks to us, without touching the shared libvirtd."""
    import libvirt

    if not os.path.exists(LIBVIRTD_SOCK) or not os.access(LIBVIRTD_SOCK, os.W_OK):
        unavailable(f"no writable libvirtd socket at {LIBVIRTD_SOCK}")
    try:
        libvirt.open("test+unix:///default").close()
    except libvirt.libvirtError as err:
        unavailable(f"libvirtd has no test driver: {err}")
    with tempfile.TemporaryDirectory(prefix="hostagent-proxy-") as tmp:
        p = SocketProxy(os.path.join(tmp, "sock"), LIBVIRTD_SOCK)
        try:
            yield p
        finally:
            p.close()
