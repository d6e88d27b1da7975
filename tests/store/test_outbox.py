"""The SQLite store: opening, the pass commit, delivery state, dead letters, pruning, merging,
the size cap and a full disk (a real small tmpfs), and the `hostagent outbox` commands."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest

from hostagent.alerts.routing import UNCLAIMED
from hostagent.cli import main as cli
from hostagent.errors import StateCorrupt, StateError, StoreFull
from hostagent.model import Baseline, OutEvent
from hostagent.store.outbox import Outcome, Store
from tests.clocks import FakeClock
from tests.standins.queue import PERIOD_NS, T0_NS, usage_event

HOST = "host-a"


def open_store(path: Path, clock: FakeClock, sinks: tuple[str, ...] = ("q",),
               **kw: object) -> Store:
    return Store.open(path, clock=clock, node_id=HOST, sink_names=sinks, **kw)  # type: ignore[arg-type]


def base(instance: str, k: int) -> Baseline:
    return Baseline(instance_id=instance, incarnation="inc-1", t_wall_ns=T0_NS + k * PERIOD_NS,
                    cpu_ns=k * 10**9)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(tmp_path: Path, clock: FakeClock) -> Iterator[Store]:
    s = open_store(tmp_path / "state" / "state.db", clock)
    yield s
    s.close()


# --- opening ------------------------------------------------------------------------------


def test_open_creates_wal_store_and_keeps_created_ns(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "a" / "b" / "state.db"
    s = open_store(path, clock)
    created = s.created_ns
    assert created == clock.wall_ns
    s.close()
    clock.advance(100)
    s = open_store(path, clock)
    assert s.created_ns == created
    assert s.host == HOST
    with sqlite3.connect(path) as c:
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    s.close()


def test_foreign_file_is_refused_not_reset(tmp_path: Path, clock: FakeClock) -> None:
    junk = tmp_path / "state.db"
    junk.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(StateCorrupt, match=str(junk)):
        open_store(junk, clock)
    assert junk.read_bytes() == b"this is not sqlite at all" * 100

    other = tmp_path / "other.db"
    with sqlite3.connect(other) as c:
        c.execute("CREATE TABLE meta(key TEXT, value TEXT)")
        c.execute("INSERT INTO meta VALUES('app', 'someone-else')")
    before = other.read_bytes()
    with pytest.raises(StateCorrupt, match="someone-else"):
        open_store(other, clock)
    assert other.read_bytes() == before  # not even switched to WAL


def test_damaged_store_is_refused(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "state.db"
    s = open_store(path, clock)
    s.commit_pass([base(f"i{i}", 1) for i in range(300)],
                  [usage_event(f"i{i}", 0) for i in range(300)])
    s.close()
    raw = bytearray(path.read_bytes())
    raw[4096 * 3:4096 * 3 + 2000] = os.urandom(2000)  # scribble over b-tree pages
    path.write_bytes(bytes(raw))
    with pytest.raises(StateError, match=str(path)):
        open_store(path, clock).load_baselines()


def test_cli_open_never_creates(tmp_path: Path, clock: FakeClock) -> None:
    with pytest.raises(StateError, match="no state store"):
        open_store(tmp_path / "missing.db", clock, create=False)
    assert not (tmp_path / "missing.db").exists()


# --- the pass commit ----------------------------------------------------------------------


def test_commit_pass_is_one_idempotent_transaction(store: Store) -> None:
    events = [usage_event("i1", 0), usage_event("i2", 0)]
    store.commit_pass([base("i1", 1), base("i2", 1)], events,
                      alert_state={"fp1": b'{"state":"firing"}'})
    store.commit_pass([base("i1", 1), base("i2", 1)], events)  # the same pass again
    assert store.load_baselines() == {"i1": base("i1", 1), "i2": base("i2", 1)}
    assert store.stats()["q"].pending == 2
    assert store.load_alert_state() == {"fp1": b'{"state":"firing"}'}
    store.commit_pass([base("i1", 2)], [usage_event("i1", 1)], removed_instances=["i2"],
                      alert_state={"fp1": None, "fp2": b"{}"})
    assert set(store.load_baselines()) == {"i1"}
    assert store.load_alert_state() == {"fp2": b"{}"}
    assert store.stats()["q"].pending == 3


def test_claim_at_commit_claims_one_sinks_new_rows_and_its_claim_changes_nothing(
        tmp_path: Path, clock: FakeClock) -> None:
    s = open_store(tmp_path / "s.db", clock, ("q", "file"))

    def claimed() -> dict[str, list[int]]:
        with s.reading("claimed") as c:
            rows = c.execute("SELECT sink, claimed FROM deliveries ORDER BY sink, "
                             "period_start_ns").fetchall()
        return {sink: [f for n, f in rows if n == sink] for sink in ("file", "q")}

    s.commit_pass([], [usage_event("i1", 0)])
    s.claim_at_commit("file", True)
    s.claim_at_commit("file", True)  # idempotent
    assert s.claimed_at_commit == {"file"}
    s.commit_pass([], [usage_event("i1", 1)])
    assert claimed() == {"file": [0, 1], "q": [0, 0]}
    # the file's next claim loads both in period order; only the older row changes
    changes = s._conn.total_changes
    got = s.record_and_take("file", [], 10, clock.wall_ns, dead_letter_after=5)
    assert [p.event.event_id for p in got.batch] == [usage_event("i1", k).event_id
                                                     for k in (0, 1)]
    assert s._conn.total_changes - changes == 1
    changes = s._conn.total_changes
    s.commit_pass([], [usage_event("i1", 2)])
    s.record_and_take("file", [], 10, clock.wall_ns, dead_letter_after=5)
    assert s._conn.total_changes - changes == 1 + 2  # an event, two deliveries; no claim
    s.claim_at_commit("file", False)
    assert s.claimed_at_commit == frozenset()
    s.commit_pass([], [usage_event("i1", 3)])  # unclaimed again: mergeable
    assert claimed() == {"file": [1, 1, 1, 0], "q": [0, 0, 0, 0]}
    s.close()


def test_rows_are_keyed_in_commit_order_and_acked_by_their_key(
        tmp_path: Path, clock: FakeClock) -> None:
    s = open_store(tmp_path / "s.db", clock, ("q", "file"))
    # instance names sort against commit order: keys must follow the commit, not the ids
    for k in range(3):
        s.commit_pass([], [usage_event(f"i{9 - j}", k) for j in range(4)])
    with s.reading("keys") as c:
        keys = c.execute("SELECT d.sink, d.seq, e.event_id, e.created_ns FROM deliveries d "
                         "JOIN events e ON e.seq = d.seq ORDER BY d.sink, d.seq").fetchall()
    assert [q for sink, q, _, _ in keys if sink == "q"] == list(range(1, 13))
    assert [r[2] for r in keys if r[0] == "q"] == [
        usage_event(f"i{9 - j}", k).event_id for k in range(3) for j in range(4)]
    got = s.take("q", 100, clock.wall_ns)
    assert sorted(p.seq for p in got) == list(range(1, 13))
    by_id = {p.event.event_id: p for p in got}
    a, b = (by_id[usage_event("i9", 0).event_id], by_id[usage_event("i8", 0).event_id])
    # an outcome touches its own row only (its key, checked against its event id); a key
    # that is not the event's (never made by the daemon) changes nothing: sent again, never lost
    changes = s._conn.total_changes
    s.record("q", [Outcome.of(a, "acked"), Outcome(a.seq, b.event.event_id, "acked"),
                   Outcome(b.seq, a.event.event_id, "dead", "x")], dead_letter_after=5)
    assert s._conn.total_changes - changes == 1
    with s.reading("acked") as c:
        acked = c.execute("SELECT sink, event_id FROM deliveries WHERE status = 'acked'").fetchall()
    assert acked == [("q", a.event.event_id)]
    assert s.dead_letters() == []
    s.record("q", [Outcome.of(b, "acked")], dead_letter_after=5)
    assert s.stats()["q"].acked == 2 and s.stats()["file"].acked == 0
    s.close()


def test_routing_by_kind_and_sinks_added_later(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "s.db"
    s = open_store(path, clock, ("q", "file"), sink_kinds={"q": ["resource_usage"],
                                                            "file": ["threshold_violation"]})
    alert = OutEvent("a1", "threshold_violation", "i1", T0_NS, T0_NS, b'{"x":1}')
    s.commit_pass([], [usage_event("i1", 0), alert])
    assert (s.stats()["q"].pending, s.stats()["file"].pending) == (1, 1)
    s.close()
    s = open_store(path, clock, ("q", "file", "new"))  # no kinds given: every kind
    s.commit_pass([], [usage_event("i1", 1)])
    st = s.stats()
    assert (st["q"].pending, st["file"].pending, st["new"].pending) == (2, 2, 1)
    s.close()
    s = open_store(path, clock, ("q",))
    s.commit_pass([], [usage_event("i1", 2)])
    st = s.stats()
    assert (st["q"].pending, st["file"].active, st["file"].pending) == (3, False, 2)
    s.close()


QUEUE_CHANNELS = ["queue"]
HOOK_CHANNELS = ["webhook", "webhooks", "api_callback", UNCLAIMED]
CHANNELS: dict[str, list[str] | None] = {"q": QUEUE_CHANNELS, "hooks": HOOK_CHANNELS,
                                         "file": None}


def alert(eid: str, channels: list[str] | None, *, routed: bool = True) -> OutEvent:
    """An alert; channels None: an Alert rule's. `routed=False`: as an older hostagent built
    it, the channels only in the payload."""
    doc = {"event_type": "threshold_violation", "event_id": eid, "channels": channels or [],
           "action": "alert" if channels is None else "notify"}
    chans = frozenset(channels) if channels is not None and routed else None
    return OutEvent(eid, "threshold_violation", "i1", T0_NS, T0_NS, orjson.dumps(doc), chans)


def alert_rows(s: Store) -> dict[str, list[str]]:
    with s.reading("alert rows") as c:
        rows = c.execute("SELECT d.sink, d.event_id || ':' || d.status FROM deliveries d JOIN "
                         "events e USING (event_id) WHERE e.kind = 'threshold_violation' "
                         "ORDER BY 1, 2").fetchall()
    out: dict[str, list[str]] = {}
    for sink, row in rows:
        out.setdefault(sink, []).append(row)
    return out


def test_routing_by_channel_and_outbox_status(tmp_path: Path, clock: FakeClock,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "state.db"
    s = open_store(path, clock, ("q", "hooks", "file"), sink_channels=CHANNELS)
    s.commit_pass([], [usage_event("i1", 0), alert("a1", None), alert("a2", ["queue"]),
                       alert("a3", ["webhook_0badc0de"]), alert("a4", []),
                       alert("a5", ["queue", "webhook"])])
    # no row for a sink that is not among a Notify alert's channels; the rest reach every sink
    assert alert_rows(s) == {
        "file": ["a1:pending", "a2:pending", "a3:pending", "a4:pending", "a5:pending"],
        "hooks": ["a1:pending", "a3:pending", "a5:pending"],
        "q": ["a1:pending", "a2:pending", "a5:pending"]}
    st = s.stats()
    assert (st["q"].pending, st["hooks"].pending, st["file"].pending) == (4, 4, 6)
    # an alert no sink answers to is not stored at all
    only_q = open_store(tmp_path / "q.db", clock, ("q",), sink_channels=CHANNELS)
    only_q.commit_pass([], [alert("a6", ["webhook_0badc0de"])])
    assert only_q.stats()["q"].pending == 0
    with only_q.reading("count") as c:
        assert c.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 0
    only_q.close()
    batch = s.take("q", 10, clock.wall_ns)
    s.record("q", [Outcome.of(p, "acked") for p in batch], dead_letter_after=3)
    s.close()

    cfg = tmp_path / "hostagent.toml"
    cfg.write_text(f'[collector]\nstate_path = "{path}"\n[host]\nnode_id = "{HOST}"\n'
                   '[[sinks]]\ntype = "formation-queue"\nname = "q"\n'
                   '[[sinks]]\ntype = "webhook"\nname = "hooks"\n'
                   f'[[sinks]]\ntype = "jsonl"\nname = "file"\npath = "{tmp_path}/e.jsonl"\n')
    assert cli.main(["--config", str(cfg), "outbox", "status", "--json"]) == 0
    doc = orjson.loads(capsys.readouterr().out)
    assert {r["sink"]: (r["pending"], r["acked"]) for r in doc["sinks"]} == {
        "q": (0, 4), "hooks": (4, 0), "file": (6, 0)}


def test_channels_reroute_pending_rows_an_older_hostagent_wrote(tmp_path: Path,
                                                                clock: FakeClock) -> None:
    path = tmp_path / "state.db"
    old = open_store(path, clock, ("q", "hooks", "file", "gone"))  # before: every sink a row
    old.commit_pass([], [alert("a1", None, routed=False), alert("a2", ["queue"], routed=False),
                         alert("a3", ["webhook_0badc0de"], routed=False),
                         alert("a4", [], routed=False)])
    # the old queue sink acknowledged a4 without sending it: an acked row stays as it was
    s_a4 = [p for p in old.take("q", 10, clock.wall_ns) if p.event.event_id == "a4"]
    old.record("q", [Outcome.of(p, "acked") for p in s_a4], dead_letter_after=3)
    old.close()
    # the queue now takes usage only (a kinds change): its alert rows are not judged by kind
    s = open_store(path, clock, ("q", "hooks", "file"), sink_channels=CHANNELS,
                   sink_kinds={"q": ["resource_usage"]})
    assert alert_rows(s) == {
        "file": ["a1:pending", "a2:pending", "a3:pending", "a4:pending"],
        "gone": ["a1:pending", "a2:pending", "a3:pending", "a4:pending"],  # not configured
        "hooks": ["a1:pending", "a3:pending"],
        "q": ["a1:pending", "a2:pending", "a4:acked"]}
    assert [p.event.event_id for p in s.pending("q", 10, clock.wall_ns)] == ["a1", "a2"]
    s.close()
    again = open_store(path, clock, ("q", "hooks", "file"), sink_channels=CHANNELS)
    assert len(again.pending("q", 10, clock.wall_ns)) == 2  # idempotent
    again.close()


# --- delivery state -----------------------------------------------------------------------


def test_take_orders_by_period_and_holds_back_a_failed_instance(store: Store,
                                                               clock: FakeClock) -> None:
    for k in range(3):
        store.commit_pass([], [usage_event(i, k) for i in ("a", "b")])
    now = clock.wall_ns
    batch = store.take("q", 100, now)
    assert [(p.event.instance_id, p.event.period_start_ns) for p in batch] == [
        (i, T0_NS + k * PERIOD_NS) for k in range(3) for i in ("a", "b")]
    later = now + 10 * 10**9
    store.record("q", [Outcome.of(batch[0], "failed", "down", later)]
                 + [Outcome.of(p, "skipped") for p in batch[1:]],
                 dead_letter_after=3)
    # a's first event waits out its backoff, and a's later events wait behind it
    assert [p.event.instance_id for p in store.pending("q", 100, now)] == ["b"] * 3
    assert store.next_due_ns("q", now) == later
    assert [p.event.instance_id for p in store.pending("q", 100, later)] == ["a", "b"] * 3
    assert store.pending("q", 100, later)[0].attempts == 1


def test_dead_letter_after_n_rejections_and_replay(store: Store, clock: FakeClock) -> None:
    store.commit_pass([], [usage_event("a", 0), usage_event("b", 0)])
    taken = store.take("q", 10, clock.wall_ns)
    ids = [p.event.event_id for p in taken]
    for _ in range(2):
        assert store.record("q", [Outcome.of(taken[0], "rejected", "Failure: nope", 0)],
                            dead_letter_after=3) == 0
    assert store.record("q", [Outcome.of(taken[0], "rejected", "Failure: nope", 0),
                              Outcome.of(taken[1], "dead", "too large")],
                        dead_letter_after=3) == 2
    letters = store.dead_letters()
    assert sorted((d.event_id, d.reason, d.attempts) for d in letters) == sorted([
        (ids[0], "Failure: nope", 3), (ids[1], "too large", 1)])
    assert (store.stats()["q"].dead, store.stats()["q"].pending) == (2, 0)
    assert store.replay(event_id=ids[1]) == 1
    assert [p.event.event_id for p in store.pending("q", 10, clock.wall_ns)] == [ids[1]]
    assert store.replay(sink="q") == 1
    assert store.dead_letters() == []
    assert store.stats()["q"].pending == 2


def test_prune_keeps_unacked_and_removes_old_acked(store: Store, clock: FakeClock) -> None:
    store.commit_pass([], [usage_event("a", k) for k in range(4)])
    batch = store.take("q", 10, clock.wall_ns)
    store.record("q", [Outcome.of(p, "acked") for p in batch[:2]]
                 + [Outcome.of(p, "skipped") for p in batch[2:]],
                 dead_letter_after=3)
    clock.advance(50)
    assert store.maintain(retention_s=100).pruned == 0
    clock.advance(60)
    assert store.maintain(retention_s=100).pruned == 2
    st = store.stats()["q"]
    assert (st.pending, st.acked) == (2, 0)
    with store.reading("count") as c:
        assert c.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 2


# --- size cap, merging, full disk ---------------------------------------------------------


def _sums(payloads: list[dict[str, object]]) -> dict[str, float]:
    keys = ("cpu_seconds", "cpu_ns", "gpu_seconds", "network_egress_mb", "network_ingress_mb",
            "disk_read_mb", "disk_write_mb")
    return {k: sum(p["metrics"][k] for p in payloads) for k in keys}  # type: ignore[index,misc]


def test_merge_near_cap_preserves_billing_totals(tmp_path: Path, clock: FakeClock) -> None:
    s = open_store(tmp_path / "s.db", clock, max_bytes=2 * 1024 * 1024)
    committed: list[dict[str, object]] = []
    k = 0
    while s.size().used_bytes < 0.92 * 2 * 1024 * 1024:
        evs = [usage_event(f"i{i}", k, pad=400) for i in range(20)]
        committed += [orjson.loads(e.payload) for e in evs]
        s.commit_pass([base(f"i{i}", k + 1) for i in range(20)], evs)
        k += 1
    # the first batch was claimed (maybe sent): those must never be merged
    claimed = {p.event.event_id for p in s.take("q", 20, clock.wall_ns)}
    rep = s.maintain(retention_s=3600)
    assert (rep.merges, rep.merged["q"]) == (20, len(committed) - 20)
    assert rep.used_bytes < 0.5 * 2 * 1024 * 1024
    pending = s.pending("q", 10_000, clock.wall_ns + 10**12)
    payloads = [orjson.loads(p.event.payload) for p in pending]
    assert {p.event.event_id for p in pending} >= claimed
    assert len(pending) == 40
    exact = _sums(committed)
    got = _sums(payloads)
    for key in ("cpu_seconds", "cpu_ns", "gpu_seconds"):
        assert got[key] == exact[key]
    for key in exact:
        assert got[key] == pytest.approx(exact[key], rel=1e-12)
    merged = [p for p in payloads if "merged_from" in p]
    assert len(merged) == 20
    originals = {c["event_id"] for c in committed} - claimed
    assert {i for m in merged for i in m["merged_from"]} == originals  # type: ignore[attr-defined]
    by_instance = {m["instance_id"]: m for m in merged}
    m0 = by_instance["i0"]
    assert m0["period_ns"] == {"start": T0_NS + PERIOD_NS, "end": T0_NS + k * PERIOD_NS}
    parts = [c for c in committed if c["instance_id"] == "i0" and c["event_id"] not in claimed]
    assert m0["metrics"]["memory_gb"] == parts[-1]["metrics"]["memory_gb"]  # type: ignore[index]
    avg = sum(p["metrics"]["cpu_percent_avg"] for p in parts) / len(parts)  # type: ignore[index,misc]
    assert m0["metrics"]["cpu_percent_avg"] == pytest.approx(avg, abs=1e-5)  # type: ignore[index]
    records = s.merge_records()
    assert len(records) == 20
    assert {r[0] for r in records} == {m["event_id"] for m in merged}
    s.close()


def commit_until_full(s: Store, make: Callable[[int], list[OutEvent]]) -> tuple[int, StoreFull]:
    """Commit passes k = 0, 1, … (baselines for i0..i9 at k + 1) until StoreFull."""
    k = 0
    while True:
        evs = make(k)
        try:
            s.commit_pass([base(f"i{i}", k + 1) for i in range(10)], evs)
        except StoreFull as err:
            return k, err
        k += 1


def test_cap_full_commit_raises_storefull_and_keeps_baselines(tmp_path: Path,
                                                             clock: FakeClock) -> None:
    s = open_store(tmp_path / "s.db", clock, max_bytes=1024 * 1024)
    # claimed (maybe sent) and unacknowledged: neither prunable nor mergeable, so the refused
    # commit can make no room (tests/store/test_cap_room.py: when it can)
    s.claim_at_commit("q", True)
    k, err = commit_until_full(s, lambda k: [usage_event(f"i{i}", k, pad=2000)
                                              for i in range(10)])
    assert "full" in str(err)
    assert s.load_baselines()["i0"] == base("i0", k)  # the failed pass did not advance it
    batch = s.pending("q", 10_000, clock.wall_ns)
    assert len(batch) == 10 * k
    s.record("q", [Outcome.of(p, "acked") for p in batch], dead_letter_after=3)
    # the next commit prunes the acknowledged rows itself
    s.commit_pass([base("i0", k + 1)], [usage_event(f"i{i}", k, pad=2000) for i in range(10)])
    assert s.load_baselines()["i0"] == base("i0", k + 1)
    s.close()


@pytest.fixture
def tiny_fs(tmpfs: Callable[[str], Path]) -> Path:
    """A 2m tmpfs for the test."""
    return tmpfs("2m")


def test_disk_full_no_loss_and_recovery(tiny_fs: Path, clock: FakeClock) -> None:
    s = open_store(tiny_fs / "state.db", clock)
    filler = tiny_fs / "filler"
    with filler.open("wb") as f:  # leave ~256 KiB for the store
        f.write(b"\0" * (2 * 1024 * 1024 - 256 * 1024 - s.size().file_bytes))
    committed: set[str] = set()

    def make(k: int) -> list[OutEvent]:
        evs = [usage_event(f"i{i}", k, pad=1000) for i in range(5)]
        committed.update(e.event_id for e in evs)
        return evs

    k, err = commit_until_full(s, make)
    assert str(tiny_fs) in str(err)
    committed -= {usage_event(f"i{i}", k, pad=1000).event_id for i in range(5)}
    assert s.load_baselines()["i0"] == base("i0", k)
    filler.unlink()  # the operator frees space
    evs = [usage_event(f"i{i}", k, pad=1000) for i in range(5)]
    s.commit_pass([base(f"i{i}", k + 1) for i in range(5)], evs)
    committed |= {e.event_id for e in evs}
    assert s.load_baselines()["i0"] == base("i0", k + 1)
    assert {p.event.event_id for p in s.pending("q", 10_000, clock.wall_ns)} == committed
    s.close()
    s = open_store(tiny_fs / "state.db", clock)  # and it reopens cleanly
    assert s.stats()["q"].pending == len(committed)
    s.close()


# --- hostagent outbox ... -----------------------------------------------------------------


def test_outbox_cli_status_dead_letters_replay(tmp_path: Path, clock: FakeClock,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "state.db"
    cfg = tmp_path / "hostagent.toml"
    cfg.write_text(f'[collector]\nstate_path = "{path}"\n[host]\nnode_id = "{HOST}"\n'
                   '[[sinks]]\ntype = "formation-queue"\nname = "q"\n')
    s = open_store(path, clock)
    s.commit_pass([], [usage_event("a", 0), usage_event("b", 0)])
    batch = s.take("q", 10, clock.wall_ns)
    s.record("q", [Outcome.of(batch[0], "dead", "queue Failure: bad")],
             dead_letter_after=3)
    s.set_breaker("q", "open", clock.wall_ns)
    s.close()

    assert cli.main(["--config", str(cfg), "outbox", "status"]) == 0
    out = capsys.readouterr().out
    assert "unknown (daemon not running; last recorded: open)" in out
    assert cli.main(["--config", str(cfg), "outbox", "status", "--json"]) == 0
    doc = orjson.loads(capsys.readouterr().out)
    assert (doc["sinks"][0]["pending"], doc["sinks"][0]["dead_letters"]) == (1, 1)
    assert cli.main(["--config", str(cfg), "outbox", "dead-letters", "--json"]) == 0
    letters = orjson.loads(capsys.readouterr().out)
    assert [(d["event_id"], d["reason"]) for d in letters] == [
        (batch[0].event.event_id, "queue Failure: bad")]
    assert cli.main(["--config", str(cfg), "outbox", "replay", "--id", "nope"]) == 1
    capsys.readouterr()
    assert cli.main(["--config", str(cfg), "outbox", "replay", "--sink", "q"]) == 0
    assert "re-queued 1" in capsys.readouterr().out
    assert cli.main(["--config", str(cfg), "outbox", "dead-letters"]) == 0
    assert "no dead letters" in capsys.readouterr().out
