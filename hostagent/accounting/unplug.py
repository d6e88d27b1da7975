"""Pure: a NIC hot-unplugged from a running VM is billed up to its last light reading.

A tap goes with its NIC (`virsh detach-interface`, a Nova interface detach): the next pass
reads the domain without it, and `device_deltas.nic_deltas` dropped a NIC that is neither read nor
flagged, so its bytes since the last pass were lost. The light samples between passes follow
every tap the last pass matched, and the stop watch samples a domain the moment one of its taps
is deleted, with the final counters the kernel's RTM_DELLINK carried (sources/stop_watch.py):
the tail's latest light reading holds that tap's counters up to its end. A pass that reads the
domain without that tap (the NIC gone from the XML, listed with its tap not found, or re-plugged
on a new tap) hands them to the delta engine in `Sample.gone_taps`, and
`device_deltas.nic_deltas` bills the tap from its baseline up to them.

Only the same process's light reading (the tail's domid) and only the baseline's own tap (its
ifindex) count, and a light reading is never older than the last pass (tails re-anchor at
every pass) nor holds counters past the tap's end: nothing is billed twice, and a re-plugged
NIC's new tap counts from zero.

A NIC plugged and unplugged again between two passes was never read by a pass: the light
samples follow its tap because libvirt's DEVICE_ADDED had the daemon read the domain's taps
(`tails.with_taps`: the tail's `born` taps, those the last pass's Sample lacks). Such a tap,
unless it is a NIC that Sample read without a tap id (libvirt's counters: maybe the same tap,
billed that way), goes to `Sample.born_taps`, and
`device_deltas.nic_deltas` bills it from zero (unless the baseline holds it after all): all
of its life came after the last pass. Any other gone tap counts only against the baseline's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from hostagent.accounting.tails import Key, Tail
from hostagent.model import NicCounters, Sample, nic_key


def with_unplugged(sample: Sample, tail: Tail | None) -> Sample:
    """`sample`, with `gone_taps`: the taps of `tail`'s latest light reading (the same
    process's) that `sample` does not read."""
    light = tail.latest if tail is not None else None
    if light is None or not light.nics or light.domid != sample.domid:
        return sample
    lnics, nics = light.nics, sample.nics
    if len(lnics) == 1 and nics and lnics[0].ifindex == nics[0].ifindex:
        return sample  # the common case (once per domain and pass): its one tap is read
    gone_nics = [n for n in lnics if n.ifindex is not None and not _still_read(n, nics)]
    if not gone_nics:
        return sample
    assert tail is not None
    since = tail.born
    keyed = {nic_key(n) for n in tail.sample.nics if n.ifindex is None} if since else ()
    gone: list[tuple[int, int, int]] = []
    born: list[tuple[int, int, int]] = []
    for n in gone_nics:
        assert n.ifindex is not None
        tap = (n.ifindex, n.guest_rx_bytes, n.guest_tx_bytes)
        (born if n.ifindex in since and nic_key(n) not in keyed else gone).append(tap)
    return dataclasses.replace(sample, gone_taps=tuple(gone), born_taps=tuple(born))


def _still_read(tap: NicCounters, nics: tuple[NicCounters, ...]) -> bool:
    """`tap` is read in `nics`: by its ifindex, or by its NIC's key without a known ifindex
    (libvirt's counters, where the link dump lacked it: the same tap, read another way; by
    key, not MAC: NICs may share a MAC)."""
    key = nic_key(tap)
    return any(n.ifindex == tap.ifindex or (n.ifindex is None and nic_key(n) == key)
               for n in nics)


def fill(samples: list[Sample], live: Mapping[Key, Tail]) -> list[Sample]:
    """`with_unplugged` over a pass's samples (`live`: the tails as the pass found them, light
    readings merged); the same list when no sample has a tap gone."""
    out = samples
    for i, s in enumerate(samples):
        tail = live.get((s.uuid, s.domid))
        if tail is None or tail.latest is None:
            continue
        filled = with_unplugged(s, tail)
        if filled is not s:
            if out is samples:
                out = list(samples)
            out[i] = filled
    return out
