"""A local sink's rounds, in worker threads (sinks.base.BatchWriter: the JSONL file).

Two callers, one lock (`LocalRound.lock`: never two writes of the sink at once, so never an
event written twice by them, nor out of order):

- the drain (`rounds`, hostagent.delivery.sink_queue): record the last outcomes and claim a
  batch (commit), write and fsync it, record the acknowledgements and claim the next batch;
  up to LOCAL_BATCHES_PER_CALL batches of `outbox.local_batch_size` per call;
- the pass commit (`at_commit`, hostagent.collector): right after the commit, in the same
  worker call, the sink's new rows (claimed by that commit) are written, fsynced and
  acknowledged: no claim, no hand-off to the drain and no wake-up of it. Only when the sink is
  *caught up* (its last round left nothing due and nothing backing off, and its last write
  succeeded: nothing older of an instance can be waiting, so per-instance period order holds),
  only when the lock is free (a drain round in progress keeps them: it or the next takes them),
  only up to LOCAL_BATCHES_PER_CALL batches of `local_batch_size` rows (a write and an fsync
  each; after a failed one the rest stay due, for the drain), and only when the file is on the
  store's filesystem: the pass waits for that write, and a filesystem that hangs it would have
  hung the commit too.

Otherwise nothing is written here and the drain is woken as before. A failed write's
outcomes (transient: the round backoff) and the acknowledgements are recorded in the same
call; a failed record hands them to the drain, which records them at its next take.
"""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from hostagent.clock import Clock
from hostagent.config.schema import OutboxConfig
from hostagent.config.sinks import RetryConfig
from hostagent.delivery.drain import round_backoff_s
from hostagent.delivery.sinks.base import BatchWriter
from hostagent.errors import SinkUnavailable, StateError
from hostagent.store.inspect import Pending
from hostagent.store.outbox import Claimed, Outcome, Store

# Batches a local sink's round writes in one worker-thread call (a backlog: then trio again).
LOCAL_BATCHES_PER_CALL = 4


@dataclass(slots=True)
class LocalRounds:
    """What one worker-thread call of a local sink did (applied on trio's side)."""

    claimed: Claimed  # the last transaction's answer
    recorded: list[tuple[list[Outcome], int]]  # outcomes recorded and how many dead-lettered
    written: list[tuple[int, float]] = field(default_factory=list)  # (events, seconds)
    unrecorded: list[Outcome] = field(default_factory=list)  # written, their record failed
    failed: list[tuple[int, str]] = field(default_factory=list)  # failed writes: (events, why)
    error: StateError | None = None
    last_write_ok: bool | None = None  # None: nothing was written

    @property
    def settled(self) -> bool:
        """Written and acknowledged, nothing left due or backing off: no drain round needed."""
        c = self.claimed
        return (self.error is None and self.last_write_ok is not False and not c.batch
                and c.next_due_ns is None)


@dataclass(eq=False)
class LocalRound:
    """One local sink's worker-thread side: its writer, its lock and whether it is caught up.
    `lock` and `caught_up` belong to worker threads; trio only ever clears `caught_up` (a
    breaker that opened: the sink's rounds go through `send` and `flush`), which at worst
    leaves one pass's rows to the drain."""

    name: str
    writer: BatchWriter
    store: Store
    cfg: OutboxConfig
    clock: Clock
    rng: random.Random
    retry: RetryConfig
    lock: threading.Lock = field(default_factory=threading.Lock)
    caught_up: bool = False
    _same_fs: bool | None = None

    def rounds(self, outcomes: list[Outcome], now_ns: int) -> LocalRounds:
        """The drain's call: record and claim (commit), write and fsync, record and claim."""
        with self.lock:
            self.caught_up = False  # until this call ends well
            r = self._rounds(outcomes, now_ns)
            self.caught_up = r.settled
            return r

    def at_commit(self, rows: Sequence[Pending], now_ns: int) -> LocalRounds | None:
        """The pass commit's call, right after it: write the rows it claimed for this sink and
        record the outcomes; None when the drain must do it (see the module's docstring)."""
        limit = self.cfg.local_batch_size
        if not rows or len(rows) > LOCAL_BATCHES_PER_CALL * limit or not self._on_store_fs():
            return None
        if not self.lock.acquire(blocking=False):
            return None
        try:
            if not self.caught_up:
                return None
            self.caught_up = False
            r = LocalRounds(Claimed([], 0, None, 0), [])
            done: list[Outcome] = []
            for at in range(0, len(rows), limit):  # in batches, as a drain round would
                done += self._write(rows[at:at + limit], r)
                if not r.last_write_ok:  # the rest stay due: the drain's, after this one
                    break
            try:
                r.claimed = self._record_and_take(done, now_ns, claim=False, durable=not all(
                    o.result == "acked" for o in done))
            except StateError as err:
                r.unrecorded, r.error = done, err
                return r
            r.recorded.append((done, r.claimed.dead_lettered))
            self.caught_up = r.settled
            return r
        finally:
            self.lock.release()

    def _on_store_fs(self) -> bool:
        if self._same_fs is None:
            try:
                self._same_fs = self.writer.device() == os.stat(self.store.path).st_dev
            except OSError:
                return False  # not known yet: asked again next time
        return self._same_fs

    def _record_and_take(self, done: list[Outcome], now_ns: int, *, claim: bool,
                         durable: bool) -> Claimed:
        # Only acknowledgements, nothing claimed: committed without syncing the WAL (a power
        # cut loses at most them: sent again, same event_id). A claim must be durable before
        # its write.
        return self.store.record_and_take(
            self.name, done, self.cfg.local_batch_size if claim else 0, now_ns,
            dead_letter_after=self.cfg.dead_letter_after, durable=durable)

    def _rounds(self, outcomes: list[Outcome], now_ns: int) -> LocalRounds:
        limit = self.cfg.local_batch_size
        got = self._record_and_take(outcomes, now_ns, claim=True, durable=True)
        r = LocalRounds(got, [(outcomes, got.dead_lettered)])
        for _ in range(LOCAL_BATCHES_PER_CALL):
            if not r.claimed.batch:
                break
            done = self._write(r.claimed.batch, r)
            # A short batch took every due row: only acknowledgements to record. A full batch
            # claims the next one with them.
            acks_only = len(r.claimed.batch) < limit and all(o.result == "acked" for o in done)
            try:
                got = self._record_and_take(done, now_ns, claim=not acks_only,
                                            durable=not acks_only)
            except StateError as err:
                r.unrecorded, r.error = done, err
                break
            r.claimed = got
            r.recorded.append((done, got.dead_lettered))
        return r

    def _write(self, batch: Sequence[Pending], r: LocalRounds) -> list[Outcome]:
        by_instance: dict[str, list[Pending]] = {}  # the order `send` would see them in
        for p in batch:
            by_instance.setdefault(p.event.instance_id, []).append(p)
        t0 = self.clock.now().monotonic_ns
        try:
            self.writer.write_batch([p.event.payload for ps in by_instance.values() for p in ps])
        except SinkUnavailable as err:
            # Maybe written, not known durable: send again later (consumers dedupe).
            wait_ns = int(round_backoff_s(self.retry, 1, self.rng) * 1e9)
            at = self.clock.now().wall_ns + wait_ns
            r.last_write_ok = False
            r.failed.append((len(batch), str(err)))
            return [Outcome.of(p, "failed", str(err), at) for p in batch]
        r.last_write_ok = True
        r.written.append((len(batch), (self.clock.now().monotonic_ns - t0) / 1e9))
        return [Outcome.of(p, "acked") for p in batch]
