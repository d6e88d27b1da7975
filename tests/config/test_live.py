"""The live/restart split of a reload (hostagent.config.live; the daemon side is in
tests/test_daemon.py)."""

from __future__ import annotations

from pathlib import Path

from hostagent.api.auth import CREDENTIAL_KEYS
from hostagent.config import live
from hostagent.config.load import from_mapping
from tests.api.support import make_keys
from tests.replay import Host, build_daemon, daemon_config


def test_the_credential_keys_are_the_apis_own() -> None:
    assert live.API_CREDENTIAL_KEYS == CREDENTIAL_KEYS


def test_apply_takes_only_the_live_keys() -> None:
    old = from_mapping({"host": {"node_id": "a"}, "collector": {"interval_s": 30}})
    new = from_mapping({"host": {"node_id": "b"},
                        "collector": {"interval_s": 10, "time_format": "rfc3339"},
                        "log": {"level": "debug"}})
    applied = live.apply(old, new)
    assert applied.collector.interval_s == 10 and applied.log.level == "debug"
    assert applied.host.node_id == "a" and applied.collector.time_format == "unix"
    assert live.restart_keys(old, new) == ["collector.time_format", "host.node_id"]
    assert live.changed_keys(old, new) == ["collector.interval_s", "collector.time_format",
                                           "host.node_id", "log.level"]


def test_the_authenticator_gets_only_the_credential_keys(tmp_path: Path) -> None:
    host = Host(tmp_path, "lab-hybrid")
    keys = make_keys(tmp_path)
    table = f'[api]\nenabled = true\nport = 0\napi_keys_file = "{keys.keys_file}"\n'
    cfg_path = daemon_config(tmp_path, host, tables=table)
    daemon = build_daemon(cfg_path, host)
    cfg_path.write_text(cfg_path.read_text().replace(
        "port = 0\n", 'port = 0\nmax_header_bytes = 300\nadmin_principals = ["ops"]\n'))
    assert daemon.reload() == ["api.max_header_bytes"]
    assert daemon.api_auth.creds.admins == frozenset({"ops"})  # live
    assert daemon.api_auth.cfg.max_header_bytes == 8192  # needs a restart: not applied
    daemon.store.close()
