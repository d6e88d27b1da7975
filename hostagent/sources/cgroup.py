"""A domain's cgroups: find them from the QEMU pid (`locate`); sources/cgroup_read.py reads them.

Layouts (docs/sources.md): hybrid, v2 at `<cgroup_root>/unified` with per-VM
`cpu.stat` + PSI and v1 memory/blkio at `<cgroup_root>/<controller>/machine/qemu-N-NAME...`;
pure v2 (systemd), all under `machine.slice/machine-qemu\\x2dN\\x2dNAME.scope/libvirt`.
QEMU's main thread sits in the `emulator` child; the VM's cgroup is its parent, whose cpu.stat
covers emulator and vcpu threads. The collector caches `CgroupPaths` per (domid, pid).
"""

from __future__ import annotations

import re
from typing import NamedTuple

from hostagent.source_model import CgroupPaths, ControllerDir
from hostagent.sources.files import HostRoot

# libvirt's per-thread children of a VM cgroup; the VM's own cgroup is their parent.
_THREAD_CHILD = re.compile(r"^(emulator|vcpu\d+|iothread\d+)$")


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
