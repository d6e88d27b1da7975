"""Owner index (pure) and the resolution chain: metadata hint → account service → unassigned."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hostagent.config.schema import OwnersConfig
from hostagent.errors import ConfigError
from hostagent.model import Owner, OwnerHint
from hostagent.owners.account_client import AccountClient
from hostagent.owners.accounts import Account
from hostagent.owners.index import build_index
from hostagent.owners.resolver import Owners, make_client
from tests.clocks import FakeClock
from tests.standins.accounts import AccountService, account, serve_accounts

ALICE, BOB, CAROL = "a1" * 20, "b0" * 20, "c2" * 20


def test_index_owned_and_authorized_roles() -> None:
    idx = build_index([
        Account(ALICE, ("i-1", "i-2"), {"i-3": "Manager"}),
        Account(BOB, ("i-3",), {"i-1": "ReadOnly", "i-2": "Operator"}),
    ], org_id="org-x")
    assert idx.owners["i-1"] == Owner(ALICE, "org-x", "account-service")
    assert idx.owners["i-3"].user_id == BOB
    assert dict(idx.roles["i-1"]) == {ALICE: "Owner", BOB: "ReadOnly"}
    assert dict(idx.roles["i-3"]) == {BOB: "Owner", ALICE: "Manager"}
    assert idx.conflicts == {}
    assert idx.accounts == 2
    # One Owner object per address: the pass compares owners by identity first.
    assert idx.owners["i-1"] is idx.owners["i-2"]


def test_index_owned_wins_over_an_authorized_role_of_the_same_account() -> None:
    idx = build_index([Account(ALICE, ("i-1",), {"i-1": "ReadOnly"})])
    assert dict(idx.roles["i-1"]) == {ALICE: "Owner"}


def test_index_falls_back_to_an_authorized_owner_role() -> None:
    idx = build_index([Account(BOB, (), {"i-9": "Owner"}), Account(ALICE, (), {"i-9": "Manager"})])
    assert idx.owners["i-9"].user_id == BOB
    idx = build_index([Account(BOB, (), {"i-9": "Manager"})])
    assert "i-9" not in idx.owners
    assert dict(idx.roles["i-9"]) == {BOB: "Manager"}


ACCOUNTS = [Account(CAROL, ("i-1", "i-2")), Account(ALICE, ("i-1",)),
            Account(BOB, ("i-2", "i-3"), {"i-1": "Operator"})]


@given(st.permutations(ACCOUNTS))
def test_index_is_deterministic_for_any_order(accounts: list[Account]) -> None:
    idx = build_index(accounts)
    assert {i: o.user_id for i, o in idx.owners.items()} == {"i-1": ALICE, "i-2": BOB,
                                                              "i-3": BOB}
    assert idx.conflicts == {"i-1": (ALICE, CAROL), "i-2": (BOB, CAROL)}
    assert dict(idx.roles["i-1"]) == {CAROL: "Owner", ALICE: "Owner", BOB: "Operator"}


# --- the resolution chain --------------------------------------------------------------------


def test_disabled_owners_use_hints_then_unassigned() -> None:
    owners = Owners(OwnersConfig(enabled=False, default_org_id="acme"), FakeClock(), None)
    hint = OwnerHint("u-1", None, "metadata:nova")
    assert owners.resolve("i-1", hint) == Owner("u-1", "acme", "metadata:nova")
    assert owners.resolve("i-1", OwnerHint("u-1", "o-1", "metadata:hostagent")) == Owner(
        "u-1", "o-1", "metadata:hostagent")
    assert owners.resolve("i-2", None) == Owner("unassigned", "acme", "unassigned")
    assert owners.resolve("i-2", OwnerHint(None, "o-2", "metadata:hostagent")) == Owner(
        "unassigned", "o-2", "unassigned")
    assert owners.health()["state"] == "disabled"
    assert dict(owners.authorized("i-1")) == {}


def test_unassigned_name_is_configurable_and_org_none_without_default() -> None:
    owners = Owners(OwnersConfig(unassigned="nobody"), FakeClock(), None)
    assert owners.resolve("i-1", None) == Owner("nobody", None, "unassigned")


async def test_make_client_with_and_without_a_key(tmp_path: Path) -> None:
    assert make_client(OwnersConfig(enabled=False), FakeClock()) is None
    c = make_client(OwnersConfig(enabled=True), FakeClock())
    assert c is not None
    assert not c.can_sign
    await c.aclose()
    key = tmp_path / "node.key"
    key.write_text("11" * 32)
    key.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        make_client(OwnersConfig(enabled=True, key_file=str(key)), FakeClock(), "ha.toml")
    key.chmod(0o600)
    c = make_client(OwnersConfig(enabled=True, key_file=str(key)), FakeClock(), "ha.toml")
    assert c is not None
    assert c.can_sign
    await c.aclose()


@pytest.fixture
def svc() -> Iterator[AccountService]:
    with serve_accounts([account(ALICE, ["i-1", "i-2"], {"i-3": "Operator"}),
                         account(BOB, ["i-3"])]) as s:
        yield s


def owners_for(svc: AccountService, **kw: object) -> tuple[Owners, AccountClient]:
    opts: dict[str, object] = {"enabled": True, "url": svc.url, "prefix": svc.prefix,
                               "timeout_s": 1.0, **kw}
    cfg = OwnersConfig(**opts)  # type: ignore[arg-type]
    client = AccountClient(cfg, FakeClock())
    return Owners(cfg, FakeClock(), client), client


async def test_metadata_hint_wins_over_the_index(svc: AccountService) -> None:
    owners, client = owners_for(svc)
    assert await owners.refresh_once()
    assert owners.resolve("i-1", None) == Owner(ALICE, None, "account-service")
    hint = OwnerHint("tenant-7", "proj-7", "metadata:nova")
    assert owners.resolve("i-1", hint) == Owner("tenant-7", "proj-7", "metadata:nova")
    # A hint with only an org keeps the service's user and adds the org.
    assert owners.resolve("i-3", OwnerHint(None, "proj-3", "metadata:hostagent")) == Owner(
        BOB, "proj-3", "account-service")
    assert owners.resolve("i-404", None).user_id == "unassigned"
    assert dict(owners.authorized("i-3")) == {BOB: "Owner", ALICE: "Operator"}
    assert owners.health()["state"] == "fresh"
    assert owners.health()["index_size"] == 3
    await client.aclose()


async def test_ownership_change_is_logged_with_old_and_new(
        svc: AccountService, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="hostagent.owners.resolver")
    owners, client = owners_for(svc)
    await owners.refresh_once()
    assert owners.resolve("i-2", None).user_id == ALICE
    assert owners.resolve("i-2", None).user_id == ALICE
    assert not [r for r in caplog.records if r.msg == "owner changed"]
    svc.set_accounts([account(ALICE, ["i-1"]), account(BOB, ["i-2", "i-3"])])
    await owners.refresh_once()
    assert owners.resolve("i-2", None).user_id == BOB
    changes = [r for r in caplog.records if r.msg == "owner changed"]
    assert len(changes) == 1
    rec = changes[0].__dict__
    assert (rec["instance_id"], rec["old_user_id"], rec["new_user_id"]) == ("i-2", ALICE, BOB)
    assert owners.resolve("i-2", None).user_id == BOB
    assert len([r for r in caplog.records if r.msg == "owner changed"]) == 1
    await client.aclose()


async def test_conflicting_owners_pick_the_smallest_and_log_once(
        svc: AccountService, caplog: pytest.LogCaptureFixture) -> None:
    svc.set_accounts([account(CAROL, ["i-1"]), account(ALICE, ["i-1"])])
    owners, client = owners_for(svc)
    await owners.refresh_once()
    await owners.refresh_once()
    assert owners.resolve("i-1", None).user_id == ALICE
    warned = [r for r in caplog.records if r.msg.startswith("several accounts own")]
    assert len(warned) == 1
    assert warned[0].__dict__["claimants"] == [ALICE, CAROL]
    assert owners.health()["conflicts"] == 1
    await client.aclose()


async def test_retain_forgets_gone_instances(svc: AccountService) -> None:
    owners, client = owners_for(svc)
    await owners.refresh_once()
    for iid in ("i-1", "i-2", "gone-1", "gone-2"):
        owners.resolve(iid, None, build_id="ab" * 32)
    assert owners.health()["pending_lookups"] == 2  # the unknown ones, queued for lookup
    owners.retain({"i-1"})
    assert owners.health()["pending_lookups"] == 0
    assert owners.resolve("i-1", None).user_id == ALICE
    await client.aclose()


def test_change_history_survives_one_rotation_then_is_forgotten(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="hostagent.owners.resolver")
    clock = FakeClock()
    owners = Owners(OwnersConfig(), clock, None)
    owners.sweep()
    owners.resolve("i-1", OwnerHint("u-a", None, "metadata:nova"))
    clock.advance(3601)
    owners.sweep()  # rotation: i-1 is now in the older generation
    owners.resolve("i-1", OwnerHint("u-b", None, "metadata:nova"))
    changes = [r.__dict__ for r in caplog.records if r.msg == "owner changed"]
    assert [(c["old_user_id"], c["new_user_id"]) for c in changes] == [("u-a", "u-b")]
    owners.resolve("i-2", OwnerHint("u-a", None, "metadata:nova"))
    for _ in range(2):  # i-2 not resolved for two rotations: forgotten
        clock.advance(3601)
        owners.sweep()
    owners.resolve("i-2", OwnerHint("u-c", None, "metadata:nova"))
    assert len([r for r in caplog.records if r.msg == "owner changed"]) == 1
