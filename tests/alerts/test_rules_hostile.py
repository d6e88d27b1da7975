"""Rules files a fuzzing pass found to crash the loader (and with it the daemon's watch):
each is a refused load that keeps the previous set, and a config error at start."""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

import orjson
import pytest

from hostagent.alerts import rules_file
from hostagent.alerts.index import Settings
from hostagent.alerts.rules_file import load_rules
from hostagent.alerts.rules_source import RulesSource
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
    # A line break in a channel forged mail headers (email:a@x\r\nBcc: ...) and, before the
    # sink was hardened, crashed delivery at every start.
    ("crlf.json", orjson.dumps([{**FLAT, "notification_channels": ["email:a@x\r\nBcc: b@y"]}]),
     "printable"),
    ("long.json", orjson.dumps([{**FLAT, "notification_channels": ["email:" + "a" * 300]}]),
     "at most 256"),
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


TOML_CPU = ('[[rules]]\nid = "cpu"\nresource_type = "Cpu"\n'
            'threshold_type = { Percentage = { value = 80.0 } }\naction = "Log"\nuser_id = "*"\n')
BIG = "1" + "0" * 400  # an integer past float's range; TOML keeps it exact


@pytest.mark.parametrize(("extra", "key"), [
    (f"for_passes = {10**23}\n", "rules[0].for_passes"),
    (f"repeat_interval_s = {BIG}\n", "rules[0].repeat_interval_s"),
])
def test_huge_integers_are_a_refused_reload_not_a_crash(tmp_path: Path, extra: str,
                                                        key: str) -> None:
    p = tmp_path / "rules.toml"
    p.write_text(TOML_CPU)
    src = RulesSource(p, Settings(), in_force_path=tmp_path / "rules-in-force.json")
    src.load_initial()
    p.write_text(TOML_CPU + extra)
    os.utime(p, ns=(1, 1))
    # Before: TypeError (orjson, remembering a for_passes past 64 bits) out of check(), so out
    # of the watch and the daemon; OverflowError for the repeat, logged with no file or key.
    assert src.check() is False
    assert [r.id for r in src.index.rules] == ["cpu"] and src.failures == 1
    assert f"{p}: [{key}]" in (src.last_error or "")
    with pytest.raises(ConfigError) as err:  # and at start: a config error, not a traceback
        load_rules(p)
    assert err.value.key == key


@pytest.mark.parametrize(("text", "key"), [
    (TOML_CPU.replace("value = 80.0", f"value = {BIG}"),
     "rules[0].threshold_type.Percentage.value"),
    (TOML_CPU.replace("value = 80.0", "value = 1" + "0" * 5000), "-"),  # past 4,300 digits
    (TOML_CPU.replace('resource_type = "Cpu"', 'resource_type = "Memory"').replace(
        "Percentage = { value = 80.0 }", 'Absolute = { value = 1e308, unit = "TB" }'),
     "rules[0].threshold_type.Absolute.value"),  # finite as written, infinite in bytes
])
def test_numbers_no_threshold_can_hold_are_config_errors(tmp_path: Path, text: str,
                                                         key: str) -> None:
    p = tmp_path / "rules.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as err:  # before: OverflowError, ValueError, or accepted
        load_rules(p)                        # (1e308 TB: an infinite threshold, never firing)
    assert err.value.file == str(p) and err.value.key == key


def test_flat_rule_overflowing_its_unit_names_threshold_value(tmp_path: Path) -> None:
    p = tmp_path / "rules.json"
    p.write_bytes(orjson.dumps([{**FLAT, "threshold_value": 1e300, "units": "TB"}]))
    with pytest.raises(ConfigError) as err:
        load_rules(p)
    assert err.value.key == "rules[0].threshold_value" and "finite" in str(err.value)


def _released(p: Path) -> None:
    """Let a reader blocked on the FIFO go (what the old code needed, to end the test)."""
    with contextlib.suppress(OSError):
        os.close(os.open(p, os.O_WRONLY | os.O_NONBLOCK))


def test_a_fifo_at_rules_path_is_refused_without_blocking(tmp_path: Path) -> None:
    p = tmp_path / "rules.json"
    p.write_bytes(orjson.dumps([FLAT]))
    src = RulesSource(p, Settings())
    src.load_initial()
    p.unlink()
    os.mkfifo(p)
    done: list[bool | None] = []
    t = threading.Thread(target=lambda: done.append(src.check()), daemon=True)
    t.start()
    t.join(5)
    if t.is_alive():
        _released(p)
        t.join(5)
    # Before: check() sat in open() for a writer; the daemon calls it on its trio thread, so
    # every pass, the API and delivery stood still with it.
    assert done == [False] and not t.is_alive()
    assert "a FIFO" in (src.last_error or "") and [r.id for r in src.index.rules] == ["disk-big"]


@pytest.mark.parametrize("kind", ["directory", "device"])
def test_other_non_files_at_rules_path_are_refused(tmp_path: Path, kind: str) -> None:
    p = tmp_path / "rules.json"
    if kind == "directory":
        p.mkdir()
    else:
        p.symlink_to("/dev/null")  # /dev/zero: read until memory ran out
    with pytest.raises(ConfigError, match="a regular rules file") as err:
        load_rules(p)
    assert err.value.file == str(p)


def test_a_rules_file_over_the_size_bound_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "rules.json"
    with p.open("wb") as f:
        f.truncate(rules_file.MAX_RULES_FILE_BYTES + 1)
    with pytest.raises(ConfigError, match="at most"):
        load_rules(p)
