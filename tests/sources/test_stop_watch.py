"""The end of a VM as the kernel reports it (hostagent/sources/stop_watch.py), on real cgroups and
real links: a v2 cgroup's `cgroup.events` going to `populated 0` wakes the watch while the
cgroup's `cpu.stat` still holds the process's final CPU, and a deleted link's RTM_DELLINK carries
its final byte counters (checked against what the frames sent)."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

from hostagent.clock import SystemClock
from hostagent.sources.fdcache import FdCache
from hostagent.sources.files import HostRoot
from hostagent.sources.light import LightSampler, LightTarget
from hostagent.sources.stop_watch import StopWatch, dellink_stats
from tests.sources.conftest import RealCgroups
from tests.sources.test_net import ip, needs_netns, netns  # noqa: F401 - the fixture


def target(uuid: str, domid: int, cpu_file: str) -> LightTarget:
    return LightTarget(uuid, domid, cpu_file, None)


def _burner(path: str, cpu_s: float) -> subprocess.Popen[bytes]:
    """A process in the v2 cgroup at `path` that burns `cpu_s` of CPU and exits."""
    code = ("import sys, time\nsys.stdin.read(1)\nt = time.process_time()\n"
            f"while time.process_time() - t < {cpu_s}:\n    pass\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE)
    Path(path, "cgroup.procs").write_text(str(proc.pid))
    return proc


def test_an_emptied_cgroup_wakes_the_watch_with_its_final_cpu_still_readable(
        real_cgroups: RealCgroups) -> None:
    vm = real_cgroups.mkdir("qemu-7-vm.libvirt-qemu")
    other = real_cgroups.mkdir("qemu-8-other.libvirt-qemu")
    watch = StopWatch(links=False)
    fds = FdCache()
    try:
        watch.sync({("u", 7): vm, ("o", 8): other}, {})
        assert watch.watched == {("u", 7), ("o", 8)} and not watch.failed
        busy = _burner(other, 30.0)  # stays: its cgroup never empties
        proc = _burner(vm, 0.2)
        cpu_file = f"{vm}/cpu.stat"
        sampler = LightSampler(HostRoot("/"), fds=fds, links=None, clock=SystemClock())
        before = sampler.sample([target("u", 7, cpu_file)])["u"].cpu_ns  # opens the kept fd
        assert watch.wait(0.05) is None  # nothing ended yet
        proc.stdin.write(b"x")  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]
        woken = None
        deadline = time.monotonic() + 30
        while woken is None and time.monotonic() < deadline:
            woken = watch.wait(1.0)
        # The wait returned for the emptied cgroup only, and its counters are still there.
        assert woken is not None and woken.emptied == {("u", 7)} and not woken.overflow
        final = sampler.sample([target("u", 7, cpu_file)])["u"]
        proc.wait(5)
        assert before is not None and final.cpu_ns is not None
        assert final.cpu_ns - before >= 190_000_000  # the 0.2 s it burned after `before`
        busy.kill()  # a kill ends the other one
        busy.wait(5)
        deadline = time.monotonic() + 30
        while (woken := watch.wait(1.0)) is None and time.monotonic() < deadline:
            pass
        assert woken is not None and woken.emptied == {("o", 8)}
        os.rmdir(vm)  # what libvirt does next; the pass then drops the domain's target
        watch.sync({("o", 8): other}, {})
        assert watch.watched == {("o", 8)}
    finally:
        watch.close()
        fds.close()


def _woken_within(watch: StopWatch, seconds: float) -> object:
    deadline = time.monotonic() + seconds
    woken = None
    while woken is None and time.monotonic() < deadline:
        woken = watch.wait(0.2)
    return woken


def test_an_end_is_reported_once_until_the_cgroup_fills_again(real_cgroups: RealCgroups) -> None:
    """After `populated 0`, a later change of the same file (here the empty cgroup frozen and
    thawed) is not a second end; a cgroup that holds a process again can end again."""
    vm = real_cgroups.mkdir("qemu-9-vm.libvirt-qemu")
    watch = StopWatch(links=False)
    try:
        watch.sync({("u", 9): vm}, {})
        proc = _burner(vm, 0.01)
        proc.stdin.write(b"x")  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]
        woken = _woken_within(watch, 30)
        assert woken is not None and woken.emptied == {("u", 9)}  # type: ignore[attr-defined]
        proc.wait(5)
        Path(vm, "cgroup.freeze").write_text("1")
        assert b"frozen 1" in Path(vm, "cgroup.events").read_bytes()  # the file changed
        Path(vm, "cgroup.freeze").write_text("0")
        assert _woken_within(watch, 0.5) is None  # still the one end
        again = _burner(vm, 0.01)  # populated 1: the next end counts
        assert _woken_within(watch, 0.3) is None
        again.stdin.write(b"x")  # type: ignore[union-attr]
        again.stdin.flush()  # type: ignore[union-attr]
        woken = _woken_within(watch, 30)
        assert woken is not None and woken.emptied == {("u", 9)}  # type: ignore[attr-defined]
        again.wait(5)
    finally:
        watch.close()


def test_a_cgroup_that_cannot_be_watched_is_named_in_failed(tmp_path: Path) -> None:
    watch = StopWatch(links=False)
    try:
        watch.sync({("u", 1): str(tmp_path / "no-such-cgroup")}, {})
        assert watch.failed == {("u", 1)} and watch.watched == frozenset()
        watch.sync({}, {})
        assert watch.failed == set()
    finally:
        watch.close()


def test_wake_ends_a_wait_from_another_thread() -> None:
    watch = StopWatch(links=False)
    try:
        threading.Timer(0.05, watch.wake).start()
        t0 = time.monotonic()
        assert watch.wait(10) is None
        assert time.monotonic() - t0 < 5
    finally:
        watch.close()


# Run inside the namespace: open the tap as QEMU does and write frames into it (the guest's
# transmit, the host side's receive), then close it.
_TAP_WRITER = """
import fcntl, os, struct
fd = os.open("/dev/net/tun", os.O_RDWR)
fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", b"hatapw", 0x0002 | 0x1000))  # TUNSETIFF
frame = bytes.fromhex("ffffffffffff020000000001") + b"\\x88\\xb5" + bytes(46)
for _ in range(5):
    os.write(fd, frame)
os.close(fd)
"""


@needs_netns
def test_a_deleted_tap_leaves_its_final_counters(netns: str) -> None:  # noqa: F811
    ip(netns, "tuntap", "add", "mode", "tap", "name", "hatapw")  # persistent, like a managed
    ip(netns, "tuntap", "add", "mode", "tap", "name", "hatapz")  # tap between QEMU's opens
    ip(netns, "link", "set", "hatapw", "up")
    indexes = _ifindexes(netns)
    tap, other = indexes["hatapw"], indexes["hatapz"]
    watch = StopWatch(netns=netns)
    try:
        watch.sync({}, {tap: ("u", 3)})  # only this tap's end is followed
        subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", _TAP_WRITER],
                       check=True)
        ip(netns, "link", "del", "hatapw")
        ip(netns, "link", "del", "hatapz")
        deadline = time.monotonic() + 5
        woken = None
        while woken is None and time.monotonic() < deadline:
            woken = watch.wait(0.1)
        # The followed tap's end woke the wait for its domain (a NIC hot-unplugged: sampled
        # at once), and the host side received the 5 frames of 60 bytes and sent none.
        assert woken is not None and woken.unplugged == {("u", 3)} and not woken.emptied
        assert watch.deleted == {tap: (300, 0)}
        assert other not in watch.deleted
        assert watch.wait(0.2) is None  # told once; the other tap's end is not followed
        watch.sync({}, {})
        assert watch.deleted == {}
    finally:
        watch.close()


def _ifindexes(ns: str) -> dict[str, int]:
    out = subprocess.run(["ip", "-n", ns, "-o", "link"], capture_output=True, text=True,
                         check=True).stdout
    return {line.split(": ")[1].split("@")[0]: int(line.split(":")[0])
            for line in out.splitlines()}


def _dellink(ifindex: int, rx: int, tx: int, *, stats: bool = True) -> bytes:
    attrs = b""
    name = b"tap0\0"
    attrs += struct.pack("=HH", 4 + len(name), 3) + name + bytes(-len(name) % 4)
    if stats:
        body = struct.pack("=QQQQ", 1, 2, rx, tx) + bytes(8 * 20)
        attrs += struct.pack("=HH", 4 + len(body), 23) + body
    ifi = struct.pack("=BBHiII", 0, 0, 1, ifindex, 0, 0)
    msg = ifi + attrs
    return struct.pack("=IHHII", 16 + len(msg), 17, 0, 0, 0) + msg


def test_dellink_messages_are_decoded_and_filtered() -> None:
    newlink = bytearray(_dellink(9, 1, 1))
    newlink[4:6] = struct.pack("=H", 16)  # RTM_NEWLINK: not an end
    data = _dellink(5, 1000, 2000) + bytes(newlink) + _dellink(6, 7, 8) \
        + _dellink(7, 0, 0, stats=False)
    assert dellink_stats(data) == {5: (1000, 2000), 6: (7, 8)}
    assert dellink_stats(data, keep=[6, 9]) == {6: (7, 8)}
    assert dellink_stats(data[:-3]) == {5: (1000, 2000), 6: (7, 8)}  # a cut message: stop
