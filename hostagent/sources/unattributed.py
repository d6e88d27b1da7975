"""The CPU of the VMs' parent cgroup (v2), for hostagent/accounting/unattributed.py.

libvirt puts VMs under the `/machine` partition: `machine.slice` on a systemd host (pure v2:
`machine.slice/machine-qemu\\x2dN\\x2dNAME.scope/libvirt`), `/machine` without systemd
(the lab's hybrid host: `unified/machine/qemu-N-NAME.libvirt-qemu`). Its `cpu.stat`
`usage_usec` includes every descendant, also those already removed. v1 `cpuacct` is not
per-VM on the hosts we know (LAB-NOTES), so there is no v1 figure: None.
"""

from __future__ import annotations

from hostagent.sources.cgroup import v2_mount
from hostagent.sources.fdcache import FdCache
from hostagent.sources.files import HostRoot, cat, kv_value

PARTITIONS = ("machine.slice", "machine")


def parent_cpu_stat(root: HostRoot, cgroup_root: str = "/sys/fs/cgroup",
                    partitions: tuple[str, ...] = PARTITIONS) -> str | None:
    """Host path of the VM partition's v2 `cpu.stat`, or None (no v2, no partition)."""
    mount = v2_mount(root, cgroup_root)
    if mount is None:
        return None
    for part in partitions:
        path = f"{mount}/{part}/cpu.stat"
        if root.exists(path):
            return path
    return None


def read_parent_cpu_ns(root: HostRoot, path: str, fds: FdCache | None = None) -> int | None:
    """The partition's CPU in ns; None when unreadable (SourceError propagates)."""
    full = root.abspath(path)
    text = cat(full) if fds is None else fds.read(full)
    usec = None if text is None else kv_value(text, "usage_usec")
    return None if usec is None else usec * 1000
