"""kill -9 of the REAL daemon (the replayed lab host, 1 s passes, a JSONL and a NATS sink)
20+ times while nats-server is killed and restarted under it. Afterwards the stream holds every
event the daemon committed exactly once, byte-identical to its JSONL line (the JSONL file may
repeat lines: it is at-least-once), and every instance's periods tile time with no gap."""

from __future__ import annotations

import itertools
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import trio

from tests.nats_support import nats_server, read_stream

ROOT = Path(__file__).resolve().parents[2]
KILLS = 20


def write_config(tmp: Path, url: str) -> Path:
    path = tmp / "hostagent.toml"
    path.write_text(f"""
[host]
node_id = "chaos-host"
[libvirt]
uri = "replay:///"
call_timeout_s = 2
[collector]
interval_s = 1
align = false
state_path = "{tmp}/state.db"
count_preexisting = true
[[sinks]]
type = "jsonl"
path = "{tmp}/events.jsonl"
[[sinks]]
type = "nats"
servers = ["{url}"]
create_stream = true
timeout_s = 1.0
connect_timeout_s = 0.5
[sinks.retry]
max_retries = 1
initial_backoff_s = 0.05
max_backoff_s = 0.2
round_backoff_max_s = 0.3
[sinks.breaker]
reset_timeout_s = 0.3
""")
    return path


async def child(cfg_path: str, run_dir: str, passes: int | None) -> None:
    """The real daemon on the replayed host (its own root symlink per run)."""
    from hostagent.config.load import load
    from hostagent.daemon import Daemon
    from tests.replay import Host

    host = Host(Path(run_dir), "lab-hybrid")
    cfg = load(cfg_path)
    cfg = cfg.__class__(**{**{f: getattr(cfg, f) for f in cfg.__dataclass_fields__},
                           "paths": cfg.paths.__class__(root=str(host.root))})
    daemon = Daemon.build(cfg, config_path=cfg_path)
    daemon.libvirt._connector = lambda uri, ro: host.conn
    print("ready", flush=True)
    await daemon.run(passes=passes)
    print("done", flush=True)


def spawn(cfg: Path, run_dir: Path, passes: int | None = None) -> subprocess.Popen[str]:
    run_dir.mkdir()
    return subprocess.Popen([sys.executable, __file__, "child", str(cfg), str(run_dir),
                             str(passes or 0)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def test_sigkill_the_real_daemon_and_the_server_each_event_once(tmp_path: Path) -> None:
    rng = random.Random(18)
    t0 = time.monotonic()
    server_kills = 0
    with nats_server(tmp_path) as srv:
        cfg = write_config(tmp_path, srv.url)
        for kill in range(KILLS):
            proc = spawn(cfg, tmp_path / f"run{kill}")
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.2, 1.4))
            if rng.random() < 0.4:
                srv.kill()
                server_kills += 1
                time.sleep(rng.choice([0.0, 0.3]))
                srv.start()
                time.sleep(rng.uniform(0.0, 0.3))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        proc = spawn(cfg, tmp_path / "final", passes=2)
        out, _ = proc.communicate(timeout=40)
        assert proc.returncode == 0
        assert out.split() == ["ready", "done"]
        stored = read_stream(srv.url, "HOSTAGENT")
    elapsed = time.monotonic() - t0
    assert elapsed < 60

    lines = {orjson.loads(line)["event_id"]: line
             for line in (tmp_path / "events.jsonl").read_bytes().splitlines()
             if line.startswith(b"{") and line.endswith(b"}")}
    ids = [m.headers["Nats-Msg-Id"] for m in stored]
    assert len(ids) == len(set(ids)), "an event is stored twice"
    # Every committed event was delivered to both sinks before the final run exited.
    assert {m.headers["Nats-Msg-Id"]: m.data for m in stored} == lines
    periods: dict[str, list[tuple[int, int]]] = {}
    for m in stored:
        ev = orjson.loads(m.data)
        periods.setdefault(ev["instance_id"], []).append(
            (ev["period_ns"]["start"], ev["period_ns"]["end"]))
    for ps in periods.values():
        ps.sort()
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ps)), "a gap or an overlap"
    assert server_kills >= 5
    print(f"{KILLS} daemon kills, {server_kills} nats-server kills, {len(stored)} events "
          f"in {elapsed:.1f}s")


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "child":
    trio.run(child, sys.argv[2], sys.argv[3], int(sys.argv[4]) or None)
