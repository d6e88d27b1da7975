"""Config inputs found by an adversarial sweep of the loader: each was a traceback, a line
without a fix, or a config `check-config` passed although `run` would do something else."""

from __future__ import annotations

from pathlib import Path

import pytest

from hostagent.config import preflight
from hostagent.config.load import from_mapping, load
from hostagent.errors import ConfigError


def write(tmp: Path, text: str | bytes, name: str = "hostagent.toml") -> Path:
    path = tmp / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def test_an_integer_of_thousands_of_digits_is_a_config_error(tmp_path: Path) -> None:
    # tomllib raises int()'s ValueError (4,300-digit limit) as it is, not TOMLDecodeError.
    path = write(tmp_path, "[collector]\ninterval_s = " + "9" * 5000 + "\n")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.file == str(path) and info.value.fix
    assert "sys.set_int_max_str_digits" not in str(info.value)


@pytest.mark.parametrize(("data", "line", "byte"), [
    ("[host]\nnode_id = \"caf\xe9\"\n".encode("latin-1"), 2, 21),
    ("[host]\n".encode("utf-16"), 1, 0),
])
def test_undecodable_bytes_say_where_and_how_to_fix(tmp_path: Path, data: bytes, line: int,
                                                    byte: int) -> None:
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert f"at line {line} (byte {byte})" in str(info.value)
    assert info.value.fix and "UTF-8" in info.value.fix


@pytest.mark.parametrize("uri", ["", "  "])
def test_an_empty_libvirt_uri_is_refused(uri: str) -> None:
    # libvirt takes "" as "pick a default" and connects to qemu:///system (or whatever
    # LIBVIRT_DEFAULT_URI says): a templated config with an empty variable must not do that.
    with pytest.raises(ConfigError) as info:
        from_mapping({"libvirt": {"uri": uri}}, "/etc/hostagent/hostagent.toml")
    assert info.value.key == "libvirt.uri" and info.value.fix
    assert str(info.value).startswith("/etc/hostagent/hostagent.toml: [libvirt.uri]")


@pytest.mark.parametrize("node_id", ["", "  ", "hv\n01", "hv\x1b[31m"])
def test_a_blank_or_unprintable_node_id_is_refused(node_id: str) -> None:
    # It goes into every event (`host`), each event id, NATS subjects and alert keys: an empty
    # templated value billed a host as "", a newline forged log lines and subjects.
    with pytest.raises(ConfigError) as info:
        from_mapping({"host": {"node_id": node_id}}, "/etc/hostagent/hostagent.toml")
    assert info.value.key == "host.node_id" and info.value.fix


@pytest.mark.parametrize("unassigned", ["", "  ", "a\nb", "x" * 257])
def test_an_unassigned_user_id_no_event_can_carry_is_refused(unassigned: str) -> None:
    # The user_id of every event whose owner is unknown: "" reached events as it was (found by
    # a CLI sweep), an owner no billing pipeline can tell from a missing one.
    with pytest.raises(ConfigError) as info:
        from_mapping({"owners": {"unassigned": unassigned}}, "/etc/hostagent/hostagent.toml")
    assert info.value.key == "owners.unassigned" and info.value.fix
    assert from_mapping({"owners": {"unassigned": "nobody-known"}}).owners.unassigned \
        == "nobody-known"


@pytest.mark.parametrize(("paths", "key"), [
    ({"root": "srv/host"}, "paths.root"), ({"root": ""}, "paths.root"),
    ({"cgroup_root": "sys/fs/cgroup"}, "paths.cgroup_root"),
])
def test_a_relative_host_root_is_refused(paths: dict[str, str], key: str) -> None:
    # Read from whatever directory the daemon runs in (/ under systemd, or a fixture's parent):
    # every reading came back missing, which passes still billed as "no counters".
    with pytest.raises(ConfigError) as info:
        from_mapping({"paths": paths}, "/etc/hostagent/hostagent.toml")
    assert info.value.key == key and info.value.fix


@pytest.mark.parametrize(("text", "key"), [
    ("host = 5\n", "host"),
    ("[[host]]\n", "host"),
    ("sinks = 'x'\n", "sinks"),
    ("[sinks]\ntype = 'jsonl'\n", "sinks"),
    ("sinks = [1]\n", "sinks[0]"),
    ("[[sinks]]\ntype = 'jsonl'\nretry = 5\n", "sinks[0].retry"),
])
def test_a_value_where_a_table_goes_names_a_fix(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, text))
    assert info.value.key == key and info.value.fix


def test_a_config_file_past_the_size_limit_names_a_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, "#" * (2 << 20)))
    assert info.value.fix


@pytest.mark.parametrize(("sink", "key"), [
    ({"type": "jsonl", "path": "events.jsonl"}, "sinks[0].path"),
    ({"type": "jsonl", "path": "out/events.jsonl"}, "sinks[0].path"),
    ({"type": "email", "host": "127.0.0.1", "tls": "none", "journal_path": "mail.db"},
     "sinks[0].journal_path"),
])
def test_a_relative_sink_file_is_refused(tmp_path: Path, sink: dict[str, str],
                                         key: str) -> None:
    # check-config would look for it under its own working directory, the daemon writes it
    # under its own (/ under systemd): the same rule as collector.state_path.
    cfg = from_mapping({"collector": {"state_path": f"{tmp_path}/state.db"}, "sinks": [sink]},
                       str(tmp_path / "hostagent.toml"))
    with pytest.raises(ConfigError) as info:
        preflight.check(cfg)
    assert info.value.key == key and "absolute" in info.value.expected


def test_a_relative_api_rules_path_is_refused(tmp_path: Path) -> None:
    cfg = from_mapping({"collector": {"state_path": f"{tmp_path}/state.db"},
                        "thresholds": {"api_rules_path": "api-rules.json"},
                        "sinks": [{"type": "jsonl", "path": f"{tmp_path}/e.jsonl"}]},
                       str(tmp_path / "hostagent.toml"))
    with pytest.raises(ConfigError) as info:
        preflight.check(cfg)
    assert info.value.key == "thresholds.api_rules_path"


def test_a_missing_rules_file_names_the_config_that_points_at_it(tmp_path: Path) -> None:
    # The error is about the rules file, so it names that file; the fix is in the config.
    config = str(tmp_path / "hostagent.toml")
    cfg = from_mapping({"collector": {"state_path": f"{tmp_path}/state.db"},
                        "thresholds": {"rules_path": f"{tmp_path}/nope.json"},
                        "sinks": [{"type": "jsonl", "path": f"{tmp_path}/e.jsonl"}]}, config)
    with pytest.raises(ConfigError) as info:
        preflight.check(cfg)
    assert info.value.file == f"{tmp_path}/nope.json"
    assert info.value.fix and f"thresholds.rules_path in {config}" in info.value.fix
