"""API keys: the CLI writes hashed entries only; verification is exact."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest

from hostagent.api import keys
from hostagent.errors import ConfigError


def test_cli_new_and_list(tmp_path: Path) -> None:
    f = tmp_path / "keys.toml"
    out = subprocess.run([sys.executable, "-m", "hostagent.api.keys", "new", "--principal",
                          "portal", "--scope", "read", "--file", str(f)],
                         capture_output=True, text=True, check=True)
    clear = out.stdout.strip()
    assert clear.startswith("hak_")
    text = f.read_text()
    assert clear.split("_", 2)[2] not in text  # the secret is never stored
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    loaded = keys.load_keys(str(f))
    k = keys.verify(clear, loaded)
    assert k is not None
    assert k.principal == "portal"
    assert k.scopes == {"read"}
    listed = subprocess.run([sys.executable, "-m", "hostagent.api.keys", "list", "--file",
                             str(f)], capture_output=True, text=True, check=True).stdout
    assert "portal\tread" in listed


def test_verify_rejects_near_misses() -> None:
    clear, stored = keys.new_key("p", ["admin"])
    table = {stored.key_id: stored}
    assert keys.verify(clear, table) == stored
    assert keys.verify(clear + "x", table) is None
    assert keys.verify(clear[:-1], table) is None
    assert keys.verify(clear.replace("hak_", "hak"), table) is None
    assert keys.verify("hak_" + stored.key_id, table) is None


def test_bad_files(tmp_path: Path) -> None:
    f = tmp_path / "k.toml"
    f.write_text('[[keys]]\nid = "x"\nprincipal = "p"\nscopes = ["root"]\nsalt = "00"\n'
                 'sha256 = "00"\n')
    with pytest.raises(ConfigError, match="scopes"):
        keys.load_keys(str(f))
    f.write_text('[[keys]]\nid = "x"\n')
    with pytest.raises(ConfigError, match="keys\\[0\\]"):
        keys.load_keys(str(f))
    with pytest.raises(ValueError, match="scopes"):
        keys.new_key("p", ["write"])


def test_cli_refuses_reserved_principals_and_reports_bad_files(tmp_path: Path) -> None:
    f = tmp_path / "keys.toml"
    out = subprocess.run([sys.executable, "-m", "hostagent.api.keys", "new", "--principal",
                          "unassigned", "--scope", "read", "--file", str(f)],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 2 and "reserved" in out.stderr and "Traceback" not in out.stderr
    assert not f.exists()
    f.write_text("[[keys]]\nid = 1\n")
    out = subprocess.run([sys.executable, "-m", "hostagent.api.keys", "list", "--file", str(f)],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr


def test_duplicate_key_ids_and_empty_principals_are_config_errors(tmp_path: Path) -> None:
    _c, k = keys.new_key("portal", ["read"])
    f = tmp_path / "keys.toml"
    f.write_text(keys.to_toml(k) + "\n" + keys.to_toml(k))
    with pytest.raises(ConfigError, match="used once"):
        keys.load_keys(str(f))
    f.write_text(keys.to_toml(k).replace('principal = "portal"', 'principal = " "'))
    with pytest.raises(ConfigError, match="non-empty principal"):
        keys.load_keys(str(f))


@pytest.mark.parametrize(("content", "key"), [
    (b"\xff", "-"),                                       # before: UnicodeDecodeError
    (b"keys = 5\n", "keys"),                              # before: TypeError
    (b"x = " + b"[" * 3000 + b"]" * 3000 + b"\n", "-"),   # before: RecursionError
    (b"keys = [5]\n", "keys[0]"),
    (b'[[keys]]\nscopes = "read"\n', "keys[0].scopes"),
    (b"[collector]\ninterval_s = 5\n", "collector"),
])
def test_hostile_keys_files_are_config_errors(tmp_path: Path, content: bytes, key: str) -> None:
    f = tmp_path / "keys.toml"
    f.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        keys.load_keys(str(f))
    assert (err.value.file, err.value.key) == (str(f), key) and err.value.fix
    assert keys.main(["list", "--file", str(f)]) == 2
