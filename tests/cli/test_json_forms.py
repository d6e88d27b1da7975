"""The `--json` forms of dump, top, check-config, check-rules and outbox status: their shapes
(documented in docs/cli-json.md) and that logs never mix into stdout."""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import orjson
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from hostagent.cli import top_view
from hostagent.cli.main import main
from hostagent.cli.top import LAST_EVENT_SQL, daemon_state, unattributed_cpu_s
from hostagent.config.load import load
from hostagent.store.inspect import DEAD_SQL, PENDING_SQL
from hostagent.store.outbox import Outcome, Store
from tests.clocks import FakeClock
from tests.standins.queue import usage_event
from tests.store.test_migrate import V1

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "cli-json.md"
RULE = ('[{"resource_type": "storage", "threshold_type": "absolute", "threshold_value": 500, '
        '"units": "GB", "action": "notify", "user_id": "*", "notification_channels": ["queue"]}]')


def documented_keys(section: str) -> set[str]:
    """The top-level keys docs/cli-json.md lists under `## <section>` (lines `- \\`key\\``)."""
    text = DOC.read_text().split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return {line.split("`")[1] for line in text.splitlines() if line.startswith("- `")}


def config(tmp_path: Path, extra: str = "") -> Path:
    cfg = tmp_path / "h.toml"
    cfg.write_text(f'[libvirt]\nuri = "test:///default"\n[collector]\n'
                   f'state_path = "{tmp_path}/state.db"\n{extra}'
                   f'[[sinks]]\ntype = "jsonl"\nname = "file"\npath = "{tmp_path}/e.jsonl"\n')
    return cfg


def test_check_config_and_check_rules_json(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    rules = tmp_path / "rules.json"
    rules.write_text(RULE)
    # The rule notifies the "queue" channel: a queue sink must serve it (no silent channel).
    cfg = config(tmp_path, f'[thresholds]\nrules_path = "{rules}"\n'
                 '[[sinks]]\ntype = "formation-queue"\nurl = "http://127.0.0.1:9"\n')
    assert main(["check-config", str(cfg), "--json"]) == 0
    doc = orjson.loads(capsys.readouterr().out)
    assert set(doc) == documented_keys("check-config")
    assert isinstance(doc.pop("store"), str)
    assert doc == {"file": str(cfg), "ok": True,
                   "sinks": [{"name": "formation-queue", "type": "formation-queue"},
                             {"name": "file", "type": "jsonl"}],
                   "rules_path": str(rules), "rules": 1}
    assert main(["check-rules", str(rules), "--json"]) == 0
    doc = orjson.loads(capsys.readouterr().out)
    assert set(doc) == documented_keys("check-rules")
    assert doc == {"file": str(rules), "ok": True, "rules": 1, "channels": None}
    assert main(["check-rules", str(rules), "--config", str(cfg), "--json"]) == 0
    doc = orjson.loads(capsys.readouterr().out)
    assert doc["channels"]["queue"] == ["formation-queue"]


def test_check_json_on_a_bad_file_answers_ok_false(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[collector]\ninterval_s = -3\n")
    assert main(["check-config", str(bad), "--json"]) == 2
    out = capsys.readouterr()
    doc = orjson.loads(out.out)
    assert doc["ok"] is False and doc["file"] == str(bad)
    assert "collector.interval_s" in doc["error"] and "collector.interval_s" in out.err
    rules = tmp_path / "r.json"
    rules.write_text("[{}]")
    assert main(["check-rules", str(rules), "--json"]) == 2
    assert orjson.loads(capsys.readouterr().out)["ok"] is False


def test_check_config_json_on_a_refused_store_answers_ok_false(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # exit 2 with an empty stdout: the StateCorrupt path skipped the JSON document
    with sqlite3.connect(tmp_path / "state.db") as c:
        c.execute("CREATE TABLE other(x)")
    c.close()
    cfg = config(tmp_path)
    assert main(["check-config", str(cfg), "--json"]) == 2
    out = capsys.readouterr()
    doc = orjson.loads(out.out)
    assert doc["ok"] is False and doc["file"] == str(cfg)
    assert "not a hostagent state store" in doc["error"] and doc["error"] in out.err


def make_store(tmp_path: Path) -> Path:
    clock = FakeClock()
    path = tmp_path / "state.db"
    s = Store.open(path, clock=clock, node_id="host-a", sink_names=("file",))
    s.commit_pass([], [usage_event("a", 0), usage_event("b", 0), usage_event("c", 0)])
    batch = s.take("file", 10, clock.wall_ns)
    s.record("file", [Outcome.of(batch[0], "dead", "refused")], dead_letter_after=3)
    s.set_breaker("file", "open", clock.wall_ns)
    s.close()
    return path


def test_outbox_status_json_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_store(tmp_path)
    assert main(["--config", str(config(tmp_path)), "outbox", "status", "--json"]) == 0
    doc = orjson.loads(capsys.readouterr().out)
    assert set(doc) == documented_keys("outbox status")
    assert set(doc["sinks"][0]) == {"sink", "configured", "pending", "oldest_pending_age_s",
                                    "acked", "dead_letters", "breaker"}


def test_top_reads_index_ranges_only(tmp_path: Path) -> None:
    # `top` refreshes every second or two: never a walk of the day of rows retention keeps
    # (a scan, or the sink's whole primary key, which SQLite picks without INDEXED BY)
    path = make_store(tmp_path)
    s = Store.open(path, clock=FakeClock(), node_id="host-a", sink_names=("file",))
    for k in range(1, 30):
        s.commit_pass([], [usage_event(i, k) for i in ("a", "b", "c")])
        s.record("file", [Outcome.of(p, "acked") for p in s.take("file", 100, 2**62)],
                 dead_letter_after=3)
    s.close()
    with sqlite3.connect(path) as c:
        for sql, args in ((LAST_EVENT_SQL, ()), (PENDING_SQL, ("file",)), (DEAD_SQL, ("file",))):
            plan = " | ".join(r[3] for r in c.execute(f"EXPLAIN QUERY PLAN {sql}", args))
            assert "SCAN" not in plan and "PRIMARY KEY (sink=?)" not in plan, (sql, plan)


def test_top_leaves_a_version_1_store_to_the_daemon(tmp_path: Path) -> None:
    # installed, not restarted yet: the old daemon still writes version-1 rows
    shutil.copy(V1, tmp_path / "state.db")
    d = daemon_state(load(config(tmp_path)), FakeClock().wall_ns)
    assert not d.available
    assert d.reason == ("state store of schema version 1: the daemon upgrades it to 2 when "
                        "it next starts")


def test_top_reads_the_store_without_writing_it(tmp_path: Path) -> None:
    path = make_store(tmp_path)
    files = sorted(tmp_path.glob("state.db*"))
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    cfg = load(config(tmp_path))
    d = daemon_state(cfg, FakeClock().wall_ns + 60 * 10**9)
    assert d.available and d.unattributed_cpu_s is None
    (sink,) = d.sinks
    assert (sink.name, sink.pending, sink.dead_letters) == ("file", 2, 1)
    assert sink.breaker.startswith("unknown (daemon not running; last recorded: open")
    assert sink.oldest_pending_age_s is not None and sink.oldest_pending_age_s >= 60
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(tmp_path.glob("state.db*"))} == before
    (tmp_path / "none").mkdir()
    assert daemon_state(load(config(tmp_path / "none")), 0).reason is not None
    assert path.exists()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hostagent.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)


def test_top_json_and_dump_json_on_the_test_driver(tmp_path: Path) -> None:
    (tmp_path / "none").mkdir()
    cfg = str(config(tmp_path / "none"))
    top = run_cli("--config", cfg, "top", "--json", "--interval", "0.2")
    assert top.returncode == 0, top.stderr
    doc = orjson.loads(top.stdout)            # stdout is JSON only: logs went to stderr
    assert set(doc) == documented_keys("top --json")
    assert set(doc["domains"][0]) == set(top_view.Row.__dataclass_fields__)
    assert doc["domains"][0]["name"] == "test"
    assert "libvirt connected" in top.stderr
    assert orjson.loads(top.stderr.splitlines()[0])["level"] == "info"  # not a tty: JSON
    dump = run_cli("--config", cfg, "dump", "test", "--json", "--interval", "0.2")
    assert dump.returncode == 0, dump.stderr
    d = orjson.loads(dump.stdout)
    assert set(d) == documented_keys("dump")
    text = run_cli("--config", cfg, "--log-format", "text", "top", "--once", "--interval", "0.2")
    assert "NAME" in text.stdout and "test" in text.stdout
    assert " info    libvirt connected uri=test:///default" in text.stderr


class Metrics(BaseHTTPRequestHandler):
    body = b""

    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/metrics" else 404)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


def exposition(**counters: float) -> bytes:
    """What the daemon's prometheus_client writes for these counters."""
    reg = CollectorRegistry()

    class Fixed(Collector):
        def collect(self) -> Iterator[Metric]:
            for name, value in counters.items():
                yield CounterMetricFamily(name, "doc", value=value)

    reg.register(Fixed())
    return generate_latest(reg)


@pytest.mark.parametrize(("body", "expected"), [
    (exposition(hostagent_unattributed_cpu_seconds=12.5, hostagent_passes=3), 12.5),
    (b"# TYPE hostagent_unattributed_cpu_seconds counter\n"
     b"hostagent_unattributed_cpu_seconds_total 2.5\n", 2.5),
    (exposition(hostagent_passes=3), None),     # a daemon without the metric: not shown
])
def test_top_shows_unattributed_cpu_only_when_the_daemon_exports_it(
        tmp_path: Path, body: bytes, expected: float | None) -> None:
    handler = type("H", (Metrics,), {"body": body})
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        port = srv.server_address[1]
        cfg = load(config(tmp_path, f"[api]\nenabled = true\nbind = \"127.0.0.1\"\n"
                                    f"port = {port}\nmetrics_unauthenticated = true\n"))
        assert unattributed_cpu_s(cfg) == expected
        assert unattributed_cpu_s(load(config(tmp_path))) is None   # API off: not asked
    finally:
        srv.shutdown()
        srv.server_close()
