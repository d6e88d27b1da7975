#!/usr/bin/env python3
"""Record a host fixture tree from the running lab guests.

``python3 deploy/lab/record_fixture.py HOSTNAME [--out fixtures/hosts] [--interval 2]``
writes ``fixtures/hosts/HOSTNAME/{meta.json,t0/,t1/}``: two snapshots ``--interval`` seconds
apart, each a complete fake root (``proc/``, ``run/``, ``sys/``) plus ``libvirt/`` and ``net/``.
See fixtures/hosts/README.md for the layout. Stdlib only; run as root.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import lab  # noqa: E402

REPO = HERE.parents[1]

# Files the collector may read in a VM's cgroup dir, v2 and v1 names together.
CGROUP_FILES = (
    "cgroup.controllers",
    "cpu.stat",
    "cpu.pressure",
    "memory.current",
    "memory.max",
    "memory.stat",
    "memory.pressure",
    "memory.usage_in_bytes",
    "memory.limit_in_bytes",
    "io.stat",
    "io.pressure",
    "blkio.throttle.io_service_bytes",
    "cpuacct.usage",
    "cpuacct.stat",
)
CHILD_FILES = ("cpu.stat",)
CHILD_RE = re.compile(r"^(emulator|vcpu\d+)$")

BULK_FLAGS_DOC = (
    "VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE | VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT"
)


def _bulk_stats_python(names: list[str]) -> list[dict[str, Any]]:
    import libvirt

    conn = libvirt.open(lab.URI)
    try:
        flags = (
            libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE
            | libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT
        )
        out = [
            {"uuid": dom.UUIDString(), "name": dom.name(), "id": dom.ID(), "stats": dict(stats)}
            for dom, stats in conn.getAllDomainStats(0, flags)
            if dom.name() in names
        ]
    finally:
        conn.close()
    return sorted(out, key=lambda d: names.index(d["name"]))


def _typed(value: str) -> int | float | str:
    if re.fullmatch(r"-?\d+", value):
        return int(value)
    if re.fullmatch(r"-?\d+\.\d+", value):
        return float(value)
    return value


def parse_domstats_raw(text: str) -> dict[str, dict[str, str]]:
    """``virsh domstats --raw`` output -> {domain name: {key: raw text value}}."""
    out: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for line in text.splitlines():
        m = re.match(r"^Domain: '(.*)'$", line)
        if m:
            current = out.setdefault(m.group(1), {})
        elif current is not None and "=" in line:
            key, _, value = line.strip().partition("=")
            current[key] = value
    return out


def _bulk_stats_virsh(names: list[str], raw: str) -> list[dict[str, Any]]:
    parsed = parse_domstats_raw(raw)
    out = []
    for name in names:
        uuid = lab.virsh("domuuid", name).stdout.strip()
        domid = lab.virsh("domid", name).stdout.strip()
        out.append(
            {
                "uuid": uuid,
                "name": name,
                "id": int(domid),
                "stats": {k: _typed(v) for k, v in parsed[name].items()},
            }
        )
    return out


def bulk_stats(names: list[str], raw: str) -> tuple[list[dict[str, Any]], str]:
    """getAllDomainStats as JSON-able dicts; python-libvirt here, via /usr/bin/python3, or virsh."""
    try:
        return _bulk_stats_python(names), "python-libvirt"
    except ImportError:
        pass
    sys_py = Path("/usr/bin/python3")
    if sys_py.exists() and Path(sys.executable).resolve() != sys_py.resolve():
        proc = subprocess.run(
            [str(sys_py), __file__, "--bulk-stats-json", *names],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode == 0:
            return json.loads(proc.stdout), "python-libvirt (/usr/bin/python3)"
    return _bulk_stats_virsh(names, raw), "virsh domstats --raw (ints parsed)"


def _mountinfo() -> list[tuple[str, str, str, set[str]]]:
    """(root, mountpoint, fstype, super options) of cgroup mounts."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        f = left.split()
        r = right.split()
        if r[0] in ("cgroup", "cgroup2"):
            out.append((f[3], f[4], r[0], set(r[2].split(","))))
    return out


def cgroup_dirs(pid: int) -> list[Path]:
    """Absolute cgroup dirs of a QEMU process, one per hierarchy (emulator/vcpuN -> VM dir)."""
    mounts = _mountinfo()
    dirs: list[Path] = []
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        hid, ctrls, path = line.split(":", 2)
        if path == "/":
            continue
        if hid == "0" and ctrls == "":
            cands = [m for m in mounts if m[2] == "cgroup2"]
        else:
            want = set(ctrls.split(","))
            cands = [m for m in mounts if m[2] == "cgroup" and want <= m[3]]
        for root, mnt, _, _ in cands[:1]:
            rel = os.path.relpath(path, root) if root != "/" else path.lstrip("/")
            d = Path(mnt) / rel
            if CHILD_RE.match(d.name):
                d = d.parent
            if d not in dirs:
                dirs.append(d)
    return dirs


def _copy(src: Path, root: Path) -> bool:
    try:
        data = src.read_bytes()
    except OSError:
        return False
    dst = root / str(src).lstrip("/")
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(data)
    return True


def snapshot(root: Path, names: list[str]) -> dict[str, Any]:
    """Write one complete fixture root for the given running guests."""
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    raw = lab.virsh("domstats", "--raw", *names).stdout
    stats, source = bulk_stats(names, raw)
    libvirt_dir = root / "libvirt"
    libvirt_dir.mkdir()
    (libvirt_dir / "bulk_stats.json").write_text(
        json.dumps(stats, indent=1, sort_keys=False) + "\n"
    )
    (libvirt_dir / "domstats_raw.txt").write_text(raw)
    guests = []
    links = []
    for name in names:
        pid = lab.qemu_pid(name)
        if pid is None:
            raise lab.LabError(f"{name}: no qemu pid")
        _copy(lab.LIBVIRT_QEMU_RUN / f"{name}.pid", root)
        _copy(Path(f"/proc/{pid}/cgroup"), root)
        _copy(Path(f"/proc/{pid}/stat"), root)
        for d in cgroup_dirs(pid):
            for f in CGROUP_FILES:
                _copy(d / f, root)
            for child in sorted(p for p in d.iterdir() if p.is_dir() and CHILD_RE.match(p.name)):
                for f in CHILD_FILES:
                    _copy(child / f, root)
        (libvirt_dir / f"{name}.xml").write_text(lab.virsh("dumpxml", name).stdout)
        for tap, mac in lab.domain_taps(name):
            if tap == "-":
                continue
            net = Path("/sys/class/net") / tap
            for f in ("ifindex", "address", "statistics/rx_bytes", "statistics/tx_bytes"):
                _copy(net / f, root)
            rx, tx = lab.tap_stats(tap)
            links.append(
                {
                    "name": tap,
                    "ifindex": int((net / "ifindex").read_text()),
                    "mac": (net / "address").read_text().strip(),
                    "guest_mac": mac,
                    "domain": name,
                    "rx_bytes": rx,
                    "tx_bytes": tx,
                }
            )
        guests.append({"name": name, "qemu_pid": pid})
    (root / "net").mkdir()
    (root / "net" / "links.json").write_text(json.dumps(links, indent=1) + "\n")
    mounts = [
        line
        for line in Path("/proc/self/mounts").read_text().splitlines()
        if line.split()[2] in ("cgroup", "cgroup2") or line.split()[1] == "/sys/fs/cgroup"
    ]
    (root / "proc").mkdir(exist_ok=True)
    (root / "proc" / "mounts").write_text("\n".join(mounts) + "\n")
    for m in _mountinfo():
        if m[2] == "cgroup2":
            _copy(Path(m[1]) / "cgroup.controllers", root)
    _copy(Path("/sys/fs/cgroup/cgroup.controllers"), root)
    return {"bulk_stats_source": source, "guests": guests}


def record(hostname: str, out: Path, interval_s: float, names: list[str] | None) -> Path:
    """Record t0 and t1 of all running lab guests into OUT/HOSTNAME."""
    if names is None:
        names = [n for n in lab.lab_domains() if lab.domain_state(n) == "running"]
    if not names:
        raise lab.LabError("no running lab guests: run `lab.py up`")
    dest = out / hostname
    dest.mkdir(parents=True, exist_ok=True)
    lab.log(f"recording {', '.join(names)} into {dest}")
    t0 = time.time()
    s0 = snapshot(dest / "t0", names)
    lab.log(f"t0 recorded; waiting {interval_s} s")
    time.sleep(max(0.0, interval_s - (time.time() - t0)))
    t1 = time.time()
    s1 = snapshot(dest / "t1", names)
    lab.log("t1 recorded")
    statuses = {g.name: g for g in lab.status()}
    meta = {
        "hostname": hostname,
        "recorded_with": "deploy/lab/record_fixture.py",
        "recorded_at": {
            "t0": dt.datetime.fromtimestamp(t0, dt.UTC).isoformat(timespec="milliseconds"),
            "t1": dt.datetime.fromtimestamp(t1, dt.UTC).isoformat(timespec="milliseconds"),
        },
        "interval_s": round(t1 - t0, 3),
        "host_kernel": platform.release(),
        "libvirt": lab.virsh("version").stdout.strip().splitlines(),
        "cgroup_layout": "hybrid"
        if Path("/sys/fs/cgroup/unified").is_dir()
        else ("v2" if Path("/sys/fs/cgroup/cgroup.controllers").exists() else "v1"),
        "bulk_stats_flags": BULK_FLAGS_DOC,
        "bulk_stats_source": s0["bulk_stats_source"],
        "guests": [
            {
                "name": n,
                "uuid": statuses[n].uuid,
                "domid": statuses[n].domid,
                "qemu_pid": statuses[n].qemu_pid,
                "tap": statuses[n].tap,
                "guest_mac": statuses[n].mac,
                "index": lab.index_of(n),
            }
            for n in names
        ],
    }
    assert s0["guests"] == s1["guests"], "a guest restarted between t0 and t1"
    (dest / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    lab.log(f"fixture {dest}: {size // 1024} KiB")
    return dest


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "--bulk-stats-json":  # helper mode, run under /usr/bin/python3
        print(json.dumps(_bulk_stats_python(argv[1:])))
        return 0
    p = argparse.ArgumentParser(
        prog="record_fixture.py", description=__doc__.splitlines()[0] if __doc__ else None
    )
    p.add_argument("hostname")
    p.add_argument("--out", type=Path, default=REPO / "fixtures" / "hosts")
    p.add_argument("--interval", type=float, default=2.0)
    p.add_argument("--guest", action="append", dest="guests", help="record only these (repeatable)")
    args = p.parse_args(argv)
    try:
        record(args.hostname, args.out, args.interval, args.guests)
    except lab.LabError as err:
        print(f"lab: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
