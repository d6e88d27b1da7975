"""A domain's cgroups: find them from the QEMU pid, read CPU, memory, io and PSI from them.

Layouts (docs/sources.md): hybrid, v2 at `<cgroup_root>/unified` with per-VM
`cpu.stat` + PSI and v1 memory/blkio at `<cgroup_root>/<controller>/machine/qemu-N-NAME...`;
pure v2 (systemd), all under `machine.slice/machine-qemu\\x2dN\\x2dNAME.scope/libvirt`.
QEMU's main thread sits in the `emulator` child; the VM's cgroup is its parent, whose cpu.stat
covers emulator and vcpu threads. The collector caches `CgroupPaths` per (domid, pid); a reader
given an `FdCache` keeps the cgroup files open across passes (sources/fdcache.py says why a
kept descriptor never answers for a removed cgroup).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import NamedTuple

from hostagent.errors import SourceError
from hostagent.model import CgroupPaths, CgroupReading, ControllerDir, IoSource, Pressure
from hostagent.sources.fdcache import FdCache
from hostagent.sources.files import HostRoot, cat_bytes, kv_bytes

# libvirt's per-thread children of a VM cgroup; the VM's own cgroup is their parent.
_THREAD_CHILD = re.compile(r"^(emulator|vcpu\d+|iothread\d+)$")
# v1 reports "no limit" as PAGE_COUNTER_MAX pages (9223372036854771712 with 4 KiB pages).
_V1_UNLIMITED_BYTES = 1 << 62
_MEMORY_KEYS = ("cgroup:memory_current_bytes", "cgroup:memory_working_set_bytes",
                "cgroup:memory_limit_bytes")
_PSI_FILES = tuple((r, f"cgroup:pressure.{r}") for r in ("cpu", "memory", "io"))
# PSI figures of an earlier read and why some were missing (`CgroupReader.read(kept=...)`).
KeptPressure = tuple[Pressure | None, Mapping[str, str]]


# --- locating -----------------------------------------------------------------------------------


def vm_cgroup(path: str) -> str:
    """The VM's cgroup for a /proc/<pid>/cgroup path: the parent of `emulator`/`vcpuN`."""
    head, _, leaf = path.rstrip("/").rpartition("/")
    if _THREAD_CHILD.match(leaf):
        return head or "/"
    return path


def v2_mount(root: HostRoot, cgroup_root: str) -> str | None:
    """The v2 mount point: `cgroup_root` (pure v2), `cgroup_root/unified` (hybrid) or None."""
    base = cgroup_root.rstrip("/")
    for mount in (base, f"{base}/unified"):
        if root.exists(f"{mount}/cgroup.controllers"):
            return mount
    return None


def _join(mount: str, path: str) -> str:
    return mount if path == "/" else f"{mount}{path}"


class _Want(NamedTuple):
    """A controller we read: its name, the v2 file that proves it, its v1 hierarchy and file."""

    name: str
    v2_file: str
    v1_name: str
    v1_file: str


_WANTS = (
    _Want("cpu", "cpu.stat", "cpuacct", "cpuacct.usage"),
    _Want("memory", "memory.current", "memory", "memory.usage_in_bytes"),
    _Want("io", "io.stat", "blkio", "blkio.throttle.io_service_bytes"),
)


def _pick(
    root: HostRoot,
    want: _Want,
    *,
    cgroup_root: str,
    v2_dir: str | None,
    v2_why: str,
    v1: tuple[str, str] | None,
) -> tuple[ControllerDir | None, str]:
    """A controller's per-VM dir, v2 first (what libvirt itself reads), else v1; or why not."""
    if v2_dir is not None:
        if root.exists(f"{v2_dir}/{want.v2_file}"):
            return ControllerDir(v2_dir, 2), ""
        v2_why = f"v2 {v2_dir} has no {want.v2_file}"
    if v1 is None:
        return None, f"{v2_why}; no v1 {want.v1_name} hierarchy"
    field_, path = v1
    if path == "/":
        return None, f"{v2_why}; v1 {want.v1_name} is the root cgroup, not per VM"
    base = cgroup_root.rstrip("/")
    # Co-mounted controllers live at e.g. /sys/fs/cgroup/cpu,cpuacct (plus symlinks).
    for mount_name in dict.fromkeys((field_, *field_.split(","))):
        d = _join(f"{base}/{mount_name}", path)
        if root.exists(f"{d}/{want.v1_file}"):
            return ControllerDir(d, 1), ""
    return None, f"{v2_why}; no {want.v1_file} in v1 {want.v1_name} {path}"


def locate(root: HostRoot, cgroup_root: str, pid: int) -> CgroupPaths | None:
    """A QEMU process's per-VM cgroup dirs from /proc/<pid>/cgroup; None when the pid is gone."""
    text = root.read_text(f"/proc/{pid}/cgroup")
    if text is None:
        return None
    v2_path: str | None = None
    v1: dict[str, tuple[str, str]] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3 or not parts[2].startswith("/"):
            continue
        hier, controllers, path = parts
        if hier == "0" and controllers == "":
            v2_path = vm_cgroup(path)
        else:
            for c in controllers.split(","):
                v1[c] = (controllers, vm_cgroup(path))
    mount = v2_mount(root, cgroup_root)
    v2_dir: str | None = None
    if mount is None:
        v2_why = "no cgroup v2 mount"
    elif v2_path is None:
        v2_why = "no v2 line in /proc/pid/cgroup"
    elif v2_path == "/":
        v2_why = "process is in the v2 root cgroup, not per VM"
    elif not root.exists(_join(mount, v2_path)):
        v2_why = f"v2 {_join(mount, v2_path)} is gone"
    else:
        v2_dir = _join(mount, v2_path)
        v2_why = ""
    missing: dict[str, str] = {}
    found: dict[str, ControllerDir | None] = {}
    for want in _WANTS:
        found[want.name], why = _pick(root, want, cgroup_root=cgroup_root, v2_dir=v2_dir,
                                      v2_why=v2_why, v1=v1.get(want.v1_name))
        if why:
            missing[want.name] = why
    if v2_dir is None:
        missing["pressure"] = v2_why
    return CgroupPaths(cpu=found["cpu"], memory=found["memory"], io=found["io"], unified=v2_dir,
                       missing=missing)


# --- reading ------------------------------------------------------------------------------------


class CgroupReader:
    """Reads a domain's counters from the dirs `locate` found; one call per domain per pass.

    `io=False` / `pressure=False` / `limit=False` skip those files (each costs ~7 µs of kernel
    time per domain on cgroupfs to open and read, ~2 µs to re-read through `fds`); skipped
    fields are None with no `missing` entry. The daemon reads neither io (disk bytes come from
    libvirt) nor the memory limit (no event, alert or API field uses it). With `fds` the
    reader owns that cache: call `sweep()` once per pass, after the reads, and `close()` when
    done.
    """

    __slots__ = ("_fds", "_io", "_limit", "_prefix", "_pressure")

    def __init__(self, root: HostRoot, *, io: bool = True, pressure: bool = True,
                 limit: bool = True, fds: FdCache | None = None) -> None:
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
        missing: dict[str, str] = {}
        cpu_ns = self._cpu(paths, missing) if cpu else None
        current, working_set, limit = (self._memory(paths, missing) if memory
                                       else (None, None, None))
        rd, wr, io_source = self._read_io(paths, missing) if self._io else (None, None, None)
        if kept is not None:
            psi, kept_missing = kept
            missing.update(kept_missing)
        else:
            psi = self._read_pressure(paths, missing) if self._pressure and pressure else None
        return CgroupReading(
            cpu_ns=cpu_ns, memory_current_bytes=current, memory_working_set_bytes=working_set,
            memory_limit_bytes=limit, io_read_bytes=rd, io_write_bytes=wr, io_source=io_source,
            pressure=psi, missing=missing,
        )

    def _cat(self, host_path: str, key: str, missing: dict[str, str]) -> bytes | None:
        """The file's bytes (parsed without decoding: int() and float() take bytes)."""
        path = self._prefix + host_path
        try:
            data = cat_bytes(path) if self._fds is None else self._fds.read_bytes(path)
        except SourceError as err:
            missing[key] = f"unreadable: {err}"
            return None
        if data is None:
            missing[key] = f"absent: {host_path}"
        return data

    def _cpu(self, paths: CgroupPaths, missing: dict[str, str]) -> int | None:
        d = paths.cpu
        if d is None:
            missing["cgroup:cpu_ns"] = paths.missing.get("cpu", "no cpu cgroup")
            return None
        if d.version == 2:
            data = self._cat(d.path + "/cpu.stat", "cgroup:cpu_ns", missing)
            if data is None:
                return None
            usage_usec = kv_bytes(data, b"usage_usec ")
            if usage_usec is None:
                missing["cgroup:cpu_ns"] = f"no usage_usec in {d.path}/cpu.stat"
                return None
            return usage_usec * 1000
        data = self._cat(d.path + "/cpuacct.usage", "cgroup:cpu_ns", missing)
        return None if data is None else self._int(data, d.path, "cpuacct.usage",
                                                   "cgroup:cpu_ns", missing)

    def _memory(
        self, paths: CgroupPaths, missing: dict[str, str]
    ) -> tuple[int | None, int | None, int | None]:
        d = paths.memory
        keys = _MEMORY_KEYS
        if d is None:
            why = paths.missing.get("memory", "no memory cgroup")
            missing.update(dict.fromkeys(keys if self._limit else keys[:2], why))
            return None, None, None
        v2 = d.version == 2
        cur_file = "memory.current" if v2 else "memory.usage_in_bytes"
        data = self._cat(f"{d.path}/{cur_file}", keys[0], missing)
        current = None if data is None else self._int(data, d.path, cur_file, keys[0], missing)
        stat = self._cat(d.path + "/memory.stat", keys[1], missing)
        # cAdvisor's working set: usage minus inactive file cache (v1: hierarchical total_*).
        inactive = None if stat is None else kv_bytes(stat, b"inactive_file " if v2
                                                      else b"total_inactive_file ")
        working_set: int | None = None
        if current is not None and inactive is not None:
            working_set = max(current - inactive, 0)
        elif keys[1] not in missing:
            missing[keys[1]] = (f"no memory usage in {d.path}" if current is None
                                else f"no inactive_file in {d.path}/memory.stat")
        limit = self._memory_limit(d, stat, missing) if self._limit else None
        return current, working_set, limit

    def _memory_limit(self, d: ControllerDir, stat: bytes | None,
                      missing: dict[str, str]) -> int | None:
        """The memory limit in bytes; None when unlimited (no `missing` entry) or unreadable."""
        key = _MEMORY_KEYS[2]
        if d.version == 2:
            data = self._cat(d.path + "/memory.max", key, missing)
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

    def _read_io(
        self, paths: CgroupPaths, missing: dict[str, str]
    ) -> tuple[int | None, int | None, IoSource | None]:
        d = paths.io
        keys = ("cgroup:io_read_bytes", "cgroup:io_write_bytes")
        if d is None:
            missing.update(dict.fromkeys(keys, paths.missing.get("io", "no io cgroup")))
            return None, None, None
        name = "io.stat" if d.version == 2 else "blkio.throttle.io_service_bytes"
        data = self._cat(f"{d.path}/{name}", keys[0], missing)
        if data is None:
            missing[keys[1]] = missing[keys[0]]
            return None, None, None
        text = data.decode("utf-8", "replace")
        try:
            if d.version == 2:
                rd, wr = _sum_io_stat(text)
                return rd, wr, "v2:io.stat"
            rd, wr = _sum_blkio(text)
        except ValueError as err:
            missing.update(dict.fromkeys(keys, f"malformed {d.path}/{name}: {err}"))
            return None, None, None
        return rd, wr, "v1:blkio.throttle"

    def _read_pressure(self, paths: CgroupPaths, missing: dict[str, str]) -> Pressure | None:
        d = paths.unified
        if d is None:
            missing["cgroup:pressure"] = paths.missing.get("pressure", "no cgroup v2 directory")
            return None
        values: list[float | None] = []
        for resource, key in _PSI_FILES:
            data = self._cat(f"{d}/{resource}.pressure", key, missing)
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


def _sum_io_stat(text: str) -> tuple[int, int]:
    """Σ rbytes, Σ wbytes over the devices of a v2 io.stat (no device yet: 0, 0)."""
    rd = wr = 0
    for line in text.splitlines():
        for token in line.split()[1:]:
            if token.startswith("rbytes="):
                rd += int(token[7:])
            elif token.startswith("wbytes="):
                wr += int(token[7:])
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
