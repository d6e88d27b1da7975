"""Form-state's account and instance documents: pure, type-checked parsers and their types.

Every field read from a response is type-checked; anything unexpected becomes an
`OwnerLookupError` whose message names the JSON path (`accounts[3].owned_instances[0]`). Pure
(no I/O) so the owner index can be built in a worker thread and tested without a server.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from hostagent.errors import OwnerLookupError
from hostagent.model import MAX_OWNER_ID_CHARS, usable_owner_id
from hostagent.owners import json_stream

ROLES: Final = frozenset({"Owner", "Manager", "Operator", "ReadOnly"})
_ADDRESS = re.compile(r"(?:0[xX])?[0-9a-fA-F]{40}")
SNIPPET_BYTES = 200
CLIP_CHARS = 120  # of an id or a path quoted in an error message


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
    """A validated `account/list` answer; `unknown_roles` counts role strings we skipped,
    `skipped` the accounts whose address cannot be an owner id (`usable_owner_id`)."""

    accounts: tuple[Account, ...]
    unknown_roles: int = 0
    skipped: int = 0


# --- pure parsers ---------------------------------------------------------------------------


def bad_field(where: str, expected: str, found: object) -> OwnerLookupError:
    shown = type(found).__name__ if not isinstance(found, str | int | bool) else repr(found)
    return OwnerLookupError(f"{where}: expected {expected}, found {shown[:80]}")


def json_body(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as err:
        raise OwnerLookupError(f"malformed JSON ({err}): {snippet(body)}") from err


def clip(text: str, limit: int = CLIP_CHARS) -> str:
    """`text` cut to `limit` characters for an error message, saying how long it was: a
    2 MB instance id once became a 2 MB log line and /health `last_error`."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...({len(text)} characters)"


def one_line(text: str) -> str:
    """The first SNIPPET_BYTES characters of a server's text, on one line: whitespace runs
    become one space and other control characters escapes (an HTML error page, an ESC)."""
    flat = " ".join(text[:SNIPPET_BYTES].split())
    if flat.isprintable():
        return flat
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in flat)


def snippet(body: bytes) -> str:
    return one_line(body[:SNIPPET_BYTES].decode("utf-8", "replace"))


def envelope(doc: Any) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise bad_field("body", "a JSON object", doc)
    ok = doc.get("success")
    if ok is not True:
        err = doc.get("error")
        if ok is False:
            raise OwnerLookupError(f"success: false: {one_line(str(err))}")
        raise bad_field("success", "true", ok)
    return doc


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise bad_field(where, "a non-empty string", value)
    return value


def _opt_str(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise bad_field(where, "a string or null", value)
    return value


def parse_account(raw: Any, where: str = "account") -> tuple[Account, int]:
    """One account object → (Account, number of unknown roles skipped)."""
    if not isinstance(raw, dict):
        raise bad_field(where, "an object", raw)
    address = normalize_address(_str(raw.get("address"), f"{where}.address"))
    owned_raw = raw.get("owned_instances")
    owned: tuple[str, ...] = ()
    if owned_raw is not None:  # serde(default): absent means empty
        if not isinstance(owned_raw, list):
            raise bad_field(f"{where}.owned_instances", "an array", owned_raw)
        owned = tuple(_str(v, f"{where}.owned_instances[{i}]") for i, v in enumerate(owned_raw))
    auth_raw = raw.get("authorized_instances")
    auth: dict[str, str] = {}
    unknown = 0
    if auth_raw is not None:
        if not isinstance(auth_raw, dict):
            raise bad_field(f"{where}.authorized_instances", "an object", auth_raw)
        for iid, role in auth_raw.items():
            if not isinstance(role, str):
                raise bad_field(f"{where}.authorized_instances[{clip(repr(iid))}]",
                                "a role string", role)
            if role in ROLES:
                auth[iid] = role
            else:  # a role added upstream later must not stop billing
                unknown += 1
    admin = raw.get("is_global_admin", False)
    if admin is None:
        admin = False
    if not isinstance(admin, bool):
        raise bad_field(f"{where}.is_global_admin", "true or false", admin)
    return Account(address, owned, auth, admin), unknown


def parse_account_list(body: bytes) -> AccountList:
    """`GET account/list` body → validated accounts; OwnerLookupError on anything off.

    The accounts are parsed one at a time as the body is read (owners/json_stream.py): the
    whole document is never built, only the accounts kept (16 MiB of accounts: a 277 MB peak
    parsed whole). The checks come in the order of a whole parse: JSON, the envelope, the
    array, `total`, then the first bad account."""
    accounts: list[Account] = []
    counts = [0, 0, 0]  # accounts seen, unknown roles, unusable addresses
    bad: list[OwnerLookupError] = []

    def on_item(i: int, item: Any) -> None:
        counts[0] += 1
        if bad:
            return  # the answer is refused: nothing more is kept
        try:
            acct, skipped = parse_account(item, f"accounts[{i}]")
        except OwnerLookupError as err:
            bad.append(err)
            accounts.clear()
            return
        if not usable_owner_id(acct.address):
            counts[2] += 1  # its instances are unassigned; the other accounts still count
            return
        accounts.append(acct)
        counts[1] += skipped

    def on_restart() -> None:  # "accounts" given twice: the last one counts
        accounts.clear()
        bad.clear()
        counts[:] = [0, 0, 0]

    try:
        got = json_stream.walk_object(body, "accounts", on_item, on_restart)
        if got is None:
            raise bad_field("body", "a JSON object", json_stream.loads(body))
    except json_stream.MalformedJson as err:
        raise OwnerLookupError(f"malformed JSON ({err}): {snippet(body)}") from err
    doc = envelope(got.members)
    if not got.array_seen:
        raise bad_field("accounts", "an array", doc.get("accounts"))
    total = doc.get("total")
    if total is not None and (isinstance(total, bool) or total != counts[0]):
        # form-state sets total = len(accounts): a mismatch means a cut or mangled body.
        raise bad_field("total", f"{counts[0]} (the number of accounts)", total)
    if bad:
        raise bad[0]
    return AccountList(tuple(accounts), counts[1], counts[2])


def check_owner_id(address: str, where: str) -> str:
    """`address` when it can be an owner id; OwnerLookupError naming `where` otherwise."""
    if not usable_owner_id(address):
        raise bad_field(where, f"an owner address (at most {MAX_OWNER_ID_CHARS} printable "
                        "characters)", f"{len(address)} characters" if len(address) > 80
                        else address)
    return address


def parse_instance(raw: Any, where: str = "instance") -> InstanceRecord:
    """One form-state Instance object → InstanceRecord."""
    if not isinstance(raw, dict):
        raise bad_field(where, "an object", raw)
    status = raw.get("status")
    return InstanceRecord(
        instance_id=_str(raw.get("instance_id"), f"{where}.instance_id"),
        instance_owner=check_owner_id(normalize_address(_str(
            raw.get("instance_owner"), f"{where}.instance_owner")), f"{where}.instance_owner"),
        build_id=_opt_str(raw.get("build_id"), f"{where}.build_id"),
        node_id=_opt_str(raw.get("node_id"), f"{where}.node_id"),
        status=status if isinstance(status, str) else None,  # an enum upstream; informative only
    )


def parse_instance_get(body: bytes) -> InstanceRecord:
    """`GET instance/<id>/get` 200 body → InstanceRecord."""
    return parse_instance(envelope(json_body(body)).get("instance"))


def parse_by_build_id(body: bytes) -> tuple[InstanceRecord, ...]:
    """`GET instance/<build_id>/get_by_build_id` body (`{"Success": {"List": [...]}}`)."""
    doc = json_body(body)
    if isinstance(doc, dict) and "Failure" in doc:
        raise OwnerLookupError(f"Failure: {one_line(str(doc['Failure']))}")
    ok = doc.get("Success") if isinstance(doc, dict) else None
    items = ok.get("List") if isinstance(ok, dict) else None
    if not isinstance(items, list):
        raise bad_field("Success.List", "an array", items if ok is not None else doc)
    return tuple(parse_instance(v, f"Success.List[{i}]") for i, v in enumerate(items))
