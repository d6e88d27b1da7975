"""API keys: `hak_<id>_<secret>`, stored as salted SHA-256 (never in clear), with scopes.

The secret is 32 random bytes, so a fast salted hash is enough: a slow KDF (scrypt) protects
guessable passwords, not 256-bit random keys, and would put ~50 ms of CPU on every request.

    python -m hostagent.api.keys new --principal portal --scope read --file keys.toml
    python -m hostagent.api.keys list --file keys.toml
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import secrets
import sys
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from hostagent.config.load import decode_utf8
from hostagent.errors import ConfigError
from hostagent.file_read import FileTooLarge, NotRegularFile, read_regular

PREFIX = "hak_"
SCOPES = ("read", "admin")
# No key may carry these (the owner of unowned instances); auth adds owners.unassigned.
RESERVED_PRINCIPALS = frozenset({"unassigned"})
# A key is ~200 bytes of TOML: far past any real keys file, a bound so that another file put
# at the path is refused instead of read whole.
MAX_KEYS_FILE_BYTES = 16 << 20


@dataclass(frozen=True, slots=True)
class StoredKey:
    """One key as the keys file holds it."""

    key_id: str
    principal: str
    scopes: frozenset[str]
    salt: bytes
    digest: bytes


def _digest(salt: bytes, secret: str) -> bytes:
    return hashlib.sha256(salt + secret.encode()).digest()


def new_key(principal: str, scopes: Sequence[str]) -> tuple[str, StoredKey]:
    """A fresh key: (the clear key to hand out once, the entry to store)."""
    if not principal.strip() or principal.strip().lower() in RESERVED_PRINCIPALS:
        raise ValueError(f"principal {principal!r} is empty or reserved")
    bad = [s for s in scopes if s not in SCOPES]
    if bad or not scopes:
        raise ValueError(f"scopes must be a non-empty subset of {SCOPES}, got {list(scopes)}")
    key_id = secrets.token_hex(4)
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_bytes(16)
    return (f"{PREFIX}{key_id}_{secret}",
            StoredKey(key_id, principal, frozenset(scopes), salt, _digest(salt, secret)))


def to_toml(k: StoredKey) -> str:
    """The `[[keys]]` table of one stored key."""
    scopes = ", ".join(f'"{s}"' for s in sorted(k.scopes))
    return (f'[[keys]]\nid = "{k.key_id}"\nprincipal = "{k.principal}"\nscopes = [{scopes}]\n'
            f'salt = "{k.salt.hex()}"\nsha256 = "{k.digest.hex()}"\n')


FIX = "write entries with `python -m hostagent.api.keys new --file FILE`"
TABLE_FIX = ("write each key as a [[keys]] table of id, principal, scopes, salt and sha256, as "
             "`python -m hostagent.api.keys new --principal NAME --scope read --file FILE` "
             "writes it")
SCOPES_FIX = 'write scopes = ["read"] or scopes = ["read", "admin"]'


def _read(path: str) -> bytes:
    """The keys file's bytes. Never blocks: a FIFO at the path is refused (opened
    non-blocking), where reading it hung check-config and start-up."""
    try:
        return read_regular(path, MAX_KEYS_FILE_BYTES)
    except NotRegularFile as err:
        raise ConfigError(path, "-", "a regular TOML keys file", "a directory or special file",
                          "point it at the TOML keys file (" + FIX + ")") from err
    except FileTooLarge as err:
        raise ConfigError(path, "-", f"a keys file of at most {MAX_KEYS_FILE_BYTES} bytes",
                          "a larger file", "point it at the TOML keys file (10,000 keys take "
                          "about 2 MB)") from err
    except OSError as err:
        raise ConfigError(path, "-", "a readable TOML keys file", err.strerror or str(err),
                          f"create it: {FIX}" if isinstance(err, FileNotFoundError)
                          else "point it at a regular file the daemon can read") from err


def load_keys(path: str) -> dict[str, StoredKey]:
    """Parse the keys file; every defect is a ConfigError naming the file and the entry."""
    text = decode_utf8(_read(path), path)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(path, "-", "valid TOML", str(err),
                          f"fix the syntax; {TABLE_FIX}") from err
    except ValueError as err:  # an integer past Python's 4,300 digits: not a TOMLDecodeError
        raise ConfigError(path, "-", "numbers of at most a few thousand digits", "a longer one",
                          f"a keys file holds no numbers; {TABLE_FIX}") from err
    except RecursionError as err:  # tomllib recurses once per nesting level
        raise ConfigError(path, "-", "TOML nested at most a few hundred levels deep",
                          "deeper nesting", TABLE_FIX) from err
    unknown = sorted(set(raw) - {"keys"})
    if unknown:  # another TOML file (the config?) named as the keys file
        raise ConfigError(path, unknown[0], "only [[keys]] tables", unknown[0],
                          f"is this the keys file? {FIX}")
    entries = raw.get("keys", [])
    if not isinstance(entries, list):
        raise ConfigError(path, "keys", "an array of [[keys]] tables", entries, TABLE_FIX)
    out: dict[str, StoredKey] = {}
    for i, e in enumerate(entries):
        where = f"keys[{i}]"
        if not isinstance(e, dict):
            raise ConfigError(path, where, "a [[keys]] table", e, TABLE_FIX)
        if not isinstance(e.get("scopes"), list) or not all(
                isinstance(sc, str) for sc in e["scopes"]):
            raise ConfigError(path, f"{where}.scopes", f"an array of scopes among {SCOPES}",
                              e.get("scopes"), SCOPES_FIX)
        try:
            k = StoredKey(str(e["id"]), str(e["principal"]), frozenset(e["scopes"]),
                          bytes.fromhex(e["salt"]), bytes.fromhex(e["sha256"]))
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(path, where, "id, principal, scopes, salt, sha256", e,
                              TABLE_FIX) from err
        if not k.principal.strip():
            raise ConfigError(path, f"{where}.principal", "a non-empty principal", k.principal,
                              'name who holds the key, e.g. principal = "portal"')
        if not k.scopes <= set(SCOPES) or not k.scopes:
            raise ConfigError(path, f"{where}.scopes", f"a subset of {SCOPES}", sorted(k.scopes),
                              SCOPES_FIX)
        if k.key_id in out:
            raise ConfigError(path, f"{where}.id", "a key id used once", k.key_id,
                              "remove the duplicate entry (only one can match a key)")
        out[k.key_id] = k
    return out


def verify(presented: str, keys: Mapping[str, StoredKey]) -> StoredKey | None:
    """The stored key a presented `hak_…` key matches, in constant time per candidate."""
    if not presented.startswith(PREFIX):
        return None
    key_id, sep, secret = presented[len(PREFIX):].partition("_")
    k = keys.get(key_id)
    if not sep or k is None:
        return None
    return k if hmac.compare_digest(_digest(k.salt, secret), k.digest) else None


def main(argv: Sequence[str] | None = None) -> int:
    """`new` appends a key to the file and prints the clear key once; `list` shows entries."""
    ap = argparse.ArgumentParser(prog="python -m hostagent.api.keys")
    sub = ap.add_subparsers(dest="cmd", required=True)
    n = sub.add_parser("new", help="create a key")
    n.add_argument("--principal", required=True)
    n.add_argument("--scope", action="append", choices=SCOPES, required=True)
    n.add_argument("--file", help="keys file to append to (created 0600); else print the entry")
    ls = sub.add_parser("list", help="list key ids, principals and scopes")
    ls.add_argument("--file", required=True)
    args = ap.parse_args(argv)
    if args.cmd == "list":
        try:
            listed = load_keys(args.file)
        except ConfigError as err:
            print(f"hostagent: {err}", file=sys.stderr)
            return 2
        for k in listed.values():
            print(f"{k.key_id}\t{k.principal}\t{','.join(sorted(k.scopes))}")
        return 0
    try:
        clear, stored = new_key(args.principal, args.scope)
    except ValueError as err:
        ap.error(str(err))
    if args.file:
        fd = os.open(args.file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a") as f:
            f.write("\n" + to_toml(stored))
        print(f"key id {stored.key_id} added to {args.file}", file=sys.stderr)
    else:
        print(to_toml(stored), file=sys.stderr)
    print(clear)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
