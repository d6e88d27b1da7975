"""A deterministic, varied accounting history whose exact output is kept as a golden file.

`history()` drives `ledger.account` over passes of domains in many shapes (full libvirt stats,
cgroup-only, missing CPU/memory/NICs/disks, GPUs, PSI with NaN, reboots, re-created taps,
closed-out incarnations with light readings, both time formats, owner hints) and returns every
event payload and every baseline's `to_dict()` in order. tests/accounting/test_golden_bytes.py
compares them byte for byte with golden/pass_history.jsonl, so a speed-up of the accounting
step cannot change a byte of what is sent or persisted.

Regenerate (only for an intended format change): python -m tests.accounting.golden_scenario
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

import orjson

from hostagent.accounting import ledger, tails
from hostagent.accounting.closeout import IoBytes, LightReading
from hostagent.accounting.readings import DomainReading, HostFacts, HostReading
from hostagent.model import (
    Baseline,
    Disk,
    DomainInfo,
    GpuReading,
    Nic,
    NicCounters,
    Owner,
    OwnerHint,
    Pressure,
)
from hostagent.source_model import CgroupReading

NS = 10**9
STORE_NS = 1_700_000_000 * NS
GOLDEN = Path(__file__).parent / "golden" / "pass_history.jsonl"


class Owners:
    """Hints win; otherwise every third instance is unassigned."""

    def resolve(self, instance_id: str, hint: OwnerHint | None, *,
                build_id: str | None = None) -> Owner:
        if hint is not None and hint.user_id is not None:
            return Owner(hint.user_id, hint.org_id, hint.source)
        if int(instance_id[-3:], 16) % 3 == 0:
            return Owner("unassigned", None, "default")
        return Owner(f"user-{instance_id[-3:]}", "org-1" if build_id is None else build_id,
                     "account-service")


class Vm:
    """One domain's live counters, advanced pass by pass from a seeded RNG."""

    def __init__(self, n: int, rng: random.Random) -> None:
        self.n, self.rng = n, rng
        self.domid, self.ticks, self.ifindex = n, 1000 + n, 100 + n
        self.cpu = rng.randrange(0, 10**12)
        self.rx, self.tx = rng.randrange(10**9), rng.randrange(10**9)
        self.rd, self.wr = rng.randrange(10**10), rng.randrange(10**10)
        self.shape = n % 6
        self.gpus = 2 if n % 7 == 0 else (1 if n % 11 == 0 else 0)
        self.hint = OwnerHint(f"hint-user-{n}", None if n % 2 else "hint-org", "metadata") \
            if n % 5 == 0 else None

    @property
    def uuid(self) -> str:
        return f"00000000-0000-4000-8000-{self.n:012x}"

    @property
    def mac(self) -> str:
        return f"52:54:00:00:{self.n >> 8 & 255:02x}:{self.n & 255:02X}"

    def grow(self) -> None:
        r = self.rng
        self.cpu += r.randrange(0, 3 * NS)
        self.rx += r.randrange(0, 5 << 20)
        self.tx += r.randrange(0, 5 << 20)
        self.rd += r.randrange(0, 9 << 20)
        self.wr += r.randrange(0, 9 << 20)
        if r.random() < 0.04:  # reboot: a new QEMU process, counters from zero
            self.domid += 100
            self.ticks += 777
            self.cpu = r.randrange(0, NS)
            self.rx = self.tx = self.rd = self.wr = 0
        if r.random() < 0.04:  # a re-created tap
            self.ifindex += 1
            self.rx = self.tx = 0

    def info(self) -> DomainInfo:
        nics = (Nic(self.mac, "bridge", f"vnet{self.n}", "virtio"),)
        if self.shape == 3:
            nics += (Nic("52:54:00:ff:ff:01", "network", None),)
        disks = (Disk("vda", "disk", f"/img/{self.n}.qcow2"), Disk("sda", "cdrom"))
        if self.shape == 4:
            disks += (Disk("vdb", "disk", None),)
        return DomainInfo(uuid=self.uuid, name=f"vm-{self.n}", domid=self.domid,
                          vcpus=1 + self.n % 4, memory_bytes=(1 + self.n % 3) << 30,
                          max_memory_bytes=4 << 30, nics=nics, disks=disks,
                          owner_hint=self.hint)

    def reading(self, t_ns: int) -> DomainReading:
        r, info = self.rng, self.info()
        stats: dict[str, Any] = {"state.state": 1, "state.reason": 1}
        missing: dict[str, str] = {}
        if self.shape in (0, 3, 4) and r.random() > 0.1:
            stats["cpu.time"] = self.cpu
        if self.shape in (0, 4):
            stats.update({"balloon.current": 1 << 20, "balloon.available": 900_000,
                          "balloon.usable": r.randrange(0, 900_000)})
        elif self.shape == 3:
            stats.update({"balloon.available": 900_000, "balloon.unused": 100_000,
                          "balloon.disk_caches": 5000})
        elif self.shape == 5:
            stats["balloon.rss"] = 300_000
        if self.shape != 2:
            stats.update({"net.count": 1, "net.0.name": f"vnet{self.n}",
                          "net.0.rx.bytes": self.tx, "net.0.tx.bytes": self.rx})
        if self.shape in (0, 3, 4, 5):
            stats.update({"block.count": 1, "block.0.name": "vda",
                          "block.0.rd.bytes": self.rd, "block.0.wr.bytes": self.wr,
                          "block.0.capacity": 64 << 30})
            if self.shape != 5:
                stats["block.0.allocation"] = r.randrange(1 << 30, 64 << 30)
            if self.shape == 4 and r.random() < 0.3:
                del stats["block.0.wr.bytes"]
        if r.random() < 0.05:
            missing["libvirt"] = "the stats call hung"
        psi = Pressure(round(r.random() * 10, 3), None if self.shape == 1 else 0.0,
                       float("nan") if self.shape == 5 else r.random())
        cg = None
        if self.shape != 0:
            cg_missing = {"memory": "memory.stat unreadable"} if self.shape == 2 else {}
            cg = CgroupReading(
                cpu_ns=None if r.random() < 0.1 else self.cpu,
                memory_current_bytes=200 << 20,
                memory_working_set_bytes=None if self.shape == 2 else r.randrange(1 << 30),
                memory_limit_bytes=None, io_read_bytes=None, io_write_bytes=None,
                io_source=None, pressure=psi, missing=cg_missing)
        netlink: dict[str, NicCounters] | None = None
        netlink_missing: dict[str, str] = {}
        if self.shape in (1, 2, 3):
            netlink = {}
            if r.random() < 0.85:
                netlink[self.mac] = NicCounters(self.mac, f"vnet{self.n}", self.ifindex,
                                                self.tx, self.rx, "netlink-stats64")
            else:
                netlink_missing[f"net:{self.mac}"] = "tap not found"
        gpus = tuple(GpuReading(f"0000:3b:00.{g}", "pci", "A100",
                                None if g else round(r.random() * 100, 4),
                                None, None if g == 0 else "no NVML")
                     for g in range(self.gpus))
        facts = HostFacts(pid=5000 + self.domid,
                          start_ticks=None if r.random() < 0.05 else self.ticks,
                          started_wall_ns=STORE_NS + self.ticks * NS // 100, cgroup=None)
        return DomainReading(info=info, instance_id=self.uuid, t_wall_ns=t_ns, stats=stats,
                             facts=facts, cgroup=cg, netlink_nics=netlink,
                             netlink_missing=netlink_missing, gpus=gpus, missing=missing)


def history(time_format: str, *, n: int = 36, passes: int = 12,
            name_is_build_id: bool = False) -> list[bytes]:
    """Every event payload and baseline of the scenario, in order, as JSON lines."""
    rng = random.Random(f"golden-{time_format}-{name_is_build_id}")
    settings = ledger.Settings(node_id="hv-golden", time_format=time_format,  # type: ignore[arg-type]
                               store_created_ns=STORE_NS, count_preexisting=n % 2 == 0,
                               name_is_build_id=name_is_build_id)
    vms = [Vm(i, rng) for i in range(1, n + 1)]
    baselines: dict[str, Baseline] = {}
    tl: dict[tails.Key, tails.Tail] = {}
    out: list[bytes] = []
    t = STORE_NS + 3600 * NS + 123_456_789
    for k in range(passes):
        t += NS + rng.randrange(0, NS) * (k % 3)
        if k == 7:
            t -= 5 * NS  # the wall clock stepped back
        alive = [v for v in vms if not (v.n % 9 == 0 and k >= 5)]  # some go away
        withheld = {v.n for v in alive if rng.random() < 0.08}
        for v in alive:
            v.grow()
        for key, tail in list(tl.items()):  # light readings between passes
            if rng.random() < 0.5:
                v = next((v for v in vms if v.uuid == key[0]), None)
                cpu = None if v is None or rng.random() < 0.1 else v.cpu + 17
                light = LightReading(key[0], key[1], tail.anchor.t_wall_ns + NS // 2, cpu,
                                     io=IoBytes(rng.randrange(10**6), rng.randrange(10**6)))
                tl[key] = tails.with_light(tail, light)
        rs = tuple(v.reading(t) for v in alive if v.n not in withheld)
        h = HostReading(t_wall_ns=t, domains=rs,
                        listed={v.uuid: f"vm-{v.n}" for v in alive})
        closing = tails.ended(tl, h)
        acc, samples = ledger.account(baselines, rs, owners=Owners(), settings=settings,
                                      now_ns=t, closing=closing)
        for e in acc.events:
            out.append(b"E " + e.event_id.encode() + b" " + e.payload)
        for b in acc.baselines:
            baselines[b.instance_id] = b
            out.append(b"B " + orjson.dumps(b.to_dict()))
        for iid in acc.removed:
            baselines.pop(iid, None)
            out.append(b"R " + iid.encode())
        out.append(b"S " + orjson.dumps([[s.instance_id, s.incarnation, s.cpu_ns, len(s.nics),
                                           len(s.disks), sorted(s.missing.items())]
                                          for s in samples]))
        tl = tails.after_pass(tl, h, [c.key for c in closing])
    return out


def everything() -> list[bytes]:
    """The whole golden file: both time formats, and Formation's name-as-build-id."""
    return (history("unix", n=30, passes=10) + history("rfc3339", n=16, passes=8)
            + history("unix", n=8, passes=4, name_is_build_id=True))


if __name__ == "__main__":
    GOLDEN.write_bytes(b"\n".join(everything()) + b"\n")
    sys.stdout.write(f"wrote {GOLDEN}\n")
