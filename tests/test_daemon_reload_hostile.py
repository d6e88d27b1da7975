"""SIGHUP with a broken config, keys file or rules file: the reload is refused and logged,
the running config, keys and rules stay in force, and the daemon lives on."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from hostagent.daemon import Daemon
from tests.api.support import Keys, make_keys
from tests.replay import Host, build_daemon, daemon_config

DEEP_TOML = "x = " + "[" * 3000 + "]" * 3000 + "\n"


def _daemon(tmp_path: Path, tables: str = "") -> tuple[Daemon, Path]:
    host = Host(tmp_path, "lab-hybrid")
    cfg_path = daemon_config(tmp_path, host, tables=tables)
    return build_daemon(cfg_path, host), cfg_path


def test_a_nats_subject_with_an_attribute_is_a_refused_reload(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    daemon, cfg_path = _daemon(tmp_path)
    before = daemon.cfg
    cfg_path.write_text(cfg_path.read_text() + '[[sinks]]\ntype = "nats"\n'
                        'subject = "a.{node_id.foo}"\n')
    with caplog.at_level(logging.ERROR):
        assert daemon.reload() is None  # before: AttributeError out of the SIGHUP handler
    assert daemon.cfg is before
    assert "sinks[1].subject" in str(caplog.records[-1].__dict__.get("error"))
    daemon.store.close()


def test_anything_escaping_load_is_a_refused_reload(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    daemon, _ = _daemon(tmp_path)
    before = daemon.cfg

    def broken(_path: object) -> object:
        raise AttributeError("a defect load() did not anticipate")

    monkeypatch.setattr("hostagent.daemon_signals.load", broken)
    with caplog.at_level(logging.ERROR):
        assert daemon.reload() is None
    assert daemon.cfg is before
    assert "reload refused, keeping the running config" in caplog.text
    assert "AttributeError: a defect" in str(caplog.records[-1].__dict__.get("error"))
    monkeypatch.undo()
    assert daemon.reload() == []  # and the next good reload applies
    daemon.store.close()


def test_a_deeply_nested_rules_file_on_sighup_keeps_the_rules(tmp_path: Path) -> None:
    rules = tmp_path / "rules.json"
    rules.write_text("[]")
    rules_toml = tmp_path / "rules.toml"
    rules_toml.write_text("rules = []\n")
    daemon, _ = _daemon(tmp_path, f'[thresholds]\nrules_path = "{rules_toml}"\n')
    assert daemon.rules is not None
    rules_toml.write_text(DEEP_TOML)
    os.utime(rules_toml, ns=(1, 1))
    assert daemon.reload() == []  # the config is fine; the rules file is refused
    assert daemon.rules.failures == 1 and "nested" in (daemon.rules.last_error or "")
    assert daemon.rules.check() is None  # the watch sees nothing new to crash on
    daemon.store.close()


def _api_daemon(tmp_path: Path) -> tuple[Daemon, Path, Keys]:
    keys = make_keys(tmp_path)
    daemon, cfg_path = _daemon(tmp_path, f'[api]\nenabled = true\nport = 0\n'
                               f'api_keys_file = "{keys.keys_file}"\n')
    return daemon, cfg_path, keys


@pytest.mark.parametrize("content", [b"keys = 5\n", b"\xff", DEEP_TOML.encode(),
                                     b"[[keys]]\nscopes = 5\n"])
def test_a_broken_keys_file_keeps_the_keys_in_force(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes) -> None:
    daemon, _, keys = _api_daemon(tmp_path)
    assert daemon.api_auth is not None
    creds = daemon.api_auth.creds
    keys.keys_file.write_bytes(content)
    with caplog.at_level(logging.ERROR):
        assert daemon.reload() == []  # before `keys = 5`: TypeError, the daemon gone
    assert daemon.api_auth.creds is creds
    assert "API credentials reload refused, keeping the keys in force" in caplog.text
    error = str(caplog.records[-1].__dict__.get("error"))
    assert f"{tmp_path}/hostagent.toml: [api.api_keys_file]" in error
    assert str(keys.keys_file) in error
    daemon.store.close()


def test_anything_escaping_the_key_readers_keeps_the_keys(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    daemon, _, _keys = _api_daemon(tmp_path)
    assert daemon.api_auth is not None
    creds = daemon.api_auth.creds

    def broken(*_a: object, **_kw: object) -> object:
        raise TypeError("unhashable type: 'list'")

    monkeypatch.setattr("hostagent.api.auth.load_credentials", broken)
    assert daemon.reload() == []
    assert daemon.api_auth.creds is creds
    daemon.store.close()
