"""Config: every error names file, key, expectation and what was found; defaults are sane."""

from __future__ import annotations

from pathlib import Path

import pytest

from hostagent.config.load import from_mapping, load, reference
from hostagent.config.sinks import QueueSinkConfig
from hostagent.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "hostagent.toml"
    p.write_text(text)
    return p


def test_defaults_when_empty(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, ""))
    assert cfg.collector.interval_s == 30.0
    assert cfg.libvirt.uri == "qemu:///system"
    assert [s.type for s in cfg.sinks] == ["jsonl"]
    assert cfg.source == str(tmp_path / "hostagent.toml")


def test_full_example_values(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, """
[host]
node_id = "hv-7"
[libvirt]
uri = "test:///default"
[collector]
interval_s = 10
state_path = "/tmp/s.db"
time_format = "rfc3339"
[[sinks]]
type = "jsonl"
path = "/tmp/e.jsonl"
[[sinks]]
type = "formation-queue"
url = "http://127.0.0.1:53333"
[sinks.retry]
max_retries = 5
"""))
    assert cfg.host.node_id == "hv-7"
    assert cfg.collector.interval_s == 10.0
    assert isinstance(cfg.collector.interval_s, float)
    assert cfg.collector.time_format == "rfc3339"
    queue = cfg.sinks[1]
    assert isinstance(queue, QueueSinkConfig)
    assert queue.retry.max_retries == 5
    assert queue.breaker.failure_threshold == 5


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ("[collector]\ninterval_s = 'fast'", "collector.interval_s", "a number"),
        ("[collector]\ninterval_s = 0", "collector.interval_s", "a value >= 1"),
        ("[collector]\ntime_format = 'iso'", "collector.time_format", "one of 'unix', 'rfc3339'"),
        ("[colector]\ninterval_s = 5", "colector", "one of"),
        ("[libvirt]\nuri = 5", "libvirt.uri", "a string"),
        ("[libvirt]\nnowait = 'yes'", "libvirt.nowait", "true or false"),
        ("[collector]\nmax_threads = 2.5", "collector.max_threads", "an integer"),
        ("[[sinks]]\ntype = 'kafka'", "sinks[0].type", "one of"),
        ("[[sinks]]\ntype = 'jsonl'\nfoo = 1", "sinks[0].foo", "one of"),
        ("[[sinks]]\ntype = 'jsonl'\nname='a'\n[[sinks]]\ntype = 'jsonl'\nname='a'",
         "sinks[1].name", "a unique sink name"),
        ("[[sinks]]\ntype = 'formation-queue'\n[sinks.retry]\njitter = 2",
         "sinks[0].retry.jitter", "a value <= 1"),
    ],
)
def test_errors_name_file_key_and_expectation(
    tmp_path: Path, text: str, key: str, expected: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path)
    err = info.value
    assert err.file == str(path)
    assert err.key == key
    assert expected in err.expected
    assert str(path) in str(err)
    assert key in str(err)


def test_syntax_error_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="valid TOML"):
        load(write(tmp_path, "[collector\n"))
    with pytest.raises(ConfigError, match="no such file"):
        load(tmp_path / "absent.toml")


def test_reference_covers_every_section() -> None:
    keys = {k for k, _, _ in reference()}
    for key in ("host.node_id", "libvirt.uri", "collector.interval_s", "collector.state_path",
                "sinks[jsonl].path", "sinks[formation-queue].retry.max_retries"):
        assert key in keys
    assert all(doc for k, _, doc in reference() if not k.startswith(("log.", "sinks")))


def test_unnamed_sinks_keep_their_type_name_unless_it_clashes() -> None:
    cfg = from_mapping({"sinks": [{"type": "formation-queue"}, {"type": "jsonl"},
                                         {"type": "jsonl", "path": "/tmp/second.jsonl"}]})
    assert [s.name for s in cfg.sinks] == ["formation-queue", "jsonl", "jsonl-2"]
