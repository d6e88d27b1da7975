"""Damage found by a sweep of odd state files (real stores, the real CLI): the webhook tables
are checked like the outbox's (refused, never re-created empty; no traceback), an outcome the
store cannot record pauses the endpoint instead of POSTing again in a loop, and a dangling
symbolic link at the state path gets the store where it points."""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from hostagent.cli.main import main
from hostagent.clock import SystemClock
from hostagent.config.sinks import BreakerConfig, RetryConfig, WebhookSinkConfig
from hostagent.delivery.sinks.webhook import WebhookDispatcher
from hostagent.errors import StateCorrupt
from hostagent.store.webhooks import WebhookStore
from tests.clocks import FakeClock
from tests.standins.queue import usage_event
from tests.standins.webhook_receiver import WebhookReceiver
from tests.store.test_guard import config, used_store
from tests.store.test_refusals import refusal

FAST = RetryConfig(max_retries=0, initial_backoff_s=0.05, max_backoff_s=0.05, multiplier=1.0,
                   jitter=0.0, round_backoff_max_s=0.05)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def webhook_config(tmp: Path) -> Path:
    cfg = config(tmp)
    cfg.write_text(cfg.read_text() + '[[sinks]]\ntype = "webhook"\nname = "hooks"\n')
    return cfg


def store_with_a_webhook(tmp: Path, clock: FakeClock) -> tuple[Path, str]:
    """A used store whose webhook tables hold a registration and one pending delivery."""
    path = tmp / "state.db"
    used_store(path, clock)
    hooks = WebhookStore(path, clock)
    reg = hooks.register("http://192.0.2.1:9/x", ["metrics"])
    assert hooks.fan_out(usage_event("i0", 0)) == 1
    hooks.close()
    return path, reg.id


def damage(path: Path, sql: str) -> str:
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as c:
        c.execute(sql)
    return hashlib.sha256(path.read_bytes()).hexdigest()


TABLE_DAMAGE = {
    "deliveries dropped": "DROP TABLE webhook_deliveries",
    "registrations dropped": "DROP TABLE webhooks",
    "a column dropped": "ALTER TABLE webhook_deliveries DROP COLUMN last_error",
    "event types not JSON": "UPDATE webhooks SET event_types = 'nope'",
    "event types not a list": "UPDATE webhooks SET event_types = '{\"a\": 1}'",
}


@pytest.mark.parametrize("sql", TABLE_DAMAGE.values(), ids=TABLE_DAMAGE.keys())
def test_damaged_webhook_tables_are_refused_never_recreated(
        tmp_path: Path, clock: FakeClock, capsys: pytest.CaptureFixture[str], sql: str) -> None:
    # A dropped table was re-created empty at start (what endpoints were owed, silently
    # gone); a dropped column made every record fail in a tight loop; a registration's bad
    # event types ended `run` with a traceback.
    path, _ = store_with_a_webhook(tmp_path, clock)
    digest = damage(path, sql)
    cfg = str(webhook_config(tmp_path))
    with pytest.raises(StateCorrupt, match="store reset"):
        WebhookStore(path, clock)
    for command in (["run", "--once"], ["store", "check"], ["outbox", "status"]):
        assert main([*command, "--config", cfg]) == 2, command
        line = refusal(capsys)
        assert str(path) in line and "hostagent store reset" in line, (command, line)
    assert main(["check-config", cfg]) == 2
    refusal(capsys)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert main(["store", "reset", "--config", cfg]) == 0  # accepted as broken, moved aside
    assert not path.exists()


@pytest.mark.parametrize("sql", [
    "UPDATE webhook_deliveries SET body = CAST(body AS TEXT)",
    "UPDATE webhook_deliveries SET body = 5",
    "UPDATE webhook_deliveries SET attempts = 'many'",
], ids=["body text", "body integer", "attempts text"])
def test_a_damaged_delivery_row_is_a_store_error_not_a_crash(
        tmp_path: Path, clock: FakeClock, sql: str) -> None:
    # A TEXT body raised TypeError (a traceback from `run`), an INTEGER one was sent as that
    # many NUL bytes, a TEXT attempt count raised TypeError while recording.
    path, wid = store_with_a_webhook(tmp_path, clock)
    damage(path, sql)
    hooks = WebhookStore(path, clock)
    try:
        with pytest.raises(StateCorrupt, match=rf"{path}: webhook delivery .*damaged"):
            hooks.due(wid, 10, 2**62)
    finally:
        hooks.close()


@contextlib.asynccontextmanager
async def stuck_on_an_unrecordable_row(path: Path) -> AsyncIterator[
        tuple[WebhookReceiver, WebhookDispatcher]]:
    """A running webhook dispatcher (cancelled on exit) whose one row cannot be marked
    delivered (a column dropped under it; a full disk does the same), after its first POST;
    (the receiver, the dispatcher)."""
    receiver = WebhookReceiver().start()
    hooks = WebhookStore(path, SystemClock())
    try:
        hooks.register(receiver.url, ["metrics"])
        assert hooks.fan_out(usage_event("i0", 0)) == 1
        damage(path, "ALTER TABLE webhook_deliveries DROP COLUMN done_ns")
        cfg = WebhookSinkConfig(allow_list=("127.0.0.1",), retry=FAST, timeout_s=2.0,
                                breaker=BreakerConfig(failure_threshold=3, reset_timeout_s=60))
        dispatcher = WebhookDispatcher(cfg, hooks, SystemClock())
        async with trio.open_nursery() as nursery:
            await nursery.start(dispatcher.run)
            with trio.fail_after(10):  # the first POST (a loaded machine may take a while)
                while not receiver.received:  # noqa: ASYNC110 - the receiver is a thread
                    await trio.sleep(0.01)
            yield receiver, dispatcher
            nursery.cancel_scope.cancel()
    finally:
        hooks.close()
        receiver.stop()


async def test_an_outcome_the_store_cannot_record_pauses_the_endpoint(
        tmp_path: Path, clock: FakeClock) -> None:
    # The receiver answers 200, but the row cannot be marked delivered: the row stayed due,
    # and the endpoint got the same event again in a tight loop, thousands of POSTs a second.
    path = tmp_path / "state.db"
    used_store(path, clock)
    async with stuck_on_an_unrecordable_row(path) as (receiver, _):
        await trio.sleep(1.5)
    assert len(receiver.received) <= 3  # one POST a pause (drain.STORE_ERROR_PAUSE_S)


def test_a_dangling_link_at_the_state_path_gets_the_store_where_it_points(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Linking the new store into place over the link failed as "a state store appeared while
    # this one was being created; try again", at every start (exit 1).
    target = tmp_path / "data" / "real.db"
    target.parent.mkdir()
    os.symlink(target, tmp_path / "state.db")
    cfg = str(config(tmp_path))
    assert main(["run", "--once", "--config", cfg]) == 0, capsys.readouterr().err
    assert (tmp_path / "state.db").is_symlink() and target.is_file()
    assert (tmp_path / "state.db.id").is_file()
    assert not list(target.parent.glob("*.new*"))
    assert main(["store", "check", "--config", cfg]) == 0
