"""The account-service client against the stand-in: routes, signatures, bad input, faults."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import orjson
import pytest

from hostagent.config.schema import OwnersConfig
from hostagent.errors import OwnerLookupError
from hostagent.owners.account_client import AccountClient
from hostagent.owners.accounts import (
    normalize_address,
    parse_account_list,
    parse_by_build_id,
    parse_instance_get,
)
from hostagent.owners.signing import Signer
from tests.clocks import FakeClock
from tests.standins.accounts import AccountService, account, instance, serve_accounts

NODE_KEY = Signer(bytes.fromhex("11" * 32))
OTHER_KEY = Signer(bytes.fromhex("22" * 32))
ALICE = "a1" * 20
BOB = "b0" * 20


@pytest.fixture
def svc() -> Iterator[AccountService]:
    accounts = [account(ALICE, ["i-1", "i-2"], {"i-3": "Manager"}),
                account(BOB, ["i-3"], {"i-1": "ReadOnly"})]
    instances = [instance("i-1", ALICE, build_id="b" * 64), instance("i-3", BOB)]
    with serve_accounts(accounts, instances, admins={NODE_KEY.address}) as s:
        yield s


def client(svc: AccountService, signer: Signer | None = NODE_KEY, **kw: object) -> AccountClient:
    opts: dict[str, object] = {"enabled": True, "url": svc.url, "prefix": svc.prefix,
                               "timeout_s": 1.0, **kw}
    return AccountClient(OwnersConfig(**opts), FakeClock(), signer)  # type: ignore[arg-type]


async def test_account_list_unsigned(svc: AccountService) -> None:
    c = client(svc, signer=None)
    listing = await c.list_accounts()
    await c.aclose()
    assert [a.address for a in listing.accounts] == [ALICE, BOB]
    assert listing.accounts[0].owned_instances == ("i-1", "i-2")
    assert dict(listing.accounts[1].authorized_instances) == {"i-1": "ReadOnly"}
    assert svc.seen("account_list")[0].signer is None


async def test_account_get_and_unknown(svc: AccountService) -> None:
    c = client(svc, signer=None)
    got = await c.get_account(BOB)
    assert got is not None
    assert got.owned_instances == ("i-3",)
    assert await c.get_account("ff" * 20) is None
    await c.aclose()


async def test_signed_instance_get_as_admin(svc: AccountService) -> None:
    c = client(svc)
    rec = await c.get_instance("i-3")
    assert rec is not None
    assert rec.instance_owner == BOB
    assert rec.status == "Started"
    assert await c.get_instance("i-unknown") is None
    await c.aclose()
    seen = svc.seen("instance_get")
    assert {r.signer for r in seen} == {NODE_KEY.address}
    assert seen[0].status == 200


async def test_instance_routes_require_a_signature_even_locally(svc: AccountService) -> None:
    async with httpx.AsyncClient() as raw:
        resp = await raw.get(f"{svc.url}/v1/instance/i-1/get")
    assert resp.status_code == 401
    assert resp.json() == {"error": "Missing signature"}
    c = client(svc, signer=None)
    with pytest.raises(OwnerLookupError, match="needs a signature"):
        await c.get_instance("i-1")
    await c.aclose()


async def test_wrong_key_is_rejected(svc: AccountService) -> None:
    c = client(svc, signer=OTHER_KEY)
    with pytest.raises(OwnerLookupError, match="403"):
        await c.get_instance("i-1")
    await c.aclose()
    assert svc.seen("instance_get")[-1].signer == OTHER_KEY.address
    # A signature that does not verify at all is refused too.
    bad = NODE_KEY.sign(b"GET /v1/instance/i-1/get 1")
    sig, recid, msg = bad[len("Signature "):].split(".")
    mangled = f"Signature {'00' * 32}{sig[64:]}.{recid}.{msg}"
    async with httpx.AsyncClient() as raw:
        resp = await raw.get(f"{svc.url}/v1/instance/i-1/get",
                             headers={"Authorization": mangled})
    assert resp.status_code == 401


async def test_non_admin_signer_sees_only_its_instances(svc: AccountService) -> None:
    bob = Signer(bytes.fromhex("33" * 32))
    svc.set_accounts([account(bob.address, ["i-3"]), account(ALICE, ["i-1"])])
    c = client(svc, signer=bob)
    rec = await c.get_instance("i-3")
    assert rec is not None
    with pytest.raises(OwnerLookupError, match="permission"):
        await c.get_instance("i-1")
    await c.aclose()


async def test_get_by_build_id_is_open(svc: AccountService) -> None:
    c = client(svc, signer=None)
    found = await c.get_by_build_id("b" * 64)
    assert [r.instance_id for r in found] == ["i-1"]
    assert await c.get_by_build_id("c" * 64) == ()
    await c.aclose()


async def test_unprefixed_service() -> None:
    with serve_accounts([account(ALICE, ["i-1"])], prefix="") as svc:
        c = client(svc, signer=None)
        assert (await c.list_accounts()).accounts[0].address == ALICE
        await c.aclose()
        c = client(svc, signer=None, prefix="/v1")
        with pytest.raises(OwnerLookupError, match="404"):
            await c.list_accounts()
        await c.aclose()


async def test_ids_are_quoted_in_paths(svc: AccountService) -> None:
    svc.add_instance(instance("odd/id ?#", BOB))
    c = client(svc)
    rec = await c.get_instance("odd/id ?#")
    assert rec is not None
    assert rec.instance_id == "odd/id ?#"
    await c.aclose()


# --- bad input: a corpus of bodies the parser must refuse with a clear message ---------------

def _body(doc: object) -> bytes:
    return orjson.dumps(doc)


LIST_CORPUS: list[tuple[bytes, str]] = [
    (b"", "malformed JSON"),
    (b"<html>502 Bad Gateway</html>", "malformed JSON"),
    (b'{"success": true, "accounts": [', "malformed JSON"),
    (b"\xff\xfe", "malformed JSON"),
    (_body([]), "body: expected a JSON object"),
    (_body({"success": False, "error": "db locked"}), "success: false: db locked"),
    (_body({"success": "true", "accounts": []}), "success: expected true"),
    (_body({"accounts": []}), "success: expected true"),
    (_body({"success": True}), "accounts: expected an array"),
    (_body({"success": True, "accounts": {"a": 1}}), "accounts: expected an array"),
    (_body({"success": True, "accounts": [1]}), "accounts[0]: expected an object"),
    (_body({"success": True, "accounts": [{}]}), "accounts[0].address"),
    (_body({"success": True, "accounts": [{"address": 7}]}), "accounts[0].address"),
    (_body({"success": True, "accounts": [{"address": ""}]}), "accounts[0].address"),
    (_body({"success": True, "accounts": [{"address": "x", "owned_instances": "i-1"}]}),
     "accounts[0].owned_instances: expected an array"),
    (_body({"success": True, "accounts": [{"address": "x", "owned_instances": [1]}]}),
     "accounts[0].owned_instances[0]"),
    (_body({"success": True, "accounts": [{"address": "x", "authorized_instances": []}]}),
     "accounts[0].authorized_instances: expected an object"),
    (_body({"success": True, "accounts": [{"address": "x",
                                           "authorized_instances": {"i": 3}}]}),
     "authorized_instances['i']"),
    (_body({"success": True, "accounts": [{"address": "x", "is_global_admin": "no"}]}),
     "is_global_admin"),
    (_body({"success": True, "accounts": [], "total": 5}), "total: expected 0"),
    (_body({"success": True, "accounts": [], "total": "0"}), "total"),
]


@pytest.mark.parametrize(("body", "message"), LIST_CORPUS)
def test_account_list_corpus(body: bytes, message: str) -> None:
    with pytest.raises(OwnerLookupError) as info:
        parse_account_list(body)
    assert message in str(info.value)


def test_account_list_tolerates_defaults_unknown_roles_and_extra_fields() -> None:
    listing = parse_account_list(_body({"success": True, "total": 2, "accounts": [
        {"address": "0x" + ALICE.upper(), "owned_instances": None, "credits": 5, "new": {}},
        {"address": BOB, "authorized_instances": {"i-1": "Billing", "i-2": "Operator"}},
    ]}))
    assert listing.accounts[0].address == ALICE
    assert listing.accounts[0].owned_instances == ()
    assert dict(listing.accounts[1].authorized_instances) == {"i-2": "Operator"}
    assert listing.unknown_roles == 1


@pytest.mark.parametrize(("body", "message"), [
    (_body({"success": True}), "instance: expected an object"),
    (_body({"success": True, "instance": {"instance_id": "i"}}), "instance.instance_owner"),
    (_body({"success": True, "instance": {"instance_id": 1, "instance_owner": "a"}}),
     "instance.instance_id"),
    (_body({"success": True, "instance": {"instance_id": "i", "instance_owner": "a",
                                          "build_id": 5}}), "instance.build_id"),
])
def test_instance_corpus(body: bytes, message: str) -> None:
    with pytest.raises(OwnerLookupError, match=message.replace(".", r"\.")):
        parse_instance_get(body)


@pytest.mark.parametrize(("body", "message"), [
    (_body({"Failure": {"reason": None}}), "Failure"),
    (_body({"Success": {"Some": {}}}), "Success.List"),
    (_body({"Success": {"List": [{"instance_id": "i"}]}}), r"Success\.List\[0\]"),
    (_body([1]), "Success.List"),
])
def test_by_build_id_corpus(body: bytes, message: str) -> None:
    with pytest.raises(OwnerLookupError, match=message):
        parse_by_build_id(body)


def test_normalize_address() -> None:
    assert normalize_address("0x" + "AB" * 20) == "ab" * 20
    assert normalize_address(" " + "ab" * 20) == "ab" * 20
    assert normalize_address("alice") == "alice"
    assert normalize_address("0x" + "ab" * 19) == "0x" + "ab" * 19


# --- faults over real HTTP ----------------------------------------------------------------------

@pytest.mark.parametrize(("kind", "params", "message"), [
    ("http", {"status": 503}, "HTTP 503: simulated failure"),
    ("http", {"status": 500}, "HTTP 500"),
    ("garbage", {}, "malformed JSON"),
    ("success_false", {}, "success: false: simulated"),
    ("wrong_types", {}, "accounts[0].owned_instances: expected an array"),
    ("reset", {}, "RemoteProtocolError"),
    ("body", {"status": 200, "body": b"null"}, "body: expected a JSON object"),
])
async def test_faults_become_owner_lookup_errors(svc: AccountService, kind: str,
                                                 params: dict[str, object],
                                                 message: str) -> None:
    svc.set_fault(kind, **params)
    c = client(svc, signer=None)
    with pytest.raises(OwnerLookupError) as info:
        await c.list_accounts()
    await c.aclose()
    assert message in str(info.value)


@pytest.mark.parametrize("declare_length", [True, False])
async def test_huge_body_is_refused_at_the_cap(svc: AccountService,
                                               declare_length: bool) -> None:
    svc.set_fault("huge", size_bytes=50 * 1024 * 1024, declare_length=declare_length)
    c = client(svc, signer=None, max_response_bytes=64 * 1024)
    t0 = time.monotonic()
    with pytest.raises(OwnerLookupError, match="max_response_bytes=65536"):
        await c.list_accounts()
    await c.aclose()
    assert time.monotonic() - t0 < 1.0


@pytest.mark.parametrize("kind", ["slow", "drip"])
async def test_slow_or_dripping_service_hits_the_deadline(svc: AccountService,
                                                         kind: str) -> None:
    svc.set_fault(kind, delay_s=0.2 if kind == "drip" else 5.0)
    c = client(svc, signer=None, timeout_s=0.4)
    t0 = time.monotonic()
    with pytest.raises(OwnerLookupError, match=r"no complete answer within 0\.4s"):
        await c.list_accounts()
    await c.aclose()
    assert 0.35 < time.monotonic() - t0 < 1.0


async def test_down_service_is_an_owner_lookup_error(svc: AccountService) -> None:
    svc.stop()
    c = client(svc, signer=None)
    with pytest.raises(OwnerLookupError, match="ConnectError"):
        await c.list_accounts()
    svc.start()
    assert len((await c.list_accounts()).accounts) == 2
    await c.aclose()
