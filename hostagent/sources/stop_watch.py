"""The moment a VM's QEMU process ends, and the final counters of its deleted taps.

Light samples bound what a `virsh destroy`, a crash or a kill leaves unbilled to one sample
interval, and a host pays for that bound in wake-ups: 15 samples a 30 s pass cost it more than
the pass (docs/benchmarks.md). Two kernel notifications give the final counters at the stop
itself, so the periodic samples only back them up:

* **the VM cgroup empties**: a v2 cgroup's `cgroup.events` changes to `populated 0` when its
  last process is reaped, and inotify reports that as IN_MODIFY (kernfs_notify). The cgroup and
  its `cpu.stat` / `io.stat` are still there until libvirt (or systemd) removes it, later: a
  light sample taken at once reads the process's final CPU and disk bytes. Measured on the lab:
  the notification ~45 ms after `virsh destroy` started, the cgroup still readable.
* **a tap is deleted** (QEMU closed it when it exited, or the NIC was hot-unplugged): the
  RTM_DELLINK notification of the RTNLGRP_LINK multicast group carries the link's final
  IFLA_STATS64. Kept by ifindex (the light sample's key), the samples use them for taps already
  gone. A watched tap's end also wakes the wait for its domain (`Woken.unplugged`): a NIC
  detached from a running VM is sampled at once, so its bytes up to the detach are billed
  (docs/billing-tail.md, "A NIC hot-unplugged").

`StopWatch.wait()` blocks on both descriptors and a wake-up pipe (`wake()`), so the light-samples
thread sleeps on it instead of a timer. Nothing here reads a counter: the caller samples the
domains `wait()` names. Linux only (inotify through hostagent/file_watch.py, netlink); the
constructor raises OSError where either is unavailable, and the caller samples on its timer
alone.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from hostagent.errors import SourceError
from hostagent.file_watch import (
    IN_IGNORED,
    IN_Q_OVERFLOW,
    add_watch,
    inotify_init,
    read_events,
    rm_watch,
)
from hostagent.sources.rtnl_links import parse_link, route_socket

__all__ = ["StopWatch", "Woken", "dellink_stats"]

IN_MODIFY = 0x00000002
_READ_BYTES = 64 * 1024
_RTMGRP_LINK = 1
_RTM_DELLINK = 17
_NLMSGHDR_BYTES = 16
_LINK_MSG_MIN_BYTES = _NLMSGHDR_BYTES + 16  # and its struct ifinfomsg
_LEN_TYPE = struct.Struct("=IH")  # nlmsghdr's len and type
# A multicast socket that cannot keep up loses notifications (ENOBUFS), never blocks the kernel.
_RCVBUF_BYTES = 1 << 20


def dellink_stats(data: bytes, keep: Iterable[int] | None = None
                  ) -> dict[int, tuple[int, int]]:
    """(rx_bytes, tx_bytes) by ifindex of the RTM_DELLINK messages in one netlink read, decoded
    as the link dump decodes RTM_NEWLINK (sources/rtnl_links.parse_link: the same layout).

    `keep`: only these ifindexes (None: all). A message without IFLA_STATS64 is skipped; a
    malformed one ends the read (nothing after it can be trusted)."""
    wanted = None if keep is None else set(keep)
    out: dict[int, tuple[int, int]] = {}
    off, end = 0, len(data)
    while off + _NLMSGHDR_BYTES <= end:
        mlen, mtype = _LEN_TYPE.unpack_from(data, off)
        if mlen < _NLMSGHDR_BYTES or off + mlen > end:
            break
        if mtype == _RTM_DELLINK and mlen >= _LINK_MSG_MIN_BYTES:
            try:
                link = parse_link(data, off, off + mlen)
            except SourceError:
                break
            if link is not None and (wanted is None or link.ifindex in wanted) \
                    and link.rx_bytes is not None and link.tx_bytes is not None:
                out[link.ifindex] = (link.rx_bytes, link.tx_bytes)
        off += (mlen + 3) & ~3
    return out


@dataclass(frozen=True, slots=True)
class Woken:
    """What `StopWatch.wait()` returned for: the keys whose cgroup emptied, whether the watch
    lost notifications (an inotify queue overflow: sample everything), and the keys one of
    whose taps was deleted (`deleted` holds its final counters)."""

    emptied: frozenset[object]
    overflow: bool = False
    unplugged: frozenset[object] = frozenset()


class StopWatch:
    """Watches the `cgroup.events` of the VM cgroups it is given and collects the final
    counters of deleted taps; one thread uses it (not thread-safe), `wake()` from any."""

    def __init__(self, *, links: bool = True, netns: str | None = None) -> None:
        self._inotify = inotify_init()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sock: socket.socket | None = None
        try:
            if links:
                sock = route_socket(netns)
                self._sock = sock
                sock.setblocking(False)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF_BYTES)
                sock.bind((0, _RTMGRP_LINK))
        except BaseException:
            self.close()
            raise
        self._poll = select.poll()
        for d in (self._inotify, self._wake_r, *([self._sock.fileno()] if self._sock else [])):
            self._poll.register(d, select.POLLIN)
        self._by_key: dict[object, tuple[str, int]] = {}  # key -> (cgroup.events path, wd)
        self._by_wd: dict[int, object] = {}
        self._taps: Mapping[int, object] = {}  # ifindex -> key of the domain it belongs to
        self.deleted: dict[int, tuple[int, int]] = {}  # final (rx, tx) of deleted taps
        self._unplugged: set[object] = set()  # keys a tap of which was deleted, not yet told
        self.failed: set[object] = set()  # keys whose cgroup could not be watched
        self._ended: set[object] = set()  # keys already reported emptied (reported once)

    @property
    def follows_links(self) -> bool:
        """Deleted taps' final counters are collected (a netlink socket is open)."""
        return self._sock is not None

    @property
    def watched(self) -> frozenset[object]:
        """The keys whose cgroup's end is watched now."""
        return frozenset(self._by_key)

    def sync(self, cgroups: Mapping[object, str], taps: Mapping[int, object]) -> None:
        """Watch exactly these cgroup directories (by key) and follow the end of these taps
        (ifindex -> key of their domain) only; a directory that cannot be watched lands in
        `failed`."""
        for key in [k for k in self._by_key if k not in cgroups]:
            path, wd = self._by_key.pop(key)
            self._by_wd.pop(wd, None)
            rm_watch(self._inotify, wd)
        self.failed = {k for k in self.failed if k in cgroups}
        self._ended &= set(cgroups)
        for key, directory in cgroups.items():
            path = f"{directory}/cgroup.events"
            had = self._by_key.get(key)
            if had is not None:
                if had[0] == path:
                    continue
                self._by_wd.pop(had[1], None)  # the same process, its cgroup moved
                rm_watch(self._inotify, had[1])
                del self._by_key[key]
                self._ended.discard(key)
            try:
                wd = add_watch(self._inotify, path, IN_MODIFY)
            except OSError:
                self.failed.add(key)  # no such cgroup (v1), or the watch limit reached
                continue
            self.failed.discard(key)
            other = self._by_wd.get(wd)  # the same cgroup under another key: one watch
            if other is not None and other != key:
                self._by_key.pop(other, None)
            self._by_key[key] = (path, wd)
            self._by_wd[wd] = key
        self._taps = dict(taps)
        self.deleted = {i: v for i, v in self.deleted.items() if i in self._taps}

    def has_ended(self, key: object) -> bool:
        """The end of `key`'s cgroup was reported (`Woken.emptied`), and it held no process
        since."""
        return key in self._ended

    def wait(self, timeout_s: float | None) -> Woken | None:
        """Block until a watched cgroup empties or a followed tap is deleted, `wake()` is
        called or `timeout_s` passes; None unless one of those happened (or notifications
        were lost). Deleted taps' counters collected meanwhile are in `deleted`."""
        ms = -1 if timeout_s is None else max(0, int(timeout_s * 1000 + 0.999))
        try:
            ready = self._poll.poll(ms)
        except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for clarity
            return None
        emptied: set[object] = set()
        overflow = False
        for fd, _ in ready:
            if fd == self._inotify:
                overflow |= self._drain_inotify(emptied)
            elif fd == self._wake_r:
                self._drain_wake()
            else:
                overflow |= self._drain_links()
        unplugged, self._unplugged = self._unplugged, set()
        if not emptied and not overflow and not unplugged:
            return None
        return Woken(frozenset(emptied), overflow, frozenset(unplugged))

    def collect_links(self) -> None:
        """Take the link notifications queued now (before a sample that needs them); a
        socket error leaves the sample to the dump and the counters collected before."""
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._drain_links()

    def wake(self) -> None:
        """Make a `wait()` in progress (or the next one) return at once. Thread-safe."""
        # A full pipe has a wake-up pending anyway; a closed one has no reader left.
        with contextlib.suppress(OSError, ValueError):
            os.write(self._wake_w, b"\0")

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _drain_inotify(self, emptied: set[object]) -> bool:
        overflow = False
        changed: set[object] = set()
        for wd, mask, _ in read_events(self._inotify):
            if mask & IN_Q_OVERFLOW:
                overflow = True
                continue
            key = self._by_wd.get(wd)
            if key is None:
                continue
            if mask & IN_IGNORED:  # the watch is gone
                self._by_wd.pop(wd, None)
                self._by_key.pop(key, None)
                continue
            changed.add(key)
        for key in changed:  # `populated` or `frozen` changed: only an empty cgroup counts
            had = self._by_key.get(key)
            if had is not None and not _emptied(had[0]):
                self._ended.discard(key)  # populated again: a later end counts anew
            elif key not in self._ended:  # an end is reported once, whatever follows it
                self._ended.add(key)
                emptied.add(key)
        return overflow

    def _drain_links(self) -> bool:
        sock = self._sock
        assert sock is not None
        lost = False
        while True:
            try:
                data = sock.recv(_READ_BYTES)
            except BlockingIOError:
                return lost
            except OSError as err:
                if err.errno == errno.ENOBUFS:  # notifications were dropped: sample all
                    lost = True
                    continue
                raise
            if not data:
                return lost
            taps = self._taps
            gone = dellink_stats(data, taps)
            if gone:
                self.deleted.update(gone)
                self._unplugged.update(taps[i] for i in gone)

    def close(self) -> None:
        """Release the descriptors."""
        for name in ("_inotify", "_wake_r", "_wake_w"):
            fd = getattr(self, name, -1)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _emptied(events_path: str) -> bool:
    """The cgroup's `cgroup.events` says `populated 0`, or the cgroup is gone already (its end
    passed: the caller's read tells which)."""
    try:
        with open(events_path, "rb") as f:
            text = f.read()
    except OSError:
        return True
    return b"populated 0" in text
