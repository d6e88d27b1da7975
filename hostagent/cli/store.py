"""`hostagent store check | reset`: the explicit way out of a broken state store.

Both open the store read-only, with every check start-up makes (`hostagent.store.opening`):
they write, create and delete nothing, so any user who may read the store may run them.
`reset` renames files in the store's directory: run it as the service user (`runuser -u
hostagent --`) or root.

The daemon refuses to start on a store that is empty, truncated, foreign, from a newer schema,
damaged, or gone while its marker remains (`hostagent.store.guard`): it never starts billing
from nothing on its own. `store reset` is the operator's decision to do so: it moves the store,
its WAL and its marker aside (``state.db.broken-<UTC time>``), says what was lost as far as
the old file can still be read (pending events, baselines), and the next start creates a fresh
store. A healthy store, or one a running daemon still writes to, is reset only with --force.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hostagent.cli.terminal import one_line
from hostagent.clock import SystemClock
from hostagent.config import preflight
from hostagent.config.load import Config
from hostagent.errors import ForeignLog, StateCorrupt, StateError
from hostagent.store import guard, opening
from hostagent.store.outbox import Store
from hostagent.store.schema import SCHEMA_VERSION

# A delivery heartbeat younger than this says a daemon is using the store right now.
LIVE_HEARTBEAT_S = 60.0
EXIT_REFUSED = 2


def add_parser(subparsers: Any, parents: Sequence[Any] = ()) -> None:
    """Add `store` and its subcommands to the main parser's subparsers."""
    p = subparsers.add_parser("store", parents=list(parents),
                              help="check the state store, or move a broken one aside")
    sub = p.add_subparsers(dest="store_command", required=True)
    sub.add_parser("check", parents=list(parents),
                   help="run every start-up check on the state store, read-only (it "
                        "writes, creates and deletes nothing)")
    rs = sub.add_parser("reset", parents=list(parents),
                        help="move a broken state store aside so the next start begins afresh")
    rs.add_argument("--force", action="store_true",
                    help="also reset a healthy store, or one a running daemon uses")


def _open_existing(path: Path, node_id: str) -> Store:
    """The store opened read-only, every start-up check made: nothing written or created."""
    return Store.open(path, clock=SystemClock(), node_id=node_id, sink_names=(), create=False,
                      register_sinks=False, upgrade=False, read_only=True)


def check_store(cfg: Config) -> str:
    """`check-config`'s look at the store: what start-up would refuse but the integrity
    check, read-only and without creating any file (`opening.peek`); StateCorrupt when
    start-up would refuse it. Returns a short note."""
    path = Path(cfg.collector.state_path)
    if not guard.before_open(path):
        return "no state store yet (created at the first start)"
    try:
        opening.peek(path)
    except StateCorrupt:
        raise
    except StateError as err:  # e.g. no permission to read it as this user
        return f"state store not checked ({err})"
    return "state store OK"


def run(args: argparse.Namespace, cfg: Config) -> int:
    """Run one `store` subcommand; a symbolic link loop at `collector.state_path` is a
    ConfigError (exit 2), as in `run`."""
    preflight.check_store_reachable(cfg.source, cfg.collector.state_path)
    if args.store_command == "check":  # every start-up check, the integrity check included
        path = Path(cfg.collector.state_path)
        opening.check_reachable(path)  # a symlink loop: an error, not "no store yet"
        if not guard.before_open(path):
            print(f"{path}: no state store yet (created at the first start)")
            return 0
        store = _open_existing(path, cfg.host.node_id)
        store.close()
        older = ("" if store.schema_version == SCHEMA_VERSION else
                 f" (schema version {store.schema_version}: the daemon upgrades it to "
                 f"{SCHEMA_VERSION} when it next starts)")
        print(f"{path}: state store OK{older}")
        return 0
    return reset(Path(cfg.collector.state_path), cfg.host.node_id, force=args.force)


def _fail(message: str, status: int) -> int:
    print(f"hostagent: {one_line(message)}", file=sys.stderr)
    return status


def reset(path: Path, node_id: str, *, force: bool) -> int:
    """Move the store at `path` aside (see the module doc); the exit status. Refusals and
    errors go to stderr, one line each; what was moved and lost to stdout."""
    marker = guard.marker_path(path)
    try:  # a symlink loop on the way reads as "not there" to Path.exists: never "nothing"
        opening.check_reachable(path)
    except StateError as err:
        return _fail(f"{err}; not resetting a store that cannot be inspected", 1)
    if not path.exists() and not path.is_symlink() and not marker.exists():
        print(f"{path}: no state store here; nothing to reset")
        return 0
    if (holder := guard.held_by(path)) is not None:  # --force too: it would go on billing
        return _fail(f"{path}: refusing to reset: {holder} is running on this store; stop it "
                     "first (it would go on committing to the store moved aside)", EXIT_REFUSED)
    problem: str | None = None
    heartbeat_ns: int | None = None
    try:
        store = _open_existing(path, node_id)
    except ForeignLog as err:  # the store is intact: moving it aside would lose it for nothing
        if not force:
            return _fail(f"{err}; refusing to reset (pass --force to set the store aside "
                         "anyway)", EXIT_REFUSED)
        problem = str(err)
    except StateCorrupt as err:
        problem = str(err)
    except StateError as err:
        return _fail(f"{err}; not resetting a store that cannot be inspected", 1)
    else:
        try:
            heartbeat_ns = opening.heartbeat_ns(path, store.meta())
        except StateError as err:  # changed since it was opened: damaged after all
            problem = str(err)
        finally:
            store.close()
    now_ns = SystemClock().now().wall_ns
    if problem is None and not force:
        live = heartbeat_ns is not None and now_ns - heartbeat_ns < LIVE_HEARTBEAT_S * 1e9
        why = "a daemon is using it (delivery heartbeat is recent)" if live else "it is healthy"
        return _fail(f"{path}: refusing to reset: {why}; pass --force to reset it anyway (its "
                     "baselines and pending events are then lost)", EXIT_REFUSED)
    lost = guard.inspect(path) if path.is_file() and path.stat().st_size > 0 else None
    try:
        moved = guard.move_aside(path, now_ns)
    except StateError as err:
        return _fail(str(err), 1)
    print(f"{path}: moved aside: " + ", ".join(str(m) for m in moved))
    if problem:
        print(f"reason: {problem}")
    if lost is None:
        print("lost: the store file was gone or empty; what it held is unknown")
    else:
        def n(v: int | None) -> str:
            return "unknown" if v is None else str(v)

        print(f"lost: {n(lost.pending_events)} pending event(s) "
              f"({n(lost.pending_deliveries)} pending deliveries), {n(lost.baselines)} "
              "baseline(s)" + (f"; partly unreadable: {lost.error}" if lost.error else ""))
    print("the next start creates a fresh store; instances seen before are billed from then on "
          "(or from their start with collector.count_preexisting)")
    return 0
