"""Reading a domain's cgroup files (the dirs sources/cgroup.py `locate` found): CPU, memory, io
and PSI, one domain (`read`) or a whole pass's domains in batches (`read_many`).

A reader given an `FdCache` keeps the cgroup files open across passes (sources/fdcache.py says
why a kept descriptor never answers for a removed cgroup). docs/sources.md lists what each
field is read from.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Literal, NamedTuple

from hostagent.errors import SourceError
from hostagent.model import IoSource, Pressure
from hostagent.source_model import CgroupPaths, CgroupReading, ControllerDir
from hostagent.sources.fdcache import FdCache
from hostagent.sources.files import HostRoot, cat_bytes, kv_bytes

# `rbytes=` / `wbytes=` tokens after a device's `MAJ:MIN` (a malformed value fails int()).
_IO_BYTES = re.compile(rb"[ \t]([rw])bytes=(\S*)")

__all__ = ["READ_ERRORS", "CgroupReader", "KeptPressure", "ReadAsk", "sum_io_stat"]

# The failures a per-domain read can raise: the source's own error (a file that is there but
# cannot be read or parsed), and OS or value errors from paths no file helper saw.
READ_ERRORS = (SourceError, OSError, ValueError)

# Why a figure is missing when its file is gone (not unreadable): its cgroup was removed.
_ABSENT = "absent: "
# v1 reports "no limit" as PAGE_COUNTER_MAX pages (9223372036854771712 with 4 KiB pages).
_V1_UNLIMITED_BYTES = 1 << 62
_MEMORY_KEYS = ("cgroup:memory_current_bytes", "cgroup:memory_working_set_bytes",
                "cgroup:memory_limit_bytes")
_PSI_FILES = tuple((r, f"cgroup:pressure.{r}") for r in ("cpu", "memory", "io"))
# PSI figures of an earlier read and why some were missing (`CgroupReader.read(kept=...)`).
KeptPressure = tuple[Pressure | None, Mapping[str, str]]


# Domains whose files one `FdCache.read_many` call reads (sources/light.py batches its cpu.stat
# files the same way): the files' bytes of a whole large host held at once are fresh memory
# every pass, and cost more than the lock round trips they save.
_BATCH_DOMAINS = 256


# A domain's files as `_parse` takes them: (host path, its bytes, None when gone, or the error
# reading it raised), in `_files` order.
Got = Iterator[tuple[str, bytes | SourceError | None]]


class ReadAsk(NamedTuple):
    """One domain for `CgroupReader.read_many`: its dirs and what to read (`read`'s flags)."""

    paths: CgroupPaths
    cpu: bool = True
    memory: bool = True
    pressure: bool = True
    kept: KeptPressure | None = None


class CgroupReader:
    """Reads domains' counters from the dirs `locate` found: `read` one domain, `read_many` a
    whole pass's domains in one batch.

    `io="v2"` reads a v2 `io.stat` only (no v1 blkio file, no `missing` entry without one).
    `io=False` / `pressure=False` / `limit=False` skip those files (each costs ~7 µs of kernel
    time per domain on cgroupfs to open and read, ~2 µs to re-read through `fds`); skipped
    fields are None with no `missing` entry. The daemon reads a v2 `io.stat` only to anchor the
    billing tail (disk bytes come from libvirt), never v1 blkio nor the memory limit (no event,
    alert or API field uses it). With `fds` the
    reader owns that cache: call `sweep()` once per pass, after the reads, and `close()` when
    done.

    A read is two steps: the files a domain needs (`_files`), then the figures parsed from
    their bytes in the same order (`_parse`). `read_many` lists the files of every domain
    first and reads them all with one `FdCache.read_many` (one lock round trip a batch, not
    two a file); at 1,000 domains that is about half the Python a pass spent per file.
    """

    __slots__ = ("_fds", "_io", "_limit", "_prefix", "_pressure")

    def __init__(self, root: HostRoot, *, io: bool | Literal["v2"] = True,
                 pressure: bool = True, limit: bool = True, fds: FdCache | None = None
                 ) -> None:
        self._prefix = root.abspath("/").rstrip("/")
        self._io = io
        self._limit = limit
        self._pressure = pressure
        self._fds = fds

    def sweep(self) -> None:
        """After a pass's reads: close the kept files no domain read (VMs that went away)."""
        if self._fds is not None:
            self._fds.sweep()

    def close(self) -> None:
        """Close every kept file; later reads open and close each file. Idempotent."""
        if self._fds is not None:
            self._fds.close()

    def read(self, paths: CgroupPaths, *, cpu: bool = True, memory: bool = True,
             pressure: bool = True, kept: KeptPressure | None = None) -> CgroupReading:
        """Every counter that can be read now; the rest None, with the reason in `missing`.

        `cpu=False` / `memory=False` skip those files when the caller already has the figure
        from libvirt, `pressure=False` the PSI files (skipped fields are None with no `missing`
        entry); `kept`: PSI figures (and why some are missing) from an earlier read, used
        instead of reading the PSI files.
        """
        ask = ReadAsk(paths, cpu=cpu, memory=memory, pressure=pressure, kept=kept)
        got = self.read_many([ask])[0]
        if isinstance(got, Exception):
            raise got
        return got

    def read_many(self, asks: Sequence[ReadAsk]) -> list[CgroupReading | Exception]:
        """`read` of each ask, in order, the files of `_BATCH_DOMAINS` domains read in one
        batch; a domain whose figures cannot be made (an error no file helper turned into a
        `missing` entry) gets the error in its place, and only that domain."""
        out: list[CgroupReading | Exception] = []
        prefix = self._prefix
        for start in range(0, len(asks), _BATCH_DOMAINS):
            batch = asks[start:start + _BATCH_DOMAINS]
            files: list[list[str]] = [self._files(a) for a in batch]
            datas = self._read_files([prefix + f for fs in files for f in fs])
            at = 0
            for ask, fs in zip(batch, files, strict=True):
                n = len(fs)
                try:
                    out.append(self._parse(ask, zip(fs, datas[at:at + n], strict=True)))
                except READ_ERRORS as err:
                    out.append(err)
                at += n
        return out

    def _read_files(self, flat: list[str]) -> list[bytes | SourceError | None]:
        if self._fds is not None:
            return self._fds.read_many(flat)
        out: list[bytes | SourceError | None] = []
        for path in flat:
            try:
                out.append(cat_bytes(path))
            except SourceError as err:
                out.append(err)
        return out

    def _files(self, ask: ReadAsk) -> list[str]:
        """The host paths `_parse` will take, in its order."""
        paths = ask.paths
        out: list[str] = []
        d = paths.cpu
        if ask.cpu and d is not None:
            out.append(d.path + ("/cpu.stat" if d.version == 2 else "/cpuacct.usage"))
        d = paths.memory
        if ask.memory and d is not None:
            if d.version == 2:
                out += (d.path + "/memory.current", d.path + "/memory.stat")
                if self._limit:
                    out.append(d.path + "/memory.max")
            else:
                out += (d.path + "/memory.usage_in_bytes", d.path + "/memory.stat")
        d = paths.io
        if self._io and d is not None and (self._io is True or d.version == 2):
            out.append(d.path + ("/io.stat" if d.version == 2
                                 else "/blkio.throttle.io_service_bytes"))
        u = paths.unified
        if ask.kept is None and self._pressure and ask.pressure and u is not None:
            out += (u + "/cpu.pressure", u + "/memory.pressure", u + "/io.pressure")
        return out

    def _parse(self, ask: ReadAsk, got: Got) -> CgroupReading:
        """The reading from the bytes of `_files(ask)`, taken from `got` in that order."""
        paths = ask.paths
        missing: dict[str, str] = {}
        cpu_ns = self._cpu(paths, got, missing) if ask.cpu else None
        current, working_set, limit = (self._memory(paths, got, missing) if ask.memory
                                       else (None, None, None))
        io = self._io
        rd, wr, io_source = (self._read_io(paths, got, missing) if io is True or (
            io and paths.io is not None and paths.io.version == 2) else (None, None, None))
        if ask.kept is not None:
            psi, kept_missing = ask.kept
            missing.update(kept_missing)
        elif self._pressure and ask.pressure:
            psi = self._read_pressure(paths, got, missing)
        else:
            psi = None
        return CgroupReading(
            cpu_ns=cpu_ns, memory_current_bytes=current, memory_working_set_bytes=working_set,
            memory_limit_bytes=limit, io_read_bytes=rd, io_write_bytes=wr, io_source=io_source,
            pressure=psi, missing=missing, cpu_gone=cpu_ns is None and ask.cpu and missing.get(
                "cgroup:cpu_ns", "").startswith(_ABSENT) and paths.cpu is not None,
        )

    @staticmethod
    def _next(got: Got, key: str, missing: dict[str, str]) -> bytes | None:
        """The next file's bytes (parsed without decoding: int() and float() take bytes);
        None, with why in `missing[key]`, when it is gone or unreadable."""
        host_path, data = next(got)
        return CgroupReader._usable(host_path, data, key, missing)

    @staticmethod
    def _usable(host_path: str, data: bytes | SourceError | None, key: str,
                missing: dict[str, str]) -> bytes | None:
        """`data`, or None with why in `missing[key]`: the file is gone or was unreadable."""
        if data is None:
            missing[key] = f"{_ABSENT}{host_path}"
        elif isinstance(data, SourceError):
            missing[key] = f"unreadable: {data}"
            return None
        return data

    def _cat(self, host_path: str, key: str, missing: dict[str, str]) -> bytes | None:
        """One file read on its own (the rare v1 memory-limit fallback)."""
        path = self._prefix + host_path
        data: bytes | SourceError | None
        try:
            data = cat_bytes(path) if self._fds is None else self._fds.read_bytes(path)
        except SourceError as err:
            data = err
        return self._usable(host_path, data, key, missing)

    def _cpu(self, paths: CgroupPaths, got: Got, missing: dict[str, str]) -> int | None:
        d = paths.cpu
        if d is None:
            missing["cgroup:cpu_ns"] = paths.missing.get("cpu", "no cpu cgroup")
            return None
        data = self._next(got, "cgroup:cpu_ns", missing)
        if data is None:
            return None
        if d.version == 2:
            usage_usec = kv_bytes(data, b"usage_usec ")
            if usage_usec is None:
                missing["cgroup:cpu_ns"] = f"no usage_usec in {d.path}/cpu.stat"
                return None
            return usage_usec * 1000
        return self._int(data, d.path, "cpuacct.usage", "cgroup:cpu_ns", missing)

    def _memory(self, paths: CgroupPaths, got: Got, missing: dict[str, str]
                ) -> tuple[int | None, int | None, int | None]:
        d = paths.memory
        keys = _MEMORY_KEYS
        if d is None:
            why = paths.missing.get("memory", "no memory cgroup")
            missing.update(dict.fromkeys(keys if self._limit else keys[:2], why))
            return None, None, None
        v2 = d.version == 2
        cur_file = "memory.current" if v2 else "memory.usage_in_bytes"
        data = self._next(got, keys[0], missing)
        current = None if data is None else self._int(data, d.path, cur_file, keys[0], missing)
        stat = self._next(got, keys[1], missing)
        # cAdvisor's working set: usage minus inactive file cache (v1: hierarchical total_*).
        inactive = None if stat is None else kv_bytes(stat, b"inactive_file " if v2
                                                      else b"total_inactive_file ")
        working_set: int | None = None
        if current is not None and inactive is not None:
            working_set = max(current - inactive, 0)
        elif keys[1] not in missing:
            missing[keys[1]] = (f"no memory usage in {d.path}" if current is None
                                else f"no inactive_file in {d.path}/memory.stat")
        limit = self._memory_limit(d, stat, got, missing) if self._limit else None
        return current, working_set, limit

    def _memory_limit(self, d: ControllerDir, stat: bytes | None, got: Got,
                      missing: dict[str, str]) -> int | None:
        """The memory limit in bytes; None when unlimited (no `missing` entry) or unreadable."""
        key = _MEMORY_KEYS[2]
        if d.version == 2:
            data = self._next(got, key, missing)
            if data is None or data.strip() == b"max":
                return None
            return self._int(data, d.path, "memory.max", key, missing)
        # hierarchical_memory_limit is the effective limit (parents included) and saves
        # opening memory.limit_in_bytes; the file is the fallback for odd kernels.
        limit = None if stat is None else kv_bytes(stat, b"hierarchical_memory_limit ")
        if limit is None:
            data = self._cat(d.path + "/memory.limit_in_bytes", key, missing)
            if data is not None:
                limit = self._int(data, d.path, "memory.limit_in_bytes", key, missing)
        if limit is not None and limit >= _V1_UNLIMITED_BYTES:
            return None
        return limit

    def _read_io(self, paths: CgroupPaths, got: Got, missing: dict[str, str]
                 ) -> tuple[int | None, int | None, IoSource | None]:
        d = paths.io
        keys = ("cgroup:io_read_bytes", "cgroup:io_write_bytes")
        if d is None:
            missing.update(dict.fromkeys(keys, paths.missing.get("io", "no io cgroup")))
            return None, None, None
        name = "io.stat" if d.version == 2 else "blkio.throttle.io_service_bytes"
        data = self._next(got, keys[0], missing)
        if data is None:
            missing[keys[1]] = missing[keys[0]]
            return None, None, None
        try:
            if d.version == 2:
                rd, wr = sum_io_stat(data)
                return rd, wr, "v2:io.stat"
            rd, wr = _sum_blkio(data.decode("utf-8", "replace"))
        except ValueError as err:
            missing.update(dict.fromkeys(keys, f"malformed {d.path}/{name}: {err}"))
            return None, None, None
        return rd, wr, "v1:blkio.throttle"

    def _read_pressure(self, paths: CgroupPaths, got: Got,
                       missing: dict[str, str]) -> Pressure | None:
        d = paths.unified
        if d is None:
            missing["cgroup:pressure"] = paths.missing.get("pressure", "no cgroup v2 directory")
            return None
        values: list[float | None] = []
        for resource, key in _PSI_FILES:
            data = self._next(got, key, missing)
            value = None if data is None else _some_avg10(data)
            if data is not None and value is None:
                missing[key] = f"malformed {d}/{resource}.pressure"
            values.append(value)
        if values[0] is None and values[1] is None and values[2] is None:
            return None
        return Pressure(cpu_some_avg10=values[0], memory_some_avg10=values[1],
                        io_some_avg10=values[2])

    @staticmethod
    def _int(data: bytes, d: str, name: str, key: str, missing: dict[str, str]) -> int | None:
        try:
            return int(data)
        except ValueError:
            text = data.decode("utf-8", "replace")
            missing[key] = f"malformed {d}/{name}: {text.strip()[:40]!r}"
            return None


def sum_io_stat(data: bytes) -> tuple[int, int]:
    """Σ rbytes, Σ wbytes over the devices of a v2 io.stat (no device yet: 0, 0); ValueError
    for a value that is not a number.

    One regex scan, no decoding: every pass reads a v2 io.stat per domain (the billing tail's
    anchor), and this took half the time `str.split` per token did (0.6 against 1.3 µs a
    one-device file). `tests/sources/test_io_stat.py` holds it to the token-by-token parse."""
    rd = wr = 0
    for kind, value in _IO_BYTES.findall(data):
        if kind == b"r":
            rd += int(value)
        else:
            wr += int(value)
    return rd, wr


def _sum_blkio(text: str) -> tuple[int, int]:
    """Σ Read, Σ Write over the `MAJ:MIN Op bytes` lines of v1 blkio.throttle.io_service_bytes."""
    sums = {"Read": 0, "Write": 0}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] in sums:
            sums[parts[1]] += int(parts[2])
    return sums["Read"], sums["Write"]


def _some_avg10(data: bytes) -> float | None:
    """`some avg10=` of a PSI file, in percent."""
    if not data.startswith(b"some avg10="):
        return None
    end = data.find(b" ", 11)
    try:
        return float(data[11:end] if end > 0 else data[11:].strip())
    except ValueError:
        return None
