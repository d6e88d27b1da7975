"""Who is asking: JWTs (allow-listed algorithms, `exp` required, aud/iss) and hashed API keys.

Every refusal is a 401 Problem carrying `WWW-Authenticate: Bearer …` (RFC 6750). Keys are
bound to an algorithm family, so an RSA public key can never be used as an HMAC secret
(the HS/RS confusion attack) and `alg: none` is never in the allow-list.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from hostagent.api import keys as keys_mod
from hostagent.api.problems import Problem
from hostagent.config.schema import ApiConfig
from hostagent.errors import ConfigError

FAMILIES = {
    "HS256": "hmac", "HS384": "hmac", "HS512": "hmac",
    "RS256": "rsa", "RS384": "rsa", "RS512": "rsa",
    "PS256": "rsa", "PS384": "rsa", "PS512": "rsa",
    "ES256": "ec", "ES384": "ec", "ES512": "ec", "ES256K": "ec",
    "EdDSA": "okp",
}
REALM = 'Bearer realm="hostagent"'
# [api] keys that `Authenticator.reload` applies live (the rest of [api] needs a restart).
CREDENTIAL_KEYS = ("jwt_algorithms", "jwt_keys_file", "jwks_file", "jwt_hmac_secret_file",
                   "jwt_audience", "jwt_issuer", "jwt_leeway_s", "jwt_admin_claim",
                   "api_keys_file", "admin_principals")


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: `subject` is compared with instance owners/authorized users."""

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


def load_pem_keys(path: str) -> list[VerifyKey]:
    """Every `-----BEGIN PUBLIC KEY-----` block in a PEM file."""
    try:
        text = Path(path).read_text()
        blocks = [b + "-----END PUBLIC KEY-----\n"
                  for b in text.split("-----END PUBLIC KEY-----") if "-----BEGIN" in b]
        out = []
        for b in blocks:
            k = load_pem_public_key(b[b.index("-----BEGIN"):].encode())
            out.append(VerifyKey(_family_of(k), k, None))
    except (OSError, ValueError) as err:
        raise ConfigError(path, "api.jwt_keys_file", "PEM public keys", str(err)) from err
    return out


def load_jwks(path: str) -> list[VerifyKey]:
    """Every usable key of a JWKS document (keys with `use` other than `sig` are skipped)."""
    try:
        doc = json.loads(Path(path).read_text())
        out = []
        for raw in doc["keys"]:
            if raw.get("use", "sig") != "sig":
                continue
            k = jwt.PyJWK.from_dict(raw)
            fam = {"RSA": "rsa", "EC": "ec", "OKP": "okp", "oct": "hmac"}[str(k.key_type)]
            out.append(VerifyKey(fam, k.key, k.key_id))
    except (OSError, ValueError, KeyError, TypeError, jwt.PyJWKError) as err:
        raise ConfigError(path, "api.jwks_file", "a JWKS document", str(err)) from err
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


def load_credentials(cfg: ApiConfig, verify_keys: Sequence[VerifyKey] = (),
                     api_keys: Mapping[str, keys_mod.StoredKey] | None = None) -> Credentials:
    """Read every key file `cfg` names (plus the given keys); defects are ConfigErrors."""
    unknown = [a for a in cfg.jwt_algorithms if a not in FAMILIES]
    if unknown:
        raise ConfigError(cfg.__class__.__name__, "api.jwt_algorithms",
                          f"algorithms among {sorted(FAMILIES)}", unknown,
                          "`none` is never accepted")
    vk = list(verify_keys)
    if cfg.jwt_keys_file:
        vk += load_pem_keys(cfg.jwt_keys_file)
    if cfg.jwks_file:
        vk += load_jwks(cfg.jwks_file)
    if cfg.jwt_hmac_secret_file:
        try:
            secret = Path(cfg.jwt_hmac_secret_file).read_bytes().strip()
        except OSError as err:
            raise ConfigError(cfg.jwt_hmac_secret_file, "api.jwt_hmac_secret_file",
                              "a readable secret file", str(err)) from err
        if len(secret) < 32:
            raise ConfigError(cfg.jwt_hmac_secret_file, "api.jwt_hmac_secret_file",
                              "a secret of at least 32 bytes", f"{len(secret)} bytes")
        vk.append(VerifyKey("hmac", secret, None))
    keys = dict(api_keys or {})
    if cfg.api_keys_file:
        keys.update(keys_mod.load_keys(cfg.api_keys_file))
    return Credentials(cfg, tuple(vk), keys, frozenset(cfg.admin_principals))


class Authenticator:
    """Turns request headers into a Principal, or raises a 401/431 Problem.

    `reload(cfg)` (SIGHUP) re-reads the key files: a new or revoked API key, a rotated JWT
    key or a changed admin list takes effect without a restart. A reload that fails keeps
    the credentials in force.
    """

    def __init__(self, cfg: ApiConfig, *, verify_keys: Sequence[VerifyKey] = (),
                 api_keys: Mapping[str, keys_mod.StoredKey] | None = None) -> None:
        self._extra = (tuple(verify_keys), dict(api_keys or {}))
        self.creds = load_credentials(cfg, *self._extra)

    @property
    def cfg(self) -> ApiConfig:
        """The [api] section in force."""
        return self.creds.cfg

    def reload(self, cfg: ApiConfig) -> Credentials:
        """Re-read the key files `cfg` names and swap them in; ConfigError keeps the old set."""
        self.creds = load_credentials(cfg, *self._extra)
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
        scopes = set(k.scopes)
        if k.principal in creds.admins:
            scopes.add("admin")
        if "admin" in scopes:
            scopes.add("read")
        return Principal(k.principal, frozenset(scopes), "api_key")

    @staticmethod
    def _jwt(creds: Credentials, token: str) -> Principal:
        cfg = creds.cfg
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
        if not isinstance(sub, str) or not sub:
            raise _unauthorized("`sub` must be a non-empty string")
        scopes = {"read"}
        granted = claims.get(cfg.jwt_admin_claim)
        values = granted.split() if isinstance(granted, str) else (
            granted if isinstance(granted, list) else [])
        if "admin" in values or sub in creds.admins:
            scopes.add("admin")
        return Principal(sub, frozenset(scopes), "jwt")
