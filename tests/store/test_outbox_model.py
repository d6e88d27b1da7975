"""The outbox against a model (hypothesis state machine): whatever the order of pass commits
(repeated ones included), claims, outcomes of every kind (late ones for rows already settled
included), replays and pruning, each committed event has exactly one row per sink, in the
state the outcomes say, with its exact bytes, and the keys (`seq`) stay those of their events.
This is the billing guarantee the arrival keys (schema version 2) must keep."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from hostagent.store.inspect import Pending
from hostagent.store.outbox import Outcome, Result, Store
from tests.clocks import FakeClock
from tests.standins.queue import usage_event

SINKS = ("q", "file")
INSTANCES = ("vm-a", "vm-b", "vm-c")
DEAD_AFTER = 2
FAR_NS = 2**62
RESULTS: tuple[Result, ...] = ("acked", "failed", "skipped", "rejected", "dead")


class OutboxModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="outbox-model-"))
        self.clock = FakeClock()
        self.store = Store.open(self.dir / "state.db", clock=self.clock, node_id="host-a",
                                sink_names=list(SINKS))
        self.k = 0  # next pass
        self.payload: dict[str, bytes] = {}  # committed events
        # per sink: event id -> "pending" | "acked" | "dead" (acked rows go when pruned)
        self.state: dict[str, dict[str, str]] = {s: {} for s in SINKS}
        self.rejections: dict[tuple[str, str], int] = {}
        self.claimed: dict[str, list[Pending]] = {s: [] for s in SINKS}
        self.seqs: dict[str, int] = {}

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(instances=st.lists(st.sampled_from(INSTANCES), min_size=1, max_size=3, unique=True),
          again=st.booleans(), claim_file=st.booleans())
    def commit_pass(self, instances: list[str], again: bool, claim_file: bool) -> None:
        self.store.claim_at_commit("file", claim_file)
        k = self.k - 1 if again and self.k else self.k  # a pass committed again: no new rows
        self.k = k + 1
        events = [usage_event(i, k) for i in instances]
        self.store.commit_pass([], events)
        for e in events:
            # Stored already (a row left for some sink): left alone. Pruned for every sink,
            # the event is gone and a commit of it is a new one (as with version 1).
            if not any(e.event_id in self.state[s] for s in SINKS):
                self.payload[e.event_id] = e.payload
                self.seqs.pop(e.event_id, None)  # a new row: a new key
                for s in SINKS:
                    self.state[s][e.event_id] = "pending"
                    self.rejections.pop((s, e.event_id), None)

    @rule(sink=st.sampled_from(SINKS), limit=st.integers(1, 8))
    def take(self, sink: str, limit: int) -> None:
        got = self.store.take(sink, limit, FAR_NS)
        for p in got:
            assert self.state[sink][p.event.event_id] == "pending"
            assert p.event.payload == self.payload[p.event.event_id]
        self.claimed[sink].extend(got)

    @precondition(lambda self: any(self.claimed.values()))
    @rule(data=st.data())
    def record(self, data: st.DataObject) -> None:
        sink = data.draw(st.sampled_from([s for s in SINKS if self.claimed[s]]))
        picked = data.draw(st.lists(st.sampled_from(self.claimed[sink]), min_size=1,
                                    max_size=4, unique_by=lambda p: p.seq))
        outcomes = [Outcome.of(p, data.draw(st.sampled_from(RESULTS)), "x", 0) for p in picked]
        dead = self.store.record(sink, outcomes, dead_letter_after=DEAD_AFTER)
        expect_dead = 0
        for p, o in zip(picked, outcomes, strict=True):
            key = (sink, o.event_id)
            if self.state[sink].get(o.event_id) != "pending":
                continue  # late: settled (or pruned) already, nothing changes
            if self.seqs.get(o.event_id, p.seq) != p.seq:
                # Claimed from a row since pruned; the event committed again is a new row
                # (a new key) that this claim never took: the outcome is for nothing.
                continue
            if o.result == "acked":
                self.state[sink][o.event_id] = "acked"
            elif o.result in ("rejected", "dead"):
                self.rejections[key] = self.rejections.get(key, 0) + 1
                if o.result == "dead" or self.rejections[key] >= DEAD_AFTER:
                    self.state[sink][o.event_id] = "dead"
                    expect_dead += 1
        assert dead == expect_dead

    @rule(sink=st.sampled_from(SINKS))
    def replay(self, sink: str) -> None:
        n = self.store.replay(sink)
        back = [e for e, s in self.state[sink].items() if s == "dead"]
        assert n == len(back)
        for e in back:
            self.state[sink][e] = "pending"
            self.rejections[(sink, e)] = 0

    @rule()
    def prune(self) -> None:
        self.clock.advance(1)
        self.store.maintain(retention_s=0.5)
        for s in SINKS:
            self.state[s] = {e: v for e, v in self.state[s].items() if v != "acked"}

    @invariant()
    def every_row_is_where_the_outcomes_put_it(self) -> None:
        stats = self.store.stats()
        for s in SINKS:
            pending = {e for e, v in self.state[s].items() if v == "pending"}
            dead = {e for e, v in self.state[s].items() if v == "dead"}
            got = self.store.pending(s, 10**6, FAR_NS)
            assert {p.event.event_id for p in got} == pending
            assert len(got) == len(pending)  # one row per event
            assert all(p.event.payload == self.payload[p.event.event_id] for p in got)
            assert {d.event_id for d in self.store.dead_letters(s)} == dead
            assert (stats[s].pending, stats[s].dead) == (len(pending), len(dead))
            assert stats[s].acked == sum(v == "acked" for v in self.state[s].values())
            for p in got:  # an event keeps its key, the same for every sink
                assert self.seqs.setdefault(p.event.event_id, p.seq) == p.seq
        with self.store.reading("keys") as c:  # every row's key is its own event's
            assert c.execute("SELECT COUNT(*) FROM deliveries d LEFT JOIN events e ON "
                             "e.seq = d.seq WHERE e.event_id IS NOT d.event_id").fetchone() == (0,)


TestOutboxModel = OutboxModel.TestCase
TestOutboxModel.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)
