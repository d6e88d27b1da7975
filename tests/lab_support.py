"""Helpers for tests marked ``lab``: bring up the local lab (deploy/lab/lab.py) and poke at it.

Mutating helpers shell out to ``lab.py`` (which locks, configures taps and waits for boot);
read-only helpers read virsh, /proc and /sys directly. Everything needs root and a working
lab: tests should skip when :func:`lab_available` is false (see tests/conftest.py).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

LAB = Path(__file__).parents[1] / "deploy/lab/lab.py"
URI = "qemu:///system"
PREFIX = "halab-"
TAP_PREFIX = "hatap"
LIBVIRT_QEMU_RUN = Path("/run/libvirt/qemu")
_UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.I)


class LabUnavailable(RuntimeError):
    """The lab cannot run here (not root, tools missing) or a lab command failed."""


def lab_available() -> bool:
    """True when lab tests can run: root, virsh present and the lab script in place."""
    return os.geteuid() == 0 and shutil.which("virsh") is not None and LAB.exists()


def _lab(*args: str, timeout: float = 900) -> str:
    proc = subprocess.run(
        [sys.executable, str(LAB), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if proc.returncode != 0:
        raise LabUnavailable(
            f"lab.py {' '.join(args)} failed (rc={proc.returncode}):\n{proc.stdout}{proc.stderr}"
        )
    return proc.stdout


def _virsh(*args: str, check: bool = True) -> str:
    proc = subprocess.run(
        ["virsh", "-c", URI, *args],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        env=dict(os.environ, LC_ALL="C"),
        check=False,
    )
    if check and proc.returncode != 0:
        raise LabUnavailable(f"virsh {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def guest_names(n_guests: int) -> list[str]:
    """Names of the first ``n_guests`` lab guests (index 169 is never used)."""
    return [f"{PREFIX}{i}" for i in range(1, n_guests + 200) if i != 169][:n_guests]


def tap_stats(tap: str) -> tuple[int, int]:
    """Host-side (rx_bytes, tx_bytes) of a tap; host rx is guest egress, host tx guest ingress."""
    base = Path("/sys/class/net") / tap / "statistics"
    return int((base / "rx_bytes").read_text()), int((base / "tx_bytes").read_text())


def _already_up(names: list[str]) -> bool:
    try:
        running = set(_virsh("list", "--name", "--state-running", check=False).split())
    except (OSError, subprocess.TimeoutExpired):
        return False
    for name in names:
        if name not in running:
            return False
        try:
            rx, tx = tap_stats(f"{TAP_PREFIX}{name[len(PREFIX) :]}")
        except OSError:
            return False
        if rx == 0 or tx == 0:
            return False
    return True


def ensure_lab(n_guests: int) -> list[str]:
    """Make sure halab-1..N run with their load (``lab.py up N`` unless already up); their names."""
    names = guest_names(n_guests)
    if not lab_available():
        raise LabUnavailable("the lab needs root, virsh and deploy/lab/lab.py")
    if not _already_up(names):
        _lab("up", str(n_guests))
    return names


def domain_xml(name: str, index: int) -> str:
    """The domain XML lab.py would use for ``name`` on tap/address/MAC slot ``index``."""
    return _lab("xml", name, str(index), timeout=60)


def define_extra_guest(name: str, index: int) -> None:
    """Define (persistent, NOT started) a lab guest ``name`` on slot ``index`` (tap hatapN).

    Pick an index no other live guest uses (1..200, not 169); start it with start_guest().
    """
    _lab("define", name, str(index))


def start_guest(name: str, *, wait: bool = True) -> None:
    """Start a defined lab guest and configure its tap; with ``wait``, until it pings (~7 s)."""
    args = ["start", name]
    if not wait:
        args.append("--no-wait")
    _lab(*args)


def destroy_guest(name: str) -> None:
    """Hard-stop a guest (``virsh destroy``); it stays defined, libvirt removes its tap."""
    _lab("destroy", name)


def remove_guest(name: str) -> None:
    """Destroy + undefine a guest and delete its tap, disk and serial log (fine when absent)."""
    _lab("rm", name)


def domain_uuid(name_or_uuid: str) -> str:
    """UUID of a domain given its name (a UUID is returned as is, lower-case)."""
    if _UUID_RE.match(name_or_uuid):
        return name_or_uuid.lower()
    return _virsh("domuuid", name_or_uuid).strip()


def qemu_pid(name: str) -> int | None:
    """Pid of the guest's QEMU from libvirt's pid file, None when it is not running."""
    try:
        pid = int((LIBVIRT_QEMU_RUN / f"{name}.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if Path(f"/proc/{pid}").exists() else None


def _require_pid(name: str) -> int:
    pid = qemu_pid(name)
    if pid is None:
        raise LabUnavailable(f"{name} is not running (no QEMU pid)")
    return pid


def _cgroup2_mount() -> tuple[str, Path]:
    """(mount root, mount point) of the cgroup v2 hierarchy (unified/ on hybrid hosts)."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if right.split()[:1] == ["cgroup2"]:
            fields = left.split()
            return fields[3], Path(fields[4])
    raise LabUnavailable("no cgroup2 mount")


def vm_cgroup_v2_dir(name: str) -> Path:
    """The VM's cgroup v2 dir (parent of the ``emulator`` cgroup QEMU's main thread sits in)."""
    pid = _require_pid(name)
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        hid, _, path = line.split(":", 2)
        if hid == "0":
            root, mnt = _cgroup2_mount()
            rel = os.path.relpath(path, root)
            d = mnt / rel
            if d.name == "emulator" or re.fullmatch(r"vcpu\d+", d.name):
                d = d.parent
            return d
    raise LabUnavailable(f"{name}: no cgroup v2 line in /proc/{pid}/cgroup")


def cgroup_cpu_usage_ns(name: str) -> int:
    """The VM's cgroup v2 ``usage_usec`` x 1000 (the same counter as libvirt ``cpu.time``)."""
    text = (vm_cgroup_v2_dir(name) / "cpu.stat").read_text()
    m = re.search(r"^usage_usec (\d+)$", text, re.M)
    if not m:
        raise LabUnavailable(f"{name}: no usage_usec in cpu.stat")
    return int(m.group(1)) * 1000


def guest_start_wall_ns(name: str) -> int:
    """Wall-clock time (ns since the epoch) the guest's QEMU process started; 10 ms resolution."""
    pid = _require_pid(name)
    stat = Path(f"/proc/{pid}/stat").read_text()
    starttime_ticks = int(stat.rsplit(")", 1)[1].split()[19])
    uptime_s = float(Path("/proc/uptime").read_text().split()[0])
    now_ns = time.time_ns()
    age_s = uptime_s - starttime_ticks / os.sysconf("SC_CLK_TCK")  # both on the boot clock
    return now_ns - int(age_s * 1e9)


def virsh_domstats_raw(name: str) -> dict[str, str]:
    """``virsh domstats --raw NAME`` as {key: text value} (virsh prints every value as text)."""
    out: dict[str, str] = {}
    for line in _virsh("domstats", "--raw", name).splitlines():
        m = re.match(r"^\s+([^=\s]+)=(.*)$", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def _libvirtd_pids() -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if (p / "comm").read_text().strip() == "libvirtd":
                    out.append(int(p.name))
            except OSError:
                continue
    return out


def stop_libvirtd(timeout_s: float = 30) -> None:
    """SIGTERM every libvirtd and wait until none runs (running guests keep running)."""
    pids = _libvirtd_pids()
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while _libvirtd_pids():
        if time.monotonic() > deadline:
            raise LabUnavailable(f"libvirtd {pids} still runs {timeout_s} s after SIGTERM")
        time.sleep(0.1)


def start_libvirtd() -> None:
    """Start the lab's libvirtd (when none runs) and wait until it answers."""
    _lab("start-libvirtd")
