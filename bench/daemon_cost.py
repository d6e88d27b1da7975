"""What the host pays: the whole `hostagent run` process per pass, beside a raw bulk call and a
per-domain collector, each in its own process, measured one after another in ONE run.

For every collector the same window is measured: process CPU (run time of all its threads in
ns, the exited ones included: the process's CPU-time clock, `clock_gettime` on the clock id of
`clock_getcpuclockid(pid)`), libvirtd's CPU over the same window, and the collector's RSS.
Each collector polls every `--interval` seconds (hostagent: `collector.interval_s`, JSONL sink,
delivery included). Passes are counted, not assumed: hostagent's from the events it wrote,
the others' from the passes they report.

Hosts:
* `--live`: the lab's running guests (qemu:///system, `deploy/lab/lab.py up 8` for 8 guests);
* `--domains 10,100,1000`: domains of libvirt's test driver inside libvirtd (test+unix://) and a
  generated cgroup tree (bench/pass_cost.py's generator), `--cgroupfs` for real cgroups;
  `--qemu-shaped`: the generated domains' stats answered as a QEMU guest's (bench/qemu_shape.py:
  balloon, vCPUs, a NIC and a disk; memory then comes from the balloon, not the cgroup), for
  hostagent and the raw bulk call alike.

    python bench/daemon_cost.py [--live] [--domains 10,100,1000,5000] [--window 20] [--repeat 3]
    python bench/daemon_cost.py --live --peers     # and collectd, prometheus-libvirt-exporter

`--peers` adds the two shipped collectors of issue 16's table, from Debian's packages
(bench/peers.py: downloaded with `apt-get download` and unpacked once, never installed).

Printed, not asserted (the machines are noisy).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import libvirt

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

import peers as _peers  # noqa: E402
from pass_cost import RealCgroups, generate, per_domain_pass  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
IDLE = "nothing (libvirtd alone)"
SHAPED_ENV = "HOSTAGENT_BENCH_QEMU_SHAPED"  # the raw worker shapes its answers too
STATS = (libvirt.VIR_DOMAIN_STATS_STATE | libvirt.VIR_DOMAIN_STATS_CPU_TOTAL
         | libvirt.VIR_DOMAIN_STATS_BALLOON | libvirt.VIR_DOMAIN_STATS_VCPU
         | libvirt.VIR_DOMAIN_STATS_INTERFACE | libvirt.VIR_DOMAIN_STATS_BLOCK)


# --- the two reference collectors, run as `daemon_cost.py --worker KIND URI INTERVAL` ---------


def raw_bulk(conn: libvirt.virConnect) -> int:
    """The bare bulk call hostagent is built on: same stats groups, NOWAIT, nothing else."""
    flags = (libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE
             | libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT)
    return len(conn.getAllDomainStats(STATS, flags))


def worker(kind: str, uri: str, interval_s: float, passes_file: Path) -> None:
    """Poll until SIGTERM, aligned to the interval; count passes in `passes_file`."""
    if os.environ.get(SHAPED_ENV) and kind == "raw":
        import qemu_shape
        qemu_shape.install()
    conn = libvirt.openReadOnly(uri)
    fn = raw_bulk if kind == "raw" else per_domain_pass
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    passes = 0
    while not stop:
        fn(conn)
        passes += 1
        passes_file.write_text(str(passes))
        time.sleep(interval_s - time.time() % interval_s)


# --- measuring a process -----------------------------------------------------------------------


def cpu_s(pid: int) -> float:
    """utime + stime of every thread of `pid` (children not included), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def threads_cpu_ns(pid: int) -> tuple[int, frozenset[str]]:
    """Run time (ns, from /proc/<pid>/task/*/schedstat) of the live threads, and which they are.

    Precise where /proc/<pid>/stat counts 10 ms ticks; a thread that exits in a window takes its
    time with it, so `window_cpu_s` falls back to the ticks when the thread set shrank."""
    total, tids = 0, []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
            tids.append(tid)
        except (OSError, ValueError, IndexError):
            continue
    return total, frozenset(tids)


def process_cpu_ns(pid: int) -> int | None:
    """The whole process's CPU time in ns, threads that exited included; None where the kernel
    will not say.

    Linux gives every process a CPU-time clock (clock_getcpuclockid(3)): the id
    `(~pid << 3) | CPUCLOCK_SCHED`, readable with clock_gettime by any process here (the
    benches run as root). It sums the same scheduler run time as the threads' schedstat, plus
    what the exited threads ran: trio's idle worker threads exit after 10 s, which used to cut
    a window back to /proc/<pid>/stat's 10 ms ticks."""
    try:
        return time.clock_gettime_ns((~pid << 3) | _CPUCLOCK_SCHED)
    except OSError:
        return None


_CPUCLOCK_SCHED = 2


class CpuMark:
    """A process's CPU at one moment: its CPU-time clock (ns), else the live threads' ns and
    the whole process's ticks."""

    def __init__(self, pid: int) -> None:
        self.clock_ns = process_cpu_ns(pid)
        self.ns, self.tids = threads_cpu_ns(pid)
        self.ticks_s = cpu_s(pid)

    def until(self, later: CpuMark) -> float:
        """CPU seconds from this mark to `later` (ns precision, unless the process clock is
        unreadable and a thread exited: then 10 ms ticks)."""
        if self.clock_ns is not None and later.clock_ns is not None:
            return (later.clock_ns - self.clock_ns) / 1e9
        if later.tids >= self.tids:
            return (later.ns - self.ns) / 1e9
        return later.ticks_s - self.ticks_s


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the daemon finishes its pass), SIGKILL after 20 s."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def libvirtd_pid() -> int | None:
    for p in ("/run/hostagent-lab/libvirtd.pid", "/run/libvirtd.pid"):
        with contextlib.suppress(OSError, ValueError):
            return int(Path(p).read_text().split()[0])
    out = subprocess.run(["pgrep", "-o", "-x", "libvirtd"], capture_output=True, text=True,
                         check=False).stdout.split()
    return int(out[0]) if out else None


@dataclass
class Result:
    label: str
    passes: int
    cpu_ms_per_pass: float
    libvirtd_ms_per_pass: float
    rss_mb: float


def measure(label: str, cmd: list[str], count: Callable[[], int], *, warmup_s: float,
            window_s: float, env: dict[str, str] | None = None, log: Path | None = None,
            cwd: Path | None = None) -> Result:
    """Start `cmd`, let it warm up, then measure one window of its and libvirtd's CPU (its
    stderr to `log` where given: a peer that logs every pass must not fill a pipe)."""
    lv = libvirtd_pid()
    with contextlib.ExitStack() as files:
        err_to = files.enter_context(log.open("wb")) if log else subprocess.PIPE
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err_to, cwd=cwd)
    try:
        time.sleep(warmup_s)
        if proc.poll() is not None:
            err = (log.read_text(errors="replace") if log else
                   proc.stderr.read().decode() if proc.stderr else "")
            raise RuntimeError(f"{label} exited: {err[-2000:]}")
        p0, c0 = count(), CpuMark(proc.pid)
        l0 = CpuMark(lv) if lv else None
        time.sleep(window_s)
        p1, c1 = count(), CpuMark(proc.pid)
        l1 = CpuMark(lv) if lv else None
        rss = rss_mb(proc.pid)
    finally:
        stop(proc)
    n = max(p1 - p0, 1)
    lv_s = l0.until(l1) if l0 is not None and l1 is not None else 0.0
    return Result(label, p1 - p0, c0.until(c1) * 1e3 / n, lv_s * 1e3 / n, rss)


def events_counter(path: Path, domains: int) -> Callable[[], int]:
    """Passes = events written / domains (one usage event per domain per pass)."""
    def count() -> int:
        try:
            with path.open("rb") as f:
                return sum(1 for _ in f) // max(domains, 1)
        except FileNotFoundError:
            return 0
    return count


def intervals_counter(interval_s: float) -> Callable[[], int]:
    """For the window without a collector: the intervals that went by."""
    return lambda: int(time.monotonic() / interval_s)


def passes_counter(path: Path) -> Callable[[], int]:
    def count() -> int:
        try:
            return int(path.read_text() or 0)
        except (FileNotFoundError, ValueError):
            return 0
    return count


def hostagent_config(work: Path, uri: str, root: str, interval_s: float) -> Path:
    cfg = work / "hostagent.toml"
    cfg.write_text(f"""
[host]
node_id = "bench"
[libvirt]
uri = "{uri}"
readonly = {str(not uri.startswith("test")).lower()}
[paths]
root = "{root}"
[collector]
interval_s = {interval_s}
state_path = "{work}/state.db"
pass_timeout_s = 60
[log]
level = "warning"
[[sinks]]
type = "jsonl"
path = "{work}/events.jsonl"
""")
    return cfg


def run_host(label: str, uri: str, root: str, domains: int, args: argparse.Namespace,
             work: Path) -> list[Result]:
    """The collectors on one host, one after another, after a window with none (libvirtd's
    own work); `--repeat` rounds of them all."""
    results = []
    py = sys.executable
    shaped = shaped_here(args, label)
    env = dict(os.environ, PYTHONPATH=str(REPO), **({SHAPED_ENV: "1"} if shaped else {}))
    for n in range(args.repeat):
        results.append(measure(f"{label}: {IDLE}", ["sleep", "infinity"],
                               intervals_counter(args.interval), warmup_s=1.0,
                               window_s=args.window))
        for kind, name in (("raw", "raw getAllDomainStats"), ("per-domain", "per-domain calls")):
            pf = work / f"{kind}.{n}.passes"
            results.append(measure(f"{label}: {name}",
                                   [py, str(Path(__file__)), "--worker", kind, uri,
                                    str(args.interval), str(pf)],
                                   passes_counter(pf), warmup_s=args.warmup,
                                   window_s=args.window, env=env))
        state = work / f"hostagent.{n}"
        state.mkdir()
        cfg = hostagent_config(state, uri, root, args.interval)
        cmd = ([py, str(BENCH / "qemu_shape.py")] if shaped else [py, "-m", "hostagent.cli"])
        results.append(measure(f"{label}: hostagent run",
                               [*cmd, "--config", str(cfg), "run"],
                               events_counter(state / "events.jsonl", domains),
                               warmup_s=args.warmup + 2, window_s=args.window, env=env))
        if args.peers:
            results.extend(run_peers(label, uri, args, work / f"peers.{n}"))
    return results


def run_peers(label: str, uri: str, args: argparse.Namespace, work: Path) -> list[Result]:
    """collectd's virt plugin and prometheus-libvirt-exporter on the same host (bench/peers.py:
    Debian's packages, unpacked, not installed)."""
    peers = _peers.fetch()
    out = []
    cd = work / "collectd"
    cd.mkdir(parents=True)
    conf = _peers.collectd_config(peers, cd, uri, args.interval)
    out.append(measure(f"{label}: collectd virt plugin", _peers.collectd_command(peers, conf),
                       _peers.collectd_passes(cd / "csv"), warmup_s=args.warmup,
                       window_s=args.window, log=cd / "stderr", cwd=cd))
    port = _peers.free_port()
    with _peers.Scraper(port, args.interval).running() as scraper:
        out.append(measure(f"{label}: prometheus-libvirt-exporter",
                           _peers.exporter_command(peers, uri, port), scraper.count,
                           warmup_s=args.warmup, window_s=args.window,
                           log=work / "exporter.stderr"))
    return out


def shaped_here(args: argparse.Namespace, label: str) -> bool:
    """Whether this host's answers are QEMU-shaped (`--qemu-shaped`, generated hosts only)."""
    return bool(args.qemu_shaped) and label.startswith("gen")


def _span(values: list[float], fmt: str) -> str:
    lo, hi = min(values), max(values)
    return format(lo, fmt) if format(lo, fmt) == format(hi, fmt) else \
        f"{format(lo, fmt)}–{format(hi, fmt)}"


def print_table(host: str, domains: int, results: list[Result]) -> None:
    """One row per collector; with --repeat, each cell is the range over the repeats."""
    by: dict[str, list[Result]] = {}
    for r in results:
        by.setdefault(r.label.split(": ")[1], []).append(r)
    alone = by.pop(IDLE, [])
    idle_ms = statistics.median(r.libvirtd_ms_per_pass for r in alone) if alone else 0.0

    def pays(r: Result) -> float:
        """What the host pays a pass: the collector's CPU and the libvirtd work it causes."""
        return r.cpu_ms_per_pass + r.libvirtd_ms_per_pass - idle_ms

    runs = len(by["hostagent run"])
    print(f"\n{host}: {domains} domains" + (f", {runs} runs (ranges)" if runs > 1 else ""))
    if alone:
        idle = _span([r.libvirtd_ms_per_pass for r in alone], ".2f")
        print(f"libvirtd with no collector connected: {idle} ms per interval")
    print("| collector | passes | its CPU per pass | per domain | libvirtd CPU per pass "
          "| the host pays (its + libvirtd's beyond alone) | RSS |")
    print("|---|---|---|---|---|---|---|")
    for name, rs in by.items():
        print(f"| {name} | {sum(r.passes for r in rs)} | "
              f"{_span([r.cpu_ms_per_pass for r in rs], '.2f')} ms | "
              f"{_span([r.cpu_ms_per_pass / max(domains, 1) for r in rs], '.4f')} ms | "
              f"{_span([r.libvirtd_ms_per_pass for r in rs], '.2f')} ms | "
              f"{_span([pays(r) for r in rs], '.2f')} ms | "
              f"{_span([r.rss_mb for r in rs], '.0f')} MB |")
    ours = [r.cpu_ms_per_pass for r in by["hostagent run"]]
    raw = [r.cpu_ms_per_pass for r in by["raw getAllDomainStats"]]
    mid = statistics.median(ours)
    print(f"ratios (medians): hostagent/raw bulk = {mid / max(statistics.median(raw), 1e-9):.1f}x"
          + "".join(f", {name}/hostagent = "
                    f"{statistics.median(r.cpu_ms_per_pass for r in rs) / max(mid, 1e-9):.1f}x"
                    for name, rs in by.items() if name not in ("hostagent run",
                                                               "raw getAllDomainStats")))
    host = statistics.median(pays(r) for r in by["hostagent run"])
    print("what the host pays (collector + libvirtd beyond alone), medians: "
          + ", ".join(f"{name}/hostagent = "
                      f"{statistics.median(pays(r) for r in rs) / max(host, 1e-9):.1f}x"
                      for name, rs in by.items() if name != "hostagent run"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", nargs=4, metavar=("KIND", "URI", "INTERVAL", "PASSES_FILE"))
    ap.add_argument("--live", action="store_true", help="the lab's running guests")
    ap.add_argument("--domains", default="", help="comma-separated generated host sizes")
    ap.add_argument("--cgroupfs", action="store_true", help="real cgroups for generated hosts")
    ap.add_argument("--qemu-shaped", action="store_true",
                    help="generated domains' stats answered as a QEMU guest's (qemu_shape.py)")
    ap.add_argument("--peers", action="store_true",
                    help="also collectd's virt plugin and prometheus-libvirt-exporter "
                         "(bench/peers.py: Debian's packages, downloaded and unpacked once)")
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--warmup", type=float, default=4.0)
    ap.add_argument("--window", type=float, default=20.0)
    ap.add_argument("--repeat", type=int, default=1, help="rounds; cells show the range")
    args = ap.parse_args()
    if args.worker:
        kind, uri, interval, pf = args.worker
        worker(kind, uri, float(interval), Path(pf))
        return 0
    print(f"whole-process CPU per pass (all threads, exited ones included: the process's CPU-time "
          f"clock, ns), interval {args.interval} s, {args.window} s windows after "
          f"{args.warmup} s warm-up")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.live:
            conn = libvirt.openReadOnly("qemu:///system")
            n = len(conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE))
            conn.close()
            (work / "live").mkdir()
            print_table("live lab guests (qemu:///system)", n,
                        run_host("live", "qemu:///system", "/", n, args, work / "live"))
        for size in [int(s) for s in args.domains.split(",") if s]:
            real = RealCgroups() if args.cgroupfs else None
            try:
                gen = work / f"gen{size}"
                node_xml, root = generate(size, gen, real)
                uri = f"test+unix://{node_xml}" if shutil.which("libvirtd") else f"test://{node_xml}"
                shape = ", QEMU-shaped stats" if args.qemu_shaped else ""
                print_table(f"generated ({uri.split(':', 1)[0]}{shape})", size,
                            run_host(f"gen{size}", uri, str(root), size, args, gen))
            finally:
                if real is not None:
                    real.remove()
    return 0


if __name__ == "__main__":
    sys.exit(main())
