#!/usr/bin/env python3
"""hostagent local lab: tiny TCG guests under a self-started libvirtd.

Run as root: ``python3 deploy/lab/lab.py COMMAND`` (install, start-libvirtd, up [N], down,
status, xml NAME INDEX; see --help for the per-guest commands tests use).
Stdlib only, so tests can import it by path (see tests/lab_support.py).

Each guest ``halab-N`` boots a Debian kernel (extracted from the .deb, never installed) with a
busybox-static initramfs built here. Its /init loads the virtio modules, puts 169.254.N.2/24 on
eth0 and runs a steady load: a ~50 ms CPU burst every second, 256 KiB of O_DIRECT writes to
/dev/vda every 2 s and one ping to the host end of its tap (169.254.N.1) every second.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

URI = "qemu:///system"
PREFIX = "halab-"
TAP_PREFIX = "hatap"
DEFAULT_WORKDIR = "/var/lib/hostagent-lab"
RUN_DIR = Path("/run/hostagent-lab")
LIBVIRTD_PIDFILE = RUN_DIR / "libvirtd.pid"
LIBVIRTD = "/usr/sbin/libvirtd"
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
LIBVIRT_QEMU_RUN = Path("/run/libvirt/qemu")
OWNER_NS = "urn:hostagent:owner:1"
TITLE_PREFIX = "hostagent lab guest"
LAB_UUID_NS = uuid.UUID("5a1e4c0b-7a6b-4d3e-9c1f-686f73746167")  # fixed: uuids stable per name

PACKAGES = (
    "libvirt-daemon",
    "libvirt-daemon-driver-qemu",
    "libvirt-clients",
    "qemu-system-x86",
    "qemu-utils",
    "libvirt-dev",
    "pkg-config",
    "busybox-static",
    # Not needed by the lab itself: lets deploy/lab/record_fixture.py record the real value
    # types of getAllDomainStats through the distribution's /usr/bin/python3.
    "python3-libvirt",
    # tests/test_prometheus.py (promtool) and tests/test_lab_prometheus.py (a real Prometheus
    # scraping the daemon); tests/test_lab_top.py drives `hostagent top` in tmux.
    "prometheus",
    "tmux",
    # Not needed by the lab either: the NATS JetStream sink's tests and bench/nats.py start
    # their own nats-server processes (JetStream built in) on random 127.0.0.1 ports.
    "nats-server",
)

# Dependency order matters: insmod does not resolve dependencies.
VIRTIO_MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_balloon",
)

MEMORY_MIB = 160
VCPUS = 1
DISK_SIZE = "64M"
BOOT_TIMEOUT_S = 60.0
LIBVIRTD_TIMEOUT_S = 60.0

QEMU_CONF_TEXT = """\
# Written by hostagent deploy/lab/lab.py: lab guests run as root, no labelling.
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
stdio_handler = "file"
"""


def log(msg: str) -> None:
    """Print one lab action line."""
    print(f"lab: {msg}", flush=True)


class LabError(RuntimeError):
    """A lab step failed; the message says which and why."""


# ---------------------------------------------------------------------------------------------
# naming and addresses


def workdir() -> Path:
    """The lab work dir (env HOSTAGENT_LAB_DIR overrides /var/lib/hostagent-lab)."""
    return Path(os.environ.get("HOSTAGENT_LAB_DIR", DEFAULT_WORKDIR))


def check_index(index: int) -> int:
    """Validate a guest index: 1..200, never 169 (169.254.169.0/24 would shadow metadata)."""
    if not 1 <= index <= 200:
        raise LabError(f"guest index {index} out of range 1..200")
    if index == 169:
        raise LabError("guest index 169 is reserved (169.254.169.254 is the metadata address)")
    return index


def guest_name(index: int) -> str:
    """Name of lab guest number ``index``."""
    return f"{PREFIX}{check_index(index)}"


def index_of(name: str) -> int | None:
    """Index N of a ``halab-N`` name, else None."""
    m = re.fullmatch(re.escape(PREFIX) + r"(\d+)", name)
    return int(m.group(1)) if m else None


def tap_name(index: int) -> str:
    """Host tap device of guest ``index`` (not vnet-prefixed: libvirt would rename it)."""
    return f"{TAP_PREFIX}{check_index(index)}"


def mac_address(index: int) -> str:
    """Fixed guest MAC of guest ``index``."""
    return f"52:54:00:4c:ab:{check_index(index):02x}"


def host_address(index: int) -> str:
    """Host end of the tap, without prefix length."""
    return f"169.254.{check_index(index)}.1"


def guest_address(index: int) -> str:
    """Guest eth0 address, without prefix length."""
    return f"169.254.{check_index(index)}.2"


def guest_uuid(name: str) -> str:
    """Deterministic domain uuid for a lab guest name."""
    return str(uuid.uuid5(LAB_UUID_NS, name))


def boot_dir(wd: Path | None = None) -> Path:
    return (wd or workdir()) / "boot"


def disk_path(name: str, wd: Path | None = None) -> Path:
    return (wd or workdir()) / "disks" / f"{name}.qcow2"


def serial_log_path(name: str, wd: Path | None = None) -> Path:
    return (wd or workdir()) / "logs" / f"{name}.serial.log"


def kernel_cmdline(name: str, index: int) -> str:
    """Kernel command line of a lab guest; /init reads the halab.* keys from /proc/cmdline."""
    return " ".join(
        [
            "console=ttyS0",
            "quiet",
            "loglevel=3",
            "mitigations=off",  # PTI & co. are expensive under TCG
            "ipv6.disable=1",  # keep tap counters to ARP + ICMP only
            f"halab.name={name}",
            f"halab.ip={guest_address(index)}/24",
            f"halab.host={host_address(index)}",
        ]
    )


def domain_xml(name: str, index: int, wd: Path | None = None) -> str:
    """Domain XML of lab guest ``name`` using addresses/tap/MAC of ``index``."""
    check_index(index)
    wd = wd or workdir()
    boot = boot_dir(wd)
    metadata = ""
    if index % 2 == 1:
        metadata = (
            "  <metadata>\n"
            f"    <hostagent:owner xmlns:hostagent={quoteattr(OWNER_NS)}"
            f" user={quoteattr(f'lab-user-{index}')} org={quoteattr('lab-org')}/>\n"
            "  </metadata>\n"
        )
    return f"""<domain type='qemu'>
  <name>{escape(name)}</name>
  <uuid>{guest_uuid(name)}</uuid>
  <title>{TITLE_PREFIX} {index}</title>
{metadata}  <memory unit='MiB'>{MEMORY_MIB}</memory>
  <currentMemory unit='MiB'>{MEMORY_MIB}</currentMemory>
  <vcpu placement='static'>{VCPUS}</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{escape(str(boot / "kernel.img"))}</kernel>
    <initrd>{escape(str(boot / "initramfs.cpio.gz"))}</initrd>
    <cmdline>{escape(kernel_cmdline(name, index))}</cmdline>
  </os>
  <features>
    <acpi/>
    <apic/>
  </features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file={quoteattr(str(disk_path(name, wd)))}/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <controller type='usb' model='none'/>
    <interface type='ethernet'>
      <mac address='{mac_address(index)}'/>
      <target dev='{tap_name(index)}'/>
      <model type='virtio'/>
    </interface>
    <serial type='file'>
      <source path={quoteattr(str(serial_log_path(name, wd)))}/>
      <target port='0'/>
    </serial>
    <memballoon model='virtio'>
      <stats period='2'/>
    </memballoon>
  </devices>
</domain>
"""


# ---------------------------------------------------------------------------------------------
# small process helpers


def run(
    cmd: Sequence[str],
    *,
    check: bool = True,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float | None = 600,
) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing text output; raise LabError with stderr when check fails."""
    full_env = dict(os.environ, LC_ALL="C")
    if env:
        full_env.update(env)
    try:
        proc = subprocess.run(
            list(cmd),
            check=False,
            capture_output=True,
            text=True,
            env=full_env,
            cwd=cwd,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except FileNotFoundError as err:
        raise LabError(f"{cmd[0]}: not found (run `lab.py install`)") from err
    except subprocess.TimeoutExpired as err:
        raise LabError(f"{' '.join(cmd)}: timed out after {timeout} s") from err
    if check and proc.returncode != 0:
        raise LabError(
            f"{' '.join(cmd)} failed (rc={proc.returncode}): "
            f"{proc.stderr.strip() or proc.stdout.strip()}"
        )
    return proc


def virsh(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``virsh -c qemu:///system ARGS``."""
    return run(["virsh", "-c", URI, *args], check=check, timeout=timeout)


@contextlib.contextmanager
def lab_lock(wd: Path | None = None) -> Iterator[None]:
    """Serialise mutating lab commands (tests may run in parallel)."""
    wd = wd or workdir()
    wd.mkdir(parents=True, exist_ok=True)
    with open(wd / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab must run as root")


# ---------------------------------------------------------------------------------------------
# install


def _pkg_installed(pkg: str) -> bool:
    proc = run(["dpkg-query", "-W", "-f=${Status}", pkg], check=False)
    return proc.returncode == 0 and proc.stdout.strip() == "install ok installed"


def _apt_lists_present() -> bool:
    lists = Path("/var/lib/apt/lists")
    return any(lists.glob("*_Packages*"))


def _apt_candidate_missing(pkgs: Sequence[str]) -> list[str]:
    proc = run(["apt-cache", "policy", *pkgs], check=False)
    missing = []
    for block in re.split(r"\n(?=\S)", proc.stdout):
        m = re.match(r"(\S+):\n", block)
        if m and "Candidate: (none)" in block:
            missing.append(m.group(1))
    known = set(re.findall(r"^(\S+):$", proc.stdout, re.M))
    missing.extend(p for p in pkgs if p not in known)
    return missing


APT_ENV = {"DEBIAN_FRONTEND": "noninteractive"}
# apt-get download writes as _apt unless told otherwise; our cache dir is root-only.
APT_OPTS = ["-o", "APT::Sandbox::User=root", "-o", "Dpkg::Use-Pty=0"]


def apt_update(reason: str) -> None:
    log(f"apt-get update ({reason})")
    run(["apt-get", *APT_OPTS, "update", "-q"], env=APT_ENV, timeout=900)


def _apt_with_refresh(cmd: list[str], what: str, cwd: Path | None = None) -> None:
    """Run an apt-get command; on a fetch failure (stale lists) update once and retry."""
    proc = run(cmd, check=False, env=APT_ENV, cwd=cwd, timeout=1800)
    if proc.returncode == 0:
        return
    if re.search(
        r"Failed to fetch|Unable to locate|404\s+Not Found|has no installation candidate",
        proc.stdout + proc.stderr,
    ):
        apt_update(f"{what} failed with stale package lists")
        run(cmd, env=APT_ENV, cwd=cwd, timeout=1800)
        return
    raise LabError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-2000:]}")


def install_packages() -> None:
    """apt-get install the lab packages that are missing (update lists only when needed)."""
    missing = [p for p in PACKAGES if not _pkg_installed(p)]
    if not missing:
        log(f"packages already installed: {' '.join(PACKAGES)}")
        return
    if not _apt_lists_present():
        apt_update("no package lists")
    elif _apt_candidate_missing(missing):
        apt_update(f"no candidate for {' '.join(_apt_candidate_missing(missing))}")
    log(f"apt-get install {' '.join(missing)}")
    # policy-rc.d (exit 101) keeps post-install scripts from starting services; we start
    # libvirtd ourselves, so that is what we want.
    _apt_with_refresh(
        ["apt-get", *APT_OPTS, "install", "-y", "-q", "--no-install-recommends", *missing],
        "apt-get install",
    )


def kernel_package() -> str:
    """Current Debian kernel image package, e.g. linux-image-6.1.0-50-amd64."""
    proc = run(["apt-cache", "depends", "linux-image-amd64"], check=False)
    m = re.search(r"Depends:\s*(linux-image-[0-9][^\s]*-amd64)\b", proc.stdout)
    if not m and (not _apt_lists_present() or "linux-image-amd64" not in proc.stdout):
        apt_update("linux-image-amd64 unknown")
        proc = run(["apt-cache", "depends", "linux-image-amd64"])
        m = re.search(r"Depends:\s*(linux-image-[0-9][^\s]*-amd64)\b", proc.stdout)
    if not m:
        raise LabError(f"cannot find the kernel image behind linux-image-amd64: {proc.stdout!r}")
    return m.group(1)


def _builtin_modules(modroot: Path) -> set[str]:
    path = modroot / "modules.builtin"
    if not path.exists():
        return set()
    return {
        Path(line.strip()).name.split(".ko")[0].replace("-", "_")
        for line in path.read_text().splitlines()
        if line.strip()
    }


def _module_depends(ko: bytes) -> list[str]:
    """``depends=`` of a module's .modinfo section (NUL-separated key=value strings)."""
    m = re.search(rb"(?:^|\x00)depends=([^\x00]*)", ko)
    if not m or not m.group(1):
        return []
    return [d.decode().replace("-", "_") for d in m.group(1).split(b",") if d]


def _read_ko(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.zst"):
        return subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True).stdout
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    return data


def extract_kernel(deb: Path, dest: Path) -> None:
    """Extract vmlinuz and the virtio modules (in dependency order) from a kernel .deb."""
    with tempfile.TemporaryDirectory(prefix="halab-kernel-") as tmp:
        root = Path(tmp)
        log(f"dpkg-deb -x {deb.name}")
        run(["dpkg-deb", "-x", str(deb), str(root)])
        vmlinuz = sorted((root / "boot").glob("vmlinuz-*"))
        if not vmlinuz:
            raise LabError(f"{deb}: no /boot/vmlinuz-*")
        kver = vmlinuz[0].name[len("vmlinuz-") :]
        modroot = next(
            p for p in [root / "lib/modules" / kver, root / "usr/lib/modules" / kver] if p.exists()
        )
        builtin = _builtin_modules(modroot)
        files: dict[str, Path] = {}
        for p in modroot.rglob("*.ko*"):
            files[p.name.split(".ko")[0].replace("-", "_")] = p
        wanted = list(VIRTIO_MODULES)
        contents: dict[str, bytes] = {}
        deps: dict[str, list[str]] = {}
        i = 0
        while i < len(wanted):  # closure over depends= (adds anything missing from the list)
            mod = wanted[i]
            i += 1
            if mod in builtin:
                log(f"module {mod}: built into {kver}")
                continue
            if mod not in files:
                raise LabError(f"module {mod} neither built in nor shipped in {deb.name}")
            contents[mod] = _read_ko(files[mod])
            deps[mod] = [d for d in _module_depends(contents[mod]) if d not in builtin]
            for d in deps[mod]:
                if d not in wanted:
                    log(f"module {mod} needs {d}: adding it")
                    wanted.append(d)
        order: list[str] = []

        def visit(mod: str, stack: tuple[str, ...]) -> None:
            if mod in order:
                return
            if mod in stack:
                raise LabError(f"module dependency cycle: {' -> '.join((*stack, mod))}")
            for d in deps[mod]:
                visit(d, (*stack, mod))
            order.append(mod)

        for mod in wanted:
            if mod in contents:
                visit(mod, ())
        staging = dest.with_name(dest.name + ".new")
        shutil.rmtree(staging, ignore_errors=True)
        (staging / "modules").mkdir(parents=True)
        shutil.copyfile(vmlinuz[0], staging / "vmlinuz")
        config = root / "boot" / f"config-{kver}"
        if config.exists():
            shutil.copyfile(config, staging / "config")
        for mod in order:
            src = files[mod].name
            how = "decompressed " if src.endswith((".xz", ".zst", ".gz")) else ""
            log(f"module {mod}: {how}{src}")
            (staging / "modules" / f"{mod}.ko").write_bytes(contents[mod])
        (staging / "modules.order").write_text("\n".join(order) + "\n")
        (staging / "kernel-version").write_text(kver + "\n")
        (staging / "kernel-package").write_text(deb.name + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        staging.rename(dest)
        log(f"kernel {kver} ready in {dest} (modules in order: {' '.join(order)})")


def fetch_kernel(wd: Path | None = None) -> None:
    """Download (never install) the Debian kernel image and extract what the guests need."""
    wd = wd or workdir()
    kdir = boot_dir(wd) / "kernel"
    if all((kdir / f).exists() for f in ("vmlinuz", "modules.order", "config")):
        log(f"kernel already extracted: {(kdir / 'kernel-version').read_text().strip()} in {kdir}")
        return
    cache = wd / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    pkg = kernel_package()
    debs = sorted(cache.glob(f"{pkg}_*.deb"))
    if debs:
        log(f"kernel package already downloaded: {debs[-1].name}")
    else:
        log(f"apt-get download {pkg}")
        _apt_with_refresh(
            ["apt-get", *APT_OPTS, "download", "-q", pkg], "apt-get download", cwd=cache
        )
        debs = sorted(cache.glob(f"{pkg}_*.deb"))
        if not debs:
            raise LabError(f"apt-get download {pkg} produced no .deb in {cache}")
    extract_kernel(debs[-1], kdir)
    for old in cache.glob("linux-image-*.deb"):
        if old != debs[-1]:
            old.unlink()
            log(f"deleted old kernel package {old.name}")


def install() -> None:
    """Install the lab packages and fetch the guest kernel."""
    require_root()
    install_packages()
    fetch_kernel()


def installed() -> bool:
    """True when the lab binaries are present."""
    return (
        all(shutil.which(b) for b in ("virsh", "qemu-system-x86_64", "qemu-img"))
        and Path(LIBVIRTD).exists()
    )


# ---------------------------------------------------------------------------------------------
# libvirtd


def _ensure_user_group() -> None:
    if run(["getent", "group", "libvirt-qemu"], check=False).returncode != 0:
        log("groupadd --system libvirt-qemu")
        run(["groupadd", "--system", "libvirt-qemu"])
    if run(["getent", "passwd", "libvirt-qemu"], check=False).returncode != 0:
        log("useradd --system libvirt-qemu")
        run(
            [
                "useradd",
                "--system",
                "-g",
                "libvirt-qemu",
                "-d",
                "/var/lib/libvirt",
                "-M",
                "-s",
                "/usr/sbin/nologin",
                "libvirt-qemu",
            ]
        )


def _ensure_qemu_conf() -> bool:
    """Write /etc/libvirt/qemu.conf when absent or different; True when it changed."""
    if QEMU_CONF.exists() and QEMU_CONF.read_text() == QEMU_CONF_TEXT:
        log(f"{QEMU_CONF} up to date")
        return False
    QEMU_CONF.parent.mkdir(parents=True, exist_ok=True)
    if QEMU_CONF.exists():
        backup = QEMU_CONF.with_name("qemu.conf.hostagent-lab.bak")
        shutil.copyfile(QEMU_CONF, backup)
        log(f"saved previous {QEMU_CONF} as {backup}")
    QEMU_CONF.write_text(QEMU_CONF_TEXT)
    log(f"wrote {QEMU_CONF}")
    return True


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def libvirtd_pid() -> int | None:
    """Pid of a running libvirtd (ours by pidfile first, else any)."""
    try:
        pid = int(LIBVIRTD_PIDFILE.read_text().strip())
        if _comm(pid) == "libvirtd":
            return pid
    except (OSError, ValueError):
        pass
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and _comm(int(p.name)) == "libvirtd":
            return int(p.name)
    return None


def libvirtd_answers() -> bool:
    return virsh("version", check=False, timeout=30).returncode == 0


def _wait_libvirtd() -> None:
    start = time.monotonic()
    while time.monotonic() - start < LIBVIRTD_TIMEOUT_S:
        if libvirtd_answers():
            log(f"libvirtd answers on {URI} after {time.monotonic() - start:.1f} s")
            return
        time.sleep(0.5)
    raise LabError(
        f"libvirtd did not answer on {URI} within {LIBVIRTD_TIMEOUT_S:.0f} s "
        f"(log: {workdir() / 'libvirtd.log'})"
    )


def _start_libvirtd() -> None:
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    for d in ("/var/lib/libvirt/qemu", "/var/log/libvirt/qemu", "/var/cache/libvirt/qemu"):
        Path(d).mkdir(parents=True, exist_ok=True)
    wd = workdir()
    wd.mkdir(parents=True, exist_ok=True)
    log(f"start {LIBVIRTD} -d -p {LIBVIRTD_PIDFILE} (log: {wd / 'libvirtd.log'})")
    env = dict(os.environ, LIBVIRT_LOG_OUTPUTS=f"3:file:{wd / 'libvirtd.log'}")
    # -d forks after init; the daemon inherits our fds, so give it none of our pipes.
    rc = subprocess.call(
        [LIBVIRTD, "-d", "-p", str(LIBVIRTD_PIDFILE)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    if rc != 0:
        raise LabError(f"{LIBVIRTD} -d exited with {rc} (log: {wd / 'libvirtd.log'})")


def ensure_libvirtd() -> None:
    """Make sure libvirtd runs with the lab's qemu.conf and answers on qemu:///system."""
    require_root()
    if not installed():
        raise LabError("libvirt/qemu not installed: run `lab.py install`")
    _ensure_user_group()
    changed = _ensure_qemu_conf()
    pid = libvirtd_pid()
    if pid is not None and changed:
        # qemu.conf is read at start; running guests survive a libvirtd restart.
        log(f"restart libvirtd (pid {pid}) to apply {QEMU_CONF}")
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            if _comm(pid) != "libvirtd":
                break
            time.sleep(0.1)
        pid = None
    if pid is None:
        _start_libvirtd()
    else:
        log(f"libvirtd already running (pid {pid})")
    _wait_libvirtd()


# ---------------------------------------------------------------------------------------------
# images

INIT_SCRIPT = r"""#!/bin/sh
# /init of hostagent lab guests (generated by deploy/lab/lab.py)
export PATH=/bin:/sbin
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
log() { echo "halab: $*"; }
log "init start uptime=$(cut -d' ' -f1 /proc/uptime)"
for m in $(cat /etc/halab/modules.order); do
  insmod "/lib/modules/$m.ko" || log "insmod $m failed"
done
NAME=guest; IP=; HOST=; BURST=3000
for kv in $(cat /proc/cmdline); do
  case "$kv" in
    halab.name=*) NAME="${kv#halab.name=}" ;;
    halab.ip=*) IP="${kv#halab.ip=}" ;;
    halab.host=*) HOST="${kv#halab.host=}" ;;
    halab.burst=*) BURST="${kv#halab.burst=}" ;;
  esac
done
hostname "$NAME"
ip link set lo up
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
ip addr add "$IP" dev eth0 || log "no eth0"
ip link set eth0 up
[ -b /dev/vda ] || log "no /dev/vda"

spin() { n=0; while [ $n -lt $1 ]; do n=$((n+1)); done; }
cs=/sys/devices/system/clocksource/clocksource0
log "clocksource $(cat $cs/current_clocksource) (available: $(cat $cs/available_clocksource))"
log "ready name=$NAME ip=$IP host=$HOST burst=$BURST uptime=$(cut -d' ' -f1 /proc/uptime)"

# CPU: BURST shell-loop iterations (3000 ~ 50 ms of TCG time on an idle host), then 1 s idle
( while :; do spin $BURST; sleep 1; done ) &
# disk: 4 x 64 KiB O_DIRECT writes every 2 s, cycling over the first 8 MiB of vda
( k=0; warned=0
  while :; do
    if ! dd if=/dev/zero of=/dev/vda bs=64k count=4 seek=$(( (k % 32) * 4 )) \
         oflag=direct conv=notrunc 2>/dev/null; then
      [ $warned = 1 ] || log "dd to /dev/vda failed"; warned=1
    fi
    k=$((k + 1)); sleep 2
  done ) &
# net: one ping to the host end of the tap every second (both tap directions count)
( while :; do ping -c 1 -W 1 "$HOST" >/dev/null 2>&1; sleep 1; done ) &
while :; do wait; sleep 60; done
"""


def _cpio_newc(entries: Sequence[tuple[str, int, bytes, tuple[int, int]]]) -> bytes:
    """A newc cpio archive of (name, mode, data, (rdev major, minor)); mtimes are 0."""
    out = bytearray()

    def add(name: str, mode: int, data: bytes, rdev: tuple[int, int], ino: int) -> None:
        nb = name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(mode) else 1
        fields = [ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(nb), 0]
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields) + nb)
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))

    for ino, (name, mode, data, rdev) in enumerate(entries, start=1):
        add(name, mode, data, rdev, ino)
    add("TRAILER!!!", 0, b"", (0, 0), 0)
    out.extend(b"\0" * (-len(out) % 512))
    return bytes(out)


def _static_busybox() -> bytes:
    path = Path("/bin/busybox")
    if not path.exists():
        raise LabError("/bin/busybox missing: install busybox-static")
    data = path.read_bytes()
    if b"ld-linux" in data[:4096] or b"/lib64/ld-" in data[:4096]:
        raise LabError("/bin/busybox is dynamically linked: install busybox-static")
    return data


def build_initramfs(wd: Path | None = None) -> None:
    """Build boot/initramfs.cpio.gz from busybox-static, the virtio modules and /init."""
    wd = wd or workdir()
    kdir = boot_dir(wd) / "kernel"
    order = (kdir / "modules.order").read_text().split()
    modules = [(m, (kdir / "modules" / f"{m}.ko").read_bytes()) for m in order]
    busybox = _static_busybox()
    d, f, lnk, chr_ = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o644, stat.S_IFLNK | 0o777, stat.S_IFCHR
    entries: list[tuple[str, int, bytes, tuple[int, int]]] = [
        (name, d, b"", (0, 0))
        for name in (
            "bin",
            "sbin",
            "dev",
            "etc",
            "etc/halab",
            "lib",
            "lib/modules",
            "proc",
            "root",
            "run",
            "sys",
            "tmp",
            "usr",
            "usr/bin",
            "usr/sbin",
        )
    ]
    entries += [
        ("dev/console", chr_ | 0o600, b"", (5, 1)),
        ("dev/null", chr_ | 0o666, b"", (1, 3)),
        ("bin/busybox", stat.S_IFREG | 0o755, busybox, (0, 0)),
        ("bin/sh", lnk, b"busybox", (0, 0)),
        ("init", stat.S_IFREG | 0o755, INIT_SCRIPT.encode(), (0, 0)),
        ("etc/halab/modules.order", f, ("\n".join(order) + "\n").encode(), (0, 0)),
    ]
    entries += [(f"lib/modules/{m}.ko", f, data, (0, 0)) for m, data in modules]
    digest = hashlib.sha256()
    for name, mode, data, rdev in entries:
        digest.update(f"{name}\0{mode}\0{rdev}\0{len(data)}\0".encode())
        digest.update(data)
    stamp = boot_dir(wd) / "initramfs.sha256"
    target = boot_dir(wd) / "initramfs.cpio.gz"
    if target.exists() and stamp.exists() and stamp.read_text().strip() == digest.hexdigest():
        log(f"initramfs up to date: {target}")
        return
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(gzip.compress(_cpio_newc(entries), compresslevel=9, mtime=0))
    tmp.rename(target)
    stamp.write_text(digest.hexdigest() + "\n")
    log(f"built {target} ({target.stat().st_size // 1024} KiB, modules: {' '.join(order)})")


def _elf_from_bzimage(bz: bytes) -> bytes | None:
    """The uncompressed vmlinux ELF inside a bzImage (xz or gzip payload), else None."""
    for magic in (b"\xfd7zXZ\x00", b"\x1f\x8b\x08\x00"):
        start = bz.find(magic)
        while start != -1:
            try:
                if magic.startswith(b"\xfd"):
                    elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(bz[start:])
                else:
                    elf = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(bz[start:])
            except (lzma.LZMAError, zlib.error):
                elf = b""
            if elf.startswith(b"\x7fELF"):
                return elf
            start = bz.find(magic, start + 1)
    return None


def install_kernel_image(wd: Path | None = None) -> None:
    """boot/kernel.img: the uncompressed vmlinux (PVH entry) when the kernel supports it.

    Under TCG, SeaBIOS + decompressing the xz bzImage costs ~4 s of a ~6 s boot; QEMU boots
    a PVH-capable ELF vmlinux directly. Falls back to the bzImage. boot/vmlinuz stays as well.
    """
    wd = wd or workdir()
    kdir = boot_dir(wd) / "kernel"
    bz = (kdir / "vmlinuz").read_bytes()
    config = (kdir / "config").read_text() if (kdir / "config").exists() else ""
    digest = hashlib.sha256(bz + config.encode()).hexdigest()
    target = boot_dir(wd) / "kernel.img"
    stamp = boot_dir(wd) / "kernel.img.sha256"
    vmlinuz = boot_dir(wd) / "vmlinuz"
    if not vmlinuz.exists() or vmlinuz.stat().st_size != len(bz):
        vmlinuz.write_bytes(bz)
    if target.exists() and stamp.exists() and stamp.read_text().strip() == digest:
        log(f"kernel image up to date: {target}")
        return
    elf = _elf_from_bzimage(bz) if re.search(r"^CONFIG_PVH=y$", config, re.M) else None
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(elf if elf is not None else bz)
    tmp.rename(target)
    stamp.write_text(digest + "\n")
    what = "uncompressed vmlinux, PVH boot" if elf is not None else "bzImage (no PVH)"
    log(f"installed {target} ({what}, {target.stat().st_size // 1024} KiB)")


def build_images(wd: Path | None = None) -> None:
    """Kernel (fetched once) + initramfs (rebuilt when its inputs change)."""
    wd = wd or workdir()
    fetch_kernel(wd)
    install_kernel_image(wd)
    build_initramfs(wd)


# ---------------------------------------------------------------------------------------------
# guests


def list_domains() -> list[str]:
    """Names of all defined or running domains."""
    return [n for n in virsh("list", "--all", "--name").stdout.split() if n]


def lab_domains() -> list[str]:
    """Lab domains: ``halab-*`` and extra guests made from lab XML (title: TITLE_PREFIX)."""
    names = []
    for line in virsh("list", "--all", "--title").stdout.splitlines()[2:]:
        cols = line.split(None, 3)
        if len(cols) < 3:
            continue
        name = cols[1]
        title = cols[3] if len(cols) == 4 else ""
        if name.startswith(PREFIX) or title.startswith(TITLE_PREFIX):
            names.append(name)
    return sorted(names, key=lambda n: (index_of(n) or 10**6, n))


def domain_index(name: str) -> int:
    """Lab index of a defined domain, from its ``hatapN`` target (else its MAC)."""
    xml = virsh("dumpxml", "--inactive", name).stdout
    m = re.search(r"<target dev='" + re.escape(TAP_PREFIX) + r"(\d+)'", xml)
    if m:
        return int(m.group(1))
    m = re.search(r"<mac address='52:54:00:4c:ab:([0-9a-f]{2})'", xml)
    if m:
        return int(m.group(1), 16)
    raise LabError(f"{name} is not a lab guest (no {TAP_PREFIX}N target, no lab MAC)")


def domain_state(name: str) -> str | None:
    """virsh domstate (``running``, ``shut off``, ``paused`` ...), None when undefined."""
    proc = virsh("domstate", name, check=False)
    if proc.returncode != 0:
        return None
    return proc.stdout.strip()


def qemu_pid(name: str) -> int | None:
    """Pid of the guest's QEMU, from libvirt's pid file."""
    try:
        pid = int((LIBVIRT_QEMU_RUN / f"{name}.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if Path(f"/proc/{pid}").exists() else None


def tap_stats(tap: str) -> tuple[int, int]:
    """Host-side (rx_bytes, tx_bytes) of a tap; (0, 0) when absent."""
    base = Path("/sys/class/net") / tap / "statistics"
    try:
        return int((base / "rx_bytes").read_text()), int((base / "tx_bytes").read_text())
    except OSError:
        return 0, 0


def domain_taps(name: str) -> list[tuple[str, str]]:
    """(tap, MAC) pairs of a domain from ``virsh domiflist``."""
    proc = virsh("domiflist", name, check=False)
    out = []
    for line in proc.stdout.splitlines()[2:]:
        cols = line.split()
        if len(cols) >= 5:
            out.append((cols[0], cols[4]))
    return out


def configure_tap(tap: str, index: int) -> None:
    """Host end of a guest tap: 169.254.N.1/24, up, no IPv6 (libvirt leaves it bare)."""
    if not Path(f"/sys/class/net/{tap}").exists():
        raise LabError(f"tap {tap} does not exist")
    want = f"{host_address(index)}/24"
    info = json.loads(run(["ip", "-j", "addr", "show", "dev", tap]).stdout or "[]")
    addrs = {
        f"{a['local']}/{a['prefixlen']}"
        for i in info
        for a in i.get("addr_info", [])
        if a.get("family") == "inet"
    }
    up = bool(info) and "UP" in info[0].get("flags", [])
    v6 = Path(f"/proc/sys/net/ipv6/conf/{tap}/disable_ipv6")
    if v6.exists() and v6.read_text().strip() != "1":
        v6.write_text("1")
        log(f"tap {tap}: IPv6 off")
    if addrs == {want} and up:
        log(f"tap {tap} already configured ({want}, up)")
        return
    for extra in addrs - {want}:
        run(["ip", "addr", "del", extra, "dev", tap])
    run(["ip", "addr", "replace", want, "dev", tap])
    run(["ip", "link", "set", tap, "up"])
    log(f"tap {tap}: {want}, up")


def ensure_disk(name: str, wd: Path | None = None) -> None:
    path = disk_path(name, wd)
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), DISK_SIZE])
    log(f"created disk {path} ({DISK_SIZE} qcow2)")


def ensure_defined(name: str, index: int, wd: Path | None = None) -> bool:
    """Define the guest persistently when it is not; True when it was defined now."""
    wd = wd or workdir()
    if domain_state(name) is not None:
        log(f"{name} already defined")
        return False
    xml_dir = wd / "xml"
    xml_dir.mkdir(parents=True, exist_ok=True)
    xml_file = xml_dir / f"{name}.xml"
    xml_file.write_text(domain_xml(name, index, wd))
    virsh("define", str(xml_file))
    log(f"defined {name} (index {index}, tap {tap_name(index)}, mac {mac_address(index)})")
    return True


def start_guest(name: str, index: int, wd: Path | None = None) -> bool:
    """Bring the guest to ``running``; True when it was (re)started now."""
    wd = wd or workdir()
    state = domain_state(name)
    if state == "running":
        log(f"{name} already running")
        return False
    if state == "paused":
        virsh("resume", name)
        log(f"resumed {name}")
        return False
    if state in ("in shutdown", "crashed", "pmsuspended", "blocked"):
        virsh("destroy", name, check=False)
        log(f"destroyed {name} ({state})")
    ensure_disk(name, wd)
    serial_log_path(name, wd).parent.mkdir(parents=True, exist_ok=True)
    virsh("start", name)
    log(f"started {name}")
    return True


def _tap_of(name: str, index: int) -> str:
    taps = domain_taps(name)
    return taps[0][0] if taps and taps[0][0] != "-" else tap_name(index)


def ensure_guest(
    name: str, index: int, *, start: bool = True, wait: bool = True, wd: Path | None = None
) -> None:
    """Make sure ``name`` is defined (and, with ``start``, running with its tap configured)."""
    wd = wd or workdir()
    with lab_lock(wd):
        ensure_defined(name, index, wd)
        ensure_disk(name, wd)
    if start:
        start_existing(name, wait=wait, wd=wd)


def start_existing(name: str, *, wait: bool = True, wd: Path | None = None) -> None:
    """Start a defined lab domain (index from its XML), configure its tap, optionally wait."""
    wd = wd or workdir()
    with lab_lock(wd):
        index = domain_index(name)
        t0 = time.monotonic()
        started = start_guest(name, index, wd)
        configure_tap(_tap_of(name, index), index)
    if wait:
        wait_ready([(name, index, t0 if started else None)], wd)


def destroy_guest(name: str) -> None:
    """Hard-stop a running domain (it stays defined; libvirt removes its tap)."""
    state = domain_state(name)
    if state is None:
        raise LabError(f"{name} is not defined")
    if state == "shut off":
        log(f"{name} already shut off")
        return
    virsh("destroy", name)
    log(f"destroyed {name}")


def _serial_ready(name: str, wd: Path) -> str | None:
    try:
        text = serial_log_path(name, wd).read_text(errors="replace")
    except OSError:
        return None
    m = re.search(r"^halab: ready .*$", text, re.M)
    return m.group(0) if m else None


def wait_ready(
    guests: Sequence[tuple[str, int, float | None]],
    wd: Path | None = None,
    timeout: float = BOOT_TIMEOUT_S,
) -> None:
    """Wait until each guest is running, printed its ready line and its tap saw rx and tx."""
    wd = wd or workdir()
    pending = {name: (index, started) for name, index, started in guests}
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for name in list(pending):
            index, started = pending[name]
            if domain_state(name) != "running":
                continue
            ready = _serial_ready(name, wd)
            rx, tx = tap_stats(_tap_of(name, index))
            if ready and rx > 0 and tx > 0:
                took = (
                    f" {time.monotonic() - started:.1f} s after start;"
                    if started is not None
                    else ""
                )
                log(f"{name} ready:{took} tap rx={rx} tx={tx}")
                del pending[name]
        if pending:
            time.sleep(0.25)
    for name in pending:
        log(f"WARNING: {name} not ready after {timeout:.0f} s: see {serial_log_path(name, wd)}")


def remove_guest(name: str, wd: Path | None = None) -> None:
    """Destroy + undefine a guest and delete its tap and disk."""
    wd = wd or workdir()
    with lab_lock(wd):
        taps = [t for t, _ in domain_taps(name) if t != "-"]
        state = domain_state(name)
        if state is None:
            log(f"{name} not defined")
        else:
            if state != "shut off":
                virsh("destroy", name, check=False)
                log(f"destroyed {name}")
            virsh("undefine", name)
            log(f"undefined {name}")
        idx = index_of(name)
        if idx is not None and 1 <= idx <= 200 and idx != 169:
            taps.append(tap_name(idx))
        for tap in dict.fromkeys(taps):
            if Path(f"/sys/class/net/{tap}").exists():
                run(["ip", "link", "del", tap], check=False)
                log(f"deleted tap {tap}")
        for path in (disk_path(name, wd), wd / "xml" / f"{name}.xml", serial_log_path(name, wd)):
            if path.exists():
                path.unlink()
                log(f"deleted {path}")


def down() -> None:
    """Remove every halab-* guest (kernel/initramfs cache stays)."""
    require_root()
    if not installed() or libvirtd_pid() is None:
        log("libvirtd not running: no guests to remove")
    else:
        for name in lab_domains():
            remove_guest(name)
    for tap in sorted(
        p.name for p in Path("/sys/class/net").iterdir() if p.name.startswith(TAP_PREFIX)
    ):
        run(["ip", "link", "del", tap], check=False)
        log(f"deleted leftover tap {tap}")
    for disk in sorted((workdir() / "disks").glob(f"{PREFIX}*.qcow2")):
        disk.unlink()
        log(f"deleted leftover disk {disk}")
    log("down")


def up(n: int = 2) -> None:
    """Ensure guests halab-1..halab-N run with their load; extra guests are left alone."""
    require_root()
    if n < 1:
        raise LabError("up needs N >= 1")
    if not installed():
        install()
    if libvirtd_pid() is None or not libvirtd_answers():
        ensure_libvirtd()
    else:
        log(f"libvirtd already running (pid {libvirtd_pid()})")
    wd = workdir()
    waits: list[tuple[str, int, float | None]] = []
    with lab_lock(wd):
        build_images(wd)
        indexes = [i for i in range(1, n + 200) if i != 169][:n]
        for index in indexes:
            name = guest_name(index)
            ensure_defined(name, index, wd)
            t0 = time.monotonic()
            started = start_guest(name, index, wd)
            configure_tap(_tap_of(name, index), index)
            waits.append((name, index, t0 if started else None))
    wait_ready(waits, wd)
    print_status()


# ---------------------------------------------------------------------------------------------
# status


@dataclass(frozen=True)
class GuestStatus:
    """One row of ``lab.py status``."""

    name: str
    state: str
    domid: int | None
    uuid: str
    tap: str
    mac: str
    qemu_pid: int | None
    rx_bytes: int
    tx_bytes: int


def guest_status(name: str) -> GuestStatus:
    """Status of one domain (any name)."""
    info: dict[str, str] = {}
    for line in virsh("dominfo", name).stdout.splitlines():
        key, _, value = line.partition(":")
        info[key.strip()] = value.strip()
    taps = domain_taps(name)
    tap, mac = taps[0] if taps else ("-", "-")
    idx = index_of(name)
    if tap == "-" and idx is not None and info.get("State") != "running":
        tap = "-"
    rx, tx = tap_stats(tap) if tap != "-" else (0, 0)
    domid = info.get("Id", "-")
    return GuestStatus(
        name=name,
        state=info.get("State", "?"),
        domid=int(domid) if domid.isdigit() else None,
        uuid=info.get("UUID", "?"),
        tap=tap,
        mac=mac,
        qemu_pid=qemu_pid(name) if info.get("State") == "running" else None,
        rx_bytes=rx,
        tx_bytes=tx,
    )


def status() -> list[GuestStatus]:
    """Status rows of all halab-* guests."""
    return [guest_status(n) for n in lab_domains()]


def print_status(as_json: bool = False) -> None:
    rows = status() if installed() and libvirtd_pid() is not None else []
    if as_json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
        return
    head = (
        "NAME",
        "STATE",
        "DOMID",
        "UUID",
        "TAP",
        "MAC",
        "QEMU_PID",
        "TAP_RX_BYTES",
        "TAP_TX_BYTES",
    )
    table = [head] + [
        (
            r.name,
            r.state,
            str(r.domid or "-"),
            r.uuid,
            r.tap,
            r.mac,
            str(r.qemu_pid or "-"),
            str(r.rx_bytes),
            str(r.tx_bytes),
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip())
    if not rows:
        print("(no lab guests)")


# ---------------------------------------------------------------------------------------------
# CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lab.py", description=__doc__.splitlines()[0] if __doc__ else None
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("install", help="install packages, download + extract the guest kernel")
    sub.add_parser("start-libvirtd", help="write qemu.conf, start libvirtd, wait until it answers")
    p_up = sub.add_parser("up", help="ensure guests halab-1..N run (default 2)")
    p_up.add_argument("n", nargs="?", type=int, default=2)
    sub.add_parser("down", help="destroy + undefine all halab-* guests, delete taps and disks")
    p_status = sub.add_parser("status", help="table of lab guests")
    p_status.add_argument("--json", action="store_true")
    p_xml = sub.add_parser("xml", help="print the domain XML for NAME using INDEX")
    p_xml.add_argument("name")
    p_xml.add_argument("index", type=int)
    p_guest = sub.add_parser(
        "guest", help="ensure one guest NAME with INDEX is defined and running"
    )
    p_guest.add_argument("name")
    p_guest.add_argument("index", type=int)
    p_guest.add_argument("--no-wait", action="store_true")
    p_define = sub.add_parser("define", help="define (not start) one guest NAME with INDEX")
    p_define.add_argument("name")
    p_define.add_argument("index", type=int)
    p_start = sub.add_parser("start", help="start a defined lab guest, configure its tap, wait")
    p_start.add_argument("name")
    p_start.add_argument("--no-wait", action="store_true")
    p_destroy = sub.add_parser("destroy", help="hard-stop one guest (stays defined)")
    p_destroy.add_argument("name")
    p_rm = sub.add_parser("rm", help="destroy + undefine one guest, delete its tap and disk")
    p_rm.add_argument("name")
    sub.add_parser("build", help="(re)build kernel/initramfs images only")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "install":
            install()
        elif args.cmd == "start-libvirtd":
            ensure_libvirtd()
        elif args.cmd == "up":
            up(args.n)
        elif args.cmd == "down":
            down()
        elif args.cmd == "status":
            print_status(args.json)
        elif args.cmd == "xml":
            sys.stdout.write(domain_xml(args.name, args.index))
        elif args.cmd in ("guest", "define", "start"):
            require_root()
            if libvirtd_pid() is None or not libvirtd_answers():
                ensure_libvirtd()
            with lab_lock():
                build_images()
            if args.cmd == "start":
                start_existing(args.name, wait=not args.no_wait)
            else:
                ensure_guest(
                    args.name,
                    args.index,
                    start=args.cmd == "guest",
                    wait=args.cmd == "guest" and not args.no_wait,
                )
        elif args.cmd == "destroy":
            require_root()
            destroy_guest(args.name)
        elif args.cmd == "rm":
            require_root()
            remove_guest(args.name)
        elif args.cmd == "build":
            require_root()
            with lab_lock():
                build_images()
    except LabError as err:
        print(f"lab: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
