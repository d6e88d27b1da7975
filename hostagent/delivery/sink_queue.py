"""The outbox's adapter to the drain engine: one sink's rows of the outbox, sent to that sink.

A round (hostagent.delivery.drain runs the loop):

1. `take`: in ONE transaction, record the previous round's outcomes and claim the next batch
   of due events (oldest period first; an instance whose earliest failed event waits out its
   backoff holds back its later events); when none is due, say when the next one will be;
2. `deliver`: send the batch, up to `max_in_flight` at a time (a plain loop when that is 1),
   one instance's events strictly in period order; each event gets one round of attempts (the
   first try directly; on a transient failure tenacity's `AsyncRetrying`, sleeping with
   `trio.sleep`: the seed's RetryConfig, 3 retries from 100 ms ×2 up to 10 s, ±10 % jitter),
   each attempt asking the circuit breaker first; then `flush` the sink. Outcomes: acked;
   failed (transient: waits `drain.round_backoff_s`, never dropped); rejected (same wait;
   dead-lettered after `dead_letter_after` rejections, except while the sink has refused two
   instances' events or more and taken none: then failed); skipped (not sent).

The outcomes are kept until the next `take` (or `settle`, before the engine waits on the
breaker, and at shutdown): acknowledgement and the next claim share one commit, and the sink
has flushed before either. An outcome not recorded by a crash only means the event is sent
again (consumers dedupe on `event_id`, which never changes).

A local sink that writes a whole batch in one blocking call (sinks.base.BatchWriter: the JSONL
file) gets the round in ONE worker-thread call while its breaker is closed (`_local_rounds`):
record the last outcomes and claim a batch (commit: claimed, so never merged, before it can
reach the sink), write and fsync it, record the acknowledgements and claim the next batch
(commit); up to LOCAL_BATCHES_PER_CALL batches of `outbox.local_batch_size` (4,096: a pass's
events are one batch, one fsync, one claim and one acknowledgement, where
`outbox.batch_size`, sized for network sinks, made 4 of each at 1,000 domains). While its
writes succeed, the pass commit
inserts the sink's new rows claimed already (`Store.claim_at_commit`, durable in that synced
commit), so the round's claim changes no page and syncs nothing: one synced commit per pass
fewer. After a failed write it stops until a write succeeds: rows held back by the failed one
stay unclaimed, so mergeable through a long outage. The acknowledgements of the last, short batch
are committed without syncing the WAL (synchronous=NORMAL for that one commit): the claim and
the pass commit stay synced; a power cut can only lose acknowledgements (the events are sent
again with the same event_id, as after a crash between the write and the commit). The take
then hands the engine no rows, only "more may be due" or the next due time: one hand-off per
round instead of three. The worker-thread side is hostagent.delivery.local_round; there, once
the sink is caught up, the pass commit's own worker call writes each pass's rows right after
the commit (`write_at_commit`), and the drain is not even woken.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import trio
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from hostagent import handoff
from hostagent.clock import Clock
from hostagent.config.schema import OutboxConfig
from hostagent.delivery import metrics as em
from hostagent.delivery.breaker import Breaker, CircuitOpen
from hostagent.delivery.drain import Taken, attempt_backoff_s, round_backoff_s
from hostagent.delivery.local_round import LocalRound, LocalRounds
from hostagent.delivery.sinks.base import BatchWriter, Sink, Undeliverable
from hostagent.errors import SinkRejected, SinkUnavailable, StateError
from hostagent.store.inspect import Pending
from hostagent.store.outbox import Outcome, Store

log = logging.getLogger(__name__)
# A sequential round lets other tasks run after this many instances (~2 ms of sending).
YIELD_EVERY = 256


def _retryable(err: BaseException) -> bool:
    return isinstance(err, SinkUnavailable) and not isinstance(err, CircuitOpen)


@dataclass(eq=False)
class SinkQueue:
    """One sink's outbox rows (a `drain.Queue[Pending]`)."""

    sink: Sink
    store: Store
    cfg: OutboxConfig
    clock: Clock
    rng: random.Random
    on_used_bytes: Callable[[int], None] = lambda used_bytes: None  # the store's size
    breaker: Breaker = field(init=False)
    counters: em.SinkCounters = field(default_factory=em.SinkCounters)
    _unrecorded: list[Outcome] = field(default_factory=list)
    _persisted_version: int = -1
    _limiter: trio.CapacityLimiter = field(init=False)
    _local: LocalRound | None = field(init=False)  # a local sink's worker-thread side
    _write_failed: bool = False  # the local sink's last write failed
    _refusing: set[str] = field(default_factory=set)  # instances refused since it took one

    def __post_init__(self) -> None:
        self.breaker = Breaker(self.sink.breaker, self.clock)
        self._limiter = trio.CapacityLimiter(self.sink.max_in_flight)
        self._local = LocalRound(self.sink.name, self.sink, self.store, self.cfg, self.clock,
                                 self.rng, self.sink.retry) \
            if isinstance(self.sink, BatchWriter) else None

    @property
    def name(self) -> str:
        """The sink's name."""
        return self.sink.name

    # --- drain.Queue --------------------------------------------------------------------

    async def take(self, now_ns: int) -> Taken[Pending]:
        """Record the last round and claim the next batch, in one transaction."""
        await self._persist_breaker()
        outcomes, self._unrecorded = self._unrecorded, []
        local = self._local_writer()
        if local is not None:
            return await self._local_take(local, outcomes, now_ns)
        try:
            got = await handoff.run_sync(lambda: self.store.record_and_take(
                self.name, outcomes, self.cfg.batch_size, now_ns,
                dead_letter_after=self.cfg.dead_letter_after))
        except StateError:
            self._unrecorded = outcomes  # rolled back: recorded by the next try
            raise
        self._recorded(outcomes, got.dead_lettered)
        self.on_used_bytes(got.used_bytes)
        return Taken(got.batch, got.next_due_ns)

    async def deliver(self, rows: Sequence[Pending]) -> None:
        """Send a batch; its outcomes are recorded by the next `take` or `settle`."""
        self._unrecorded = await self._send_batch(rows)

    async def settle(self) -> None:
        """Record the last round's outcomes now."""
        await self._persist_breaker()
        self._set_claim_at_commit()  # (a breaker that just opened: new rows stay unclaimed)
        outcomes, self._unrecorded = self._unrecorded, []
        if outcomes:
            try:
                dead = await handoff.run_sync(lambda: self.store.record(
                    self.name, outcomes, dead_letter_after=self.cfg.dead_letter_after))
            except StateError:
                self._unrecorded = outcomes
                raise
            self._recorded(outcomes, dead)

    def store_failed(self, err: StateError) -> None:
        """Count a store error and say so (no traceback: it is expected)."""
        self.counters.store_errors += 1
        log.error("outbox unavailable to delivery", extra={"sink": self.name, "error": str(err)})

    def _recorded(self, outcomes: Sequence[Outcome], dead: int) -> None:
        self.counters.dead_lettered += dead
        self.counters.published += sum(o.result == "acked" for o in outcomes)

    # --- a local sink's rounds, in one worker-thread call ------------------------------

    def _local_writer(self) -> LocalRound | None:
        """A local sink's worker-thread side while its rounds run in one worker call (its
        breaker closed), else None."""
        self._set_claim_at_commit()
        if self.breaker.state == "closed":
            return self._local
        if self._local is not None:  # its rounds go through `send` and `flush` for now
            self._local.caught_up = False
        return None

    def _set_claim_at_commit(self) -> None:
        """The pass commit claims a local sink's new rows while its rounds run in one worker
        call, unless its last write failed (rows held back by a failed one stay unclaimed,
        so mergeable)."""
        self.store.claim_at_commit(self.name, self._local is not None and
                                   self.breaker.state == "closed" and not self._write_failed)

    async def _local_take(self, local: LocalRound, outcomes: list[Outcome],
                          now_ns: int) -> Taken[Pending]:
        try:
            r = await handoff.run_sync(self._local_rounds, local, outcomes, now_ns)
        except StateError:
            self._unrecorded = outcomes  # rolled back: recorded by the next try
            raise
        try:
            self._apply_local(r)
        except StateError:
            self._unrecorded = r.unrecorded  # written: recorded by the next take or settle
            raise
        if r.claimed.batch:  # claimed, not written yet: the next take claims them again
            return Taken([], more=True)
        return Taken([], r.claimed.next_due_ns)

    def _apply_local(self, r: LocalRounds) -> None:
        """In trio: what a worker call of the local sink did; its StateError, if any."""
        if r.last_write_ok is not None:
            self._write_failed = not r.last_write_ok
            self._set_claim_at_commit()  # a failing file: the next pass's rows stay mergeable
        for recorded, dead in r.recorded:
            self._recorded(recorded, dead)
        for n, seconds in r.written:
            self.breaker.record_success()
            self.counters.observe_latency(seconds, n)
        for n, error in r.failed:
            self._write_failed_for(n, error)
        self.on_used_bytes(r.claimed.used_bytes)
        if r.error is not None:
            raise r.error

    def _write_failed_for(self, events: int, error: str) -> None:
        """A local sink's write or flush failed for `events` events: counted in `failed` and
        said (a full disk was seen only as a growing backlog: no log line, `failed` 0). The
        breaker is left alone: a write is not a send."""
        self.counters.failed += events
        self.counters.note_error(error, self.clock.now().wall_ns)
        log.warning("sink write failed", extra={"sink": self.name, "events": events,
                                                "error": error})

    def _local_rounds(self, local: LocalRound, outcomes: list[Outcome],
                      now_ns: int) -> LocalRounds:
        """In a worker thread: the drain's round of a local sink (local_round.LocalRound)."""
        return local.rounds(outcomes, now_ns)

    def write_at_commit(self, rows: Sequence[Pending], now_ns: int) -> LocalRounds | None:
        """In the pass commit's worker call, right after it: write the rows it claimed for this
        local sink (local_round.LocalRound.at_commit); None: left to the drain."""
        return self._local.at_commit(rows, now_ns) if self._local is not None else None

    def written_at_commit(self, r: LocalRounds) -> bool:
        """In trio, after `write_at_commit` did `r`: apply it; True when the drain has nothing
        to do for these rows (it is then not woken)."""
        try:
            self._apply_local(r)
        except StateError as err:  # the acknowledgements were not recorded: the drain will
            self._unrecorded = [*self._unrecorded, *r.unrecorded]
            self.store_failed(err)
            return False
        return r.settled

    # --- one round ----------------------------------------------------------------------

    async def _send_batch(self, batch: Sequence[Pending]) -> list[Outcome]:
        by_instance: dict[str, list[Pending]] = {}
        for p in batch:
            by_instance.setdefault(p.event.instance_id, []).append(p)
        done: dict[str, Outcome] = {}
        if self.sink.max_in_flight == 1:
            # No limiter here: its checkpoint per instance cost one scheduler round (an
            # epoll_wait) per event. The loop still yields every YIELD_EVERY instances.
            for n, events in enumerate(by_instance.values(), 1):
                await self._send_events(events, done)
                if n % YIELD_EVERY == 0:
                    await trio.lowlevel.checkpoint()
        else:
            async with trio.open_nursery() as nursery:
                for events in by_instance.values():
                    nursery.start_soon(self._send_instance, events, done)
        outcomes = self._refused_by_the_sink(batch, [done[p.event.event_id] for p in batch])
        if any(o.result == "acked" for o in outcomes):
            error = None
            try:
                await self.sink.flush()
            except SinkUnavailable as err:
                error = str(err)
            except Exception as err:  # a sink's bug (see _attempt): the batch is sent again
                log.exception("sink flush failed unexpectedly",
                              extra={"sink": self.name, "error": repr(err)})
                error = f"flush: {type(err).__name__}: {err}"
            if error is not None:
                self._write_failed_for(sum(o.result == "acked" for o in outcomes), error)
                # Written but maybe not durable: send again later (consumers dedupe).
                wait_ns = int(round_backoff_s(self.sink.retry, 1, self.rng) * 1e9)
                at = self.clock.now().wall_ns + wait_ns
                outcomes = [Outcome(o.seq, o.event_id, "failed", error, at)
                            if o.result == "acked" else o for o in outcomes]
        return outcomes

    def _refused_by_the_sink(self, batch: Sequence[Pending],
                             outcomes: list[Outcome]) -> list[Outcome]:
        """Refusals of two instances' events or more since the sink last took one are its own
        trouble (a queue answering `Failure` to all): held as failures, never dead-lettered (the
        whole backlog was). A poison event among taken ones is dead-lettered as before."""
        if any(o.result == "acked" for o in outcomes):
            self._refusing.clear()
            return outcomes
        refused = {p.event.instance_id for p, o in zip(batch, outcomes, strict=True)
                   if o.result == "rejected"}
        self._refusing |= refused
        if not refused or len(self._refusing) < 2:
            return outcomes
        first = next(o.error for o in outcomes if o.result == "rejected")
        log.warning("sink refuses every event: held as its failure, not dead-lettered", extra={
            "sink": self.name, "instances": len(self._refusing), "error": first})
        return [Outcome(o.seq, o.event_id, "failed", f"refused with all others: {o.error}",
                        o.next_attempt_ns) if o.result == "rejected" else o for o in outcomes]

    async def _send_instance(self, events: Sequence[Pending], done: dict[str, Outcome]) -> None:
        async with self._limiter:
            await self._send_events(events, done)

    async def _send_events(self, events: Sequence[Pending], done: dict[str, Outcome]) -> None:
        for i, p in enumerate(events):
            o = await self._deliver(p)
            done[p.event.event_id] = o
            if o.result not in ("acked", "dead"):
                # Per instance in period order: the rest wait for this one.
                for q in events[i + 1:]:
                    done[q.event.event_id] = Outcome.of(q, "skipped")
                return

    async def _deliver(self, p: Pending) -> Outcome:
        """One round of attempts for one event."""
        eid, retry = p.event.event_id, self.sink.retry
        sent: list[bool] = []  # an attempt went out: it may have reached the sink

        def later() -> int:
            return self.clock.now().wall_ns + int(
                round_backoff_s(retry, p.attempts + 1, self.rng) * 1e9)

        try:
            try:
                await self._attempt(p, sent)  # the common case, without the retry machinery
            except SinkUnavailable as err:
                if not _retryable(err) or retry.max_retries == 0:
                    raise
                await self._retry(p, sent)
        except CircuitOpen as err:
            return Outcome.of(p, "failed", str(err), later()) if sent else Outcome.of(p, "skipped")
        except Undeliverable as err:
            self.counters.note_error(str(err), self.clock.now().wall_ns)
            log.error("event can never be delivered",
                      extra={"sink": self.name, "event_id": eid, "error": str(err)})
            return Outcome.of(p, "dead", str(err))
        except SinkRejected as err:
            self.counters.note_error(str(err), self.clock.now().wall_ns)
            log.warning("event rejected", extra={"sink": self.name, "event_id": eid,
                                                 "error": str(err)})
            return Outcome.of(p, "rejected", str(err), later())
        except SinkUnavailable as err:
            self.counters.note_error(str(err), self.clock.now().wall_ns)
            log.warning("delivery round failed", extra={"sink": self.name, "event_id": eid,
                                                        "error": str(err)})
            return Outcome.of(p, "failed", str(err), later())
        return Outcome.of(p, "acked")

    async def _retry(self, p: Pending, sent: list[bool]) -> None:
        """The retries of a round after its first try failed transiently."""
        retry = self.sink.retry

        def wait(state: RetryCallState) -> float:  # attempt_number 1 is the round's 2nd try
            return attempt_backoff_s(retry, state.attempt_number + 1, self.rng)

        def before_sleep(state: RetryCallState) -> None:
            self.counters.retried += 1

        self.counters.retried += 1
        await trio.sleep(attempt_backoff_s(retry, 1, self.rng))
        async for attempt in AsyncRetrying(
                stop=stop_after_attempt(retry.max_retries), wait=wait,
                retry=retry_if_exception(_retryable), before_sleep=before_sleep,
                reraise=True, sleep=trio.sleep):
            with attempt:
                await self._attempt(p, sent)

    async def _attempt(self, p: Pending, sent: list[bool]) -> None:
        if not self.breaker.allow():
            self.counters.refused_by_breaker += 1
            raise CircuitOpen(f"circuit open for sink {self.name}")
        sent.append(True)
        t0 = self.clock.now().monotonic_ns
        try:
            await self.sink.send(p.event)
        except SinkUnavailable:
            self.counters.failed += 1
            self.breaker.record_failure()
            raise
        except SinkRejected:
            self.counters.rejected += 1
            self.breaker.record_success()
            raise
        except Exception as err:
            # A sink's bug (an exception outside its contract) must not end the delivery
            # task, and with it the daemon, again at every start while the event waits: it
            # is a rejection of this event (dead-lettered after dead_letter_after of them).
            log.exception("sink failed unexpectedly", extra={
                "sink": self.name, "event_id": p.event.event_id, "error": repr(err)})
            self.counters.rejected += 1
            self.breaker.record_success()
            raise SinkRejected(f"sink error: {type(err).__name__}: {err}") from err
        self.breaker.record_success()
        self.counters.observe_latency((self.clock.now().monotonic_ns - t0) / 1e9)

    async def _persist_breaker(self) -> None:
        b = self.breaker
        state = b.state  # first: reading it turns an expired open breaker half-open
        if b.version == self._persisted_version:
            return
        reopened = self._persisted_version >= 0 and state == "closed"
        self._persisted_version = b.version
        log.log(logging.INFO if state == "closed" else logging.WARNING, "sink breaker",
                extra={"sink": self.name, "state": state})
        try:
            await handoff.run_sync(self.store.set_breaker, self.name, state,
                                          b.since_wall_ns)
            if reopened:  # the sink is back: what waits out a transient backoff goes now
                await handoff.run_sync(self.store.release_backoff, self.name,
                                              self.clock.now().wall_ns)
        except StateError as err:
            self.counters.store_errors += 1
            log.error("cannot record breaker state", extra={"sink": self.name, "error": str(err)})
