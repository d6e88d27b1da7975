"""bench/peers.py: how `daemon_cost.py --peers` counts the passes of collectd and of
prometheus-libvirt-exporter (the CPU per pass is divided by these), and the collectd
configuration it runs. The scraper is exercised against a real HTTP server on loopback."""

from __future__ import annotations

import http.server
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import peers


def _csv(path: Path, values: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("epoch,value\n" + "".join(f"{1796596726 + i}.5,{i * 10**7}\n"
                                              for i in range(values)))


def test_collectd_passes_are_the_first_domains_cpu_lines_over_every_day(tmp_path: Path) -> None:
    csv = tmp_path / "csv"
    count = peers.collectd_passes(csv)
    assert count() == 0  # collectd has not written yet
    _csv(csv / "halab-1/virt/virt_cpu_total-2026-12-06", 3)
    _csv(csv / "halab-1/virt/virt_cpu_total-2026-12-07", 2)  # the pass after midnight
    _csv(csv / "halab-1/virt/if_octets-hatap1-2026-12-06", 9)  # not a pass count
    _csv(csv / "halab-2/virt/virt_cpu_total-2026-12-06", 7)  # another domain: not summed
    assert count() == 5
    (csv / "halab-1/virt/virt_cpu_total-2026-12-06").write_text("epoch,value\n")
    assert count() == 2  # a header alone is no pass


def test_collectd_config_reads_the_uri_at_the_interval_into_csv(tmp_path: Path) -> None:
    p = peers.Peers(tmp_path / "root")
    conf = peers.collectd_config(p, tmp_path, "test+unix:///tmp/node.xml", 1.0)
    text = conf.read_text()
    assert 'Connection "test+unix:///tmp/node.xml"' in text
    assert "Interval 1.0" in text
    assert f'DataDir "{tmp_path}/csv"' in text
    assert f'PluginDir "{tmp_path}/root/usr/lib/collectd"' in text
    assert peers.collectd_command(p, conf)[-2:] == ["-C", str(conf)]
    assert not p.present()  # nothing unpacked there


def test_an_answer_without_domain_samples_is_not_a_scrape() -> None:
    assert peers.scrape_ok(b'# HELP libvirt_up x\nlibvirt_up 1\n'
                           b'libvirt_domain_info_vcpus{domain="a"} 2\n')
    assert not peers.scrape_ok(b"# HELP libvirt_up x\nlibvirt_up 0\n")


class _Exporter(http.server.BaseHTTPRequestHandler):
    """An exporter that answers with libvirt down for its first `down` scrapes."""

    down = 2
    served = 0

    def do_GET(self) -> None:
        type(self).served += 1
        body = (b"libvirt_up 0\n" if self.served <= self.down
                else b'libvirt_up 1\nlibvirt_domain_info_vcpus{domain="a"} 2\n')
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def exporter() -> Iterator[int]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Exporter)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()


def test_the_scraper_counts_good_scrapes_and_stops(exporter: int) -> None:
    _Exporter.served = 0
    with peers.Scraper(exporter, 0.05).running() as s:
        deadline = time.monotonic() + 10
        while s.count() < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
    served = _Exporter.served
    assert s.count() >= 3
    assert s.failed == 2  # the answers without domains
    time.sleep(0.2)
    assert _Exporter.served == served  # stopped: no scrape after the block


def test_a_scraper_without_a_server_counts_nothing() -> None:
    with peers.Scraper(peers.free_port(), 0.05).running() as s:
        time.sleep(0.3)
    assert s.count() == 0
    assert s.failed >= 2
