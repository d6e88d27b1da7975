"""Kept-open descriptors for the files a pass re-reads (cgroup counters): `pread`, not `open`.

`FdCache.read(path)` answers exactly what `files.cat(path)` would (text; None when gone;
SourceError when unreadable) but keeps the descriptor and re-reads it with
`os.pread(fd, n, 0)`. Measured on cgroupfs (kernel 6.18, 2-core VM): `cat` 7.4-8.3 µs per
file, `FdCache.read` 2.7-2.8 µs (the bare pread 2.0 µs); `bench/pass_cost.py --cgroupfs` shows
the whole pass.

Why a kept descriptor never answers for a dead cgroup (checked on this kernel by
tests/sources/test_fdcache.py against real cgroups):
- cgroupfs, v1 and v2, is kernfs. `rmdir` deactivates the directory's files before it returns;
  from then on every read of a descriptor opened earlier fails with ENODEV, also once a new
  cgroup exists at the same path. Any error on a kept descriptor closes it and reads the path
  afresh with `cat`'s rules, once: the new cgroup's counters, or None when the path is gone.
- A read at offset 0 of a kernfs seq file regenerates its text (seq_read_iter restarts at 0):
  every read is fresh, never a buffer from the previous pass.
- On cgroupfs a path only changes files by rmdir + mkdir: v2 refuses rename (EPERM); v1 allows
  a rename within the parent, which neither libvirt nor systemd does (the kept descriptor
  would follow the renamed cgroup, that is the VM's processes).
- Any other filesystem (recorded fixture trees, bench trees, a root swung by a symlink) can
  replace a file by rename or unlink + create, which a kept descriptor would not see: such
  files are read like `cat`, every time (checking the path with stat() before each pread
  measured 3.4 µs per file on ext4, more than `cat`'s 3.2 µs). A descriptor is on cgroupfs
  when its st_dev is the device of a cgroup/cgroup2 mount in /proc/self/mountinfo; when that
  cannot be read, nothing is kept. Such a file's directory is remembered (one string per
  directory, not an entry per file: ~10 MB less at 5,000 domains on a recorded tree), and the
  other files there are read like `cat` without opening them to look: a cgroupfs file inside
  a plain directory would need a bind mount over a single file, and would only be read
  uncached.

Bounded: at most `max_fds` kept descriptors (default: half the RLIMIT_NOFILE soft limit minus
a reserve). A path read while the cache is full is read uncached, like `cat`: evicting instead
(LRU) would thrash when a pass touches more files than fit. `sweep()`, once per pass, closes
the descriptors not read since the previous sweep (domains that went away); `close()` closes
all; reads after `close()` are uncached.

Thread-safe: one lock around the dict (two acquisitions per read, 0.27 µs of the 2.7 µs).
A reader takes its entry out while it reads, so two threads never share a descriptor (a second
reader of the same path opens its own, and the spare is closed when both put theirs back).
Per-thread dicts would save the lock but keep one descriptor per path per worker thread.
"""

from __future__ import annotations

import contextlib
import os
import resource
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

from hostagent.errors import SourceError
from hostagent.sources.files import CHUNK_BYTES, cat, cat_bytes, gone_or_error, parse_mountinfo

__all__ = ["FdCache", "FdCacheStats", "cgroup_devices", "default_max_fds"]

# Filesystems whose removed files fail reads on earlier descriptors (kernfs), by mountinfo type.
_SELF_INVALIDATING_FS = frozenset({"cgroup", "cgroup2"})
# Descriptors left to everything else (libvirt, SQLite, netlink, sinks, API clients).
_RESERVED_FDS = 128
_MAX_FDS_CAP = 65536


def default_max_fds() -> int:
    """Half the RLIMIT_NOFILE soft limit minus a reserve, capped; 0 (no caching) when tiny."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 2 * _MAX_FDS_CAP
    return max(0, min(soft // 2 - _RESERVED_FDS, _MAX_FDS_CAP))


def cgroup_devices(mountinfo: str = "/proc/self/mountinfo") -> frozenset[int]:
    """st_dev of every cgroup/cgroup2 mount (field 3 of mountinfo); empty when unreadable."""
    try:
        text = cat(mountinfo)
    except SourceError:
        return frozenset()
    return frozenset(m.dev for m in parse_mountinfo(text or "")
                     if m.fstype in _SELF_INVALIDATING_FS)


@dataclass(slots=True)
class _Entry:
    fd: int
    used: int  # sweep generation of the last read


@dataclass(frozen=True, slots=True)
class FdCacheStats:
    """Counters since the cache was made: where reads went and what was closed."""

    hits: int  # answered from a kept descriptor
    opened: int  # descriptors opened and kept
    stale: int  # kept descriptors whose read failed (ENODEV: cgroup removed), then reopened
    uncached: int  # read like `cat`: not on cgroupfs, or the cache was full or closed
    swept: int  # descriptors closed by sweep() (not read for a whole pass)


def _close_all(entries: dict[str, _Entry]) -> int:
    """Close and remove every entry; how many descriptors were closed."""
    n = 0
    while entries:
        _, entry = entries.popitem()
        with contextlib.suppress(OSError):
            os.close(entry.fd)
        n += 1
    return n


class FdCache:
    """Kept-open descriptors keyed by full (rooted) path; `read` answers like `files.cat`."""

    __slots__ = ("__weakref__", "_cgroup_devs", "_chunk_bytes", "_closed", "_counts",
                 "_entries", "_finalizer", "_gen", "_lock", "_mountinfo", "_open", "_plain",
                 "max_fds")

    def __init__(self, max_fds: int | None = None, *, chunk_bytes: int = CHUNK_BYTES,
                 mountinfo: str = "/proc/self/mountinfo") -> None:
        self.max_fds = default_max_fds() if max_fds is None else max_fds
        self._chunk_bytes = chunk_bytes
        self._mountinfo = mountinfo
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        # Directories not on cgroupfs (their files are read like `cat`) → the sweep period
        # they were last read in.
        self._plain: dict[str, int] = {}
        self._open = 0  # descriptors owned: in the dict or being read by a thread
        self._gen = 0
        self._closed = False
        self._cgroup_devs: frozenset[int] | None = None  # read once per sweep period
        self._counts = dict.fromkeys(FdCacheStats.__dataclass_fields__, 0)
        # A cache dropped without close() (tests, a crashed builder) still closes its fds.
        self._finalizer = weakref.finalize(self, _close_all, self._entries)

    @property
    def open_fds(self) -> int:
        """Descriptors the cache holds now (kept, or being read by a thread)."""
        return self._open

    def stats(self) -> FdCacheStats:
        """A snapshot of the counters."""
        with self._lock:
            return FdCacheStats(**self._counts)

    def read(self, path: str) -> str | None:
        """Whole text of the file at `path`; None when gone; SourceError when unreadable."""
        data = self.read_bytes(path)
        return None if data is None else data.decode("utf-8", "replace")

    def read_bytes(self, path: str) -> bytes | None:
        """`read` without the decoding (the callers parse bytes: one object less per file).

        The hit path is one method: take the entry out under the lock, pread, put it back.
        """
        entries = self._entries
        plain = False
        with self._lock:
            entry = entries.get(path)
            if entry is not None:
                del entries[path]  # this thread's alone while it reads
            else:
                plain_dirs = self._plain
                d = path[:path.rfind("/")]
                if d in plain_dirs:  # not on cgroupfs: read like cat, every time
                    plain_dirs[d] = self._gen
                    self._counts["uncached"] += 1
                    plain = True
        if entry is None:
            return cat_bytes(path) if plain else self._read_new(path)
        fd = entry.fd
        try:
            data = os.pread(fd, self._chunk_bytes, 0)
            if len(data) == self._chunk_bytes:  # the rare long file: read on to EOF
                data = self._read_on(fd, data)
        except OSError:  # ENODEV: the cgroup was removed; anything else: cat's rules judge
            self._discard(entry, stale=True)
            return self._read_new(path)
        with self._lock:
            self._counts["hits"] += 1
            if not self._closed and path not in entries:
                entry.used = self._gen
                entries[path] = entry
                return data
        self._discard(entry, stale=False)  # closed meanwhile, or a second reader put one back
        return data

    def read_many(self, paths: Sequence[str | None]) -> list[bytes | SourceError | None]:
        """`read_bytes` of each path, in order, for a batch (a light sample's `cpu.stat`
        files, a pass's cgroup files: 256 domains at a time): the bytes; None when gone (or no
        path given); the SourceError an unreadable file raises, in its place, not raised.

        The kept descriptors of the whole batch are taken out under one lock and put back
        under one (`read_bytes` takes it twice a file: ~0.7 µs a file over the pread)."""
        entries = self._entries
        with self._lock:
            taken = [None if p is None else entries.pop(p, None) for p in paths]
        out: list[bytes | SourceError | None] = []
        back: list[tuple[str, _Entry]] = []
        pread, chunk = os.pread, self._chunk_bytes  # `_pread_all`, inline: once per file
        for path, entry in zip(paths, taken, strict=True):
            if path is None:
                out.append(None)
                continue
            if entry is not None:
                try:
                    data = pread(entry.fd, chunk, 0)
                    if len(data) == chunk:
                        data = self._read_on(entry.fd, data)
                except OSError:
                    self._discard(entry, stale=True)  # as read_bytes: cat's rules judge
                else:
                    out.append(data)
                    back.append((path, entry))
                    continue
            try:
                out.append(self.read_bytes(path) if entry is None else self._read_new(path))
            except SourceError as err:
                out.append(err)
        spares: list[_Entry] = []
        with self._lock:
            self._counts["hits"] += len(back)
            gen = self._gen
            for path, entry in back:
                if self._closed or path in entries:
                    spares.append(entry)  # closed meanwhile, or a second reader put one back
                else:
                    entry.used = gen
                    entries[path] = entry
        for entry in spares:
            self._discard(entry, stale=False)
        return out

    def sweep(self) -> int:
        """Close the descriptors not read since the previous sweep; how many were closed."""
        with self._lock:
            gen = self._gen
            gone = [p for p, e in self._entries.items() if e.used != gen]
            entries = {p: self._entries.pop(p) for p in gone}
            for d in [d for d, used in self._plain.items() if used != gen]:
                del self._plain[d]
            self._gen += 1
            self._cgroup_devs = None  # mounts may change: look again when next opening
        n = _close_all(entries)
        with self._lock:
            self._open -= n
            self._counts["swept"] += n
        return n

    def close(self) -> None:
        """Close every kept descriptor; later reads are uncached. Idempotent."""
        with self._lock:
            self._closed = True
            entries = dict(self._entries)
            self._entries.clear()
            self._plain.clear()
        n = _close_all(entries)
        with self._lock:
            self._open -= n
        self._finalizer.detach()

    # --- internals ---------------------------------------------------------------------------

    def _read_new(self, path: str) -> bytes | None:
        with self._lock:
            keep = not self._closed and self._open < self.max_fds
            if keep:
                self._open += 1
            else:
                self._counts["uncached"] += 1
        if not keep:
            return cat_bytes(path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            self._release()
            if (error := gone_or_error(err, "open", path)) is None:
                return None
            raise error from err
        kept = False
        try:
            data = self._pread_all(fd)
            kept = os.fstat(fd).st_dev in self._cgroupfs()
        except OSError as err:
            if (error := gone_or_error(err, "read", path)) is None:
                return None
            raise error from err
        finally:
            if not kept:
                os.close(fd)
                self._release()
        if kept:
            self._put_back(path, _Entry(fd, self._gen))
        else:
            with self._lock:
                self._counts["uncached"] += 1
                if not self._closed:
                    self._plain[path[:path.rfind("/")]] = self._gen
        return data

    def _pread_all(self, fd: int) -> bytes:
        data = os.pread(fd, self._chunk_bytes, 0)
        return self._read_on(fd, data) if len(data) == self._chunk_bytes else data

    def _read_on(self, fd: int, first: bytes) -> bytes:
        """The rest of a file whose first chunk came back full: read on to EOF, as cat does."""
        chunk = self._chunk_bytes
        parts = [first]
        offset = len(first)
        while part := os.pread(fd, chunk, offset):
            parts.append(part)
            offset += len(part)
        return b"".join(parts)

    def _cgroupfs(self) -> frozenset[int]:
        devs = self._cgroup_devs
        if devs is None:
            devs = self._cgroup_devs = cgroup_devices(self._mountinfo)
        return devs

    def _put_back(self, path: str, entry: _Entry) -> None:
        with self._lock:
            self._counts["opened"] += 1
            spare = self._closed or path in self._entries
            if not spare:
                entry.used = self._gen
                self._entries[path] = entry
        if spare:
            self._discard(entry, stale=False)

    def _discard(self, entry: _Entry, *, stale: bool) -> None:
        with contextlib.suppress(OSError):
            os.close(entry.fd)
        with self._lock:
            self._open -= 1
            if stale:
                self._counts["stale"] += 1

    def _release(self) -> None:
        with self._lock:
            self._open -= 1
