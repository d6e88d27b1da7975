"""Every API keys file error gets a fix naming what is accepted, with an example in TOML; a
non-UTF-8 file names the line and byte; a FIFO at the path is refused without blocking and an
over-long integer is an error, not a traceback. Before: `[keys[0].principal] expected a
non-empty principal, found ' '` with no fix, `keys list` hung on a FIFO (so did check-config
with it as api.api_keys_file), and `x = 1000…0` (5,000 digits) ended in a ValueError."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hostagent.api import keys
from hostagent.cli.main import main
from hostagent.errors import ConfigError

ENTRY = ('[[keys]]\nid = "0a1b2c3d"\nprincipal = "portal"\nscopes = ["read"]\n'
         'salt = "00112233445566778899aabbccddeeff"\nsha256 = "' + "ab" * 32 + '"\n')

# (id, content or None for a directory / no file, key, fix fragment)
CASES: list[tuple[str, bytes | str | None, str, str]] = [
    ("not-utf8", b"# keys\n\xe9\n", "-", "save the file as UTF-8 (not Latin-1 or UTF-16)"),
    ("keys-not-array", b"keys = 5\n", "keys",
     "write each key as a [[keys]] table of id, principal, scopes, salt and sha256"),
    ("entry-not-table", b"keys = [5]\n", "keys[0]", "write each key as a [[keys]] table"),
    ("scopes-string", b'[[keys]]\nscopes = "read"\n', "keys[0].scopes",
     'write scopes = ["read"] or scopes = ["read", "admin"]'),
    ("unknown-scope", ENTRY.replace('["read"]', '["write"]').encode(), "keys[0].scopes",
     'write scopes = ["read"] or scopes = ["read", "admin"]'),
    ("blank-principal", ENTRY.replace('"portal"', '" "').encode(), "keys[0].principal",
     'e.g. principal = "portal"'),
    ("missing-fields", b'[[keys]]\nscopes = ["read"]\n', "keys[0]",
     "`python -m hostagent.api.keys new --principal NAME --scope read --file FILE` writes it"),
    ("bad-toml", b"[[keys]\n", "-", "fix the syntax; write each key as a [[keys]] table"),
    ("huge-integer", b"x = 1" + b"0" * 5000 + b"\n", "-", "a keys file holds no numbers"),
    ("missing-file", None, "-", "create it: write entries with `python -m hostagent.api.keys"),
    ("directory", "dir", "-", "point it at the TOML keys file"),
]


@pytest.mark.parametrize(("content", "key", "fix"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_keys_list_names_what_is_accepted(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes | str | None,
        key: str, fix: str) -> None:
    path = tmp_path / "keys.toml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "dir":
        path.mkdir()
    assert keys.main(["list", "--file", str(path)]) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"hostagent: {path}: [{key}] expected "), lines[0]
    assert "; fix: " in lines[0] and fix in lines[0].split("; fix: ", 1)[1], lines[0]


def test_a_non_utf8_keys_file_names_the_line_and_byte(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_bytes(ENTRY.encode() + b"# caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        keys.load_keys(str(path))
    assert info.value.found == f"undecodable bytes at line 7 (byte {len(ENTRY) + 5})"


def _config(tmp_path: Path, keys_file: Path) -> Path:
    cfg = tmp_path / "hostagent.toml"
    cfg.write_text(f'[api]\nenabled = true\napi_keys_file = "{keys_file}"\n'
                   f'[collector]\nstate_path = "{tmp_path}/state.db"\n'
                   f'[[sinks]]\ntype = "jsonl"\npath = "{tmp_path}/out.jsonl"\n')
    return cfg


@pytest.mark.parametrize("command", ["keys-list", "check-config"])
def test_a_fifo_keys_file_is_refused_without_blocking(tmp_path: Path, command: str) -> None:
    fifo = tmp_path / "keys.toml"
    os.mkfifo(fifo, 0o600)
    argv = (["-m", "hostagent.api.keys", "list", "--file", str(fifo)] if command == "keys-list"
            else ["-m", "hostagent.cli.main", "check-config", str(_config(tmp_path, fifo))])
    try:  # before: blocked in open() waiting for a writer
        out = subprocess.run([sys.executable, *argv], capture_output=True, text=True,
                             timeout=60, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{command} blocked on a FIFO keys file")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "expected a regular TOML keys file" in out.stderr and "; fix: " in out.stderr


def test_check_config_passes_the_keys_fix_on(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(ENTRY.replace('"portal"', '" "'))
    assert main(["check-config", str(_config(tmp_path, path))]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "[api.api_keys_file] expected a non-empty principal" in line
    assert line.endswith('; fix: name who holds the key, e.g. principal = "portal"'), line


@pytest.mark.parametrize("key", ["jwt_keys_file", "jwks_file", "jwt_hmac_secret_file"])
def test_a_fifo_at_a_jwt_key_file_is_refused_without_blocking(tmp_path: Path, key: str) -> None:
    fifo = tmp_path / "key"
    os.mkfifo(fifo, 0o600)
    algorithms = {"jwt_keys_file": '["RS256"]', "jwks_file": '["RS256"]',
                  "jwt_hmac_secret_file": '["HS256"]'}[key]
    cfg = tmp_path / "hostagent.toml"
    cfg.write_text(f'[api]\nenabled = true\n{key} = "{fifo}"\njwt_algorithms = {algorithms}\n'
                   'jwt_issuer = "https://issuer.example"\njwt_audience = "hostagent"\n'
                   f'[collector]\nstate_path = "{tmp_path}/state.db"\n'
                   f'[[sinks]]\ntype = "jsonl"\npath = "{tmp_path}/out.jsonl"\n')
    try:  # before: blocked in open() waiting for a writer (check-config and start-up)
        out = subprocess.run([sys.executable, "-m", "hostagent.cli.main", "check-config",
                              str(cfg)], capture_output=True, text=True, timeout=60,
                             check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"check-config blocked on a FIFO at api.{key}")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert f"[api.{key}]" in out.stderr and "not a regular file" in out.stderr, out.stderr
