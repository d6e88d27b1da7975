"""One instance id, one running domain (accounting/id_clash.py): properties and the rules."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from hostagent.accounting.id_clash import Claim, assign
from hostagent.model import Baseline

UUIDS = [f"{i:08x}-0000-0000-0000-000000000000" for i in range(6)]


def base(iid: str, domid: int) -> Baseline:
    return Baseline(instance_id=iid, incarnation=f"{domid}:12345", t_wall_ns=1, cpu_ns=0)


def test_no_clash_gives_every_claim_its_id() -> None:
    claims = [Claim((UUIDS[0], 1), "a"), Claim((UUIDS[1], 2), "b")]
    got = assign(claims, {}, set(), {})
    assert got.ids == {(UUIDS[0], 1): "a", (UUIDS[1], 2): "b"}
    assert not got.refused and not got.clashes


def test_a_live_holder_keeps_its_id_and_the_newcomer_is_billed_under_its_uuid() -> None:
    # a virt-clone copied the <metadata>: the original runs on under its id
    held = {"shared": (UUIDS[3], 7)}
    got = assign([Claim((UUIDS[0], 9), "shared")], held, {(UUIDS[3], 7)}, {})
    assert got.ids == {(UUIDS[0], 9): UUIDS[0]}
    assert got.clashes == (("shared", (UUIDS[3], 7), (UUIDS[0], 9)),)


def test_a_holder_that_is_gone_holds_nothing() -> None:
    # the same domain restarted (new domid): its old incarnation is no longer listed
    got = assign([Claim((UUIDS[0], 9), "shared")], {"shared": (UUIDS[0], 7)}, set(), {})
    assert got.ids == {(UUIDS[0], 9): "shared"} and not got.clashes


def test_after_a_daemon_restart_the_domain_billed_under_the_id_keeps_it() -> None:
    # both claim it at once; the stored baseline says domid 5 was billed under it
    claims = [Claim((UUIDS[0], 4), "shared"), Claim((UUIDS[1], 5), "shared")]
    got = assign(claims, {}, set(), {"shared": base("shared", 5)})
    assert got.ids == {(UUIDS[1], 5): "shared", (UUIDS[0], 4): UUIDS[0]}
    # no baseline: the smallest UUID, the same choice every time
    got = assign(list(reversed(claims)), {}, set(), {})
    assert got.ids == {(UUIDS[0], 4): "shared", (UUIDS[1], 5): UUIDS[1]}


def test_a_uuid_another_domain_claims_as_its_id_is_refused_not_shared() -> None:
    claims = [Claim((UUIDS[0], 1), "shared"), Claim((UUIDS[1], 2), "shared"),
              Claim((UUIDS[2], 3), UUIDS[1])]
    got = assign(claims, {}, set(), {})
    assert got.ids == {(UUIDS[0], 1): "shared", (UUIDS[2], 3): UUIDS[1]}
    assert list(got.refused) == [(UUIDS[1], 2)]


ids = st.sampled_from(["a", "b", "c", *UUIDS[:3]])


@given(st.lists(st.tuples(st.sampled_from(UUIDS), st.integers(1, 4), ids), max_size=8,
                unique_by=lambda t: t[0]),
       st.dictionaries(ids, st.tuples(st.sampled_from(UUIDS), st.integers(1, 4)), max_size=4),
       st.sets(st.tuples(st.sampled_from(UUIDS), st.integers(1, 4))),
       st.dictionaries(ids, st.integers(1, 4), max_size=4))
def test_ids_are_unique_every_claim_is_answered_and_live_holders_never_lose(
        raw: list[tuple[str, int, str]], held: dict[str, tuple[str, int]],
        live: set[tuple[str, int]], domids: dict[str, int]) -> None:
    claims = [Claim((u, d), iid) for u, d, iid in raw]
    held = {iid: k for iid, k in held.items() if k not in {c.key for c in claims}}
    got = assign(claims, held, live, {iid: base(iid, d) for iid, d in domids.items()})
    assert set(got.ids) | set(got.refused) == {c.key for c in claims}
    assert not set(got.ids) & set(got.refused)
    live_held = {iid for iid, k in held.items() if k in live}
    given_ids = list(got.ids.values())
    assert len(given_ids) == len(set(given_ids))  # one domain per id
    assert not set(given_ids) & live_held  # nobody takes a running domain's id
    for c in claims:  # an id is either the scheme's or the domain's own UUID
        assert got.ids.get(c.key) in (None, c.instance_id, c.key[0])
