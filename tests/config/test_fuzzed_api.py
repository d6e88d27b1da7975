"""[api] key files a fuzzing pass found to crash `check-config` (or pass it, or name the wrong
file): each is exit 2 with one line naming the config file, the [api] key, the key file and
the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.config.test_fuzzed_configs import base, check_config, jsonl

DEEP_TOML = "x = " + "[" * 3000 + "]" * 3000 + "\n"


def api(tmp_path: Path, **keys: str) -> str:
    lines = "".join(f"{k} = {v}\n" for k, v in keys.items())
    return base(tmp_path) + jsonl(tmp_path) + f"[api]\nenabled = true\nport = 0\n{lines}"


@pytest.mark.parametrize(("content", "found"), [
    (b"\xff[[keys]]\n", "undecodable"),
    (b"keys = 5\n", "[[keys]] tables"),
    (b"keys = [5]\n", "a [[keys]] table"),
    (DEEP_TOML.encode(), "nested"),
    (b'[[keys]]\nid = "a"\nprincipal = "p"\nscopes = 5\nsalt = "00"\nsha256 = "00"\n',
     "keys[0].scopes"),
    (b'[[keys]]\nid = "a"\nprincipal = "p"\nscopes = "read"\nsalt = "00"\nsha256 = "00"\n',
     "keys[0].scopes"),
    (b"[host]\nnode_id = 'x'\n", "only [[keys]] tables"),
    (b"[[keys]\n", "valid TOML"),
])
def test_bad_api_keys_files_name_the_config_key_and_the_keys_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, found: str) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_bytes(content)
    err = check_config(tmp_path, api(tmp_path, api_keys_file=f'"{keys}"'), capsys)
    assert "[api.api_keys_file]" in err and str(keys) in err and found in err
    assert "; fix: " in err


def test_a_directory_as_keys_file_names_the_config_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = check_config(tmp_path, api(tmp_path, api_keys_file=f'"{tmp_path}"'), capsys)
    assert "[api.api_keys_file] expected a regular TOML keys file (in " in err
    assert "a directory or special file" in err and "; fix: " in err


@pytest.mark.parametrize(("doc", "found"), [
    ('{"keys":[{"kty":["RSA"]}]}', "keys[0].kty"),
    ('{"keys":[{"kty":{"a":1}}]}', "keys[0].kty"),
    ("[" * 100_000 + "]" * 100_000, "a JSON JWKS document"),
    ('{"keys": NaN}', "a JSON JWKS document"),
    ('{"keys":[{"kty":"RSA","n":["x"],"e":"AQAB"}]}', "keys[0]"),
])
def test_bad_jwks_files_are_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          doc: str, found: str) -> None:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(doc)
    err = check_config(tmp_path, api(tmp_path, jwks_file=f'"{jwks}"'), capsys)
    assert "[api.jwks_file]" in err and str(jwks) in err and found in err


def test_missing_jwt_key_files_name_the_config_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for key in ("jwt_keys_file", "jwt_hmac_secret_file", "jwks_file"):
        err = check_config(tmp_path, api(tmp_path, **{key: f'"{tmp_path}/absent"'}), capsys)
        assert f"[api.{key}]" in err and f"{tmp_path}/absent" in err


@pytest.mark.parametrize(("algs", "fix"), [
    ('["XX999"]', "case matters"), ('["rs256"]', "case matters"), ('["none"]', "remove `none`"),
])
def test_unknown_jwt_algorithms_get_the_right_fix(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], algs: str, fix: str) -> None:
    err = check_config(tmp_path, api(tmp_path, jwt_algorithms=algs), capsys)
    assert "[api.jwt_algorithms]" in err and fix in err and "ApiConfig" not in err


def test_reserved_admin_principals_name_the_config_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = check_config(tmp_path, api(tmp_path, admin_principals='["unassigned"]'), capsys)
    assert "[api.admin_principals]" in err and "<config>" not in err


def test_a_page_size_above_the_maximum_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = check_config(tmp_path, api(tmp_path, page_size="500", max_page_size="100"), capsys)
    assert "[api.page_size]" in err


def test_a_sound_keys_file_passes(tmp_path: Path) -> None:
    from hostagent.api import keys as keys_mod
    from hostagent.cli.main import main

    _clear, stored = keys_mod.new_key("portal", ["read"])
    keys = tmp_path / "keys.toml"
    keys.write_text(keys_mod.to_toml(stored))
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": []}))
    path = tmp_path / "hostagent.toml"
    path.write_text(api(tmp_path, api_keys_file=f'"{keys}"', jwks_file=f'"{jwks}"'))
    assert main(["check-config", "-q", str(path)]) == 0
