"""Owners.run against the stand-in: refresh, outages, point lookups, caches, never blocking."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager

import pytest
import trio

from hostagent.accounting.identity import formation_instance_id
from hostagent.clock import Clock, SystemClock
from hostagent.config.schema import OwnersConfig
from hostagent.model import Owner
from hostagent.owners.account_client import AccountClient
from hostagent.owners.resolver import Owners
from hostagent.owners.signing import Signer
from tests.clocks import FakeClock
from tests.concurrency import turns_of
from tests.standins.accounts import AccountService, account, instance, serve_accounts

ALICE, BOB = "a1" * 20, "b0" * 20
NODE_KEY = Signer(bytes.fromhex("11" * 32))


@pytest.fixture
def svc() -> Iterator[AccountService]:
    with serve_accounts([account(ALICE, ["i-1", "i-2"]), account(BOB, ["i-3"])],
                        admins={NODE_KEY.address}) as s:
        yield s


@asynccontextmanager
async def running(svc: AccountService, *, clock: Clock | None = None,
                  signer: Signer | None = None, **kw: object) -> AsyncIterator[Owners]:
    """Owners.run in a nursery, cancelled (and its client closed) on exit."""
    opts: dict[str, object] = {"enabled": True, "url": svc.url, "prefix": svc.prefix,
                               "timeout_s": 0.5, "refresh_s": 0.05, "lookups_per_s": 50.0,
                               **kw}
    cfg = OwnersConfig(**opts)  # type: ignore[arg-type]
    clock = clock or SystemClock()
    owners = Owners(cfg, clock, AccountClient(cfg, clock, signer))
    async with trio.open_nursery() as nursery:
        await nursery.start(owners.run)
        yield owners
        nursery.cancel_scope.cancel()


async def until(pred: Callable[[], bool], timeout_s: float = 5.0) -> None:
    with trio.fail_after(timeout_s):
        # Polling on purpose: the state changes in the stand-in's threads too.
        while not pred():  # noqa: ASYNC110
            await trio.sleep(0.01)


def state(owners: Owners) -> object:
    return owners.health()["state"]


async def test_outage_keeps_last_owner_and_new_instance_gets_owner_when_back(
        svc: AccountService, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="hostagent.owners.resolver")
    async with running(svc) as owners:
        await until(lambda: state(owners) == "fresh")
        assert owners.resolve("i-1", None) == Owner(ALICE, None, "account-service")

        svc.stop()  # the account service goes down
        await until(lambda: state(owners) == "stale")
        health = owners.health()
        assert isinstance(health["stale_since"], str)
        assert "ConnectError" in str(health["last_error"])
        await trio.sleep(0.3)  # several failed refreshes
        assert owners.resolve("i-1", None) == Owner(ALICE, None, "account-service")
        assert owners.resolve("i-new", None).user_id == "unassigned"

        svc.set_accounts([account(ALICE, ["i-1", "i-2"]), account(BOB, ["i-3", "i-new"])])
        svc.start()  # back, and it knows the new instance
        await until(lambda: state(owners) == "fresh")
        assert owners.resolve("i-new", None) == Owner(BOB, None, "account-service")
        assert owners.resolve("i-1", None).user_id == ALICE
        assert owners.health()["stale_since"] is None

    msgs = [r.msg for r in caplog.records]
    # Logs come once per state change, not once per failed refresh.
    assert msgs.count("account service refresh failed; serving the last known owners") == 1
    assert msgs.count("account service answers again; owner index refreshed") == 1
    change = next(r.__dict__ for r in caplog.records if r.msg == "owner changed")
    assert (change["instance_id"], change["old_user_id"], change["new_user_id"]) == (
        "i-new", "unassigned", BOB)


async def test_service_down_from_the_start_is_never_then_fresh(svc: AccountService) -> None:
    svc.stop()
    async with running(svc) as owners:
        await until(lambda: owners.health()["refresh_failed"] >= 2)  # type: ignore[operator]
        assert state(owners) == "never"
        assert owners.resolve("i-1", None).user_id == "unassigned"
        svc.start()
        await until(lambda: state(owners) == "fresh")
        assert owners.resolve("i-1", None).user_id == ALICE


@pytest.mark.parametrize("fault", ["slow", "down"])
async def test_resolve_never_blocks_while_the_service_is_slow_or_down(
        svc: AccountService, fault: str) -> None:
    async with running(svc, timeout_s=3.0, signer=NODE_KEY) as owners:
        await until(lambda: state(owners) == "fresh")
        if fault == "slow":
            svc.set_fault("slow", delay_s=2.0)
        else:
            svc.stop()
        await trio.sleep(0.2)  # a refresh is now in flight (slow) or has failed (down)
        refreshed = owners.health()["refresh_ok"]
        ids = [f"i-{n}" for n in range(1000)]
        t0 = time.perf_counter()
        for iid in ids:
            owners.resolve(iid, None)
        elapsed_s = time.perf_counter() - t0
        assert owners.resolve("i-1", None).user_id == ALICE
        assert owners.resolve("i-999", None).user_id == "unassigned"
        # 1,000 resolves in well under the time of one request to the service.
        assert elapsed_s < 0.05, elapsed_s
        assert owners.health()["refresh_ok"] == refreshed  # nothing completed meanwhile
        if fault == "slow":
            assert state(owners) == "fresh"
            svc.clear_fault()
        else:
            assert state(owners) == "stale"


@pytest.mark.parametrize(("kind", "params"), [
    ("garbage", {}), ("success_false", {}), ("wrong_types", {}), ("http", {"status": 502}),
    ("huge", {"size_bytes": 4 * 1024 * 1024, "declare_length": False}),
    ("reset", {}), ("drip", {"delay_s": 0.1}),
])
async def test_bad_answers_keep_the_cache_serving(
        svc: AccountService, caplog: pytest.LogCaptureFixture, kind: str,
        params: dict[str, object]) -> None:
    async with running(svc, max_response_bytes=1024 * 1024, timeout_s=0.3) as owners:
        await until(lambda: state(owners) == "fresh")
        svc.set_fault(kind, "account_list", **params)
        await until(lambda: owners.health()["refresh_failed"] >= 2)  # type: ignore[operator]
        assert state(owners) == "stale"
        assert owners.resolve("i-3", None).user_id == BOB
        assert owners.health()["last_error"]
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert warnings[0].__dict__["error"] == owners.health()["last_error"]
        svc.clear_fault()
        await until(lambda: state(owners) == "fresh")


async def test_unknown_instance_is_looked_up_signed_and_then_cached(svc: AccountService) -> None:
    svc.add_instance(instance("i-orphan", BOB))  # in instance state, in no account's list
    async with running(svc, signer=NODE_KEY, ttl_s=600.0) as owners:
        await until(lambda: state(owners) == "fresh")
        assert owners.resolve("i-orphan", None).user_id == "unassigned"
        await until(lambda: owners.resolve("i-orphan", None).user_id == BOB)
        assert dict(owners.authorized("i-orphan")) == {BOB: "Owner"}
        for _ in range(100):
            owners.resolve("i-orphan", None)
        await trio.sleep(0.1)
    lookups = svc.seen("instance_get")
    assert len(lookups) == 1
    assert lookups[0].signer == NODE_KEY.address


async def test_negative_cache_then_retry_after_negative_ttl(svc: AccountService) -> None:
    clock = FakeClock()
    async with running(svc, clock=clock, signer=NODE_KEY, negative_ttl_s=30.0) as owners:
        await until(lambda: state(owners) == "fresh")
        owners.resolve("i-ghost", None)
        await until(lambda: len(svc.seen("instance_get")) == 1)
        await until(lambda: owners.health()["lookup_not_found"] == 1)
        for _ in range(50):
            assert owners.resolve("i-ghost", None).user_id == "unassigned"
        await trio.sleep(0.2)
        assert len(svc.seen("instance_get")) == 1  # negative-cached
        svc.add_instance(instance("i-ghost", ALICE))
        clock.advance(31)
        owners.sweep()
        owners.resolve("i-ghost", None)
        await until(lambda: owners.resolve("i-ghost", None).user_id == ALICE)
        assert len(svc.seen("instance_get")) == 2


async def test_positive_lookup_expires_but_keeps_serving_when_the_service_fails(
        svc: AccountService) -> None:
    clock = FakeClock()
    svc.add_instance(instance("i-x", BOB))
    async with running(svc, clock=clock, signer=NODE_KEY, ttl_s=60.0,
                       negative_ttl_s=5.0) as owners:
        owners.resolve("i-x", None)
        await until(lambda: owners.resolve("i-x", None).user_id == BOB)
        svc.set_fault("http", "instance_get", status=503)
        clock.advance(61)
        owners.sweep()
        owners.resolve("i-x", None)  # due: re-asked in the background
        await until(lambda: owners.health()["lookup_failed"] == 1)
        assert owners.resolve("i-x", None).user_id == BOB  # stale-while-error
        await trio.sleep(0.1)
        assert owners.health()["lookup_failed"] == 1  # not hammered: waits negative_ttl_s
        clock.advance(200)  # nobody resolves i-x for longer than another ttl_s: gone
        owners.sweep()
        assert dict(owners.authorized("i-x")) == {}
        assert owners.health()["lookup_cache"] == 0


async def test_point_lookups_are_rate_limited(svc: AccountService) -> None:
    async with running(svc, signer=NODE_KEY, lookups_per_s=10.0) as owners:
        await until(lambda: state(owners) == "fresh")
        for n in range(30):
            owners.resolve(f"u-{n}", None)
        await trio.sleep(0.5)
        done = len(svc.seen("instance_get"))
    assert 3 <= done <= 7, done


async def test_formation_instance_found_by_build_id_without_a_key(svc: AccountService) -> None:
    node = "0123456789abcdef0123456789abcdef01234567"
    build_id = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
    iid = formation_instance_id(build_id, node)
    other = formation_instance_id(build_id, "ff" * 20)  # the same build on another node
    svc.add_instance(instance(other, ALICE, build_id=build_id, node_id="ff" * 20))
    svc.add_instance(instance(iid, BOB, build_id=build_id, node_id=node))
    async with running(svc) as owners:
        await until(lambda: state(owners) == "fresh")
        owners.resolve(iid, None, build_id=build_id)
        await until(lambda: owners.resolve(iid, None).user_id == BOB)
    assert len(svc.seen("by_build_id")) == 1
    assert svc.seen("instance_get") == []


async def test_the_lookup_task_wakes_when_an_entry_expires_not_every_second(
        svc: AccountService) -> None:
    # The real clock: an unknown instance is asked again once its negative entry expired
    # (the task sleeps until then), and nothing wakes trio while nothing expires.
    async with running(svc, signer=NODE_KEY, negative_ttl_s=1.0, refresh_s=3600.0) as owners:
        await until(lambda: state(owners) == "fresh")
        owners.resolve("i-ghost", None)
        await until(lambda: owners.health()["lookup_not_found"] == 1)
        svc.add_instance(instance("i-ghost", ALICE))
        t0 = trio.current_time()
        await until(lambda: owners.health()["lookup_cache"] == 0, timeout_s=3)  # swept
        assert 0.5 < trio.current_time() - t0 < 1.5
        owners.resolve("i-ghost", None)
        await until(lambda: owners.resolve("i-ghost", None).user_id == ALICE)
        await trio.sleep(0.2)  # the lookup's rate-limit spacing
        turns = await turns_of(functools.partial(trio.sleep, 2.5))  # swept each second: 3+
        assert turns <= 1, turns  # the sleep's own
