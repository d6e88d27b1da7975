"""Changes to a few named files, seen by inotify on their directories, so that a daemon that
watches a file costs nothing while the file does not change.

Polling a file's mtime every few seconds wakes trio each time, and on a busy hypervisor each
wake-up pays trio's whole run loop in cache misses (~0.5 ms of process CPU each on the lab VM
beside 8 TCG guests): the rules file's 5 s poll and the outbox upkeep cost a third of the
daemon's CPU at the default 30 s interval (docs/benchmarks.md, "Twelfth session").

What is watched: the directory of each path (so an editor's or ansible's write-to-temp-and-
rename is seen, and a file that does not exist yet), for events that change what a path names
(created, written and closed, moved in or out, deleted, attributes); only events for the
watched names count. A path that is a symlink has its directory watched for every name (a
ConfigMap-style `..data` swap) and its target's directory too. IN_MODIFY is not watched: a
busy directory (the state directory: the SQLite files) would wake the watcher on every write,
and a writer that writes in place closes the file at the end (IN_CLOSE_WRITE).

What it cannot see: a change made on another host to a file on a network filesystem, or in a
directory above a watched one. The callers keep a slow poll for those.

`DirWatch(paths)` raises OSError where inotify cannot watch them (not Linux, a directory that
does not exist, the per-user watch limit reached); callers then poll as before. Linux only
(ctypes on libc's inotify calls).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = ["DirWatch", "add_watch", "inotify_init", "read_events", "rm_watch"]

IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

_MASK = (IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
         | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR)
# The directory itself went away or moved: its watch is gone or no longer names the path.
_LOST = IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED | IN_Q_OVERFLOW
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then `len` bytes of NUL-padded name)
_READ_BYTES = 64 * 1024


@functools.cache
def _libc() -> ctypes.CDLL:
    # The process's own symbols (dlopen(NULL)): libc is there, and no `find_library`, which
    # runs ldconfig or a compiler to find it.
    lib = ctypes.CDLL(None, use_errno=True)
    if not hasattr(lib, "inotify_init1"):
        raise OSError(errno.ENOSYS, "inotify is not available")
    return lib


# --- the inotify calls, shared with sources/stop_watch.py ------------------------------------

def inotify_init() -> int:
    """A new non-blocking, close-on-exec inotify descriptor; OSError where there is none."""
    fd: int = _libc().inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"inotify_init1: {os.strerror(err)}")
    return fd


def add_watch(fd: int, path: str | Path, mask: int) -> int:
    """The watch descriptor of `path` on inotify `fd`; OSError naming the path on failure (no
    such file, the per-user watch limit)."""
    wd: int = _libc().inotify_add_watch(fd, os.fsencode(path), mask)
    if wd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"inotify_add_watch {path}: {os.strerror(err)}", str(path))
    return wd


def rm_watch(fd: int, wd: int) -> None:
    """Drop a watch (harmless when the kernel already dropped it)."""
    _libc().inotify_rm_watch(fd, wd)


def read_events(fd: int) -> Iterator[tuple[int, int, bytes]]:
    """Every event queued on non-blocking inotify `fd` now: (wd, mask, name without NULs)."""
    while True:
        try:
            data = os.read(fd, _READ_BYTES)
        except BlockingIOError:
            return
        if not data:
            return
        off = 0
        while off + _EVENT.size <= len(data):
            wd, mask, _, length = _EVENT.unpack_from(data, off)
            name = data[off + _EVENT.size:off + _EVENT.size + length].rstrip(b"\0")
            off += _EVENT.size + length
            yield wd, mask, name


class DirWatch:
    """One inotify descriptor watching the directories of `paths`; `drain()` after it reads
    readable says whether a watched name changed. Not thread-safe; close it when done."""

    def __init__(self, paths: Iterable[Path]) -> None:
        self.fd: int = inotify_init()
        self.lost = False  # a watched directory went away: reopen the watch (or poll)
        self._names: dict[int, frozenset[str] | None] = {}  # wd → names (None: every name)
        try:
            wanted: dict[Path, set[str] | None] = {}
            for p in paths:
                self._want(wanted, p.parent, p.name)
                if p.is_symlink():
                    wanted[p.parent] = None  # a swapped link may change what it names
                    target = Path(os.path.realpath(p))
                    self._want(wanted, target.parent, target.name)
            for d, names in wanted.items():
                self._add(d, names)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _want(wanted: dict[Path, set[str] | None], d: Path, name: str) -> None:
        if d in wanted:
            names = wanted[d]
            if names is not None:
                names.add(name)
        else:
            wanted[d] = {name}

    def _add(self, d: Path, names: set[str] | None) -> None:
        self._names[add_watch(self.fd, d, _MASK)] = None if names is None else frozenset(names)

    def drain(self) -> bool:
        """Read every queued event; True when one concerns a watched name (or a watch was
        lost: then `lost` is set too)."""
        changed = False
        for wd, mask, name in read_events(self.fd):
            if mask & _LOST:
                self.lost = changed = True
                continue
            names = self._names.get(wd)
            if names is None or os.fsdecode(name) in names:
                changed = True
        return changed

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

