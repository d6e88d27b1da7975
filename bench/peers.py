"""The peers hostagent is measured against, run from Debian's own packages in the same run.

Issue 16's table put two shipped collectors beside hostagent: collectd's virt plugin (1 s
interval) and prometheus-libvirt-exporter (one scrape a pass). `daemon_cost.py --peers` runs
both on the same host, in its own windows, with the same clocks as hostagent's row:

* **collectd** (`collectd-core`): `virt` reads the domains (libvirt's per-domain calls, the
  domain list refreshed every `RefreshInterval`), `csv` writes every value to files, as a
  JSONL sink writes hostagent's events. A pass is one line of one domain's `virt_cpu_total`.
* **prometheus-libvirt-exporter**: idle until scraped; this process scrapes `/metrics` every
  interval from a thread (the scraper's CPU is Prometheus's, not counted), and a pass is one
  scrape answered 200 with at least one `libvirt_domain_` sample.

The packages are not installed: `fetch()` downloads the two .debs with `apt-get download`
(no maintainer scripts, no service started or enabled) and unpacks them with
`dpkg -x` into a cache directory. Their libraries (libvirt, libxml2) are the lab's.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("collectd-core", "prometheus-libvirt-exporter")
DEFAULT_CACHE = Path(os.environ.get("HOSTAGENT_BENCH_PEERS", "/var/cache/hostagent-bench/peers"))


@dataclass(frozen=True)
class Peers:
    """The unpacked packages' files this bench uses."""

    root: Path

    @property
    def collectd(self) -> Path:
        return self.root / "usr/sbin/collectd"

    @property
    def plugin_dir(self) -> Path:
        return self.root / "usr/lib/collectd"

    @property
    def types_db(self) -> Path:
        return self.root / "usr/share/collectd/types.db"

    @property
    def exporter(self) -> Path:
        return self.root / "usr/bin/prometheus-libvirt-exporter"

    def present(self) -> bool:
        return all(p.exists() for p in (self.collectd, self.plugin_dir / "virt.so",
                                        self.plugin_dir / "csv.so", self.types_db,
                                        self.exporter))


def fetch(cache: Path = DEFAULT_CACHE) -> Peers:
    """The two peers unpacked under `cache` (downloaded on first use)."""
    peers = Peers(cache / "root")
    if peers.present():
        return peers
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    got = subprocess.run(["apt-get", "-o", "APT::Sandbox::User=root", "download", *PACKAGES],
                         cwd=debs, check=False, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    if got.returncode != 0:
        raise RuntimeError(f"apt-get download {' '.join(PACKAGES)} failed (no apt source "
                           f"reachable?): {got.stderr.strip()[-500:]}; or unpack the two "
                           f"packages yourself (dpkg -x) under {peers.root} and set "
                           "HOSTAGENT_BENCH_PEERS to its parent")
    for deb in sorted(debs.glob("*.deb")):
        subprocess.run(["dpkg", "-x", str(deb), str(peers.root)], check=True)
    if not peers.present():
        raise RuntimeError(f"{cache}: the unpacked packages lack collectd's virt/csv plugins "
                           "or the exporter")
    return peers


# --- collectd ------------------------------------------------------------------------------


def collectd_config(peers: Peers, work: Path, uri: str, interval_s: float) -> Path:
    """A collectd.conf reading `uri`'s domains every `interval_s` into CSV files under
    `work/csv` (Debian's virt defaults otherwise: domain names as hosts, no extra stats)."""
    conf = work / "collectd.conf"
    conf.write_text(f"""Hostname "bench"
FQDNLookup false
BaseDir "{work}"
PIDFile "{work}/collectd.pid"
PluginDir "{peers.plugin_dir}"
TypesDB "{peers.types_db}"
Interval {interval_s}
ReadThreads 1
WriteThreads 1
LoadPlugin virt
LoadPlugin csv
<Plugin virt>
  Connection "{uri}"
  RefreshInterval 60
  HostnameFormat name
</Plugin>
<Plugin csv>
  DataDir "{work}/csv"
  StoreRates false
</Plugin>
""")
    return conf


def collectd_command(peers: Peers, conf: Path) -> list[str]:
    return [str(peers.collectd), "-f", "-C", str(conf)]


def collectd_passes(csv_dir: Path) -> Callable[[], int]:
    """Passes collectd made: the value lines of the first domain's `virt_cpu_total` files (one
    file a day, each with a header line)."""
    def count() -> int:
        hosts = sorted(p for p in csv_dir.glob("*") if (p / "virt").is_dir()) \
            if csv_dir.is_dir() else []
        if not hosts:
            return 0
        lines = 0
        for f in (hosts[0] / "virt").glob("virt_cpu_total-*"):
            with contextlib.suppress(OSError), f.open("rb") as fh:
                lines += max(sum(1 for _ in fh) - 1, 0)
        return lines
    return count


# --- prometheus-libvirt-exporter -----------------------------------------------------------


def exporter_command(peers: Peers, uri: str, port: int) -> list[str]:
    return [str(peers.exporter), f"--web.listen-address=127.0.0.1:{port}",
            f"--libvirt.uri={uri}"]


def scrape_ok(body: bytes) -> bool:
    """An answer that holds domain samples (the exporter answers 200 with only its own
    `libvirt_up 0` when libvirt fails)."""
    return any(line.startswith(b"libvirt_domain_") for line in body.splitlines())


class Scraper:
    """Prometheus's side: GET `/metrics` every `interval_s` (aligned to the clock, like the
    other collectors' passes) until stopped; `count()` is the good scrapes."""

    def __init__(self, port: int, interval_s: float) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.interval_s = interval_s
        self.good = 0
        self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="scraper", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s - time.time() % self.interval_s):
            try:
                with urllib.request.urlopen(self.url, timeout=30) as resp:
                    ok = resp.status == 200 and scrape_ok(resp.read())
            except (OSError, urllib.error.URLError):
                ok = False
            if ok:
                self.good += 1
            else:
                self.failed += 1

    def count(self) -> int:
        return self.good

    @contextlib.contextmanager
    def running(self) -> Iterator[Scraper]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(timeout=35)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
