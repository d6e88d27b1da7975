"""The daemon loop without the lab: a replayed libvirt, real store, real JSONL delivery."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio

from hostagent.daemon import Daemon, next_tick_s
from tests.replay import Host, build_daemon, daemon_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("now", "interval", "align", "expected"),
    [(100.0, 30.0, True, 20.0), (120.0, 30.0, True, 30.0), (119.5, 30.0, True, 0.5),
     (100.0, 30.0, False, 30.0), (7.25, 5.0, True, 2.75)],
)
def test_next_tick_aligns_to_the_wall_clock(now: float, interval: float, align: bool,
                                            expected: float) -> None:
    assert next_tick_s(now, interval, align) == pytest.approx(expected)


def build(tmp_path: Path, host: Host) -> tuple[Daemon, Path]:
    return build_daemon(daemon_config(tmp_path, host), host), tmp_path / "events.jsonl"


def read(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line]


async def test_passes_commit_and_delivery_drains_before_exit(tmp_path: Path) -> None:
    host = Host(tmp_path, "lab-hybrid")
    daemon, events = build(tmp_path, host)
    await daemon.run(passes=2)
    assert daemon.passes_done == 2
    got = read(events)
    # count_preexisting: every domain is billed from the store's creation, twice
    assert len(got) == 2 * len(host.meta["guests"])
    by_instance: dict[str, list[dict[str, Any]]] = {}
    for e in got:
        by_instance.setdefault(e["instance_id"], []).append(e)
    for evs in by_instance.values():
        evs.sort(key=lambda e: e["period_ns"]["start"])
        assert evs[1]["period_ns"]["start"] == evs[0]["period_ns"]["end"]


async def test_the_heap_alive_after_the_first_pass_is_frozen(tmp_path: Path) -> None:
    # full collections then walk only what later passes allocate, not start-up's objects
    host = Host(tmp_path, "lab-hybrid")
    daemon, _ = build(tmp_path, host)
    frozen: list[int] = []
    daemon.on_pass.append(lambda _report: frozen.append(gc.get_freeze_count()))
    try:
        await daemon.run(passes=2)
    finally:
        gc.unfreeze()
    assert frozen[0] > 10_000  # the modules, config and connections
    assert frozen[1] <= frozen[0]  # once, after the first pass (freed ones leave it)


async def test_stop_request_finishes_the_pass_and_exits(tmp_path: Path) -> None:
    host = Host(tmp_path, "lab-hybrid")
    daemon, _ = build(tmp_path, host)

    def stop_after_first(report: Any) -> None:
        daemon.stop.set()

    daemon.on_pass.append(stop_after_first)
    with trio.fail_after(10):
        await daemon.run(passes=None)
    assert daemon.passes_done == 1
    assert daemon.collector.last is not None
    assert daemon.collector.last.committed


def test_reload_keeps_the_running_config_when_the_file_is_invalid(tmp_path: Path) -> None:
    host = Host(tmp_path, "lab-hybrid")
    daemon, _ = build(tmp_path, host)
    assert daemon.config_path is not None
    before = daemon.cfg
    Path(daemon.config_path).write_text("[collector]\ninterval_s = 'soon'\n")
    daemon.reload()
    assert daemon.cfg is before
    Path(daemon.config_path).write_text(
        f'[collector]\ninterval_s = 7\nstate_path = "{tmp_path}/state.db"\n')
    daemon.reload()
    assert daemon.cfg.collector.interval_s == 7.0
    assert daemon.collector.cfg is daemon.cfg
    daemon.store.close()


def test_a_daemon_without_http_sinks_or_owners_imports_no_http_stack(tmp_path: Path) -> None:
    # httpx costs ~18 MB of RSS and coincurve ~5 MB: a host with a JSONL sink needs neither
    cfg = tmp_path / "hostagent.toml"
    cfg.write_text(f"""
[host]
node_id = "h"
[libvirt]
uri = "test:///default"
[collector]
state_path = "{tmp_path}/state.db"
[[sinks]]
type = "jsonl"
path = "{tmp_path}/events.jsonl"
""")
    script = ("import sys\n"
              "from hostagent.config.load import load\n"
              "from hostagent.daemon import Daemon\n"
              "import hostagent.cli.main\n"
              f"Daemon.build(load({str(cfg)!r}), config_path=None).store.close()\n"
              "print(sorted(m for m in ('httpx', 'coincurve', 'Crypto', 'rich', 'click')"
              " if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
