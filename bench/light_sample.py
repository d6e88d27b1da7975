"""Cost of one light sample (hostagent/sources/light.py) per domain: hostagent's CPU and libvirtd's.

For each domain count (default 10 and 1,000) it builds, for real and removed at exit (root):
* one v2 cgroup per domain under the cgroup2 mount (`cpu.stat` read through kept descriptors,
  as on a host: sources/fdcache.py);
* one tap per domain in a private network namespace (one RTM_GETSTATS dump per sample, as a
  host with that many taps answers it; no traffic is sent anywhere);
and, with io.stat: the same counters from a generated tree of plain files whose FdCache trusts
the tree like cgroupfs (the io controller is not enabled on a shared host's root).

hostagent CPU: process CPU time (all threads) per sample, median after a warm-up sample.
libvirtd CPU: its utime+stime (/proc/<pid>/stat) over the sampling window, next to the same
window with no sampling (the daemon is shared: the difference is what sampling adds; the
sampler makes no libvirt call by construction, tests/sources/test_light.py walks its imports).

    python bench/light_sample.py [--domains 10,1000] [--samples 30] [--every-s 0.5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hostagent.clock import SystemClock
from hostagent.sources.fdcache import FdCache
from hostagent.sources.files import HostRoot, cgroup_mounts
from hostagent.sources.light import LightNic, LightSampler, LightTarget
from hostagent.sources.net import LinkStatsReader
from hostagent.sources.netstats import LinkStats64Reader

CLK_TCK = os.sysconf("SC_CLK_TCK")
BUDGET_MS = 0.015


def libvirtd_cpu_s() -> float | None:
    """libvirtd's utime+stime in seconds, or None when it is not running."""
    for pidfile in ("/run/hostagent-lab/libvirtd.pid", "/run/libvirtd.pid"):
        try:
            pid = int(Path(pidfile).read_text())
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, ValueError):
            continue
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    return None


class Host:
    """N real v2 cgroups and N dummy links in a private netns; `remove()` undoes both."""

    def __init__(self, n: int) -> None:
        mounts = cgroup_mounts(Path("/proc/self/mountinfo").read_text())
        if os.geteuid() != 0 or "cgroup2" not in mounts:
            sys.exit("needs root and a cgroup2 mount")
        self.parent = f"{mounts['cgroup2']}/hostagent-bench-light-{os.getpid()}-{n}"
        self.netns = f"halight{os.getpid()}n{n}"
        self.dirs: list[str] = []
        self.made_netns = False
        try:
            self._make(n)
        except BaseException:
            self.remove()
            raise
        by_name = LinkStatsReader(netns=self.netns)  # the pass's dump: tap name -> ifindex
        try:
            ifindex = {name: link.ifindex for name, link in by_name.read().items()}
        finally:
            by_name.close()
        self.targets = [
            LightTarget(f"u-{i}", i, f"{d}/cpu.stat", None,
                        (LightNic(f"52:54:00:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:"
                                  f"{i & 255:02x}", f"bt{i}", ifindex[f"bt{i}"]),))
            for i, d in enumerate(self.dirs, start=1)]

    def _make(self, n: int) -> None:
        os.mkdir(self.parent)
        for i in range(1, n + 1):
            d = f"{self.parent}/qemu-{i}-bench-{i}.libvirt-qemu"
            os.mkdir(d)
            self.dirs.append(d)
        subprocess.run(["ip", "netns", "add", self.netns], check=True)
        self.made_netns = True
        batch = "".join(f"tuntap add mode tap name bt{i}\n" for i in range(1, n + 1))
        subprocess.run(["ip", "-n", self.netns, "-batch", "-"], input=batch, text=True,
                       check=True)

    def remove(self) -> None:
        """rmdir the cgroups, delete the namespace (and its taps)."""
        for d in reversed(self.dirs):
            os.rmdir(d)
        self.dirs.clear()
        if os.path.isdir(self.parent):
            os.rmdir(self.parent)
        if self.made_netns:
            subprocess.run(["ip", "netns", "del", self.netns], check=True)
            self.made_netns = False


def io_tree(n: int, work: Path) -> tuple[HostRoot, str, list[LightTarget]]:
    """A plain-file tree with cpu.stat and io.stat per domain, and a mountinfo trusting it."""
    for i in range(1, n + 1):
        d = work / f"machine.slice/vm{i}.scope/libvirt"
        d.mkdir(parents=True)
        (d / "cpu.stat").write_text(f"usage_usec {i * 1000}\nuser_usec 1\nsystem_usec 1\n"
                                    "nr_periods 0\nnr_throttled 0\nthrottled_usec 0\n")
        (d / "io.stat").write_text("253:0 rbytes=1 wbytes=2 rios=1 wios=1 dbytes=0 dios=0\n"
                                   "253:16 rbytes=3 wbytes=4 rios=1 wios=1 dbytes=0 dios=0\n")
    dev = os.stat(work).st_dev
    info = work / ".mountinfo"
    info.write_text(f"99 1 {os.major(dev)}:{os.minor(dev)} / {work} rw - cgroup2 cgroup2 rw\n")
    targets = [LightTarget(f"u-{i}", i, f"/machine.slice/vm{i}.scope/libvirt/cpu.stat",
                           f"/machine.slice/vm{i}.scope/libvirt/io.stat")
               for i in range(1, n + 1)]
    return HostRoot(work), str(info), targets


def run(sampler: LightSampler, targets: list[LightTarget], samples: int,
        every_s: float) -> tuple[float, float, float | None, float | None]:
    """(median CPU s, median wall s per sample, libvirtd CPU s while sampling, same idle)."""
    sampler.sample(targets)  # warm-up: opens the kept descriptors
    cpus, walls = [], []
    l0 = libvirtd_cpu_s()
    start = time.perf_counter()
    for _ in range(samples):
        c0, w0 = time.process_time(), time.perf_counter()
        got = sampler.sample(targets)
        cpus.append(time.process_time() - c0)
        walls.append(time.perf_counter() - w0)
        assert len(got) == len(targets)
        time.sleep(every_s)
    window = time.perf_counter() - start
    l1 = libvirtd_cpu_s()
    time.sleep(window)
    l2 = libvirtd_cpu_s()
    during = None if l0 is None or l1 is None else l1 - l0
    idle = None if l1 is None or l2 is None else l2 - l1
    return statistics.median(cpus), statistics.median(walls), during, idle


def row(label: str, n: int, samples: int, res: tuple[float, float, float | None, float | None]
        ) -> None:
    cpu, wall, during, idle = res
    per = cpu * 1e3 / n
    lv = ("n/a" if during is None or idle is None else
          f"{during * 1e3 / (samples * n):.4f} (idle {idle * 1e3 / (samples * n):.4f})")
    print(f"{label:<34} {n:>6} | hostagent {per:.4f} ms/dom/sample "
          f"({'ok' if per <= BUDGET_MS else 'OVER'} vs {BUDGET_MS}), {cpu * 1e3:6.2f} ms/sample, "
          f"wall {wall * 1e3:6.2f} ms | "
          f"libvirtd {lv} ms/dom/sample")


def main() -> int:
    """Measure and print one row per domain count and variant."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--domains", default="10,1000")
    ap.add_argument("--samples", type=int, default=30)
    # Samples far apart find cold caches, as a daemon sampling every 2 s does; --every-s 0
    # measures the hot loop (a lower bound).
    ap.add_argument("--every-s", type=float, default=0.5)
    args = ap.parse_args()
    print(f"light sample cost, median of {args.samples} samples after a warm-up; budget "
          f"{BUDGET_MS} ms hostagent CPU per domain per sample")
    for n in (int(x) for x in args.domains.split(",")):
        host = Host(n)
        links = LinkStats64Reader(netns=host.netns)
        fds = FdCache()
        try:
            sampler = LightSampler(HostRoot("/"), fds=fds, links=links, clock=SystemClock())
            row("cpu.stat (cgroupfs) + netlink", n, args.samples,
                run(sampler, host.targets, args.samples, args.every_s))
        finally:
            fds.close()
            links.close()
            host.remove()
        with tempfile.TemporaryDirectory() as tmp:
            root, mountinfo, targets = io_tree(n, Path(tmp))
            fds = FdCache(mountinfo=mountinfo)
            try:
                sampler = LightSampler(root, fds=fds, links=None, clock=SystemClock())
                row("cpu.stat + io.stat (tree, pread)", n, args.samples,
                    run(sampler, targets, args.samples, args.every_s))
            finally:
                fds.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
