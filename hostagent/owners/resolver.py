"""Who pays for an instance: metadata hint → account-service index/lookups → `unassigned`.

`Owners.resolve` is what a pass calls: synchronous, dictionary lookups only, no I/O, no clock
read, never blocks. Everything that talks to the account service runs in `Owners.run`, a
background task that

- rebuilds the index from `GET {prefix}/account/list` every `refresh_s` (parsing and
  validation run in a worker thread; the new index replaces the old one in one assignment),
- drains the queue of unknown instances with point lookups (`get_by_build_id` when the VM name
  is known, else the signed `instance/<id>/get`), at most `lookups_per_s`,
- expires point lookups: a found owner is re-asked after `ttl_s` but kept meanwhile; an
  unknown instance is not asked again for `negative_ttl_s`.

When the service fails, nothing is dropped: the last index and lookups keep serving
(stale-while-error) and `health()` says since when. Logs come once per state change.
The index itself (who owns what in one account listing) is built in `owner_index`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Final

import trio

from hostagent import handoff
from hostagent.clock import Clock
from hostagent.config.schema import OwnersConfig
from hostagent.errors import OwnerLookupError
from hostagent.model import Owner, OwnerHint
from hostagent.owners.account_client import AccountClient
from hostagent.owners.accounts import clip
from hostagent.owners.index import (
    EMPTY_INDEX,
    SERVICE_SOURCE,
    OwnerIndex,
    index_from_body,
)
from hostagent.owners.signing import load_key_file

log = logging.getLogger(__name__)

UNASSIGNED_SOURCE: Final = "unassigned"
# The lookup task sweeps when the next entry expires (or a lookup is queued), and at least this
# often. It swept every second before: 30 wake-ups of trio a 30 s pass, ~0.5 ms of process CPU
# each on a busy host, for entries that expire every negative_ttl_s (60 s) or ttl_s (600 s).
_SWEEP_MAX_S: Final = 60.0
_MAX_PENDING: Final = 10_000
_MAX_HINT_CACHE: Final = 100_000
_FORGET_AFTER_S: Final = 3600.0  # per-instance memory of instances no longer resolved
_CLAIMANTS_LOGGED: Final = 10  # of an instance's owning accounts, in its conflict warning
_EMPTY: Mapping[str, str] = MappingProxyType({})


def make_client(cfg: OwnersConfig, clock: Clock, config_source: str = "<config>"
                ) -> AccountClient | None:
    """The account client `cfg` asks for (None when disabled); ConfigError on a bad key file."""
    if not cfg.enabled:
        return None
    signer = load_key_file(cfg.key_file, config_source=config_source) if cfg.key_file else None
    return AccountClient(cfg, clock, signer)


def _iso(wall_ns: int | None) -> str | None:
    if wall_ns is None:
        return None
    return datetime.fromtimestamp(wall_ns / 1e9, tz=UTC).isoformat(timespec="seconds")


@dataclass(slots=True)
class _Lookup:
    owner: Owner | None  # None: the service does not know the instance (negative entry)
    expires_ns: int


class Owners:
    """Owner resolution for the pass, fed by a background task talking to the account service."""

    def __init__(self, cfg: OwnersConfig, clock: Clock, client: AccountClient | None) -> None:
        self._cfg = cfg
        self._clock = clock
        self._client = client
        self._enabled = cfg.enabled and client is not None
        self._org = cfg.default_org_id or None
        self._unassigned = Owner(cfg.unassigned, self._org, UNASSIGNED_SOURCE)
        self._index = EMPTY_INDEX
        self._merged: dict[str, Owner] = {}  # index ∪ positive lookups; what resolve reads
        self._lookups: dict[str, _Lookup] = {}
        self._due: set[str] = set()  # positive lookups past ttl_s: re-ask, keep serving
        self._pending: dict[str, str | None] = {}  # ordered set of queued lookups → build_id
        self._inflight: str | None = None
        self._last: dict[str, Owner] = {}  # last owner resolve() gave, for change logs
        self._last_old: dict[str, Owner] = {}  # the generation before (see sweep)
        self._rotated_ns: int | None = None
        self._next_sweep_ns: int | None = None  # when an entry expires next (None: at once)
        self._hint_owners: dict[OwnerHint, Owner] = {}
        self._wakeup = trio.Event()
        self._state = "never"
        self._last_success_ns: int | None = None
        self._stale_since_ns: int | None = None
        self._last_error: str | None = None
        self._lookup_failing = False
        self._counts = {"refresh_ok": 0, "refresh_failed": 0, "lookup_ok": 0,
                        "lookup_not_found": 0, "lookup_failed": 0, "queue_dropped": 0,
                        "unexpected_errors": 0}

    # --- the pass-facing side: no I/O, no awaits, no clock --------------------------------

    def resolve(self, instance_id: str, hint: OwnerHint | None, *,
                build_id: str | None = None) -> Owner:
        """The owner to bill now; never blocks. `build_id`: the VM name on Formation hosts."""
        if hint is not None and hint.user_id is not None:
            owner = self._hint_owners.get(hint)
            if owner is None:
                owner = Owner(hint.user_id, hint.org_id or self._org, hint.source)
                if len(self._hint_owners) >= _MAX_HINT_CACHE:
                    self._hint_owners.clear()
                self._hint_owners[hint] = owner
        else:
            found = self._merged.get(instance_id)
            if found is None:
                owner = self._unassigned
                if self._enabled and instance_id not in self._lookups:
                    self._enqueue(instance_id, build_id)
            else:
                owner = found
                if instance_id in self._due:
                    self._enqueue(instance_id, build_id)
            if hint is not None and hint.org_id is not None and owner.org_id != hint.org_id:
                owner = Owner(owner.user_id, hint.org_id, owner.source)
        prev = self._last.get(instance_id)
        if prev is not owner:
            if prev is None:
                prev = self._last_old.get(instance_id)
            self._last[instance_id] = owner
            if prev is not None and prev != owner:
                log.info("owner changed", extra={
                    "instance_id": instance_id,
                    "old_user_id": prev.user_id, "old_org_id": prev.org_id,
                    "old_source": prev.source, "new_user_id": owner.user_id,
                    "new_org_id": owner.org_id, "new_source": owner.source})
        return owner

    def _enqueue(self, instance_id: str, build_id: str | None) -> None:
        if instance_id in self._pending or instance_id == self._inflight:
            return
        if build_id is None and not (self._client and self._client.can_sign):
            return  # no route could answer: account/list is the only source
        if len(self._pending) >= _MAX_PENDING:
            self._counts["queue_dropped"] += 1
            return
        self._pending[instance_id] = build_id
        self._due.discard(instance_id)
        self._wakeup.set()

    def authorized(self, instance_id: str) -> Mapping[str, str]:
        """address → role (Owner|Manager|Operator|ReadOnly) for an instance; empty if unknown."""
        roles = self._index.roles.get(instance_id)
        if roles is not None:
            return roles
        entry = self._lookups.get(instance_id)
        if entry is not None and entry.owner is not None:
            return MappingProxyType({entry.owner.user_id: "Owner"})
        return _EMPTY

    def retain(self, live_instance_ids: Collection[str]) -> None:
        """Forget per-instance state of instances no longer running (call now and then)."""
        live = live_instance_ids if isinstance(live_instance_ids, set | frozenset) else set(
            live_instance_ids)
        for table in (self._last, self._last_old, self._pending):
            for iid in [i for i in table if i not in live]:
                del table[iid]
        for iid in [i for i in self._lookups if i not in live]:
            del self._lookups[iid]
            # Its owner goes with it: left in `_merged` without its entry, it was served with
            # no expiry (nothing re-asked it) until an account/list refresh rebuilt the table,
            # which never came while account/list failed, and the table grew with every VM.
            if iid not in self._index.owners:
                self._merged.pop(iid, None)
        self._due &= live
        self._hint_owners.clear()

    def health(self) -> dict[str, object]:
        """State of the owner source for /health: fresh, stale (since when), never or disabled."""
        return {
            "state": self._state if self._enabled else "disabled",
            "stale_since": _iso(self._stale_since_ns),
            "last_success": _iso(self._last_success_ns),
            "last_error": self._last_error,
            "index_size": len(self._index.owners),
            "accounts": self._index.accounts,
            "conflicts": len(self._index.conflicts),
            "accounts_skipped": self._index.skipped_accounts,
            "lookup_cache": len(self._lookups),
            "pending_lookups": len(self._pending),
            **self._counts,
        }

    # --- the background side -----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Refresh the index and serve point lookups until cancelled; closes the client."""
        if not self._enabled or self._client is None:
            if self._cfg.enabled:
                log.warning("owners.enabled is set but no account client was given; "
                            "owners come from metadata only (build one with make_client)")
            task_status.started()
            return
        client = self._client
        if not client.can_sign:
            log.info("owner point lookups by instance id are off: no owners.key_file "
                     "(account/list and get_by_build_id still work)")
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._loop, "refresh", self.refresh_once, self._cfg.refresh_s)
                nursery.start_soon(self._lookup_loop)
                task_status.started()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await client.aclose()

    async def _loop(self, name: str, step: Callable[[], Awaitable[object]],
                    period_s: float) -> None:
        while True:
            try:
                await step()
            except Exception:  # a bug here must not stop billing; it is counted and logged
                self._counts["unexpected_errors"] += 1
                log.exception("owner task failed unexpectedly", extra={"task": name})
            await trio.sleep(period_s)

    async def refresh_once(self) -> bool:
        """One index refresh; True when it worked. Service faults are recorded, not raised."""
        assert self._client is not None
        try:
            body = await self._client.fetch_account_list()
            index = await handoff.run_sync(index_from_body, body, self._org,
                                                  abandon_on_cancel=True)
        except OwnerLookupError as err:
            self._refresh_failed(str(err))
            return False
        self.install_index(index)
        self._refresh_ok()
        return True

    def install_index(self, index: OwnerIndex) -> None:
        """Swap in a new index (what each refresh does), keeping point-lookup owners."""
        merged = dict(index.owners)
        for iid, entry in self._lookups.items():
            if entry.owner is not None and iid not in merged:
                merged[iid] = entry.owner
        new_conflicts = index.conflicts.keys() - self._index.conflicts.keys()
        for iid in sorted(new_conflicts)[:20]:
            # The first few claimants and how many: 30,000 accounts owning one instance once
            # made this one warning 1.3 MB.
            claimants = index.conflicts[iid]
            log.warning("several accounts own one instance; billing the smallest address",
                        extra={"instance_id": clip(iid),
                               "claimants": list(claimants[:_CLAIMANTS_LOGGED]),
                               "claimants_count": len(claimants),
                               "chosen": index.owners[iid].user_id})
        if index.unknown_roles and not self._index.unknown_roles:
            log.warning("account list has roles hostagent does not know; they were skipped",
                        extra={"count": index.unknown_roles})
        if index.skipped_accounts and not self._index.skipped_accounts:
            log.warning("account list has addresses that cannot be an owner id (empty, over "
                        "256 characters or with control characters); their instances are "
                        "unassigned", extra={"count": index.skipped_accounts})
        self._index, self._merged = index, merged

    def _refresh_ok(self) -> None:
        now = self._clock.now().wall_ns
        self._counts["refresh_ok"] += 1
        if self._state == "stale":
            log.info("account service answers again; owner index refreshed", extra={
                "stale_since": _iso(self._stale_since_ns), "index_size": len(self._merged)})
        elif self._state == "never":
            log.info("owner index loaded", extra={"index_size": len(self._index.owners),
                                                  "accounts": self._index.accounts})
        self._state, self._last_success_ns = "fresh", now
        self._stale_since_ns, self._last_error = None, None

    def _refresh_failed(self, error: str) -> None:
        self._counts["refresh_failed"] += 1
        self._last_error = error
        log.debug("owner index refresh failed", extra={"error": error})
        if self._state == "fresh":
            self._state, self._stale_since_ns = "stale", self._clock.now().wall_ns
            log.warning("account service refresh failed; serving the last known owners",
                        extra={"error": error, "stale_since": _iso(self._stale_since_ns)})
        elif self._state == "never" and self._counts["refresh_failed"] == 1:
            log.warning("account service unreachable; owners are unassigned until it answers",
                        extra={"error": error})

    async def _lookup_loop(self) -> None:
        spacing_s = 1.0 / self._cfg.lookups_per_s
        while True:
            due_ns = self._next_sweep_ns
            wait_s = 0.0 if due_ns is None else (due_ns - self._clock.now().monotonic_ns) / 1e9
            with trio.move_on_after(min(max(wait_s, 0.0), _SWEEP_MAX_S)):
                await self._wakeup.wait()
            self._wakeup = trio.Event()  # a resolve() from now on wakes the next wait
            self.sweep()
            while self._pending:
                iid = next(iter(self._pending))
                build_id = self._pending.pop(iid)
                self._inflight = iid
                try:
                    await self.lookup_once(iid, build_id)
                except Exception:
                    self._counts["unexpected_errors"] += 1
                    log.exception("owner lookup failed unexpectedly",
                                  extra={"instance_id": clip(iid)})
                finally:
                    self._inflight = None
                await trio.sleep(spacing_s)

    def sweep(self) -> None:
        """Expire lookups (negatives forgotten, positives due) and forget long-gone instances."""
        now = self._clock.now().monotonic_ns
        # A positive entry due for a whole further ttl_s was not resolved again: gone.
        ttl_ns = int(self._cfg.ttl_s * 1e9)
        forget_ns = now - ttl_ns
        if self._rotated_ns is None:
            self._rotated_ns = now
        elif now - self._rotated_ns >= _FORGET_AFTER_S * 1e9:
            # Two generations: an instance resolved within the last hour keeps its history.
            self._last_old, self._last, self._rotated_ns = self._last, {}, now
        next_ns = self._rotated_ns + int(_FORGET_AFTER_S * 1e9)
        for iid, entry in list(self._lookups.items()):
            if entry.expires_ns <= now:
                if entry.owner is None or entry.expires_ns <= forget_ns:
                    del self._lookups[iid]
                    self._due.discard(iid)
                    if iid not in self._index.owners:
                        self._merged.pop(iid, None)
                    continue
                if iid not in self._pending and iid != self._inflight:
                    self._due.add(iid)
                next_ns = min(next_ns, entry.expires_ns + ttl_ns)  # forgotten then
            else:
                next_ns = min(next_ns, entry.expires_ns)
        self._next_sweep_ns = next_ns

    def _store(self, instance_id: str, entry: _Lookup) -> None:
        self._lookups[instance_id] = entry
        if self._next_sweep_ns is not None:
            self._next_sweep_ns = min(self._next_sweep_ns, entry.expires_ns)

    async def lookup_once(self, instance_id: str, build_id: str | None) -> None:
        """Ask the service about one instance and cache the answer (positive or negative)."""
        assert self._client is not None
        client = self._client
        try:
            record = None
            if build_id is not None:
                found = await client.get_by_build_id(build_id)
                record = next((r for r in found if r.instance_id == instance_id), None)
            if record is None and client.can_sign:
                record = await client.get_instance(instance_id)
        except OwnerLookupError as err:
            self._lookup_failed(instance_id, str(err))
            return
        if self._lookup_failing:
            self._lookup_failing = False
            log.info("owner point lookups work again")
        now = self._clock.now().monotonic_ns
        if record is None:
            self._counts["lookup_not_found"] += 1
            self._store(instance_id, _Lookup(None, now + int(self._cfg.negative_ttl_s * 1e9)))
            if instance_id not in self._index.owners:
                self._merged.pop(instance_id, None)
            return
        self._counts["lookup_ok"] += 1
        prev = self._lookups.get(instance_id)
        owner = (prev.owner if prev and prev.owner and prev.owner.user_id == record.instance_owner
                 else Owner(record.instance_owner, self._org, SERVICE_SOURCE))
        self._store(instance_id, _Lookup(owner, now + int(self._cfg.ttl_s * 1e9)))
        if instance_id not in self._index.owners:
            self._merged[instance_id] = owner

    def _lookup_failed(self, instance_id: str, error: str) -> None:
        self._counts["lookup_failed"] += 1
        now = self._clock.now().monotonic_ns
        prev = self._lookups.get(instance_id)
        # Keep a known owner (stale-while-error); either way, do not ask again for a while.
        self._store(instance_id, _Lookup(None if prev is None else prev.owner,
                                         now + int(self._cfg.negative_ttl_s * 1e9)))
        log.debug("owner lookup failed", extra={"instance_id": clip(instance_id),
                                                "error": error})
        if not self._lookup_failing:
            self._lookup_failing = True
            log.warning("owner point lookup failed; the instance stays as it is for now",
                        extra={"instance_id": clip(instance_id), "error": error,
                               "retry_after_s": self._cfg.negative_ttl_s})
