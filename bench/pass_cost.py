"""CPU and wall time per pass: hostagent's pass vs a per-domain (Ceilometer-style) collector.

Both run side by side in this one process, over (1) the lab's live guests (qemu:///system) and
(2) 1,000 generated domains (libvirt's test driver inside libvirtd via test+unix:// when libvirtd
runs, else in-process test:///, plus a generated pure cgroup-v2 tree). CPU is process CPU time
(all threads) of the collector: what the daemon would cost the host. Printed, not asserted.

The generated tree's cgroup files are plain files, which the collector reads like `cat` every
pass. `--cgroupfs` (root, hybrid host like the lab: cgroup2 plus a v1 memory hierarchy) makes
the per-VM cgroups for real instead (v2 for cpu.stat and PSI, v1 for memory, removed at exit),
so the kept-open descriptors of sources/fdcache.py and the kernel's cgroupfs costs are measured.

    python bench/pass_cost.py [--domains 1000] [--passes 5] [--skip-lab] [--cgroupfs]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import libvirt
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import contextlib

from hostagent.clock import SystemClock
from hostagent.collector import Collector
from hostagent.config.load import from_mapping
from hostagent.owners.resolver import Owners
from hostagent.sources.files import cgroup_mounts
from hostagent.sources.gpu import GpuSource
from hostagent.sources.libvirt import LibvirtSource
from hostagent.sources.net import LinkStatsReader
from hostagent.store.outbox import Store

CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- generated host ------------------------------------------------------------------------------


class RealCgroups:
    """Per-VM cgroups made for real on a hybrid host (cgroup2 + v1 memory); `remove()` at exit."""

    def __init__(self) -> None:
        mounts = cgroup_mounts(Path("/proc/self/mountinfo").read_text())
        if set(mounts) != {"cgroup2", "memory"}:
            sys.exit(f"--cgroupfs needs cgroup2 and a v1 memory hierarchy (hybrid, like the "
                     f"lab); found {mounts or 'neither'}")
        name = f"hostagent-bench-{os.getpid()}"
        self.v2 = f"{mounts['cgroup2']}/{name}"
        self.memory = f"{mounts['memory']}/{name}"
        self.made: list[str] = []

    def make(self, rel: str) -> None:
        """mkdir -p `rel` under both bench cgroups."""
        for base in (self.v2, self.memory):
            parts = [base, *rel.split("/")]
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i])
                if not os.path.isdir(d):
                    os.mkdir(d)
                    self.made.append(d)

    def remove(self) -> None:
        """rmdir everything made, children first (they hold no processes)."""
        for d in reversed(self.made):
            os.rmdir(d)
        self.made.clear()


def generate(n: int, workdir: Path, real: RealCgroups | None = None) -> tuple[Path, Path]:
    """A test-driver node XML with n running domains and a matching pure cgroup-v2 root tree
    (with `real`: a hybrid tree whose cgroup dirs are links to real cgroups)."""
    root = workdir / "root"
    node = ET.Element("node")
    (root / "proc").mkdir(parents=True)
    (root / "proc" / "stat").write_text("cpu  1 2 3 4\nbtime 1700000000\n")
    qemu_run = root / "run" / "libvirt" / "qemu"
    qemu_run.mkdir(parents=True)
    for i in range(1, n + 1):
        name = f"bench-{i}"
        dom = ET.SubElement(node, "domain", type="test")
        ET.SubElement(dom, "name").text = name
        ET.SubElement(dom, "uuid").text = f"00000000-0000-4000-8000-{i:012x}"
        ET.SubElement(dom, "memory").text = "1048576"
        ET.SubElement(dom, "vcpu").text = "2"
        os_el = ET.SubElement(dom, "os")
        ET.SubElement(os_el, "type").text = "hvm"
        devs = ET.SubElement(dom, "devices")
        disk = ET.SubElement(devs, "disk", type="file", device="disk")
        ET.SubElement(disk, "source", file=f"/var/lib/bench/{name}.qcow2")
        ET.SubElement(disk, "target", dev="vda", bus="virtio")
        cdrom = ET.SubElement(devs, "disk", type="file", device="cdrom")
        ET.SubElement(cdrom, "target", dev="sda", bus="sata")
        ET.SubElement(cdrom, "readonly")
        _typical_devices(devs)
        iface = ET.SubElement(devs, "interface", type="ethernet")
        ET.SubElement(iface, "mac", address=f"52:54:00:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:"
                                             f"{i & 255:02x}")
        ET.SubElement(iface, "target", dev=f"bt{i}")
        ET.SubElement(iface, "model", type="virtio")
        pid = 100000 + i
        domid = i  # the test driver numbers running domains from 1 in file order
        (qemu_run / f"{name}.pid").write_text(f"{pid}\n")
        proc = root / "proc" / str(pid)
        proc.mkdir()
        fields = ["S"] + ["0"] * 18 + [str(1000 + i)] + ["0"] * 30
        (proc / "stat").write_text(f"{pid} (qemu-system-x86) " + " ".join(fields) + "\n")
        if real is not None:  # the lab's hybrid layout
            vm = f"machine/qemu-{domid}-{name}.libvirt-qemu"
            (proc / "cgroup").write_text(f"0::/{vm}/emulator\n4:memory:/{vm}\n")
            real.make(vm)
            continue
        esc = name.replace("-", "\\x2d")
        scope = f"machine.slice/machine-qemu\\x2d{domid}\\x2d{esc}.scope/libvirt"
        (proc / "cgroup").write_text(f"0::/{scope}/emulator\n")
        cg = root / "sys" / "fs" / "cgroup" / scope
        cg.mkdir(parents=True)
        (root / "sys" / "fs" / "cgroup" / "cgroup.controllers").write_text("cpu io memory pids\n")
        (cg / "cpu.stat").write_text(f"usage_usec {i * 1000}\nuser_usec 1\nsystem_usec 1\n")
        (cg / "memory.current").write_text(f"{200 << 20}\n")
        (cg / "memory.stat").write_text("anon 1000\nfile 2000\ninactive_file 1000\n")
        (cg / "memory.max").write_text("max\n")
        (cg / "io.stat").write_text("253:0 rbytes=1 wbytes=2 rios=1 wios=1 dbytes=0 dios=0\n")
        for res in ("cpu", "memory", "io"):
            (cg / f"{res}.pressure").write_text(
                "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
                "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
    if real is not None:
        (root / "sys" / "fs" / "cgroup").mkdir(parents=True)
        (root / "sys" / "fs" / "cgroup" / "unified").symlink_to(real.v2)
        (root / "sys" / "fs" / "cgroup" / "memory").symlink_to(real.memory)
    node_xml = workdir / "node.xml"
    ET.ElementTree(node).write(node_xml)
    return node_xml, root


def _typical_devices(devs: ET.Element) -> None:
    """The devices a real cloud VM's XML carries, so XML size and parse cost are realistic."""
    ET.SubElement(devs, "emulator").text = "/usr/bin/qemu-system-x86_64"
    for i, (ctype, model) in enumerate([("usb", "qemu-xhci"), ("pci", "pcie-root"),
                                        ("virtio-serial", None), ("sata", None)]):
        c = ET.SubElement(devs, "controller", type=ctype, index="0")
        if model:
            c.set("model", model)
        if ctype != "pci":
            ET.SubElement(c, "address", type="pci", domain="0x0000", bus=f"0x{i:02x}",
                          slot="0x00", function="0x0")
    serial = ET.SubElement(devs, "serial", type="pty")
    ET.SubElement(serial, "target", type="isa-serial", port="0")
    console = ET.SubElement(devs, "console", type="pty")
    ET.SubElement(console, "target", type="serial", port="0")
    chan = ET.SubElement(devs, "channel", type="unix")
    ET.SubElement(chan, "target", type="virtio", name="org.qemu.guest_agent.0")
    ET.SubElement(devs, "input", type="tablet", bus="usb")
    gfx = ET.SubElement(devs, "graphics", type="vnc", port="-1", autoport="yes")
    ET.SubElement(gfx, "listen", type="address", address="127.0.0.1")
    video = ET.SubElement(devs, "video")
    ET.SubElement(video, "model", type="virtio", heads="1", primary="yes")
    balloon = ET.SubElement(devs, "memballoon", model="virtio")
    ET.SubElement(balloon, "stats", period="10")
    rng = ET.SubElement(devs, "rng", model="virtio")
    ET.SubElement(rng, "backend", model="random").text = "/dev/urandom"


# --- the two collectors --------------------------------------------------------------------------


def per_domain_pass(conn: Any) -> int:
    """Ceilometer's compute pollster style: several calls per domain and device, every pass."""
    n = 0
    for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
        dom.info()
        tree = ET.fromstring(dom.XMLDesc(0))
        for disk in tree.findall("devices/disk/target"):
            with contextlib.suppress(libvirt.libvirtError):
                dom.blockStats(disk.get("dev"))
        for tgt in tree.findall("devices/interface/target"):
            with contextlib.suppress(libvirt.libvirtError):
                dom.interfaceStats(tgt.get("dev"))
        with contextlib.suppress(libvirt.libvirtError):
            dom.memoryStats()
        n += 1
    return n


def measure(fn: Callable[[], int], passes: int) -> tuple[float, float, int]:
    """Median CPU and wall seconds per pass (after one warm-up pass) and the domain count."""
    count = fn()
    cpus, walls = [], []
    for _ in range(passes):
        c0, w0 = time.process_time(), time.perf_counter()
        count = fn()
        cpus.append(time.process_time() - c0)
        walls.append(time.perf_counter() - w0)
    return statistics.median(cpus), statistics.median(walls), count


def bench_collector(uri: str, root: str, state_dir: Path) -> tuple[Collector, Store]:
    """A Collector on `uri` and `root` as `hostagent run` builds one: a real store and a JSONL
    sink in `state_dir`. The caller closes `coll.cgroups` and the store."""
    cfg = from_mapping({
        "host": {"node_id": "bench"},
        "libvirt": {"uri": uri, "call_timeout_s": 60, "readonly": False},
        "paths": {"root": root},
        "collector": {"state_path": str(state_dir / "state.db"), "pass_timeout_s": 120},
        "sinks": [{"type": "jsonl", "path": str(state_dir / "events.jsonl")}],
    })
    clock = SystemClock()
    limiter = trio.CapacityLimiter(cfg.collector.max_threads)
    store = Store.open(cfg.collector.state_path, clock=clock, node_id="bench",
                       sink_names=["jsonl"])
    coll = Collector(cfg, clock=clock, store=store, owners=Owners(cfg.owners, clock, None),
                     libvirt_source=LibvirtSource(cfg.libvirt, clock=clock, limiter=limiter),
                     link_reader=LinkStatsReader(), gpu_source=GpuSource(cfg.gpu, root=root,
                                                                          clock=clock),
                     limiter=limiter)
    return coll, store


def hostagent_passes(uri: str, root: str, state_dir: Path,
                     passes: int) -> tuple[float, float, int]:
    """Real hostagent passes (sources, math, events, SQLite commit) in ONE trio run, like the
    daemon: median CPU and wall seconds per pass after a warm-up pass, and the domain count."""
    coll, store = bench_collector(uri, root, state_dir)

    async def run_all() -> tuple[float, float, int]:
        count = 0
        cpus, walls = [], []
        for i in range(passes + 1):
            c0, w0 = time.process_time(), time.perf_counter()
            report = await coll.run_pass()
            if report.error:
                raise RuntimeError(report.error)
            if i:  # the first pass parses every domain's XML once: a warm-up
                cpus.append(time.process_time() - c0)
                walls.append(time.perf_counter() - w0)
            count = report.domains
        return statistics.median(cpus), statistics.median(walls), count

    try:
        return trio.run(run_all)
    finally:
        coll.cgroups.close()
        store.close()


def row(label: str, ours: tuple[float, float, int], theirs: tuple[float, float, int]) -> None:
    oc, ow, n = ours
    tc, tw, _ = theirs
    print(f"{label:<28} {n:>6} | hostagent cpu {oc * 1e3 / n:7.3f} ms/dom  wall {ow:7.3f} s | "
          f"per-domain cpu {tc * 1e3 / n:7.3f} ms/dom  wall {tw:7.3f} s | "
          f"CPU ratio {tc / oc:5.1f}x")


def main() -> int:
    """Run both benchmarks and print the table."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--domains", type=int, default=1000)
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--skip-lab", action="store_true")
    ap.add_argument("--cgroupfs", action="store_true",
                    help="make the generated domains' cgroups for real (root, hybrid host)")
    args = ap.parse_args()
    print(f"pass cost, median of {args.passes} passes after a warm-up; CPU = process CPU time")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if not args.skip_lab:
            try:
                conn = libvirt.openReadOnly("qemu:///system")
                live = len(conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE))
            except libvirt.libvirtError as err:
                print(f"lab: skipped ({err})")
                live = 0
            if live:
                (work / "lab").mkdir()
                ours = hostagent_passes("qemu:///system", "/", work / "lab", args.passes)
                theirs = measure(lambda: per_domain_pass(conn), args.passes)
                row("lab guests (qemu:///system)", ours, theirs)
        real = RealCgroups() if args.cgroupfs else None
        try:
            node_xml, root = generate(args.domains, work / "gen", real)
            uri = f"test+unix://{node_xml}" if shutil.which("libvirtd") and _libvirtd_up() \
                else f"test://{node_xml}"
            (work / "gen-state").mkdir()
            ours = hostagent_passes(uri, str(root), work / "gen-state", args.passes)
        finally:
            if real is not None:
                real.remove()
        conn = libvirt.open(uri)
        theirs = measure(lambda: per_domain_pass(conn), args.passes)
        cgroups = ", real cgroups" if real is not None else ""
        row(f"{args.domains} domains ({uri.split(':', maxsplit=1)[0]}{cgroups})", ours, theirs)
    print("targets: >= 5x less CPU than the per-domain style; < 2 ms CPU per domain per pass "
          "(mission: ~0.2 ms)")
    return 0


def _libvirtd_up() -> bool:
    try:
        libvirt.openReadOnly("qemu:///system").close()
    except libvirt.libvirtError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
