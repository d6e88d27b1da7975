"""Real cgroups for the tests that need the kernel's cgroupfs (root; cgroup2 mounted), and
helpers for FdCache tests on plain trees.

Each test gets its own parent cgroup, `hostagent-test-<pid>-<n>`, under the cgroup2 mount (and
under the v1 memory hierarchy when the host is hybrid); everything is removed afterwards.
"""

from __future__ import annotations

import errno
import itertools
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostagent.sources import files
from tests.conftest import unavailable

_SEQ = itertools.count()


def cgroup_mounts() -> dict[str, str]:
    """Mount points by kind: "cgroup2", and "memory" for a v1 memory hierarchy."""
    return files.cgroup_mounts(Path("/proc/self/mountinfo").read_text())


def trusting(tree: Path) -> str:
    """A mountinfo that says `tree`'s filesystem is cgroup2, so an FdCache keeps its files."""
    dev = os.stat(tree).st_dev
    info = tree / ".mountinfo"
    info.write_text(f"99 1 {os.major(dev)}:{os.minor(dev)} / {tree} rw - cgroup2 cgroup2 rw\n")
    return str(info)


def fds_on(path: str | Path) -> int:
    """How many descriptors of this process are open on `path`."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}") == str(path)
        except OSError:
            continue
    return n


def rmdir(path: str) -> None:
    """rmdir a cgroup; a process that just exited may keep it busy for a moment."""
    for _ in range(100):
        try:
            os.rmdir(path)
        except FileNotFoundError:
            return
        except OSError as err:
            if err.errno != errno.EBUSY:
                raise
            time.sleep(0.01)
        else:
            return
    os.rmdir(path)


class RealCgroups:
    """Makes and removes real cgroups under a test-owned parent; runs CPU work inside one."""

    def __init__(self, v2_parent: str, memory_parent: str | None) -> None:
        self.v2_parent = v2_parent
        self.memory_parent = memory_parent

    def mkdir(self, name: str, *, v1_memory: bool = False) -> str:
        """A new cgroup (v2, or v1 memory); its path."""
        parent = self.memory_parent if v1_memory else self.v2_parent
        if parent is None:
            unavailable("no v1 memory hierarchy on this host")
        path = f"{parent}/{name}"
        os.mkdir(path)
        return path

    @staticmethod
    def burn_cpu(path: str, cpu_s: float = 0.05) -> None:
        """Run a process inside the v2 cgroup at `path` until it used `cpu_s` of CPU."""
        code = ("import sys, time\nsys.stdin.read(1)\nt = time.process_time()\n"
                f"while time.process_time() - t < {cpu_s}:\n    pass\n")
        proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE)
        try:
            Path(path, "cgroup.procs").write_text(str(proc.pid))
        finally:
            proc.communicate(b"x", timeout=30)

    def cleanup(self) -> None:
        for parent in (self.v2_parent, self.memory_parent):
            if parent is None or not os.path.isdir(parent):
                continue
            for entry in os.scandir(parent):
                if entry.is_dir(follow_symlinks=False):
                    rmdir(entry.path)
            rmdir(parent)


@pytest.fixture
def real_cgroups() -> Iterator[RealCgroups]:
    """Real cgroups for one test; skipped (failed under `make test`) where none can be made."""
    if os.geteuid() != 0:
        unavailable("making cgroups needs root")
    mounts = cgroup_mounts()
    if "cgroup2" not in mounts:
        unavailable("no cgroup2 mount")
    name = f"hostagent-test-{os.getpid()}-{next(_SEQ)}"
    v2_parent = f"{mounts['cgroup2']}/{name}"
    memory_parent = f"{mounts['memory']}/{name}" if "memory" in mounts else None
    try:
        os.mkdir(v2_parent)
        if memory_parent is not None:
            os.mkdir(memory_parent)
    except OSError as err:
        RealCgroups(v2_parent, memory_parent).cleanup()
        unavailable(f"cannot make a cgroup under {mounts['cgroup2']}: {err}")
    cgroups = RealCgroups(v2_parent, memory_parent)
    try:
        yield cgroups
    finally:
        cgroups.cleanup()


class XmlHooks:
    """What a LifecycleWatcher's XML hooks were told: UUIDs (`tell`, from libvirt's thread;
    `got` set at the first) and whether the changes were heard (`heard.append`)."""

    def __init__(self) -> None:
        self.told: list[str] = []
        self.devices: list[tuple[str, str | None, int | None]] = []
        self.heard: list[bool] = []
        self.got = threading.Event()

    def tell(self, uuid: str, device: str | None = None, wall_ns: int | None = None) -> None:
        self.told.append(uuid)
        if device is not None or wall_ns is not None:
            self.devices.append((uuid, device, wall_ns))
        self.got.set()


@pytest.fixture
def xml_hooks() -> XmlHooks:
    return XmlHooks()
