"""The bulk statements of the hot path (hostagent.store.bulk): acknowledgements as one range
UPDATE only where a read of the range proves it touches exactly the acknowledged events' rows,
and delivery rows copied from the events the pass commit inserted."""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from hostagent.errors import StateError
from hostagent.store import bulk
from hostagent.store.inspect import Pending
from hostagent.store.outbox import Outcome, Store
from tests.clocks import FakeClock
from tests.standins.queue import usage_event

Row = tuple[str, int, str, str, int, int, int | None, str | None]


def open_store(path: Path, clock: FakeClock, sinks: tuple[str, ...] = ("q",)) -> Store:
    return Store.open(path, clock=clock, node_id="h", sink_names=sinks)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(tmp_path / "state.db", FakeClock())
    s.claim_at_commit("q", True)
    yield s
    s.close()


def rows(s: Store) -> list[Row]:
    with s.reading("rows") as c:
        return c.execute("SELECT sink, seq, event_id, status, claimed, attempts, done_ns, "
                         "last_error FROM deliveries ORDER BY sink, seq").fetchall()


def drop_newest(s: Store, seqs: list[int]) -> None:
    """As if the newest rows were merged or pruned away: rows and events gone, so the next
    commit gives their seqs to other events."""
    with s.transaction("as a merge would") as c:
        for q in seqs:
            c.execute("DELETE FROM deliveries WHERE seq = ?", (q,))
            c.execute("DELETE FROM events WHERE seq = ?", (q,))


def acks(batch: list[Pending]) -> list[Outcome]:
    return [Outcome.of(p, "acked") for p in batch]


def record_acks(s: Store, outcomes: list[Outcome]) -> None:
    """As the pass commit's write records them (local_round.LocalRound.at_commit)."""
    s.record_and_take("q", outcomes, 0, 2**62, dead_letter_after=3, durable=False)


def test_a_late_acknowledgement_never_touches_the_row_of_an_event_that_reused_its_seq(
        store: Store) -> None:
    first = store.commit_pass([], [usage_event(f"i{n}", 0) for n in range(8)])["q"]
    assert [p.seq for p in first] == list(range(1, 9))
    late = acks(first)  # the write's outcomes, recorded only after what follows
    drop_newest(store, [5, 6, 7, 8])
    others = store.commit_pass([], [usage_event(f"j{n}", 0) for n in range(4)])["q"]
    assert [p.seq for p in others] == [5, 6, 7, 8]  # the same seqs, other events, claimed
    record_acks(store, late)
    got = {(q, eid): (status, attempts) for _, q, eid, status, _, attempts, _, _ in rows(store)}
    assert got == {**{(p.seq, p.event.event_id): ("acked", 1) for p in first[:4]},
                   **{(p.seq, p.event.event_id): ("pending", 0) for p in others}}
    record_acks(store, acks(others))  # their own acknowledgements do reach them
    assert {status for _, _, _, status, *_ in rows(store)} == {"acked"}


def test_a_foreign_row_inside_the_range_keeps_the_acknowledgements_per_row(
        store: Store) -> None:
    batch = store.commit_pass([], [usage_event(f"i{n}", 0) for n in range(8)])["q"]
    record_acks(store, acks(batch[:3] + batch[4:]))  # one in the middle not acknowledged
    assert [status for _, _, _, status, *_ in rows(store)] == ["acked"] * 3 + ["pending"] + [
        "acked"] * 4


def test_the_pass_commits_acknowledgements_are_one_range_statement(store: Store) -> None:
    batch = store.commit_pass([], [usage_event(f"i{n}", 0) for n in range(50)])["q"]
    seen: list[str] = []
    store._conn.set_trace_callback(seen.append)
    record_acks(store, acks(batch))
    store._conn.set_trace_callback(None)
    updates = [s for s in seen if s.startswith("UPDATE")]
    assert len(updates) == 1 and "BETWEEN" in updates[0], updates
    assert all(r[3] == "acked" and r[5] == 1 and r[6] is not None for r in rows(store))


def test_range_and_per_row_acknowledgements_leave_the_same_rows(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same random history (passes, claims, late acknowledgements, other outcomes, rows
    merged or pruned away and their seqs reused) on two stores: ranges allowed on one, never
    on the other. Every row must end the same."""
    clock = FakeClock()
    ranged, per_row = (open_store(tmp_path / f"{n}.db", clock, ("q", "f")) for n in "ab")
    used = {True: 0, False: 0}  # the ranged store's tries: done, or left to the rows
    real, lowest = bulk.ack_range, bulk.RANGE_ACKS_FROM

    def counted(c: sqlite3.Connection, sink: str, acked: Sequence[tuple[int, str]],
                now_ns: int) -> bool:
        ok = real(c, sink, acked, now_ns)
        if lowest == bulk.RANGE_ACKS_FROM and len(acked) >= lowest:
            used[ok] += 1
        return ok

    monkeypatch.setattr(bulk, "ack_range", counted)
    rng = random.Random(7)
    held: list[Pending] = []  # rows a round claimed and will report on late
    k = 0

    def both(act: object) -> list[object]:
        out = []
        for s, least in ((ranged, lowest), (per_row, 10**9)):
            monkeypatch.setattr(bulk, "RANGE_ACKS_FROM", least)
            out.append(act(s))  # type: ignore[operator]
        return out

    for _ in range(400):
        op = rng.random()
        if op < 0.35:
            k += 1
            claim = rng.random() < 0.7
            evs = [usage_event(f"i{rng.randrange(40)}", k) for _ in range(rng.randrange(1, 30))]
            for s in (ranged, per_row):
                s.claim_at_commit("q", claim)
            got = both(lambda s, evs=evs: s.commit_pass([], evs))
            assert got[0] == got[1]
            new: list[Pending] = got[0].get("q", [])  # type: ignore[union-attr]
            if rng.random() < 0.5:  # written at the commit and acknowledged at once
                both(lambda s, new=new: record_acks(s, acks(new)))
            else:
                held += new
        elif op < 0.5:
            limit = rng.randrange(1, 60)
            got = both(lambda s, limit=limit: s.take("q", limit, 2**62))
            held += got[0]  # type: ignore[arg-type]
        elif op < 0.85 and held:
            n = rng.randrange(1, len(held) + 1)
            at = rng.randrange(0, len(held) - n + 1)
            picked, held[at:at + n] = held[at:at + n], []
            mixed = rng.random() < 0.3  # else acknowledgements only, as most rounds
            outs = [Outcome.of(p, rng.choice(("acked", "failed", "skipped", "rejected"))
                               if mixed else "acked", "x", 1) for p in picked]
            if rng.random() < 0.15:  # an outcome claiming another event's id: never applied
                o = outs[rng.randrange(len(outs))]
                o.event_id = "not-" + o.event_id
            both(lambda s, outs=outs: s.record("q", outs, dead_letter_after=2))
        elif op < 0.95:
            with ranged.reading("newest") as c:
                top = [r[0] for r in c.execute("SELECT seq FROM events ORDER BY seq DESC "
                                               "LIMIT ?", (rng.randrange(1, 10),))]
            both(lambda s, top=top: drop_newest(s, top))
        else:
            clock.advance(1.0)
        assert rows(ranged) == rows(per_row)
    assert used[True] > 20 and used[False] > 5, used  # both paths taken
    ranged.close()
    per_row.close()


def test_an_event_of_an_earlier_try_is_not_claimed_again(tmp_path: Path) -> None:
    s = open_store(tmp_path / "s.db", FakeClock(), ("q", "f"))
    s.claim_at_commit("f", True)
    ev, other = usage_event("i", 0), usage_event("j", 0)
    assert [p.seq for p in s.commit_pass([], [ev])["f"]] == [1]
    got = s.commit_pass([], [ev, other])  # the retry of a pass whose first try committed
    assert [(p.seq, p.event.event_id) for p in got["f"]] == [(3, other.event_id)]
    assert [(r[0], r[1], r[2]) for r in rows(s)] == [
        ("f", 1, ev.event_id), ("f", 3, other.event_id),
        ("q", 1, ev.event_id), ("q", 3, other.event_id)]
    s.close()


def test_a_pass_commit_whose_delivery_rows_fall_short_is_rolled_back(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    # a defect (rows not found among the events just inserted) must not commit events that
    # no sink owes: the whole pass is rolled back and tried again
    monkeypatch.setattr(bulk, "_DELIVERIES_OF_RANGE", bulk._DELIVERIES_OF_RANGE + " AND 0")
    with pytest.raises(StateError, match="2 events found"):
        store.commit_pass([], [usage_event("i", 0), usage_event("j", 0)])
    with store.reading("count") as c:
        assert c.execute("SELECT (SELECT COUNT(*) FROM events) + "
                         "(SELECT COUNT(*) FROM deliveries)").fetchone()[0] == 0
