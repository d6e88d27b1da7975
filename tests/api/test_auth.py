"""The auth corpus: every forged, stale or misdirected credential is refused correctly."""

from __future__ import annotations

import base64
import json
import time
from dataclasses import replace
from pathlib import Path

import httpx
import jwt
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from hostagent.api import keys as keys_mod
from hostagent.api.auth import Authenticator, reserved_principals
from hostagent.api.problems import Problem
from hostagent.api.startup import validate_startup
from hostagent.api.view import ApiView
from hostagent.config.load import from_mapping
from hostagent.errors import ConfigError
from tests.api.support import ALICE, AUD, BOB, ISS, Keys, api_config, report, start_server, token

ROUTE = "/api/v1/usage/instances/i-a1/current"


def b64(d: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()


def claims(**over: object) -> dict[str, object]:
    now = int(time.time())
    return {"sub": ALICE, "aud": AUD, "iss": ISS, "exp": now + 300, **over}


def corpus(keys: Keys) -> dict[str, str]:
    """name → Authorization header value; every one must be refused with 401."""
    good = token(keys)
    h, p, s = good.split(".")
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return {
        "alg none": f"Bearer {b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims())}.",
        "alg None": f"Bearer {b64({'alg': 'None'})}.{b64(claims())}.",
        "HS/RS confusion": f"Bearer {_confusion_token(keys)}",
        "expired": f"Bearer {token(keys, exp_s=-3600)}",
        "no exp": "Bearer " + jwt.encode({k: v for k, v in claims().items() if k != "exp"},
                                         keys.rsa, algorithm="RS256"),
        "no sub": "Bearer " + jwt.encode({k: v for k, v in claims().items() if k != "sub"},
                                         keys.rsa, algorithm="RS256"),
        "wrong audience": f"Bearer {token(keys, aud='someone-else')}",
        "wrong issuer": f"Bearer {token(keys, iss='https://evil.test')}",
        "tampered payload": f"Bearer {h}.{b64({**claims(), 'sub': BOB})}.{s}",
        "alg not allowed (RS512)": f"Bearer {token(keys, alg='RS512')}",
        "unknown key": "Bearer " + jwt.encode(claims(), stranger, algorithm="RS256"),
        "garbage": "Bearer not.a.jwt",
        "bearer without token": "Bearer",
        "basic scheme": "Basic dXNlcjpwYXNz",
        "wrong API key secret": f"Bearer {keys.read_key[:-4]}AAAA",
        "unknown API key id": "Bearer hak_00000000_" + "A" * 43,
        "payload only": f"Bearer {p}",
        # issue 13 §6: what PyJWT lets through
        "exp as a string": "Bearer " + jwt.encode({**claims(), "exp": str(int(time.time()) + 300)},
                                                  keys.rsa, algorithm="RS256"),
        "nbf as a string": "Bearer " + jwt.encode({**claims(), "nbf": "0"}, keys.rsa,
                                                  algorithm="RS256"),
        "iat as a string": "Bearer " + jwt.encode({**claims(), "iat": "0"}, keys.rsa,
                                                  algorithm="RS256"),
        "exp as true": "Bearer " + jwt.encode({**claims(), "exp": True}, keys.rsa,
                                              algorithm="RS256"),
        "signature padded ==": f"Bearer {h}.{p}.{s}==",
        "payload padded": f"Bearer {h}.{p}{'=' * (-len(p) % 4)}.{s}" if len(p) % 4 else
                          f"Bearer {h}=.{p}.{s}",
        "signature with non-canonical trailing bits": f"Bearer {h}.{p}.{_flip_unused_bits(s)}",
        "standard base64 alphabet": f"Bearer {h}.{p}.{s.replace('-', '+').replace('_', '/')}"
                                    if ("-" in s or "_" in s) else f"Bearer {h}.{p}.{s}+",
        "sub unassigned": f"Bearer {token(keys, 'unassigned')}",
        "sub Unassigned": f"Bearer {token(keys, 'Unassigned')}",
        "four segments": f"Bearer {good}.{s}",
    }


def _flip_unused_bits(seg: str) -> str:
    """The same bytes spelled differently: set a padding bit of the last base64url character."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    assert len(seg) % 4 in (2, 3)
    last = alphabet.index(seg[-1]) ^ 1
    flipped = seg[:-1] + alphabet[last]
    pad = "=" * (-len(seg) % 4)
    assert base64.urlsafe_b64decode(flipped + pad) == base64.urlsafe_b64decode(seg + pad)
    return flipped


def _hs256_with_pem(keys: Keys) -> str:
    """Signature of an HS256 token whose secret is the server's RSA public key PEM."""
    import hashlib
    import hmac

    header = b64({"alg": "HS256", "typ": "JWT"})
    body = b64(claims())
    sig = hmac.new(keys.rsa_pem, f"{header}.{body}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(sig).rstrip(b"=").decode()


def _confusion_token(keys: Keys) -> str:
    header = b64({"alg": "HS256", "typ": "JWT"})
    return f"{header}.{b64(claims())}.{_hs256_with_pem(keys)}"


async def test_corpus_refused_with_401(client: httpx.AsyncClient, keys: Keys) -> None:
    for name, value in corpus(keys).items():
        r = await client.get(ROUTE, headers={"Authorization": value})
        assert r.status_code == 401, (name, r.text)
        assert r.headers["www-authenticate"].startswith('Bearer realm="hostagent"'), name
        assert r.headers["content-type"] == "application/problem+json", name


async def test_hs_rs_confusion_refused_even_with_hs256_allowed(
        nursery: trio.Nursery, keys: Keys) -> None:
    # HS256 on the allow-list but no HMAC secret: the RSA PEM must never become one.
    cfg = api_config(keys, jwt_algorithms=("RS256", "HS256"))
    view = ApiView()
    view.update(report({"i-a1": ALICE}))
    srv = await start_server(nursery, cfg, view)
    async with httpx.AsyncClient(base_url=srv.url) as c:
        r = await c.get(ROUTE, headers={"Authorization": f"Bearer {_confusion_token(keys)}"})
        assert r.status_code == 401
        ok = await c.get(ROUTE, headers={"Authorization": f"Bearer {token(keys)}"})
        assert ok.status_code == 200
    srv.stop.set()


async def test_missing_credentials_challenge(client: httpx.AsyncClient) -> None:
    r = await client.get(ROUTE)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == 'Bearer realm="hostagent"'


async def test_oversized_header_refused(client: httpx.AsyncClient, keys: Keys) -> None:
    r = await client.get(ROUTE, headers={"Authorization": "Bearer " + "a" * 9000})
    assert r.status_code == 431
    r = await client.get(ROUTE, headers={"X-API-Key": "hak_" + "a" * 9000})
    assert r.status_code == 431
    r = await client.get(ROUTE, headers={"Authorization": "Bearer " + "a" * 100_000})
    assert r.status_code in (400, 431)  # past hypercorn's own header limit


async def test_other_users_instance_is_not_revealed(client: httpx.AsyncClient,
                                                    keys: Keys) -> None:
    bob = {"Authorization": f"Bearer {token(keys, '{BOB}')}"}
    r = await client.get(ROUTE, headers=bob)
    assert r.status_code == 404
    r = await client.get(f"/api/v1/usage/users/{ALICE}/current", headers=bob)
    assert r.status_code == 403
    r = await client.get("/api/v1/metrics", headers=bob, params={"user_id": ALICE})
    assert r.json()["items"] == []


async def test_valid_credentials(client: httpx.AsyncClient, keys: Keys) -> None:
    for value in (f"Bearer {token(keys)}", f"Bearer {token(keys, alg='ES256')}",
                  f"Bearer {keys.read_key}"):
        r = await client.get(ROUTE, headers={"Authorization": value})
        assert r.status_code == 200, (value[:30], r.text)
    r = await client.get(ROUTE, headers={"X-API-Key": keys.read_key})
    assert r.status_code == 200


async def test_admin_from_claim_or_principal_list(client: httpx.AsyncClient,
                                                  keys: Keys) -> None:
    for t in (token(keys, "0xroot"), token(keys, "0xzed", scope="read admin")):
        r = await client.get("/api/v1/usage/instances/i-b1/current",
                             headers={"Authorization": f"Bearer {t}"})
        assert r.status_code == 200
    r = await client.get("/api/v1/usage/instances/i-b1/current",
                         headers={"Authorization": f"Bearer {token(keys, '0xzed', scope='read')}"})
    assert r.status_code == 404


def test_config_refuses_none_and_short_hmac(keys: Keys, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match="jwt_algorithms"):
        Authenticator(api_config(keys, jwt_algorithms=("none",)))
    short = tmp_path / "secret"
    short.write_text("tooshort")
    with pytest.raises(ConfigError, match="32 bytes"):
        Authenticator(api_config(keys, jwt_hmac_secret_file=str(short)))


def test_hmac_secret_works_when_configured(keys: Keys, tmp_path) -> None:  # type: ignore[no-untyped-def]
    secret = tmp_path / "secret"
    secret.write_text("k" * 40)
    auth = Authenticator(replace(api_config(keys), jwt_algorithms=("HS256",),
                                 jwt_hmac_secret_file=str(secret)))
    t = jwt.encode(claims(), "k" * 40, algorithm="HS256")
    assert auth.authenticate(f"Bearer {t}", None).subject == ALICE[2:]  # normalised
    with pytest.raises(Problem):  # RS256 is not on this allow-list
        auth.authenticate(f"Bearer {token(keys)}", None)


def test_reserved_principals_are_refused_in_key_files(keys: Keys, tmp_path: Path) -> None:
    for principal in ("unassigned", "nobody-knows"):
        _clear, k = keys_mod.new_key("placeholder", ["read"])
        f = tmp_path / "keys.toml"
        f.write_text(keys_mod.to_toml(replace(k, principal=principal)))
        with pytest.raises(ConfigError) as err:
            Authenticator(api_config(keys, api_keys_file=str(f)),
                          reserved=reserved_principals("nobody-knows"))
        assert (err.value.file, err.value.key) == ("<config>", "api.api_keys_file")
        assert str(f) in str(err.value) and "principal" in str(err.value)
    with pytest.raises(ValueError, match="reserved"):
        keys_mod.new_key("unassigned", ["read"])
    with pytest.raises(ConfigError, match="admin_principals"):
        Authenticator(api_config(keys, admin_principals=("unassigned",)))


def test_the_configured_unassigned_owner_is_reserved_in_tokens(keys: Keys) -> None:
    auth = Authenticator(api_config(keys), reserved=reserved_principals("nobody-knows"))
    with pytest.raises(Problem, match="reserved"):
        auth.authenticate(f"Bearer {token(keys, 'nobody-knows')}", None)
    assert auth.authenticate(f"Bearer {token(keys, 'carol')}", None).subject == "carol"


@pytest.mark.parametrize(("doc", "key"), [
    ({"keys": {"kty": "RSA"}}, "api.jwks_file.keys"),
    ({"keys": "x"}, "api.jwks_file.keys"),
    ([], "api.jwks_file.keys"),
    ({"keys": [{"kty": "XYZ"}]}, "api.jwks_file.keys[0].kty"),
    ({"keys": [{"n": "AQAB", "e": "AQAB"}]}, "api.jwks_file.keys[0].kty"),
    ({"keys": [{"kty": "RSA", "n": "!!!", "e": "AQAB"}]}, "api.jwks_file.keys[0]"),
    ({"keys": [{"kty": "RSA", "n": 5, "e": "AQAB"}]}, "api.jwks_file.keys[0]"),
    ({"keys": [{"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}]}, "api.jwks_file.keys[0]"),
    ({"keys": ["RSA"]}, "api.jwks_file.keys[0]"),
])
def test_jwks_defects_are_config_errors(keys: Keys, tmp_path: Path, doc: object,
                                        key: str) -> None:
    f = tmp_path / "jwks.json"
    f.write_text(json.dumps(doc))
    with pytest.raises(ConfigError) as err:
        Authenticator(api_config(keys, jwks_file=str(f)))
    # the config's key names the JWKS file; the place in it is in what was expected
    assert (err.value.file, err.value.key) == ("<config>", "api.jwks_file")
    where = key.removeprefix("api.jwks_file").lstrip(".")
    assert f"(in {f}" + (f", at {where})" if where else ")") in str(err.value)
    assert err.value.fix


def test_validate_startup_raises_config_errors(keys: Keys, tmp_path: Path) -> None:
    base = {"api": {"enabled": True, "jwt_algorithms": ["RS256"],
                    "jwt_keys_file": str(keys.pem_file)},
            "sinks": [{"type": "webhook", "allow_list": ["10.0.0.0/8"]}]}
    validate_startup(from_mapping(base, "/etc/hostagent/config.toml"))
    bad_sink = {**base, "sinks": [{"type": "webhook", "allow_list": ["10.0.0.0/99"]}]}
    with pytest.raises(ConfigError) as err:
        validate_startup(from_mapping(bad_sink, "/etc/hostagent/config.toml"))
    assert err.value.file == "/etc/hostagent/config.toml"
    jwks = tmp_path / "jwks.json"
    jwks.write_text('{"keys": {}}')
    with pytest.raises(ConfigError, match="jwks"):
        validate_startup(from_mapping({**base, "api": {**base["api"],
                                                       "jwks_file": str(jwks)}}))


def test_weak_keys_are_config_errors(keys: Keys, tmp_path: Path) -> None:
    """An RSA key under 2048 bits or a JWKS `oct` secret under 32 bytes was trusted."""
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    pem = tmp_path / "small.pem"
    pem.write_bytes(small.public_bytes(serialization.Encoding.PEM,
                                       serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(ConfigError, match="1024 bits"):
        Authenticator(api_config(keys, jwt_keys_file=str(pem)))
    jwks = tmp_path / "jwks.json"
    for jwk in (json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(small)),
                {"kty": "oct", "k": base64.urlsafe_b64encode(b"short").rstrip(b"=").decode()}):
        jwks.write_text(json.dumps({"keys": [jwk]}))
        with pytest.raises(ConfigError) as err:
            Authenticator(api_config(keys, jwks_file=str(jwks)))
        assert err.value.key == "api.jwks_file" and "at keys[0]" in str(err.value)
        assert "at least" in str(err.value)
