"""Rules files a fuzzing pass found to crash the loader (and with it the daemon's watch):
each is a refused load that keeps the previous set, and a config error at start."""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pytest

from hostagent.alerts.index import Settings
from hostagent.alerts.rules_source import RulesSource, load_rules
from hostagent.cli.main import main
from hostagent.config.schema import MAX_REPEAT_S
from hostagent.errors import ConfigError
from tests.alerts.test_rules_index import FLAT

DEEP_TOML = "x = " + "[" * 3000 + "]" * 3000 + "\n"


@pytest.mark.parametrize(("name", "data", "expected"), [
    ("deep.toml", DEEP_TOML.encode(), "nested"),
    ("deep.json", b"[" * 100_000 + b"]" * 100_000, "valid JSON"),
    ("bom.json", b"\xef\xbb\xbf[]", "BOM"),
    ("bom.toml", b"\xef\xbb\xbf", "BOM"),
    ("repeat.json", orjson.dumps([{**FLAT, "repeat_interval_s": 1e300}]), "a value <="),
])
def test_hostile_rules_files_are_config_errors(tmp_path: Path, name: str, data: bytes,
                                               expected: str) -> None:
    p = tmp_path / name
    p.write_bytes(data)
    with pytest.raises(ConfigError, match=expected) as err:
        load_rules(p)
    assert err.value.file == str(p)


def test_a_rule_repeating_at_the_maximum_is_accepted(tmp_path: Path) -> None:
    p = tmp_path / "rules.json"
    p.write_bytes(orjson.dumps([{**FLAT, "repeat_interval_s": MAX_REPEAT_S}]))
    src = RulesSource(p, Settings(repeat_interval_s=MAX_REPEAT_S, cooldown_s=MAX_REPEAT_S))
    src.load_initial()  # the index turns both into nanoseconds
    assert [r.id for r in src.index.rules] == ["disk-big"]


def test_a_deeply_nested_file_is_a_refused_reload_that_keeps_the_set(tmp_path: Path) -> None:
    p = tmp_path / "rules.toml"
    p.write_text('[[rules]]\nid = "disk-big"\nresource_type = "storage"\n'
                 'threshold_type = "absolute"\nthreshold_value = 500\nunits = "GB"\n'
                 'action = "notify"\nuser_id = "u"\nnotification_channels = []\n')
    src = RulesSource(p, Settings())
    src.load_initial()
    p.write_text(DEEP_TOML)
    os.utime(p, ns=(1, 1))
    assert src.check() is False  # before: RecursionError out of the watch, daemon gone
    assert [r.id for r in src.index.rules] == ["disk-big"] and src.failures == 1
    assert "nested" in (src.last_error or "")


def test_an_unexpected_error_in_a_reload_is_counted_not_raised(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "rules.json"
    p.write_bytes(orjson.dumps([FLAT]))
    src = RulesSource(p, Settings())
    src.load_initial()

    def broken(_path: object, **_kw: object) -> object:
        raise ValueError("a defect the parser missed")

    monkeypatch.setattr("hostagent.alerts.rules_source.load_rules", broken)
    assert src.reload() is False
    assert src.failures == 1 and "ValueError" in (src.last_error or "")
    assert [r.id for r in src.index.rules] == ["disk-big"]


@pytest.mark.parametrize("via", ["check-rules", "rules_path", "api_rules_path"])
def test_deep_rules_are_exit_2_at_every_entry_point(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], via: str) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text(DEEP_TOML)
    cfg = tmp_path / "hostagent.toml"
    table = {"check-rules": "", "rules_path": f'rules_path = "{rules}"\n',
             "api_rules_path": f'api_rules_path = "{rules}"\n'}[via]
    cfg.write_text(f'[collector]\nstate_path = "{tmp_path}/state.db"\n[thresholds]\n{table}'
                   f'[[sinks]]\ntype = "jsonl"\npath = "{tmp_path}/e.jsonl"\n')
    argv = ["check-rules", str(rules)] if via == "check-rules" else ["check-config", str(cfg)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"{rules}: [-] expected TOML nested" in err
