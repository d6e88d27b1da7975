"""The daemon loop without the lab: a replayed libvirt, real store, real JSONL delivery."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import socket
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import orjson
import pytest
import tomli_w
import trio

from hostagent.config import live
from hostagent.config.load import Config
from hostagent.daemon import Daemon, next_tick_s
from hostagent.notify import Notifier
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


async def test_each_pass_tells_the_service_manager_once(tmp_path: Path) -> None:
    # A real datagram socket stands in for systemd: per pass ONE message (watchdog and status,
    # READY with the first), not one per field: each is a wake-up of PID 1.
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(str(tmp_path / "notify"))
    manager.setblocking(False)
    host = Host(tmp_path, "lab-hybrid")
    daemon, _ = build(tmp_path, host)
    daemon.notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify")})
    try:
        await daemon.run(passes=3)
        got = []
        with contextlib.suppress(BlockingIOError):
            while True:
                got.append(dict(line.split("=", 1)
                                for line in manager.recv(4096).decode().split("\n")))
    finally:
        manager.close()
    guests = len(host.meta["guests"])
    passes = [m for m in got if "WATCHDOG" in m]
    assert len(passes) == 3
    assert [m.get("READY") for m in passes] == ["1", None, None]
    assert all(m["STATUS"].startswith(f"{guests} domains, {guests} events, pass ")
               for m in passes)
    assert [m for m in got if "WATCHDOG" not in m] == [{"STOPPING": "1"}]


async def test_a_caught_up_jsonl_sink_is_written_by_the_pass_commits_call(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # after the drain's first round, each pass's events are written, fsynced and acknowledged
    # in the commit's own worker call (hostagent.delivery.local_round), its drain left asleep
    host = Host(tmp_path, "lab-hybrid")
    daemon, events = build(tmp_path, host)
    settled: list[bool] = []
    queue = daemon.delivery._queues[0]
    real = queue.written_at_commit

    def written_at_commit(r: Any) -> bool:
        settled.append(real(r))
        return settled[-1]

    monkeypatch.setattr(queue, "written_at_commit", written_at_commit)
    await daemon.run(passes=4)
    assert settled.count(True) >= 3, settled  # every pass after the drain's first round
    got = read(events)
    assert len(got) == 4 * len(host.meta["guests"])
    assert len({e["event_id"] for e in got}) == len(got)


async def test_a_defect_writing_at_the_commit_costs_no_pass_and_no_event(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    host = Host(tmp_path, "lab-hybrid")
    daemon, events = build(tmp_path, host)

    def broken(claimed: Any) -> Any:
        raise RuntimeError("a defect")

    monkeypatch.setattr(daemon.delivery, "write_committed", broken)
    await daemon.run(passes=3)
    assert daemon.collector.last is not None and daemon.collector.last.committed
    got = read(events)  # the drain sent them: each once, the periods tiling
    assert len(got) == len({e["event_id"] for e in got}) == 3 * len(host.meta["guests"])
    by_instance: dict[str, list[dict[str, Any]]] = {}
    for e in got:
        by_instance.setdefault(e["instance_id"], []).append(e)
    for evs in by_instance.values():
        evs.sort(key=lambda e: e["period_ns"]["start"])
        assert [a["period_ns"]["end"] for a in evs[:-1]] == [b["period_ns"]["start"]
                                                              for b in evs[1:]]


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


async def test_a_stop_between_passes_ends_the_wait_for_the_next_at_once(tmp_path: Path) -> None:
    """The wait for the next pass sleeps in a worker thread (hostagent/tick.py): a stop
    request cuts it short, an hour before the tick, and no second pass runs."""
    host = Host(tmp_path, "lab-hybrid")
    daemon, _ = build(tmp_path, host)
    daemon.cfg = dataclasses.replace(daemon.cfg, collector=dataclasses.replace(
        daemon.cfg.collector, interval_s=3600.0))
    first, done = trio.Event(), trio.Event()
    daemon.on_pass.append(lambda _report: first.set())

    async def run() -> None:
        await daemon.run(passes=None)
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        with trio.fail_after(10):
            await first.wait()
        await trio.sleep(0.2)  # the loop waits for the next tick now
        daemon.stop.set()
        with trio.fail_after(5):
            await done.wait()
    assert daemon.passes_done == 1


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


# --- reload: what changes live and what waits for a restart (issue 14 §4) --------------------


def _doc(cfg: Config) -> dict[str, Any]:
    """The TOML document of a config (every key spelled out)."""
    def table(obj: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            out[f.name] = table(v) if dataclasses.is_dataclass(v) else \
                list(v) if isinstance(v, tuple) else v
        return out
    doc = {f.name: table(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
           if f.name not in ("sinks", "source")}
    doc["sinks"] = [table(s) for s in cfg.sinks]
    return doc


def _other(cls: type[Any], name: str, value: Any) -> Any:
    """A valid value of `cls.name` other than `value`."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    tp = typing.get_type_hints(cls)[name]
    if typing.get_origin(tp) is typing.Literal:
        return next(c for c in typing.get_args(tp) if c != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        lo, hi = f.metadata.get("min"), f.metadata.get("max")
        candidates = [value + 1, value - 1] + ([] if isinstance(value, int) else [value / 2 + 0.01])
        new = next(c for c in candidates
                   if (lo is None or c >= lo) and (hi is None or c <= hi) and c != value)
        return new if isinstance(value, int) else float(new)
    if isinstance(value, tuple):
        return ["RS256"] if name == "jwt_algorithms" else [*value, "changed"]
    return f"{value}-changed" if value else "changed"


def _every_key(cfg: Config) -> list[tuple[str, Any]]:
    """(dotted key, changed value) for every [section] key, and the sinks array."""
    keys = []
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if not dataclasses.is_dataclass(section):
            continue
        for g in dataclasses.fields(section):
            keys.append((f"{f.name}.{g.name}",
                         _other(type(section), g.name, getattr(section, g.name))))
    return keys


def test_reload_applies_the_live_keys_and_names_every_other_one(tmp_path: Path) -> None:
    host = Host(tmp_path, "lab-hybrid")
    daemon, _ = build(tmp_path, host)
    assert daemon.config_path is not None
    path = Path(daemon.config_path)
    start = daemon.cfg
    base = _doc(start)
    keys = _every_key(start)
    assert len(keys) > 75 and set(live.LIVE_KEYS) <= {k for k, _ in keys}
    took_effect = set()
    for key, value in [*keys, ("sinks", None)]:
        doc = _doc(start)
        if key == "sinks":
            doc["sinks"][0]["path"] = str(tmp_path / "other.jsonl")
        else:
            section, name = key.split(".")
            doc[section][name] = value
        path.write_text(tomli_w.dumps(doc))
        needs_restart = daemon.reload()
        assert needs_restart is not None, key
        if _doc(daemon.cfg) != base:
            took_effect.add(key)
            assert needs_restart == [], key
            assert daemon.collector.cfg is daemon.cfg
        else:
            assert needs_restart == [key], key
        path.write_text(tomli_w.dumps(base))  # back to the start for the next key
        assert daemon.reload() == []
        assert _doc(daemon.cfg) == base
    assert took_effect == set(live.LIVE_KEYS)
    daemon.store.close()


def _change_identity_and_interval(daemon: Daemon) -> list[str] | None:
    assert daemon.config_path is not None
    path = Path(daemon.config_path)
    path.write_text(path.read_text().replace('node_id = "replay-test"', 'node_id = "other"')
                    .replace("[collector]", '[collector]\ntime_format = "rfc3339"\n'
                                            'instance_id = "name"')
                    .replace("interval_s = 1", "interval_s = 2"))
    return daemon.reload()


async def test_identity_keys_changed_live_have_no_effect_until_restart(tmp_path: Path) -> None:
    host = Host(tmp_path, "lab-hybrid")
    daemon, events = build(tmp_path, host)
    assert _change_identity_and_interval(daemon) == [
        "collector.instance_id", "collector.time_format", "host.node_id"]
    assert daemon.cfg.collector.interval_s == 2.0  # the live key did change
    await daemon.run(passes=1)
    got = read(events)
    assert got
    for event in got:
        assert event["host"] == "replay-test"
        assert event["instance_id"] in {g["uuid"] for g in host.meta["guests"]}
        assert isinstance(event["timestamp"], int)  # still unix seconds, not RFC 3339


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
