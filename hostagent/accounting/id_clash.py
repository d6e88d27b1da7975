"""Pure: one instance id, one running domain. Who keeps an id that several domains claim.

An instance id keys the instance's baseline, its events and its owner. Two running domains
with the same id (a `virt-clone` copies `<metadata>`, an `instance_id_xpath` that picks a
shared attribute, `formation` names that differ only in the case of their hex) would read
each other's baseline every pass: each looks like a new incarnation of the other and is billed
its whole counter again. So an id is given to one incarnation (`Key`: uuid, domid) at a time:

1. a live incarnation that already holds it keeps it (ids never move while a VM runs);
2. else, among the incarnations that claim it now, the one whose domain id matches the stored
   baseline of that id (the domain billed under it before a daemon restart);
3. else the claimant with the smallest UUID (the same choice every pass).

Every other claimant is billed under its own UUID, which no other domain can hold as its
UUID; when even that is taken (another domain's id scheme produced this UUID) it is refused
for now: the pass withholds it as a read error, its baseline kept, until the clash is gone.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from hostagent.accounting.sampling import incarnation_of, same_incarnation
from hostagent.model import Baseline

Key = tuple[str, int]  # (uuid, domid): one incarnation


@dataclass(frozen=True, slots=True)
class Claim:
    """An incarnation that has no id yet, and the id its scheme gives it."""

    key: Key
    instance_id: str


@dataclass(frozen=True, slots=True)
class Assigned:
    """`assign`'s answer: the ids given, and why the others were refused (by incarnation);
    `clashes`: (id, the incarnation that kept it, one that did not) for the log."""

    ids: Mapping[Key, str]
    refused: Mapping[Key, str]
    clashes: tuple[tuple[str, Key | None, Key], ...]


def assign(claims: Sequence[Claim], held: Mapping[str, Key], live: Collection[Key],
           baselines: Mapping[str, Baseline]) -> Assigned:
    """The ids of `claims` given those `held` by incarnations (only the `live` ones count)."""
    wanted: dict[str, list[Claim]] = {}
    for c in claims:
        wanted.setdefault(c.instance_id, []).append(c)
    if len(wanted) == len(claims) and not any(
            (k := held.get(iid)) is not None and k in live for iid in wanted):
        return Assigned({c.key: c.instance_id for c in claims}, {}, ())  # no clash: the rule
    taken = {iid: k for iid, k in held.items() if k in live}
    ids: dict[Key, str] = {}
    losers: list[tuple[Claim, Key | None]] = []
    for iid, group in wanted.items():
        keeper = None if iid in taken else _keeper(group, baselines.get(iid))
        if keeper is not None:
            ids[keeper.key] = iid
            taken[iid] = keeper.key
        losers += [(c, taken.get(iid)) for c in group if c is not keeper]
    refused: dict[Key, str] = {}
    clashes: list[tuple[str, Key | None, Key]] = []
    for c, holder in losers:
        uuid = c.key[0]
        clashes.append((c.instance_id, holder, c.key))
        if uuid in taken or uuid in wanted:
            refused[c.key] = (f"instance id {c.instance_id!r} is another running domain's, and "
                              f"so is this domain's UUID: withheld until one of them is gone")
            continue
        ids[c.key] = uuid
        taken[uuid] = c.key
    return Assigned(ids, refused, tuple(clashes))


def _keeper(group: list[Claim], base: Baseline | None) -> Claim:
    """Who of `group` (claiming an id no live incarnation holds) gets it."""
    if len(group) == 1:
        return group[0]
    if base is not None:
        for c in group:
            if same_incarnation(incarnation_of(c.key[1], None), base.incarnation):
                return c
    return min(group, key=lambda c: c.key[0])
