"""A recorded host replayed for tests: a libvirt connection answering from recorded bulk stats
and XML, a root symlink swung from the t0 tree to the t1 tree, and a daemon built on it."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import libvirt

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


class NoDomain(libvirt.libvirtError):
    """libvirt's answer to a lookup of a UUID it does not know."""

    def get_error_code(self) -> int:
        return int(libvirt.VIR_ERR_NO_DOMAIN)


class ReplayConnection:
    """Answers like a libvirt connection from a recorded tree; can hang on demand."""

    def __init__(self, tree: Path) -> None:
        self.tree = tree
        self.bulk_calls = 0
        self.list_calls = 0  # domainListGetStats: the per-domain path, targeted reads
        self.lookups = 0
        self.masks: list[int] = []  # the stats groups each stats call asked for
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

    @staticmethod
    def _answer(domains: list[tuple[FakeDomain, dict[str, Any]]], mask: int
                ) -> list[tuple[FakeDomain, dict[str, Any]]]:
        """The stats as libvirt answers `mask` (0: every group): without CPU_TOTAL, no
        `cpu.*` keys."""
        if mask == 0 or mask & libvirt.VIR_DOMAIN_STATS_CPU_TOTAL:
            return domains
        return [(d, {k: v for k, v in s.items() if not k.startswith("cpu.")})
                for d, s in domains]

    def _count_xml(self, dom: FakeDomain) -> FakeDomain:
        conn = self

        class Counted(FakeDomain):
            def XMLDesc(self, flags: int) -> str:
                conn.xml_calls += 1
                return dom.xml

        return Counted(dom.entry, dom.xml)

    def getAllDomainStats(self, stats: int, flags: int) -> Any:
        self.bulk_calls += 1
        self.masks.append(stats)
        if self.hang_bulk.is_set():
            self.release.wait(30)
        return self._answer(self._domains(), stats)

    def listAllDomains(self, flags: int) -> list[FakeDomain]:
        return [d for d, _ in self._domains()]

    def lookupByUUIDString(self, uuid: str) -> FakeDomain:
        self.lookups += 1
        for d, _ in self._domains():
            if d.UUIDString() == uuid:
                return d
        raise NoDomain("Domain not found: no domain with matching uuid")

    def domainListGetStats(self, doms: list[FakeDomain], stats: int, flags: int) -> Any:
        self.list_calls += 1
        self.masks.append(stats)
        want = {d.UUIDString() for d in doms}
        return self._answer([(d, s) for d, s in self._domains() if d.UUIDString() in want],
                            stats)

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

    def vm_cgroup(self, t: str, uuid: str) -> Path:
        """The guest's VM cgroup (v2) in tree `t`."""
        g = next(g for g in self.meta["guests"] if g["uuid"] == uuid)
        cgroups = self.src / t / "sys" / "fs" / "cgroup"
        if self.meta["cgroup_layout"] == "hybrid":
            return cgroups / "unified" / "machine" / f"qemu-{g['domid']}-{g['name']}.libvirt-qemu"
        unit = f"qemu-{g['domid']}-{g['name']}".replace("-", "\\x2d")
        return cgroups / "machine.slice" / f"machine-{unit}.scope" / "libvirt"

    def io_bytes(self, t: str, uuid: str) -> tuple[int, int]:
        """Σ rbytes, Σ wbytes of the guest's VM cgroup `io.stat` in tree `t`."""
        rd = wr = 0
        for line in (self.vm_cgroup(t, uuid) / "io.stat").read_text().splitlines():
            for token in line.split()[1:]:
                key, _, value = token.partition("=")
                rd += int(value) if key == "rbytes" else 0
                wr += int(value) if key == "wbytes" else 0
        return rd, wr

    def cgroup_cpu_ns(self, t: str, uuid: str) -> int:
        """`usage_usec` x 1000 of the guest's VM cgroup in tree `t`: the counter libvirt's
        `cpu.time` reports (the recording read it a moment apart from the bulk stats)."""
        vm = self.vm_cgroup(t, uuid)
        for line in (vm / "cpu.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "usage_usec":
                return int(value) * 1000
        raise AssertionError(f"no usage_usec in {vm}/cpu.stat")


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
