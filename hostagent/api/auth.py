"""Who is asking: JWTs (allow-listed algorithms, `exp` required, aud/iss) and hashed API keys.

Every refusal is a 401 Problem carrying `WWW-Authenticate: Bearer …` (RFC 6750). Keys are
bound to an algorithm family, so an RSA public key can never be used as an HMAC secret
(the HS/RS confusion attack) and `alg: none` is never in the allow-list.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import jwt
import orjson
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from hostagent.api import keys as keys_mod
from hostagent.api.problems import Problem
from hostagent.api.token_shape import shape_error
from hostagent.config.schema import ApiConfig
from hostagent.errors import ConfigError
from hostagent.file_read import read_regular
from hostagent.owners.accounts import normalize_address

FAMILIES = {
    "HS256": "hmac", "HS384": "hmac", "HS512": "hmac",
    "RS256": "rsa", "RS384": "rsa", "RS512": "rsa",
    "PS256": "rsa", "PS384": "rsa", "PS512": "rsa",
    "ES256": "ec", "ES384": "ec", "ES512": "ec", "ES256K": "ec",
    "EdDSA": "okp",
}
REALM = 'Bearer realm="hostagent"'
T = TypeVar("T")
# [api] keys that `Authenticator.reload` applies live (the rest of [api] needs a restart).
CREDENTIAL_KEYS = ("jwt_algorithms", "jwt_keys_file", "jwks_file", "jwt_hmac_secret_file",
                   "jwt_audience", "jwt_issuer", "jwt_leeway_s", "jwt_admin_claim",
                   "api_keys_file", "admin_principals")


def reserved_principals(unassigned: str = "unassigned") -> frozenset[str]:
    """The normalised principals no credential may carry: the owner of instances whose owner is
    unknown (`unassigned` and the configured owners.unassigned), whose holder would read them."""
    return frozenset(normalize_address(p).lower()
                     for p in keys_mod.RESERVED_PRINCIPALS | {unassigned})


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: `subject` is compared with instance owners/authorized users.

    `subject` is normalised like owners (`normalize_address`: 40 lowercase hex, no 0x)."""

    subject: str
    scopes: frozenset[str]
    kind: str  # "jwt" | "api_key" | "anonymous"

    @property
    def is_admin(self) -> bool:
        """Admins read every instance and manage webhooks and rules."""
        return "admin" in self.scopes


@dataclass(frozen=True, slots=True)
class VerifyKey:
    """A verification key, its family and optional `kid`."""

    family: str
    key: Any
    kid: str | None


def _family_of(key: Any) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return "rsa"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "ec"
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return "okp"
    raise ValueError(f"unsupported key type {type(key).__name__}")


MIN_RSA_BITS = 2048
MIN_HMAC_BYTES = 32
# A PEM key, a JWKS or a secret is kilobytes: a bound, so another file put at the path (a
# device, a log) is refused instead of read whole.
KEY_FILE_MAX_BYTES = 16 << 20


def key_weakness(family: str, key: Any) -> str | None:
    """Why a verification key is too weak to trust, or None."""
    if family == "rsa" and key.key_size < MIN_RSA_BITS:
        return f"an RSA key of {key.key_size} bits (at least {MIN_RSA_BITS})"
    if family == "hmac" and len(key) < MIN_HMAC_BYTES:
        return f"an HMAC secret of {len(key)} bytes (at least {MIN_HMAC_BYTES})"
    return None


def load_pem_keys(path: str) -> list[VerifyKey]:
    """Every `-----BEGIN PUBLIC KEY-----` block in a PEM file."""
    try:
        text = read_regular(path, KEY_FILE_MAX_BYTES).decode()
        blocks = [b + "-----END PUBLIC KEY-----\n"
                  for b in text.split("-----END PUBLIC KEY-----") if "-----BEGIN" in b]
        out = []
        for b in blocks:
            k = load_pem_public_key(b[b.index("-----BEGIN"):].encode())
            out.append(VerifyKey(_family_of(k), k, None))
    except (OSError, ValueError) as err:
        raise ConfigError(path, "api.jwt_keys_file", "PEM public keys", str(err)) from err
    for i, vk in enumerate(out):
        weak = key_weakness(vk.family, vk.key)
        if weak is not None:
            raise ConfigError(path, f"api.jwt_keys_file[{i}]", "a key strong enough to trust",
                              weak, "publish a longer key")
    return out


JWK_FAMILIES = {"RSA": "rsa", "EC": "ec", "OKP": "okp", "oct": "hmac"}


def load_jwks(path: str) -> list[VerifyKey]:
    """Every usable key of a JWKS document (keys with `use` other than `sig` are skipped).

    ConfigError (naming the entry) when the document is not `{"keys": [...]}`, an entry's `kty`
    is not one of RSA/EC/OKP/oct, or its parameters do not make a key (a bad `n`, `crv`, ...).
    """
    fix = "publish the issuer's JWKS as {\"keys\": [{\"kty\": ..., ...}]}"
    try:
        # orjson: strict JSON (no NaN/Infinity), and nesting past 1024 levels is an error,
        # where the stdlib's parser recurses until RecursionError.
        doc = orjson.loads(read_regular(path, KEY_FILE_MAX_BYTES))
    except OSError as err:
        raise ConfigError(path, "api.jwks_file", "a readable JSON JWKS document",
                          err.strerror or str(err), fix) from err
    except orjson.JSONDecodeError as err:
        raise ConfigError(path, "api.jwks_file", "a JSON JWKS document", str(err),
                          fix) from err
    keys = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(keys, list):
        raise ConfigError(path, "api.jwks_file.keys", "a list of JWKs",
                          type(keys).__name__, fix)
    out = []
    for i, raw in enumerate(keys):
        where = f"api.jwks_file.keys[{i}]"
        if not isinstance(raw, dict):
            raise ConfigError(path, where, "a JWK object", type(raw).__name__, fix)
        kty = raw.get("kty")
        if not isinstance(kty, str) or kty not in JWK_FAMILIES:
            raise ConfigError(path, f"{where}.kty", f"one of {sorted(JWK_FAMILIES)}", kty, fix)
        if raw.get("use", "sig") != "sig":
            continue
        try:
            k = jwt.PyJWK.from_dict(raw)
        except (jwt.PyJWTError, ValueError, TypeError, KeyError, AttributeError,
                IndexError) as err:
            raise ConfigError(path, where, f"a valid {raw['kty']} key", str(err), fix) from err
        fam = JWK_FAMILIES[str(k.key_type)]
        weak = key_weakness(fam, k.key)
        if weak is not None:
            raise ConfigError(path, where, "a key strong enough to trust", weak,
                              "publish a longer key")
        out.append(VerifyKey(fam, k.key, k.key_id))
    return out


def _unauthorized(detail: str, error: str | None = "invalid_token") -> Problem:
    challenge = REALM if error is None else f'{REALM}, error="{error}"'
    return Problem(401, detail, kind="unauthorized",
                   headers={"WWW-Authenticate": challenge})


@dataclass(frozen=True, slots=True)
class Credentials:
    """What the API trusts: swapped whole on reload, so a request sees one consistent set."""

    cfg: ApiConfig
    verify_keys: tuple[VerifyKey, ...]
    api_keys: Mapping[str, keys_mod.StoredKey]
    admins: frozenset[str]
    reserved: frozenset[str]


def load_credentials(cfg: ApiConfig, verify_keys: Sequence[VerifyKey] = (),
                     api_keys: Mapping[str, keys_mod.StoredKey] | None = None,
                     reserved: frozenset[str] = reserved_principals(),
                     source: str = "<config>") -> Credentials:
    """Read every key file `cfg` names (plus the given keys); defects are ConfigErrors.

    Each names `source` (the config file; a placeholder `preflight` fills in) and the [api]
    key that names the file, with the key file and its entry in what was expected.
    A key or admin principal that is reserved (`reserved_principals`) is a ConfigError."""
    unknown = [a for a in cfg.jwt_algorithms if a not in FAMILIES]
    if unknown:
        none = any(a.lower() == "none" for a in unknown)
        raise ConfigError(source, "api.jwt_algorithms", f"algorithms among {sorted(FAMILIES)}",
                          unknown, "remove `none`: unsigned tokens are never accepted" if none
                          else "use those names as written (case matters), e.g. RS256")
    vk = list(verify_keys)
    if cfg.jwt_keys_file:
        vk += _from_file(source, "api.jwt_keys_file", cfg.jwt_keys_file, load_pem_keys)
    if cfg.jwks_file:
        vk += _from_file(source, "api.jwks_file", cfg.jwks_file, load_jwks)
    if cfg.jwt_hmac_secret_file:
        vk.append(_from_file(source, "api.jwt_hmac_secret_file", cfg.jwt_hmac_secret_file,
                             load_hmac_secret))
    keys = dict(api_keys or {})
    if cfg.api_keys_file:
        keys.update(_from_file(source, "api.api_keys_file", cfg.api_keys_file,
                               keys_mod.load_keys))
    fix = ("`unassigned` and owners.unassigned name the owner of unowned instances; give the "
           "caller its own principal")
    for k in keys.values():
        if normalize_address(k.principal).lower() in reserved:
            raise ConfigError(source, "api.api_keys_file",
                              f"a principal that is not reserved (in {cfg.api_keys_file or '?'}, "
                              f"[keys] id = {k.key_id!r})", k.principal, fix)
    admins = frozenset(normalize_address(a) for a in cfg.admin_principals)
    clash = sorted(a for a in admins if a.lower() in reserved)
    if clash:
        raise ConfigError(source, "api.admin_principals", "principals that are not reserved",
                          clash, fix)
    return Credentials(cfg, tuple(vk), keys, admins, reserved)


def load_hmac_secret(path: str) -> VerifyKey:
    """The HMAC secret in `path` (surrounding whitespace stripped), at least 32 bytes."""
    try:
        secret = read_regular(path, KEY_FILE_MAX_BYTES).strip()
    except OSError as err:
        raise ConfigError(path, "-", "a readable secret file", err.strerror or str(err),
                          "point it at a regular file the daemon can read") from err
    if len(secret) < MIN_HMAC_BYTES:
        raise ConfigError(path, "-", f"a secret of at least {MIN_HMAC_BYTES} bytes",
                          f"{len(secret)} bytes", "e.g. `head -c 48 /dev/urandom | base64`")
    return VerifyKey("hmac", secret, None)


def _from_file(source: str, key: str, path: str, read: Callable[[str], T]) -> T:
    """`read(path)`; its ConfigError (naming the key file) becomes one naming the config file
    and `key`, with the key file and the place in it in what was expected."""
    try:
        return read(path)
    except ConfigError as err:
        inner = err.key.removeprefix(key).lstrip(".")
        where = err.file + (f", at {inner}" if inner and inner != "-" else "")
        raise ConfigError(source, key, f"{err.expected} (in {where})", err.found,
                          err.fix or f"fix {err.file} or point {key} at another file") from err


class Authenticator:
    """Turns request headers into a Principal, or raises a 401/431 Problem.

    `reload(cfg)` (SIGHUP) re-reads the key files: a new or revoked API key, a rotated JWT
    key or a changed admin list takes effect without a restart. A reload that fails keeps
    the credentials in force.
    """

    def __init__(self, cfg: ApiConfig, *, verify_keys: Sequence[VerifyKey] = (),
                 api_keys: Mapping[str, keys_mod.StoredKey] | None = None,
                 reserved: frozenset[str] = reserved_principals()) -> None:
        self._extra = (tuple(verify_keys), dict(api_keys or {}), reserved)
        self.creds = load_credentials(cfg, *self._extra)

    @property
    def cfg(self) -> ApiConfig:
        """The [api] section in force."""
        return self.creds.cfg

    def reload(self, cfg: ApiConfig, source: str = "<config>") -> Credentials:
        """Re-read the key files `cfg` names and swap them in; ConfigError (naming `source`,
        the config file) keeps the old set."""
        self.creds = load_credentials(cfg, *self._extra, source=source)
        return self.creds

    def authenticate(self, authorization: str | None, api_key: str | None) -> Principal:
        """The caller, from `Authorization: Bearer <jwt|hak_…>` or `X-API-Key: hak_…`."""
        creds = self.creds
        cap = creds.cfg.max_header_bytes
        if (authorization and len(authorization) > cap) or (api_key and len(api_key) > cap):
            raise Problem(431, f"credential header longer than {cap} bytes",
                          headers={"WWW-Authenticate": f'{REALM}, error="invalid_request"'})
        if api_key:
            return self._api_key(creds, api_key)
        if not authorization:
            raise _unauthorized("credentials required", None)
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise _unauthorized("use the Bearer scheme", "invalid_request")
        if token.startswith(keys_mod.PREFIX):
            return self._api_key(creds, token)
        return self._jwt(creds, token)

    @staticmethod
    def _api_key(creds: Credentials, presented: str) -> Principal:
        k = keys_mod.verify(presented, creds.api_keys)
        if k is None:
            raise _unauthorized("unknown or revoked API key")
        subject = normalize_address(k.principal)
        scopes = set(k.scopes)
        if subject in creds.admins:
            scopes.add("admin")
        if "admin" in scopes:
            scopes.add("read")
        return Principal(subject, frozenset(scopes), "api_key")

    @staticmethod
    def _jwt(creds: Credentials, token: str) -> Principal:
        cfg = creds.cfg
        bad_shape = shape_error(token)
        if bad_shape is not None:
            raise _unauthorized(f"malformed token: {bad_shape}")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as err:
            raise _unauthorized(f"malformed token: {err}") from err
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in cfg.jwt_algorithms:
            raise _unauthorized(f"algorithm {alg!r} not accepted")
        fam = FAMILIES[alg]
        cands = [k for k in creds.verify_keys if k.family == fam]
        kid = header.get("kid")
        if kid is not None and any(k.kid == kid for k in cands):
            cands = [k for k in cands if k.kid == kid]
        if not cands:
            raise _unauthorized("no key for this token")
        claims: dict[str, Any] | None = None
        for k in cands:
            try:
                claims = jwt.decode(
                    token, k.key, algorithms=[alg],
                    audience=cfg.jwt_audience or None,
                    issuer=cfg.jwt_issuer or None,
                    leeway=cfg.jwt_leeway_s,
                    options={"require": ["exp", "sub"],
                             "verify_aud": bool(cfg.jwt_audience)})
                break
            except jwt.InvalidSignatureError:
                continue
            except jwt.InvalidTokenError as err:
                raise _unauthorized(str(err)) from err
        if claims is None:
            raise _unauthorized("signature verification failed")
        sub = claims["sub"]
        if not isinstance(sub, str) or not sub.strip():
            raise _unauthorized("`sub` must be a non-empty string")
        sub = normalize_address(sub)
        if sub.lower() in creds.reserved:
            raise _unauthorized(f"`sub` {sub!r} is reserved")
        scopes = {"read"}
        granted = claims.get(cfg.jwt_admin_claim)
        values = granted.split() if isinstance(granted, str) else (
            granted if isinstance(granted, list) else [])
        if "admin" in values or sub in creds.admins:
            scopes.add("admin")
        return Principal(sub, frozenset(scopes), "jwt")
