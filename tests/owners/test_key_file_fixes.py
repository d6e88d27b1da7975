"""Every `owners.key_file` error has a fix, and none shows the key. Before, a directory, a
FIFO or an out-of-range key ended at "found ...", and a symbolic link (never followed) was told
to "create it"."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hostagent.errors import ConfigError
from hostagent.owners.signing import load_key_file

KEY_HEX = "4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318"
ORDER_HEX = "fffffffffffffffffffffffffffffffebaaedce6af48a03bbfd25e8cd0364141"


def _make(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / "node.key"
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path, 0o600)
    elif kind == "symlink":
        real = tmp_path / "real.key"
        real.write_text(KEY_HEX)
        real.chmod(0o600)
        path.symlink_to(real)
    elif kind != "missing":
        path.write_text({"zero": "00" * 32, "order": ORDER_HEX, "short": KEY_HEX[:-2],
                         "shared": KEY_HEX}[kind])
        path.chmod(0o644 if kind == "shared" else 0o600)
    return path


@pytest.mark.parametrize(("kind", "fix"), [
    ("missing", "create it with a hex secp256k1 key and `chmod 600` it"),
    ("symlink", "point owners.key_file at the key file itself: a symbolic link is not followed"),
    ("directory", "not a directory or special file"),
    ("fifo", "not a directory or special file"),
    ("shared", "chmod 600 "),
    ("short", "write the node's 32-byte private key as hex"),
    ("zero", "64 hex digits above zero and below the secp256k1 group order"),
    ("order", "64 hex digits above zero and below the secp256k1 group order"),
])
def test_every_key_file_error_has_a_fix(tmp_path: Path, kind: str, fix: str) -> None:
    path = _make(tmp_path, kind)
    with pytest.raises(ConfigError) as info:
        load_key_file(str(path), config_source="/etc/hostagent.toml")
    err = info.value
    assert (err.file, err.key) == ("/etc/hostagent.toml", "owners.key_file")
    assert err.fix and fix in err.fix, str(err)
    assert KEY_HEX not in str(err) and ORDER_HEX not in str(err)
