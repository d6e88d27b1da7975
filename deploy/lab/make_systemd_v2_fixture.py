#!/usr/bin/env python3
# ruff: noqa: E501 - XML templates and fixture numbers read better unwrapped
"""Write the hand-made fixture ``fixtures/hosts/systemd-v2/`` (deterministic, no root needed).

A pure cgroup-v2 systemd KVM host with two guests, laid out like fixtures/hosts/lab-hybrid/
(``meta.json``, ``t0/``, ``t1/``, each a complete fake root). The shapes follow what libvirt 9.0
and kernel 6.1 produce; the numbers are invented but consistent: ``cpu.time`` = cgroup
``usage_usec`` x 1000, ``net.N.rx.bytes`` = host tap ``tx_bytes``, everything grows t0 -> t1.

Odd cases on purpose:
- vm-alpha's first NIC is ``type='user'`` (no ``<target>``, no tap): bulk stats say
  ``net.count=2`` but only ``net.1.*`` exists (libvirt skips NICs without ifname, keeping i).
- vm-beta's second NIC is an SR-IOV ``type='hostdev'`` VF (no tap, no counters):
  ``net.count=2``, only ``net.0.*``. vm-beta also has a PCI GPU ``<hostdev>``, a memory hard
  limit (``memory.max`` is a number, not ``max``) and two disks.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
HOST = "systemd-v2"
T0_EPOCH = 1795425600  # 2026-11-23T08:00:00Z
INTERVAL_S = 2
USER_HZ = 100
BOOT_EPOCH = T0_EPOCH - 864_000  # host up 10 days


def scope_dir(domid: int, name: str) -> str:
    unit = f"machine-qemu-{domid}-{name}.scope".replace("-", "\\x2d").replace(
        "machine\\x2d", "machine-", 1
    )
    return f"machine.slice/{unit}/libvirt"


def psi(some_total: int, full_total: int, some_avg: float, full_avg: float) -> str:
    a = f"avg10={some_avg:.2f} avg60={some_avg * 0.8:.2f} avg300={some_avg * 0.6:.2f}"
    b = f"avg10={full_avg:.2f} avg60={full_avg * 0.8:.2f} avg300={full_avg * 0.6:.2f}"
    return f"some {a} total={some_total}\nfull {b} total={full_total}\n"


def cpu_stat(usage: int, user: int) -> str:
    return (
        f"usage_usec {usage}\nuser_usec {user}\nsystem_usec {usage - user}\n"
        "nr_periods 0\nnr_throttled 0\nthrottled_usec 0\nnr_bursts 0\nburst_usec 0\n"
    )


def memory_stat(anon: int, file: int, pgfault: int) -> str:
    kernel_stack = 1_212_416
    pagetables = 9_863_168
    slab_r, slab_u = 1_503_232, 2_621_440
    rows = [
        ("anon", anon),
        ("file", file),
        ("kernel", kernel_stack + pagetables + slab_r + slab_u + 917_504),
        ("kernel_stack", kernel_stack),
        ("pagetables", pagetables),
        ("sec_pagetables", 8_192_000),
        ("percpu", 181_440),
        ("sock", 0),
        ("vmalloc", 24_576),
        ("shmem", 0),
        ("zswap", 0),
        ("zswapped", 0),
        ("file_mapped", file // 3),
        ("file_dirty", 0),
        ("file_writeback", 0),
        ("swapcached", 0),
        ("anon_thp", anon // 4096 * 4096 // 2 // 2097152 * 2097152),
        ("file_thp", 0),
        ("shmem_thp", 0),
        ("inactive_anon", anon - 4_194_304),
        ("active_anon", 4_194_304),
        ("inactive_file", file // 2),
        ("active_file", file - file // 2),
        ("unevictable", 0),
        ("slab_reclaimable", slab_r),
        ("slab_unreclaimable", slab_u),
        ("slab", slab_r + slab_u),
        ("workingset_refault_anon", 0),
        ("workingset_refault_file", 311),
        ("workingset_activate_anon", 0),
        ("workingset_activate_file", 97),
        ("workingset_restore_anon", 0),
        ("workingset_restore_file", 12),
        ("workingset_nodereclaim", 0),
        ("pgscan", 0),
        ("pgsteal", 0),
        ("pgscan_kswapd", 0),
        ("pgscan_direct", 0),
        ("pgsteal_kswapd", 0),
        ("pgsteal_direct", 0),
        ("pgfault", pgfault),
        ("pgmajfault", 412),
        ("pgrefill", 0),
        ("pgactivate", 1_024),
        ("pgdeactivate", 0),
        ("pglazyfree", 0),
        ("pglazyfreed", 0),
        ("zswpin", 0),
        ("zswpout", 0),
        ("thp_fault_alloc", 1_877),
        ("thp_collapse_alloc", 3),
    ]
    return "".join(f"{k} {v}\n" for k, v in rows)


def proc_stat(
    pid: int, utime: int, stime: int, threads: int, starttime: int, vsize: int, rss_pages: int
) -> str:
    fields = [
        str(pid),
        "(qemu-system-x86)",
        "S",
        "1",
        str(pid - 1),
        str(pid - 1),
        "0",
        "-1",
        "138412352",
        "5230114",
        "0",
        "1903",
        "0",
        str(utime),
        str(stime),
        "0",
        "0",
        "20",
        "0",
        str(threads),
        "0",
        str(starttime),
        str(vsize),
        str(rss_pages),
        "18446744073709551615",
        "94209349660672",
        "94209355521109",
        "140734279813456",
        "0",
        "0",
        "0",
        "268444224",
        "4096",
        "16963",
        "0",
        "0",
        "0",
        "17",
        "3",
        "0",
        "0",
        "0",
        "0",
        "0",
        "94209358633208",
        "94209363837360",
        "94209994407936",
        "140734279816123",
        "140734279818180",
        "140734279818180",
        "140734279818723",
        "0",
    ]
    assert len(fields) == 52
    return " ".join(fields) + "\n"


DOMAINS: list[dict[str, Any]] = [
    {
        "name": "vm-alpha",
        "uuid": "2f1c6a5e-3b7d-4c1e-9a2b-5d8e7f6a1b01",
        "domid": 3,
        "pid": 24817,
        "vcpus": 2,
        "memory_kib": 4_194_304,
        "hard_limit_kib": None,
        "starttime_ticks": 86_113_400,  # clock ticks after host boot
        "cpu": {
            "usage": 712_345_678,
            "user": 655_111_222,
            "vcpu": [301_222_333, 289_777_111],
            "d_usage": 1_342_118,
            "d_user": 1_201_004,
            "d_vcpu": [612_000, 598_000],
        },
        "mem": {"anon": 2_281_701_376, "file": 104_857_600, "pgfault": 1_188_201},
        "mem_d": {"anon": 2_097_152, "file": 0, "pgfault": 311},
        "psi": {
            "cpu": (18_222_101, 4_012_998),
            "memory": (1_034_557, 801_222),
            "io": (9_744_120, 8_120_011),
        },
        "psi_d": {"cpu": (41_211, 9_122), "memory": (0, 0), "io": (12_880, 10_001)},
        "disks": [
            {
                "dev": "vda",
                "path": "/var/lib/libvirt/images/vm-alpha.qcow2",
                "fmt": "qcow2",
                "rd": (412_338, 10_741_776_384),
                "wr": (1_204_557, 38_201_552_896),
                "fl": 88_412,
                "d_rd": (2, 65_536),
                "d_wr": (24, 1_572_864),
                "d_fl": 2,
                "capacity": 21_474_836_480,
                "allocation": 9_172_353_024,
                "physical": 9_172_353_024,
            },
        ],
        # (kind, mac, target, extra source xml); net stats are guest-oriented
        "nics": [
            {"type": "user", "mac": "52:54:00:a1:00:02", "target": None},
            {
                "type": "network",
                "mac": "52:54:00:a1:00:01",
                "target": "vnet3",
                "ifindex": 14,
                "rx": (1_122_334_455, 901_223),
                "tx": (99_887_766, 610_441),
                "d_rx": (18_230, 31),
                "d_tx": (402_118, 288),
            },
        ],
        "owner": ("user-alpha", "org-acme"),
        "gpu": None,
        "hostdev_nic": None,
    },
    {
        "name": "vm-beta",
        "uuid": "8c9d0e1f-2a3b-4c5d-8e6f-7a8b9c0d1e02",
        "domid": 4,
        "pid": 25102,
        "vcpus": 4,
        "memory_kib": 8_388_608,
        "hard_limit_kib": 9_437_184,
        "starttime_ticks": 86_120_950,
        "cpu": {
            "usage": 5_004_882_113,
            "user": 4_611_900_200,
            "vcpu": [1_190_223_001, 1_201_555_123, 1_187_443_987, 1_199_001_554],
            "d_usage": 3_105_554,
            "d_user": 2_880_121,
            "d_vcpu": [731_110, 744_902, 729_660, 752_337],
        },
        "mem": {"anon": 6_710_886_400, "file": 268_435_456, "pgfault": 2_934_110},
        "mem_d": {"anon": 0, "file": 4_096, "pgfault": 1_024},
        "psi": {
            "cpu": (88_100_442, 21_004_117),
            "memory": (4_511_002, 3_900_771),
            "io": (55_120_900, 47_800_123),
        },
        "psi_d": {"cpu": (210_554, 51_230), "memory": (1_230, 1_011), "io": (88_100, 72_455)},
        "disks": [
            {
                "dev": "vda",
                "path": "/var/lib/libvirt/images/vm-beta.qcow2",
                "fmt": "qcow2",
                "rd": (2_003_114, 55_231_201_280),
                "wr": (5_511_780, 120_004_218_880),
                "fl": 301_229,
                "d_rd": (40, 655_360),
                "d_wr": (96, 8_388_608),
                "d_fl": 6,
                "capacity": 53_687_091_200,
                "allocation": 31_238_062_080,
                "physical": 31_238_062_080,
            },
            {
                "dev": "vdb",
                "path": "/var/lib/libvirt/images/vm-beta-data.raw",
                "fmt": "raw",
                "rd": (9_100_554, 1_099_511_627_776),
                "wr": (220_100, 7_516_192_768),
                "fl": 11_002,
                "d_rd": (512, 33_554_432),
                "d_wr": (0, 0),
                "d_fl": 0,
                "capacity": 214_748_364_800,
                "allocation": 161_061_273_600,
                "physical": 214_748_364_800,
            },
        ],
        "nics": [
            {
                "type": "bridge",
                "mac": "52:54:00:b2:00:01",
                "target": "vnet5",
                "ifindex": 17,
                "rx": (88_120_554_101, 71_002_334),
                "tx": (301_554_887_002, 215_001_887),
                "d_rx": (2_621_440, 1_810),
                "d_tx": (9_437_184, 6_402),
            },
            {"type": "hostdev", "mac": "52:54:00:b2:00:02", "target": None},
        ],
        "owner": None,
        "gpu": {"domain": "0x0000", "bus": "0x65", "slot": "0x00", "function": "0x0"},
        "hostdev_nic": {"domain": "0x0000", "bus": "0x3b", "slot": "0x02", "function": "0x1"},
    },
]


def nic_xml(nic: dict[str, Any], i: int, d: dict[str, Any]) -> str:
    addr = f"<address type='pci' domain='0x0000' bus='0x0{i + 1}' slot='0x00' function='0x0'/>"
    if nic["type"] == "user":
        return (
            f"    <interface type='user'>\n      <mac address='{nic['mac']}'/>\n      <model type='virtio'/>\n"
            f"      <alias name='net{i}'/>\n      {addr}\n    </interface>\n"
        )
    if nic["type"] == "network":
        return (
            f"    <interface type='network'>\n      <mac address='{nic['mac']}'/>\n"
            "      <source network='default' portid='5b0e2c1d-7f3a-4b6e-9d8c-1a2b3c4d5e6f' bridge='virbr0'/>\n"
            f"      <target dev='{nic['target']}'/>\n      <model type='virtio'/>\n"
            f"      <alias name='net{i}'/>\n      {addr}\n    </interface>\n"
        )
    if nic["type"] == "bridge":
        return (
            f"    <interface type='bridge'>\n      <mac address='{nic['mac']}'/>\n      <source bridge='br0'/>\n"
            f"      <target dev='{nic['target']}'/>\n      <model type='virtio'/>\n"
            f"      <alias name='net{i}'/>\n      {addr}\n    </interface>\n"
        )
    h = d["hostdev_nic"]
    return (
        f"    <interface type='hostdev' managed='yes'>\n      <mac address='{nic['mac']}'/>\n"
        "      <driver name='vfio'/>\n      <source>\n"
        f"        <address type='pci' domain='{h['domain']}' bus='{h['bus']}' slot='{h['slot']}' function='{h['function']}'/>\n"
        f"      </source>\n      <alias name='hostdev0'/>\n      {addr}\n    </interface>\n"
    )


def domain_xml(d: dict[str, Any]) -> str:
    meta = ""
    if d["owner"]:
        meta = (
            "  <metadata>\n"
            f'    <hostagent:owner xmlns:hostagent="urn:hostagent:owner:1" user="{d["owner"][0]}" org="{d["owner"][1]}"/>\n'
            "  </metadata>\n"
        )
    memtune = ""
    if d["hard_limit_kib"]:
        memtune = f"  <memtune>\n    <hard_limit unit='KiB'>{d['hard_limit_kib']}</hard_limit>\n  </memtune>\n"
    disks = ""
    for n, disk in enumerate(d["disks"]):
        disks += (
            "    <disk type='file' device='disk'>\n"
            f"      <driver name='qemu' type='{disk['fmt']}' cache='none' io='native' discard='unmap'/>\n"
            f"      <source file='{disk['path']}' index='{len(d['disks']) - n}'/>\n"
            "      <backingStore/>\n"
            f"      <target dev='{disk['dev']}' bus='virtio'/>\n"
            f"      <alias name='virtio-disk{n}'/>\n"
            f"      <address type='pci' domain='0x0000' bus='0x0{5 + n}' slot='0x00' function='0x0'/>\n"
            "    </disk>\n"
        )
    nics = "".join(nic_xml(nic, i, d) for i, nic in enumerate(d["nics"]))
    gpu = ""
    if d["gpu"]:
        g = d["gpu"]
        gpu = (
            "    <hostdev mode='subsystem' type='pci' managed='yes'>\n"
            "      <driver name='vfio'/>\n      <source>\n"
            f"        <address domain='{g['domain']}' bus='{g['bus']}' slot='{g['slot']}' function='{g['function']}'/>\n"
            "      </source>\n      <alias name='hostdev1'/>\n"
            "      <address type='pci' domain='0x0000' bus='0x08' slot='0x00' function='0x0'/>\n"
            "    </hostdev>\n"
        )
    return f"""<domain type='kvm' id='{d["domid"]}'>
  <name>{d["name"]}</name>
  <uuid>{d["uuid"]}</uuid>
{meta}  <memory unit='KiB'>{d["memory_kib"]}</memory>
  <currentMemory unit='KiB'>{d["memory_kib"]}</currentMemory>
{memtune}  <vcpu placement='static'>{d["vcpus"]}</vcpu>
  <resource>
    <partition>/machine</partition>
  </resource>
  <os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <boot dev='hd'/>
  </os>
  <features>
    <acpi/>
    <apic/>
    <vmport state='off'/>
  </features>
  <cpu mode='host-passthrough' check='none' migratable='on'/>
  <clock offset='utc'>
    <timer name='rtc' tickpolicy='catchup'/>
    <timer name='pit' tickpolicy='delay'/>
    <timer name='hpet' present='no'/>
  </clock>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
{disks}    <controller type='pci' index='0' model='pcie-root'>
      <alias name='pcie.0'/>
    </controller>
{nics}{gpu}    <serial type='pty'>
      <source path='/dev/pts/{d["domid"]}'/>
      <target type='isa-serial' port='0'>
        <model name='isa-serial'/>
      </target>
      <alias name='serial0'/>
    </serial>
    <console type='pty' tty='/dev/pts/{d["domid"]}'>
      <source path='/dev/pts/{d["domid"]}'/>
      <target type='serial' port='0'/>
      <alias name='serial0'/>
    </console>
    <memballoon model='virtio'>
      <stats period='10'/>
      <alias name='balloon0'/>
      <address type='pci' domain='0x0000' bus='0x09' slot='0x00' function='0x0'/>
    </memballoon>
  </devices>
  <seclabel type='dynamic' model='apparmor' relabel='yes'>
    <label>libvirt-{d["uuid"]}</label>
    <imagelabel>libvirt-{d["uuid"]}</imagelabel>
  </seclabel>
  <seclabel type='dynamic' model='dac' relabel='yes'>
    <label>+64055:+994</label>
    <imagelabel>+64055:+994</imagelabel>
  </seclabel>
</domain>
"""


def bulk(d: dict[str, Any], k: int) -> dict[str, Any]:
    c = d["cpu"]
    usage = c["usage"] + k * c["d_usage"]
    user = c["user"] + k * c["d_user"]
    s: dict[str, Any] = {
        "state.state": 1,
        "state.reason": 1,
        "cpu.time": usage * 1000,
        "cpu.user": user * 1000,
        "cpu.system": (usage - user) * 1000,
        "cpu.cache.monitor.count": 0,
        "cpu.haltpoll.success.time": 81_223_004_511 + k * 90_112_004,
        "cpu.haltpoll.fail.time": 4_100_223_918 + k * 5_002_110,
    }
    mem_kib = d["memory_kib"]
    s.update(
        {
            "balloon.current": mem_kib,
            "balloon.maximum": mem_kib,
            "balloon.swap_in": 0,
            "balloon.swap_out": 0,
            "balloon.major_fault": 1_022,
            "balloon.minor_fault": 8_812_004 + k * 1_711,
            "balloon.unused": mem_kib // 3 - k * 512,
            "balloon.available": mem_kib - 201_332,
            "balloon.usable": mem_kib // 2 - k * 512,
            "balloon.last-update": T0_EPOCH - 7 + (10 if k else 0),  # period 10 s
            "balloon.disk_caches": mem_kib // 8,
            "balloon.hugetlb_pgalloc": 0,
            "balloon.hugetlb_pgfail": 0,
            "balloon.rss": (d["mem"]["anon"] + k * d["mem_d"]["anon"]) // 1024,
            "vcpu.current": d["vcpus"],
            "vcpu.maximum": d["vcpus"],
        }
    )
    for i, t in enumerate(c["vcpu"]):
        t_ns = (t + k * c["d_vcpu"][i]) * 1000
        s[f"vcpu.{i}.state"] = 1
        s[f"vcpu.{i}.time"] = t_ns // 10_000_000 * 10_000_000  # libvirt reads task ticks
        s[f"vcpu.{i}.wait"] = 0
        s[f"vcpu.{i}.delay"] = 2_004_118_223 + i * 10_101 + k * 1_200_554
    s["net.count"] = len(d["nics"])
    for i, nic in enumerate(d["nics"]):
        if not nic["target"]:
            continue  # libvirt skips NICs without ifname but keeps the index
        s[f"net.{i}.name"] = nic["target"]
        for dirn in ("rx", "tx"):
            b, p = nic[dirn]
            db, dp = nic[f"d_{dirn}"]
            s[f"net.{i}.{dirn}.bytes"] = b + k * db
            s[f"net.{i}.{dirn}.pkts"] = p + k * dp
            s[f"net.{i}.{dirn}.errs"] = 0
            s[f"net.{i}.{dirn}.drop"] = 3 if dirn == "rx" else 0
    s["block.count"] = len(d["disks"])
    for i, disk in enumerate(d["disks"]):
        s[f"block.{i}.name"] = disk["dev"]
        s[f"block.{i}.path"] = disk["path"]
        s[f"block.{i}.backingIndex"] = len(d["disks"]) - i
        for op in ("rd", "wr"):
            reqs, byts = disk[op]
            dreqs, dbyts = disk[f"d_{op}"]
            s[f"block.{i}.{op}.reqs"] = reqs + k * dreqs
            s[f"block.{i}.{op}.bytes"] = byts + k * dbyts
            s[f"block.{i}.{op}.times"] = (reqs + k * dreqs) * 180_211
        s[f"block.{i}.fl.reqs"] = disk["fl"] + k * disk["d_fl"]
        s[f"block.{i}.fl.times"] = (disk["fl"] + k * disk["d_fl"]) * 1_002_117
        s[f"block.{i}.allocation"] = disk["allocation"] + k * disk["d_wr"][1] // 4
        s[f"block.{i}.capacity"] = disk["capacity"]
        s[f"block.{i}.physical"] = disk["physical"] + (
            k * disk["d_wr"][1] // 4 if disk["fmt"] == "qcow2" else 0
        )
    s.update(
        {
            "dirtyrate.calc_status": 0,
            "dirtyrate.calc_start_time": 0,
            "dirtyrate.calc_period": 0,
            "dirtyrate.calc_mode": "page-sampling",
        }
    )
    return s


def domstats_raw(stats: list[dict[str, Any]]) -> str:
    out = []
    for entry in stats:
        out.append(f"Domain: '{entry['name']}'")
        out.extend(f"  {key}={value}" for key, value in entry["stats"].items())
        out.append("")
    return "\n".join(out) + "\n"


def write(root: Path, rel: str, text: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def snapshot(root: Path, k: int) -> None:
    write(
        root,
        "proc/mounts",
        "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate,memory_recursiveprot 0 0\n",
    )
    write(root, "sys/fs/cgroup/cgroup.controllers", "cpuset cpu io memory hugetlb pids rdma misc\n")
    stats = []
    links = []
    for d in DOMAINS:
        cg = scope_dir(d["domid"], d["name"])
        c = d["cpu"]
        usage = c["usage"] + k * c["d_usage"]
        user = c["user"] + k * c["d_user"]
        write(root, f"run/libvirt/qemu/{d['name']}.pid", f"{d['pid']}")  # libvirt writes no newline
        write(root, f"proc/{d['pid']}/cgroup", f"0::/{cg}/emulator\n")
        write(
            root,
            f"proc/{d['pid']}/stat",
            proc_stat(
                d["pid"],
                user // 10_000,
                (usage - user) // 10_000,
                6 + d["vcpus"],
                d["starttime_ticks"],
                d["memory_kib"] * 1024 + 1_750_000_000,
                (d["mem"]["anon"] + k * d["mem_d"]["anon"]) // 4096 + 14_000,
            ),
        )
        base = f"sys/fs/cgroup/{cg}"
        write(root, f"{base}/cgroup.controllers", "cpuset cpu io memory pids\n")
        write(root, f"{base}/cpu.stat", cpu_stat(usage, user))
        vsum = 0
        for i, t in enumerate(c["vcpu"]):
            tv = t + k * c["d_vcpu"][i]
            vsum += tv
            write(root, f"{base}/vcpu{i}/cpu.stat", cpu_stat(tv, tv * 97 // 100))
        emu = usage - vsum
        write(root, f"{base}/emulator/cpu.stat", cpu_stat(emu, emu * 55 // 100))
        m = {key: d["mem"][key] + k * d["mem_d"][key] for key in d["mem"]}
        kernel = 16_121_856
        write(root, f"{base}/memory.current", f"{m['anon'] + m['file'] + kernel}\n")
        write(
            root,
            f"{base}/memory.max",
            f"{d['hard_limit_kib'] * 1024}\n" if d["hard_limit_kib"] else "max\n",
        )
        write(root, f"{base}/memory.stat", memory_stat(m["anon"], m["file"], m["pgfault"]))
        rbytes = sum(x["rd"][1] + k * x["d_rd"][1] for x in d["disks"])
        wbytes = sum(x["wr"][1] + k * x["d_wr"][1] for x in d["disks"])
        rios = sum(x["rd"][0] + k * x["d_rd"][0] for x in d["disks"])
        wios = sum(x["wr"][0] + k * x["d_wr"][0] + x["fl"] + k * x["d_fl"] for x in d["disks"])
        # images live on the host's NVMe (259:0); the odd 253:0 line is LVM metadata noise
        write(
            root,
            f"{base}/io.stat",
            f"259:0 rbytes={rbytes + 1_048_576} wbytes={wbytes + wbytes // 64} rios={rios + 40} wios={wios + wios // 50} dbytes=0 dios=0\n"
            f"253:0 rbytes=4096 wbytes=0 rios=1 wios=0 dbytes=0 dios=0\n",
        )
        for kind in ("cpu", "memory", "io"):
            s0, f0 = d["psi"][kind]
            ds, df = d["psi_d"][kind]
            avg = (
                {"cpu": 1.37, "memory": 0.0, "io": 0.42}[kind]
                if d["name"] == "vm-alpha"
                else {"cpu": 3.05, "memory": 0.02, "io": 1.10}[kind]
            )
            write(root, f"{base}/{kind}.pressure", psi(s0 + k * ds, f0 + k * df, avg, avg / 4))
        for nic in d["nics"]:
            if not nic["target"]:
                continue
            tap = nic["target"]
            host_rx = nic["tx"][0] + k * nic["d_tx"][0]  # host rx = guest tx
            host_tx = nic["rx"][0] + k * nic["d_rx"][0]
            host_mac = "fe" + nic["mac"][2:]
            write(root, f"sys/class/net/{tap}/ifindex", f"{nic['ifindex']}\n")
            write(root, f"sys/class/net/{tap}/address", f"{host_mac}\n")
            write(root, f"sys/class/net/{tap}/statistics/rx_bytes", f"{host_rx}\n")
            write(root, f"sys/class/net/{tap}/statistics/tx_bytes", f"{host_tx}\n")
            links.append(
                {
                    "name": tap,
                    "ifindex": nic["ifindex"],
                    "mac": host_mac,
                    "guest_mac": nic["mac"],
                    "domain": d["name"],
                    "rx_bytes": host_rx,
                    "tx_bytes": host_tx,
                }
            )
        write(root, f"libvirt/{d['name']}.xml", domain_xml(d))
        stats.append({"uuid": d["uuid"], "name": d["name"], "id": d["domid"], "stats": bulk(d, k)})
    write(root, "libvirt/bulk_stats.json", json.dumps(stats, indent=1) + "\n")
    write(root, "libvirt/domstats_raw.txt", domstats_raw(stats))
    write(root, "net/links.json", json.dumps(links, indent=1) + "\n")


def main() -> int:
    dest = REPO / "fixtures" / "hosts" / HOST
    for sub in ("t0", "t1"):
        shutil.rmtree(dest / sub, ignore_errors=True)
    for k, sub in enumerate(("t0", "t1")):
        snapshot(dest / sub, k)
    meta = {
        "hostname": HOST,
        "recorded_with": "deploy/lab/make_systemd_v2_fixture.py (hand-made, not recorded)",
        "recorded_at": {
            "t0": "2026-11-23T08:00:00.000+00:00",
            "t1": "2026-11-23T08:00:02.000+00:00",
        },
        "interval_s": float(INTERVAL_S),
        "host_kernel": "6.1.0-28-amd64",
        "libvirt": [
            "Compiled against library: libvirt 9.0.0",
            "Using library: libvirt 9.0.0",
            "Using API: QEMU 9.0.0",
            "Running hypervisor: QEMU 7.2.13",
        ],
        "cgroup_layout": "v2",
        "bulk_stats_flags": "VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE | VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT",
        "bulk_stats_source": "hand-made (python-libvirt types)",
        "guests": [
            {
                "name": d["name"],
                "uuid": d["uuid"],
                "domid": d["domid"],
                "qemu_pid": d["pid"],
                "tap": next((n["target"] for n in d["nics"] if n["target"]), None),
                "guest_mac": next((n["mac"] for n in d["nics"] if n["target"]), None),
                "index": None,
            }
            for d in DOMAINS
        ],
    }
    (dest / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"lab: wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
