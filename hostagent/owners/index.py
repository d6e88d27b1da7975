"""The owner index: instance → billing owner and roles, built from one account listing.

Pure: no I/O, no clock. `Owners` (in `owners`) builds one per refresh in a worker thread with
`index_from_body` and swaps it in. The billing owner of an instance is the account whose
`owned_instances` lists it; if several do, the smallest address wins (`Owners` logs it); with
no owning account, an `Owner` role in `authorized_instances` is used the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from hostagent.model import Owner
from hostagent.owners.accounts import Account, parse_account_list

SERVICE_SOURCE: Final = "account-service"


@dataclass(frozen=True, slots=True)
class OwnerIndex:
    """instance → billing owner and instance → {address: role}, from one account listing."""

    owners: Mapping[str, Owner]
    roles: Mapping[str, Mapping[str, str]]
    conflicts: Mapping[str, tuple[str, ...]]
    accounts: int = 0
    unknown_roles: int = 0
    skipped_accounts: int = 0  # addresses that cannot be an owner id (model.usable_owner_id)


EMPTY_INDEX: Final = OwnerIndex({}, {}, {})


def build_index(accounts: Iterable[Account], *, org_id: str | None = None,
                unknown_roles: int = 0, skipped_accounts: int = 0) -> OwnerIndex:
    """Pure: the owner index of a list of accounts (deterministic for any account order)."""
    claims: dict[str, set[str]] = {}
    roles: dict[str, dict[str, str]] = {}
    n = 0
    for acct in accounts:
        n += 1
        for iid in acct.owned_instances:
            claims.setdefault(iid, set()).add(acct.address)
            roles.setdefault(iid, {})[acct.address] = "Owner"
        for iid, role in acct.authorized_instances.items():
            roles.setdefault(iid, {}).setdefault(acct.address, role)
    for iid, by_addr in roles.items():
        if iid not in claims:
            holders = {a for a, r in by_addr.items() if r == "Owner"}
            if holders:
                claims[iid] = holders
    interned: dict[str, Owner] = {}
    owners: dict[str, Owner] = {}
    conflicts: dict[str, tuple[str, ...]] = {}
    for iid, addrs in claims.items():
        addr = min(addrs)
        if len(addrs) > 1:
            conflicts[iid] = tuple(sorted(addrs))
        owner = interned.get(addr)
        if owner is None:  # one Owner object per address keeps resolve's identity check cheap
            owner = interned[addr] = Owner(addr, org_id, SERVICE_SOURCE)
        owners[iid] = owner
    frozen_roles = {iid: MappingProxyType(r) for iid, r in roles.items()}
    return OwnerIndex(owners, frozen_roles, conflicts, n, unknown_roles, skipped_accounts)


def index_from_body(body: bytes, org_id: str | None = None) -> OwnerIndex:
    """Parse, validate and index an `account/list` body (run it in a worker thread)."""
    listing = parse_account_list(body)
    return build_index(listing.accounts, org_id=org_id, unknown_roles=listing.unknown_roles,
                       skipped_accounts=listing.skipped)
