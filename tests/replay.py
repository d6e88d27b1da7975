"""A recorded host replayed for tests: a libvirt connection answering from recorded bulk stats
and XML, a root symlink swung from the t0 tree to the t1 tree, and a daemon built on it."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from hostagent.config.load import load
from hostagent.daemon import Daemon
from tests.clocks import FakeClock

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "hosts"


class FakeDomain:
    def __init__(self, entry: dict[str, Any], xml: str) -> None:
        self.entry = entry
        self.xml = xml

    def UUIDString(self) -> str:
        return str(self.entry["uuid"])

    def name(self) -> str:
        return str(self.entry["name"])

    def ID(self) -> int:
        return int(self.entry["id"])

    def XMLDesc(self, flags: int) -> str:
        return self.xml


class ReplayConnection:
    """Answers like a libvirt connection from a recorded tree; can hang on demand."""

    def __init__(self, tree: Path) -> None:
        self.tree = tree
        self.bulk_calls = 0
        self.xml_calls = 0
        self.hang_bulk = threading.Event()
        self.release = threading.Event()

    def _domains(self) -> list[tuple[FakeDomain, dict[str, Any]]]:
        entries = json.loads((self.tree / "libvirt" / "bulk_stats.json").read_text())
        out = []
        for e in entries:
            # An entry may carry its XML inline (a name too long for a file name).
            xml = e.get("xml") or (self.tree / "libvirt" / f"{e['name']}.xml").read_text()
            out.append((self._count_xml(FakeDomain(e, xml)), e["stats"]))
        return out

    def _count_xml(self, dom: FakeDomain) -> FakeDomain:
        conn = self

        class Counted(FakeDomain):
            def XMLDesc(self, flags: int) -> str:
                conn.xml_calls += 1
                return dom.xml

        return Counted(dom.entry, dom.xml)

    def getAllDomainStats(self, stats: int, flags: int) -> Any:
        self.bulk_calls += 1
        if self.hang_bulk.is_set():
            self.release.wait(30)
        return self._domains()

    def listAllDomains(self, flags: int) -> list[FakeDomain]:
        return [d for d, _ in self._domains()]

    def domainListGetStats(self, doms: list[FakeDomain], stats: int, flags: int) -> Any:
        want = {d.UUIDString() for d in doms}
        return [(d, s) for d, s in self._domains() if d.UUIDString() in want]

    def close(self) -> None:
        pass


class Host:
    """A recorded host whose clock and tree move from t0 to t1."""

    def __init__(self, tmp: Path, name: str) -> None:
        self.src = FIXTURES / name
        self.meta = json.loads((self.src / "meta.json").read_text())
        self.root = tmp / "root"
        self.root.symlink_to(self.src / "t0")
        self.conn = ReplayConnection(self.root)
        self.clock = FakeClock(wall_ns=1_800_000_000 * 10**9)

    def move_to_t1(self) -> None:
        self.root.unlink()
        self.root.symlink_to(self.src / "t1")
        self.clock.advance(float(self.meta["interval_s"]))

    def bulk(self, t: str) -> dict[str, dict[str, Any]]:
        entries = json.loads((self.src / t / "libvirt" / "bulk_stats.json").read_text())
        return {e["uuid"]: e["stats"] for e in entries}


def daemon_config(tmp: Path, host: Host, *, tables: str = "", sinks: str = "") -> Path:
    """A daemon config on the replayed host: 1 s passes, billing from the store's creation, a
    JSONL sink at tmp/events.jsonl; `tables` go before the sinks, `sinks` after the JSONL one."""
    path = tmp / "hostagent.toml"
    path.write_text(f"""
[host]
node_id = "replay-test"
[libvirt]
uri = "replay:///"
call_timeout_s = 2
[paths]
root = "{host.root}"
[collector]
interval_s = 1
align = false
state_path = "{tmp}/state.db"
count_preexisting = true
{tables}
[[sinks]]
type = "jsonl"
path = "{tmp}/events.jsonl"
{sinks}
""")
    return path


def build_daemon(cfg_path: Path, host: Host) -> Daemon:
    """The real daemon on that config, its libvirt connection replaced by the replay."""
    daemon = Daemon.build(load(cfg_path), config_path=str(cfg_path))
    daemon.libvirt._connector = lambda uri, ro: host.conn
    return daemon
