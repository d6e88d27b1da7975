"""Pure: the NIC, disk and storage part of a period (hostagent.accounting.sampling.usage).

Per device of a Sample against its Baseline: the new device baselines and the bytes of the
period, by the delta engine's rules (docs/usage-math.md): a counter that went down, a tap
re-created (new ifindex) or a device hot-plugged counts from its own zero; a missing reading
keeps the old baseline and bills nothing (the next good one covers the gap); a first reading
of a known device establishes its baseline (`ESTABLISHED` in `missing`); a NIC hot-unplugged
is billed up to its last light counters (`Sample.gone_taps`, accounting/unplug.py), and a tap
born and gone again since the last pass from zero (`Sample.born_taps`). Storage is a gauge: the
disks' allocation and capacity at the period's end.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from hostagent.model import (
    Baseline,
    DiskBase,
    NicBase,
    NicCounters,
    Sample,
    canonical_nic_key,
    nic_key,
)

# NicBase counters cannot be None in the model, yet a pre-existing NIC whose first reading is
# missing has no known value. This sentinel marks "known NIC, value not yet established"; the
# next good reading establishes it without billing anything. It round-trips through to_dict().
ESTABLISHED = "baseline established by this reading; earlier use is unknown"

def missing_keys(missing: Mapping[str, str], prefix: str) -> list[str]:
    """Names of whole devices flagged missing (`net:<key>`, `disk:<target>`), not sub-counters."""
    net, disk = flagged(missing)
    return list(net if prefix == "net:" else disk)


# Shared empty results (never mutated: Baseline's device maps are read-only Mappings).
NONE: Mapping[str, str] = {}
_NO_NICS: Mapping[str, NicBase] = {}
_NO_DISKS: Mapping[str, DiskBase] = {}


def flagged(missing: Mapping[str, str]) -> tuple[Mapping[str, str], Mapping[str, str]]:
    """(NIC key → missing key, disk target → missing key) of whole devices flagged missing, in
    `missing`'s order.

    A NIC key's MAC is lowercased (`net:<mac>` then reuses `missing`'s string where it is the
    same; a `<mac>@<target dev>` keeps its tap name's case); `disk:<target>:<counter>` is a
    sub-counter, not a whole disk."""
    net: dict[str, str] = {}
    disk: dict[str, str] = {}
    for key in missing:
        # One partition per key (once per domain and pass): cheaper than startswith + slices.
        kind, sep, name = key.partition(":")
        if kind == "net" and sep:
            nic = canonical_nic_key(name)
            net[nic] = key if name == nic else "net:" + nic
        elif kind == "disk" and sep and ":" not in name:
            disk[name] = key
    return net, disk


def counter(
    base: int | None, value: int | None, restarted: bool = False
) -> tuple[int, int | None]:
    """(delta, new base) of one cumulative counter; a missing value defers, a drop restarts."""
    if value is None:
        return 0, base
    if base is None:
        return 0, value
    if restarted or value < base:
        return value, value
    return value - base, value


_ZERO_DISK = DiskBase(0, 0)  # a hot-plugged disk (or a new process): counters from zero


def nic_deltas(
    base: Baseline, cur: Sample, missing: dict[str, str], flagged: Mapping[str, str] = NONE
) -> tuple[Mapping[str, NicBase], int, int]:
    """New NIC baselines by NIC key (`Nic.key`) and the (egress, ingress) bytes of the period.

    A tap in `cur.gone_taps` (gone since the last pass: accounting/unplug.py) is billed from
    the baseline up to its last counters, whether its NIC is no longer read (unplugged), is
    flagged missing (listed, its tap not found: the baseline moves to those counters) or is
    read on a new tap (re-plugged: the new tap counts from zero besides).

    A NIC read under a key the baseline lacks, or on another tap than its key's there, may be
    keyed differently than when the baseline was made (NICs that came to share a MAC or no
    longer do, a baseline of a version that kept one entry per MAC): `_base_of` finds its
    tap's entry by ifindex before counting it from zero."""
    if cur.gone_taps or cur.born_taps:
        return _nics_with_gone(base, cur, missing, flagged)
    if not cur.nics and not flagged:
        return _NO_NICS, 0, 0
    out: dict[str, NicBase] = {}
    egress = ingress = 0
    had = base.nics
    for key, flag in flagged.items():
        missing[flag] = cur.missing.get(flag, "not reported")
        if key in had:
            out[key] = had[key]
    for n in cur.nics:
        # `nic_key` inlined (once per NIC and pass): the reading's string where it is already
        # canonical (not a copy kept in the baseline).
        key = n.key if n.key is not None else n.mac
        low = key.lower()
        if low != key:
            key = canonical_nic_key(key)
        if flagged and key in flagged:
            continue
        ifindex = n.ifindex
        old = had.get(key)
        # A new ifindex is a new tap that counts from zero (unless the baseline has that tap
        # under another key); unknown ifindex falls back to the "counter went down" rule.
        restarted = False
        if old is None or (old.ifindex is not None and ifindex is not None
                           and old.ifindex != ifindex):
            old, restarted = _base_of(had, key, n, old)
        old_rx, old_tx, rx_now, tx_now = (old.guest_rx_bytes, old.guest_tx_bytes,
                                          n.guest_rx_bytes, n.guest_tx_bytes)
        if old_rx is None or old_tx is None:
            missing[f"net:{key}"] = ESTABLISHED
            out[key] = NicBase(ifindex, rx_now, tx_now)
            continue
        # `counter`'s rule, inlined (twice per NIC and pass): both values are known here,
        # a restart or a drop counts the new value from zero.
        egress += tx_now if restarted or tx_now < old_tx else tx_now - old_tx
        ingress += rx_now if restarted or rx_now < old_rx else rx_now - old_rx
        out[key] = NicBase(ifindex if ifindex is not None else old.ifindex, rx_now, tx_now)
    # NICs in the baseline but neither read nor flagged were unplugged: dropped, no delta.
    return out or _NO_NICS, egress, ingress


_UNKNOWN_NIC = NicBase(None, None, None)  # counted on from this reading: nothing billed


def _base_of(had: Mapping[str, NicBase], key: str, n: NicCounters,
             own: NicBase | None) -> tuple[NicBase, bool]:
    """(baseline, restarted) of NIC `n` (key `key`) that `had` lacks under its key (`own`
    None), or has on another tap: off the common path (a NIC plugged, a tap re-created).

    - an entry of the same MAC (the MAC's, or a `<mac>@<target dev>`) on `n`'s tap (its
      ifindex): that entry, continued (the NIC is keyed otherwise than then);
    - its own key's entry (on another tap): that, restarted (a new tap counts from zero);
    - no entry of its own, the MAC's held by another tap, and `n` not its MAC's last NIC (a
      `<mac>@...` key): unknown, counted on from this reading. A baseline of a version that
      kept one entry per MAC had the counters of the last NIC with that MAC for all of them
      (inventory.keyed_nics); the others were never billed apart: never from zero now.
    - else a NIC hot-plugged (or a new process): from zero."""
    ifindex = n.ifindex
    mac = key.partition("@")[0]
    prefix = mac + "@"
    family = False
    for k, b in had.items():
        if k == mac or k.startswith(prefix):
            if ifindex is not None and b.ifindex == ifindex:
                return b, False
            family = True
    if own is not None:
        return own, True
    if family and key != mac:
        return _UNKNOWN_NIC, False
    return NicBase(ifindex, 0, 0), False


def _nics_with_gone(
    base: Baseline, cur: Sample, missing: dict[str, str], flagged: Mapping[str, str]
) -> tuple[Mapping[str, NicBase], int, int]:
    """`nic_deltas` of a sample with taps gone since the last pass: the same, plus each gone tap's
    bytes from the baseline up to its last counters (a drop: counted from zero, as a reset),
    and each tap born since then and gone again (`born_taps`) from zero, unless the baseline
    holds that tap after all (then it is billed from there like a gone one) or this reading
    reads it."""
    gone = {ifindex: (rx, tx) for ifindex, rx, tx in cur.gone_taps}
    born_rx = born_tx = 0
    if cur.born_taps:
        held = {old.ifindex for old in base.nics.values()}
        read_taps = {n.ifindex for n in cur.nics}
        for ifindex, rx, tx in cur.born_taps:
            if ifindex in held:
                gone[ifindex] = (rx, tx)
            elif ifindex not in read_taps:
                born_rx += rx
                born_tx += tx
    read = {nic_key(n): n.ifindex for n in cur.nics}
    finals: dict[str, tuple[int, int]] = {}  # by NIC key: a baseline tap that is gone now
    for key, old in base.nics.items():
        if old.ifindex is None or old.ifindex not in gone \
                or old.guest_rx_bytes is None or old.guest_tx_bytes is None:
            continue
        if key in read and read[key] in (None, old.ifindex):
            continue  # read this pass after all (libvirt's counters): billed from there
        finals[key] = gone[old.ifindex]
    out, egress, ingress = nic_deltas(
        base, dataclasses.replace(cur, gone_taps=(), born_taps=()), missing, flagged)
    egress += born_tx
    ingress += born_rx
    if not finals:
        return out, egress, ingress
    out = dict(out)
    for key, (rx, tx) in finals.items():
        old = base.nics[key]
        old_rx, old_tx = old.guest_rx_bytes or 0, old.guest_tx_bytes or 0
        egress += tx if tx < old_tx else tx - old_tx
        ingress += rx if rx < old_rx else rx - old_rx
        if key in flagged:  # still listed: its baseline moves to the counters billed
            out[key] = NicBase(old.ifindex, rx, tx)
            missing.pop(flagged[key], None)
    return out or _NO_NICS, egress, ingress


def disk_deltas(
    base: Baseline, cur: Sample, missing: dict[str, str], flagged: Mapping[str, str] = NONE
) -> tuple[Mapping[str, DiskBase], int, int]:
    """New disk baselines by target and the (read, written) bytes of the period."""
    if not cur.disks and not flagged:
        return _NO_DISKS, 0, 0
    out: dict[str, DiskBase] = {}
    read = written = 0
    had = base.disks
    flags = cur.missing
    for target, key in flagged.items():
        missing[key] = flags.get(key, "not reported")
        if target in had:
            out[target] = had[target]
    for d in cur.disks:
        target = d.target
        if flagged and target in flagged:
            continue
        old = had.get(target, _ZERO_DISK)
        rd_value, wr_value = d.rd_bytes, d.wr_bytes
        if flags or rd_value is None or wr_value is None:
            rd_value = _sub_reading(rd_value, f"disk:{target}:rd_bytes", cur, missing)
            wr_value = _sub_reading(wr_value, f"disk:{target}:wr_bytes", cur, missing)
        rd, rd_base = counter(old.rd_bytes, rd_value)
        wr, wr_base = counter(old.wr_bytes, wr_value)
        if rd_value is not None and old.rd_bytes is None:
            missing[f"disk:{target}:rd_bytes"] = ESTABLISHED
        if wr_value is not None and old.wr_bytes is None:
            missing[f"disk:{target}:wr_bytes"] = ESTABLISHED
        read += rd
        written += wr
        out[target] = DiskBase(rd_base, wr_base)
    return out or _NO_DISKS, read, written


def _sub_reading(value: int | None, name: str, cur: Sample, missing: dict[str, str]) -> int | None:
    """A per-counter reading, or None (recorded in `missing`) when absent or flagged."""
    if value is None or name in cur.missing:
        missing[name] = cur.missing.get(name, "not reported")
        return None
    return value


def storage_of(cur: Sample, missing: dict[str, str],
             disk_flagged: Mapping[str, str] = NONE) -> tuple[int | None, int | None]:
    """Σ allocation and Σ capacity of the disks whose sizes are known (None if none is)."""
    if not cur.disks and not disk_flagged:
        return 0, 0  # a diskless guest uses no storage: a fact, not an unknown
    alloc: int | None = None
    capacity: int | None = None
    for d in cur.disks:
        if d.allocation_bytes is None:
            missing.setdefault(f"storage:{d.target}", "allocation not reported")
        else:
            alloc = (alloc or 0) + d.allocation_bytes
        if d.capacity_bytes is not None:
            capacity = (capacity or 0) + d.capacity_bytes
    return alloc, capacity
