"""A domain's QEMU process: its pid (libvirt's pid file) and start time (/proc), which together
with the domain id identify an incarnation, and the start's wall time (billing a new process
from its own zero)."""

from __future__ import annotations

import os

from hostagent.errors import SourceError
from hostagent.sources.files import HostRoot, kv_value, parse_int

DEFAULT_CLK_TCK = os.sysconf("SC_CLK_TCK")
LIBVIRT_RUN_DIR = "/run/libvirt/qemu"
# Field 22 of /proc/<pid>/stat (starttime) is the 20th after the ")" that ends comm.
_STARTTIME_AFTER_COMM = 19


def pid_of(root: HostRoot, domain_name: str, run_dir: str = LIBVIRT_RUN_DIR) -> int | None:
    """QEMU's pid from libvirt's `<run_dir>/<name>.pid`; None when absent or still empty.

    libvirt names the file `<name>.pid` whatever the name (virPidFileBuildPath): "." and ".."
    are domain names like any other, their files "..pid" and "...pid" plain names in
    `run_dir`. Only "/" (or a NUL, which ends the path) could lead elsewhere: no pid for those."""
    if not domain_name or "/" in domain_name or "\0" in domain_name:
        return None
    rel = f"{run_dir}/{domain_name}.pid"
    text = root.read_text(rel)
    if text is None or not text.strip():  # empty: libvirt is writing it right now
        return None
    return parse_int(text, root.abspath(rel))


def process_start_ticks(root: HostRoot, pid: int) -> int | None:
    """Field 22 (starttime, clock ticks after boot) of /proc/<pid>/stat; None when gone."""
    rel = f"/proc/{pid}/stat"
    text = root.read_text(rel)
    if text is None:
        return None
    # comm (field 2) may hold spaces and parens: fields resume after the LAST ")".
    fields = text[text.rfind(")") + 1 :].split()
    try:
        return int(fields[_STARTTIME_AFTER_COMM])
    except (IndexError, ValueError) as err:
        raise SourceError(f"{root.abspath(rel)}: no starttime field in {text[:80]!r}") from err


def boot_time_ns(root: HostRoot) -> int | None:
    """Boot time from /proc/stat `btime` (whole unix seconds, as ns); None when absent.

    The kernel truncates btime to the second, so wall times derived from it are up to 1 s
    early, but identical on every call: a process's start stays one stable number.
    """
    text = root.read_text("/proc/stat")
    if text is None:
        return None
    value = kv_value(text, "btime")
    if value is None:
        raise SourceError(f"{root.abspath('/proc/stat')}: no btime line")
    return value * 1_000_000_000


def ticks_to_wall_ns(start_ticks: int, boot_ns: int, clk_tck: int = DEFAULT_CLK_TCK) -> int:
    """Wall-clock ns of a process start from its starttime ticks and the boot time."""
    return boot_ns + start_ticks * 1_000_000_000 // clk_tck
