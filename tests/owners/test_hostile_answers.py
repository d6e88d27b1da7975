"""Answers of the account service a fuzzing pass found to leak into events or into the cache.

Each test runs `Owners.run` against the real stand-in (tests/standins/accounts.py) on 127.0.0.1.
"""

from __future__ import annotations

import logging

import pytest

from hostagent.accounting import events
from tests.owners.test_service import ALICE, BOB, NODE_KEY, running, state, until
from tests.standins.accounts import AccountService, account, instance, serve_accounts

HUGE = "x" * 2_000_000  # an owner id every event of its instance would carry


@pytest.mark.parametrize("address", [HUGE, "\x1b[2J\nforged line", "a" * 257,
                                     "\u202eevil", "  "])
async def test_an_unusable_account_address_is_skipped_not_billed(
        address: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="hostagent.owners.resolver")
    with serve_accounts([account(address, ["i-1"]), account(ALICE, ["i-2"])],
                        admins={NODE_KEY.address}) as svc:
        async with running(svc) as owners:
            await until(lambda: state(owners) == "fresh")
            # Before: the 2 MB address was i-1's owner, and each usage event 2 MB.
            assert owners.resolve("i-1", None).user_id == "unassigned"
            assert owners.resolve("i-2", None).user_id == ALICE  # the rest of the list counts
            assert owners.health()["accounts_skipped"] == 1
    assert sum("cannot be an owner id" in r.getMessage() for r in caplog.records) == 1


async def test_an_unusable_instance_owner_from_a_point_lookup_is_not_billed() -> None:
    with serve_accounts([account(ALICE, ["i-2"])], [instance("i-9", HUGE)],
                        admins={NODE_KEY.address}) as svc:
        async with running(svc, signer=NODE_KEY) as owners:
            await until(lambda: state(owners) == "fresh")
            owners.resolve("i-9", None)
            await until(lambda: owners.health()["lookup_failed"] == 1)
            assert owners.resolve("i-9", None).user_id == "unassigned"  # before: the 2 MB id
            assert owners.health()["lookup_ok"] == 0


async def test_a_usable_owner_keeps_usage_events_small() -> None:
    """The impact measured: one event of an instance owned by the 2 MB address."""
    from tests.alerts.test_rules_index import usage

    with serve_accounts([account(HUGE, ["vm-1"])]) as svc:
        async with running(svc) as owners:
            await until(lambda: state(owners) == "fresh")
            ev = events.build_usage_event(usage(), owners.resolve("vm-1", None), "node-1",
                                          time_format="unix")
    assert len(ev.payload) < 2_000  # before: 2,000,653 bytes


async def test_retain_forgets_a_looked_up_owner_while_account_list_fails() -> None:
    """account/list refused (e.g. 401 to a non-local peer), signed point lookups working."""
    with serve_accounts([], [instance("i-x", BOB)], admins={NODE_KEY.address}) as svc:
        await _moved_while_off(svc)


async def _moved_while_off(svc: AccountService) -> None:
    svc.set_fault("http", "account_list", status=401)
    async with running(svc, signer=NODE_KEY, ttl_s=600.0) as owners:
        owners.resolve("i-x", None)
        await until(lambda: owners.resolve("i-x", None).user_id == BOB)
        owners.retain(set())  # i-x stopped: its lookup is forgotten
        assert owners.health()["lookup_cache"] == 0
        # The owner moves while the VM is off; the VM starts again.
        svc.set_accounts([account(ALICE, ["i-x"])])
        with svc.lock:
            svc.instances = [instance("i-x", ALICE)]
        # Before: BOB again, from a table nothing expired, for as long as account/list failed
        # (and the table kept one owner per VM ever seen).
        assert owners.resolve("i-x", None).user_id == "unassigned"
        await until(lambda: owners.resolve("i-x", None).user_id == ALICE)
        assert len(svc.seen("instance_get")) == 2
