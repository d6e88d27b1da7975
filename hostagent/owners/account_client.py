"""httpx client for Formation's account service (form-state) and its response parsers.

Every request has one overall deadline (`timeout_s`, covering a server that drips its body)
and a body cap (`max_response_bytes`, checked against Content-Length and while streaming).
Every field read from a response is type-checked; anything unexpected becomes an
`OwnerLookupError` whose message names the JSON path (`accounts[3].owned_instances[0]`).

::

    OwnerLookupError   the service is down, slow, refused us (401/403), answered 5xx,
                       or sent a body that is too big, not JSON, success:false or ill-typed

Parsers are pure (`parse_*`) so the owner index can be built in a worker thread.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import quote

import httpx
import orjson
import trio

from hostagent.clock import Clock
from hostagent.config.schema import OwnersConfig
from hostagent.errors import OwnerLookupError
from hostagent.owners.signing import Signer

ROLES: Final = frozenset({"Owner", "Manager", "Operator", "ReadOnly"})
_ADDRESS = re.compile(r"(?:0[xX])?[0-9a-fA-F]{40}")
_SNIPPET_BYTES = 200


def normalize_address(address: str) -> str:
    """An Ethereum-style address as form-state prints it (lowercase, no 0x); others unchanged."""
    address = address.strip()
    if _ADDRESS.fullmatch(address):
        return address[-40:].lower()
    return address


@dataclass(frozen=True, slots=True)
class Account:
    """The parts of a form-state account the owner index uses."""

    address: str
    owned_instances: tuple[str, ...] = ()
    authorized_instances: Mapping[str, str] = field(default_factory=dict)
    is_global_admin: bool = False


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    """The parts of a form-state instance the owner lookup uses."""

    instance_id: str
    instance_owner: str
    build_id: str | None = None
    node_id: str | None = None
    status: str | None = None


@dataclass(frozen=True, slots=True)
class AccountList:
    """A validated `account/list` answer; `unknown_roles` counts role strings we skipped."""

    accounts: tuple[Account, ...]
    unknown_roles: int = 0


# --- pure parsers ---------------------------------------------------------------------------


def _bad(where: str, expected: str, found: object) -> OwnerLookupError:
    shown = type(found).__name__ if not isinstance(found, str | int | bool) else repr(found)
    return OwnerLookupError(f"{where}: expected {expected}, found {shown[:80]}")


def _json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as err:
        raise OwnerLookupError(f"malformed JSON ({err}): {_snippet(body)}") from err


def _snippet(body: bytes) -> str:
    return body[:_SNIPPET_BYTES].decode("utf-8", "replace")


def _envelope(doc: Any) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise _bad("body", "a JSON object", doc)
    ok = doc.get("success")
    if ok is not True:
        err = doc.get("error")
        if ok is False:
            raise OwnerLookupError(f"success: false: {str(err)[:_SNIPPET_BYTES]}")
        raise _bad("success", "true", ok)
    return doc


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise _bad(where, "a non-empty string", value)
    return value


def _opt_str(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _bad(where, "a string or null", value)
    return value


def parse_account(raw: Any, where: str = "account") -> tuple[Account, int]:
    """One account object → (Account, number of unknown roles skipped)."""
    if not isinstance(raw, dict):
        raise _bad(where, "an object", raw)
    address = normalize_address(_str(raw.get("address"), f"{where}.address"))
    owned_raw = raw.get("owned_instances")
    owned: tuple[str, ...] = ()
    if owned_raw is not None:  # serde(default): absent means empty
        if not isinstance(owned_raw, list):
            raise _bad(f"{where}.owned_instances", "an array", owned_raw)
        owned = tuple(_str(v, f"{where}.owned_instances[{i}]") for i, v in enumerate(owned_raw))
    auth_raw = raw.get("authorized_instances")
    auth: dict[str, str] = {}
    unknown = 0
    if auth_raw is not None:
        if not isinstance(auth_raw, dict):
            raise _bad(f"{where}.authorized_instances", "an object", auth_raw)
        for iid, role in auth_raw.items():
            if not isinstance(role, str):
                raise _bad(f"{where}.authorized_instances[{iid!r}]", "a role string", role)
            if role in ROLES:
                auth[iid] = role
            else:  # a role added upstream later must not stop billing
                unknown += 1
    admin = raw.get("is_global_admin", False)
    if admin is None:
        admin = False
    if not isinstance(admin, bool):
        raise _bad(f"{where}.is_global_admin", "true or false", admin)
    return Account(address, owned, auth, admin), unknown


def parse_account_list(body: bytes) -> AccountList:
    """`GET account/list` body → validated accounts; OwnerLookupError on anything off."""
    doc = _envelope(_json(body))
    raw = doc.get("accounts")
    if not isinstance(raw, list):
        raise _bad("accounts", "an array", raw)
    total = doc.get("total")
    if total is not None and (isinstance(total, bool) or total != len(raw)):
        # form-state sets total = len(accounts): a mismatch means a cut or mangled body.
        raise _bad("total", f"{len(raw)} (the number of accounts)", total)
    accounts: list[Account] = []
    unknown = 0
    for i, item in enumerate(raw):
        acct, skipped = parse_account(item, f"accounts[{i}]")
        accounts.append(acct)
        unknown += skipped
    return AccountList(tuple(accounts), unknown)


def parse_instance(raw: Any, where: str = "instance") -> InstanceRecord:
    """One form-state Instance object → InstanceRecord."""
    if not isinstance(raw, dict):
        raise _bad(where, "an object", raw)
    status = raw.get("status")
    return InstanceRecord(
        instance_id=_str(raw.get("instance_id"), f"{where}.instance_id"),
        instance_owner=normalize_address(_str(raw.get("instance_owner"),
                                              f"{where}.instance_owner")),
        build_id=_opt_str(raw.get("build_id"), f"{where}.build_id"),
        node_id=_opt_str(raw.get("node_id"), f"{where}.node_id"),
        status=status if isinstance(status, str) else None,  # an enum upstream; informative only
    )


def parse_instance_get(body: bytes) -> InstanceRecord:
    """`GET instance/<id>/get` 200 body → InstanceRecord."""
    return parse_instance(_envelope(_json(body)).get("instance"))


def parse_by_build_id(body: bytes) -> tuple[InstanceRecord, ...]:
    """`GET instance/<build_id>/get_by_build_id` body (`{"Success": {"List": [...]}}`)."""
    doc = _json(body)
    if isinstance(doc, dict) and "Failure" in doc:
        raise OwnerLookupError(f"Failure: {str(doc['Failure'])[:_SNIPPET_BYTES]}")
    ok = doc.get("Success") if isinstance(doc, dict) else None
    items = ok.get("List") if isinstance(ok, dict) else None
    if not isinstance(items, list):
        raise _bad("Success.List", "an array", items if ok is not None else doc)
    return tuple(parse_instance(v, f"Success.List[{i}]") for i, v in enumerate(items))


# --- the client -----------------------------------------------------------------------------


class AccountClient:
    """Talks to form-state; every method raises OwnerLookupError and nothing else on faults."""

    def __init__(self, cfg: OwnersConfig, clock: Clock, signer: Signer | None = None, *,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._cfg = cfg
        self._clock = clock
        self._signer = signer
        self._prefix = "/" + cfg.prefix.strip("/") if cfg.prefix.strip("/") else ""
        self._http = httpx.AsyncClient(
            base_url=cfg.url.rstrip("/"), timeout=httpx.Timeout(cfg.timeout_s),
            transport=transport, follow_redirects=False, trust_env=False,
            headers={"Accept": "application/json", "User-Agent": "hostagent"},
        )

    @property
    def can_sign(self) -> bool:
        """Whether signed routes (instance get/list) can be used."""
        return self._signer is not None

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    def path(self, *segments: str) -> str:
        """The URL path of a route, each segment percent-quoted."""
        return self._prefix + "".join("/" + quote(s, safe="") for s in segments)

    async def get(self, path: str, *, signed: bool = False) -> tuple[int, bytes]:
        """GET `path` → (status, body) within the deadline and size cap."""
        headers: dict[str, str] = {}
        if signed:
            if self._signer is None:
                raise OwnerLookupError(f"{path} needs a signature and no owners.key_file is set")
            headers = self._signer.header_for("GET", path, self._clock.now().wall_ns // 10**9)
        # One deadline for the whole exchange: httpx's per-read timeout alone lets a server
        # that drips a byte every few seconds hold the request forever.
        with trio.move_on_after(self._cfg.timeout_s):
            try:
                return await self._fetch(path, headers)
            except httpx.HTTPError as err:
                raise OwnerLookupError(f"GET {path}: {type(err).__name__}: {err}") from err
        raise OwnerLookupError(f"GET {path}: no complete answer within {self._cfg.timeout_s}s")

    async def _fetch(self, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
        cap = self._cfg.max_response_bytes
        async with self._http.stream("GET", path, headers=headers) as resp:
            declared = resp.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > cap:
                raise OwnerLookupError(f"GET {path}: body of {declared} bytes exceeds "
                                       f"max_response_bytes={cap}")
            chunks: list[bytes] = []
            size = 0
            async for chunk in resp.aiter_bytes():
                size += len(chunk)
                if size > cap:
                    raise OwnerLookupError(f"GET {path}: body exceeds max_response_bytes={cap}")
                chunks.append(chunk)
            return resp.status_code, b"".join(chunks)

    def _expect_ok(self, path: str, status: int, body: bytes) -> None:
        if status != 200:
            detail = _snippet(body)
            try:
                doc = orjson.loads(body)
                if isinstance(doc, dict) and isinstance(doc.get("error"), str):
                    detail = doc["error"][:_SNIPPET_BYTES]
            except orjson.JSONDecodeError:
                pass
            raise OwnerLookupError(f"GET {path}: HTTP {status}: {detail}")

    async def fetch_account_list(self) -> bytes:
        """Raw body of `account/list` (parse with `parse_account_list`, e.g. in a thread)."""
        path = self.path("account", "list")
        status, body = await self.get(path)
        self._expect_ok(path, status, body)
        return body

    async def list_accounts(self) -> AccountList:
        """All accounts (unsigned: form-state answers 127.0.0.1 without a signature)."""
        return parse_account_list(await self.fetch_account_list())

    async def get_account(self, address: str) -> Account | None:
        """One account by exact address; None when the service says it does not exist."""
        path = self.path("account", address, "get")
        status, body = await self.get(path)
        if status == 404:
            return None
        self._expect_ok(path, status, body)
        return parse_account(_envelope(_json(body)).get("account"))[0]

    async def get_instance(self, instance_id: str) -> InstanceRecord | None:
        """One instance (signed request); None when unknown (404)."""
        path = self.path("instance", instance_id, "get")
        status, body = await self.get(path, signed=True)
        if status == 404:
            return None
        self._expect_ok(path, status, body)
        record = parse_instance_get(body)
        if record.instance_id != instance_id:
            raise _bad("instance.instance_id", repr(instance_id), record.instance_id)
        return record

    async def get_by_build_id(self, build_id: str) -> tuple[InstanceRecord, ...]:
        """Every instance of a build (the VM name a Formation host sees); unsigned."""
        path = self.path("instance", build_id, "get_by_build_id")
        status, body = await self.get(path)
        self._expect_ok(path, status, body)
        return parse_by_build_id(body)
