"""Every rules-file error gets a fix naming what is accepted, with an example in the file's own
syntax (TOML for `*.toml`, JSON otherwise), like the main config's errors. Before, most ended at
"found ...": `[rules] expected an array of rules, found 'int'`, a rule without `resource_type`,
a non-UTF-8 file as "expected valid TOML, found ''utf-8' codec can't decode ...'", and a
missing FILE given to `check-rules` was told to "fix thresholds.rules_path"."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from hostagent.alerts.central import CentralRules
from hostagent.alerts.index import Settings
from hostagent.alerts.rules_source import RulesSource
from hostagent.cli.main import main
from hostagent.errors import ConfigError
from tests.clocks import FakeClock

# key → TOML value, one line each; None drops the key.
NESTED = {"id": '"cpu-high"', "resource_type": '"Cpu"',
          "threshold_type": "{ Percentage = { value = 80.0 } }", "action": '"Notify"',
          "user_id": '"*"', "notification_channels": "[]"}
FLAT = {"resource_type": '"storage"', "threshold_type": '"absolute"', "threshold_value": "500",
        "units": '"GB"', "action": '"notify"', "user_id": '"u"'}


def toml_rule(base: dict[str, str], **change: str | None) -> str:
    rule = {**base, **change}
    return "[[rules]]\n" + "".join(f"{k} = {v}\n" for k, v in rule.items() if v is not None)


def json_rule(**change: object) -> bytes:
    rule = {"id": "cpu-high", "resource_type": "Cpu",
            "threshold_type": {"Percentage": {"value": 80.0}}, "action": "Notify",
            "user_id": "*", **change}
    return orjson.dumps([rule])


# (id, file name, content, key, fix fragment)
CASES: list[tuple[str, str, bytes, str, str]] = [
    ("toml-rules-not-array", "r.toml", b"rules = 5\n", "rules",
     'a line [[rules]], then lines such as resource_type = "Cpu"'),
    ("toml-rule-not-table", "r.toml", b"rules = [5]\n", "rules[0]",
     "write each rule as a [[rules]] table"),
    ("toml-unknown-top-key", "r.toml", b"x = 1\n", "x",
     "remove the key (is this the rules file?); write each rule as a [[rules]] table"),
    ("toml-no-resource-type", "r.toml", toml_rule(NESTED, resource_type=None).encode(),
     "rules[0].resource_type",
     'set resource_type = "Cpu", "Memory", "Storage", "NetworkEgress", "NetworkIngress" or '
     '"Gpu"'),
    ("toml-unknown-resource-type", "r.toml",
     toml_rule(NESTED, resource_type='"Disk"').encode(), "rules[0].resource_type",
     'set resource_type = "Cpu", "Memory"'),
    ("toml-nested-threshold-type", "r.toml",
     toml_rule(NESTED, threshold_type="{ Percent = { value = 1 } }").encode(),
     "rules[0].threshold_type",
     'set threshold_type = { Percentage = { value = 80.0 } } or '
     '{ Absolute = { value = 3600, unit = "seconds" } }'),
    ("toml-threshold-body", "r.toml",
     toml_rule(NESTED, threshold_type="{ Percentage = 5 }").encode(),
     "rules[0].threshold_type.Percentage", "set threshold_type = { Percentage = "),
    ("toml-threshold-extra-key", "r.toml",
     toml_rule(NESTED, threshold_type="{ Percentage = { value = 80.0, max = 1 } }").encode(),
     "rules[0].threshold_type.Percentage.max",
     "remove the key: a Percentage takes a value, an Absolute a value and a unit"),
    ("toml-value-quoted", "r.toml",
     toml_rule(NESTED, threshold_type='{ Percentage = { value = "80" } }').encode(),
     "rules[0].threshold_type.Percentage.value",
     "write a number of 0 or more without quotes, e.g. value = 80.0"),
    ("toml-flat-threshold-type", "r.toml",
     toml_rule(FLAT, threshold_type='"relative"').encode(), "rules[0].threshold_type",
     'set threshold_type = "absolute" or "percentage" with threshold_value (and units), or '
     'the nested form { Percentage = { value = 80.0 } } or '
     '{ Absolute = { value = 500, unit = "GB" } }'),
    ("toml-flat-negative-value", "r.toml", toml_rule(FLAT, threshold_value="-1").encode(),
     "rules[0].threshold_value", "e.g. threshold_value = 500"),
    ("toml-unit-not-string", "r.toml", toml_rule(FLAT, units="5").encode(), "rules[0].units",
     'write the unit in double quotes, e.g. units = "GB"'),
    ("toml-unknown-unit", "r.toml", toml_rule(FLAT, units='"parsecs"').encode(),
     "rules[0].units", 'write one of those units in double quotes, e.g. units = "GB"'),
    ("toml-percentage-in-units", "r.toml",
     toml_rule(FLAT, threshold_type='"percentage"').encode(), "rules[0].units",
     'remove the unit or write units = "percent"'),
    ("toml-network-percentage", "r.toml",
     toml_rule(NESTED, resource_type='"NetworkEgress"').encode(), "rules[0].threshold_type",
     'use e.g. threshold_type = { Absolute = { value = 100, unit = "Mbps" } }'),
    ("toml-unknown-action", "r.toml", toml_rule(NESTED, action='"Page"').encode(),
     "rules[0].action", 'set action = "Notify", "Log" or "Alert"'),
    ("toml-no-action", "r.toml", toml_rule(NESTED, action=None).encode(),
     "rules[0].action", 'set action = "Notify", "Log" or "Alert"'),
    ("toml-user-id", "r.toml", toml_rule(NESTED, user_id="5").encode(), "rules[0].user_id",
     'e.g. user_id = "*"'),
    ("toml-instance-id", "r.toml", toml_rule(NESTED, instance_id='""').encode(),
     "rules[0].instance_id", 'e.g. instance_id = "vm-1", or remove the key'),
    ("toml-id", "r.toml", toml_rule(NESTED, id="7").encode(), "rules[0].id",
     'e.g. id = "cpu-high", or remove the key'),
    ("toml-channels", "r.toml", toml_rule(NESTED, notification_channels='"email"').encode(),
     "rules[0].notification_channels",
     'e.g. notification_channels = ["email", "webhook"] ([] for none)'),
    ("toml-channel-control", "r.toml",
     toml_rule(NESTED, notification_channels='["email:a@x\\tBcc"]').encode(),
     "rules[0].notification_channels", "shorten it to at most 256 characters, without line"),
    ("toml-for-passes", "r.toml", toml_rule(NESTED, for_passes="0").encode(),
     "rules[0].for_passes", "e.g. for_passes = 3, or remove the key"),
    ("toml-repeat-quoted", "r.toml", toml_rule(NESTED, repeat_interval_s='"1h"').encode(),
     "rules[0].repeat_interval_s", "e.g. repeat_interval_s = 3600"),
    ("toml-repeat-too-long", "r.toml", toml_rule(NESTED, repeat_interval_s="1e9").encode(),
     "rules[0].repeat_interval_s", "use a value from 0 to 31536000 seconds (0: never repeat)"),
    ("toml-not-utf8", "r.toml", b"# caf\xe9\n" + toml_rule(NESTED).encode(), "-",
     "save the file as UTF-8 (not Latin-1 or UTF-16)"),
    ("toml-huge-integer", "r.toml",
     toml_rule(NESTED, for_passes="1" + "0" * 5000).encode(), "-",
     "shorten it: no rule takes a number that long"),
    ("json-rule-not-object", "r.json", b"[5]", "rules[0]",
     'write the rules as an array of objects, [{"resource_type": "Cpu", "threshold_type": '
     '{"Percentage": {"value": 80.0}}, "action": "Notify", "user_id": "*", ...}], or as '
     '{"rules": [...]}'),
    ("json-rules-not-array", "r.json", b'{"rules": 5}', "rules",
     "write the rules as an array of objects"),
    ("json-unknown-top-key", "r.json", b'{"x": 1}', "x",
     "remove the key (is this the rules file?); write the rules as an array of objects"),
    ("json-value-quoted", "r.json",
     json_rule(threshold_type={"Percentage": {"value": "80"}}),
     "rules[0].threshold_type.Percentage.value", 'e.g. "value": 80.0'),
    ("json-unknown-action", "r.json", json_rule(action="Page"), "rules[0].action",
     'set "action": "Notify", "Log" or "Alert"'),
    ("json-nested-threshold-type", "r.json", json_rule(threshold_type={"Pct": {}}),
     "rules[0].threshold_type",
     'set "threshold_type": {"Percentage": {"value": 80.0}} or '
     '{"Absolute": {"value": 3600, "unit": "seconds"}}'),
    ("json-not-utf8", "r.json", b'[\n"caf\xe9"]', "-",
     "save the file as UTF-8 (not Latin-1 or UTF-16)"),
]


@pytest.mark.parametrize(("name", "content", "key", "fix"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_check_rules_names_what_is_accepted(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, content: bytes,
        key: str, fix: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    assert main(["check-rules", str(path)]) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"hostagent: config error: {path}: [{key}] expected "), lines[0]
    assert "; fix: " in lines[0], lines[0]
    assert fix in lines[0].split("; fix: ", 1)[1], lines[0]


@pytest.mark.parametrize(("name", "content", "where"), [
    ("r.toml", b"# a\n# b\n\xff", "line 3 (byte 8)"),
    ("r.json", b"[\n\n\xff]", "line 3 (byte 3)"),  # JSON said "line 1 column 1 (char 0)"
])
def test_a_non_utf8_rules_file_names_the_line_and_byte(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, content: bytes,
        where: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    assert main(["check-rules", str(path)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert f"[-] expected UTF-8 text, found 'undecodable bytes at {where}'; fix: " in line
    assert "codec" not in line


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_a_bad_file_argument_is_told_of_the_file_not_a_config_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str) -> None:
    path = tmp_path / "rules.json"
    if kind == "directory":
        path.mkdir()
    assert main(["check-rules", str(path)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"hostagent: config error: {path}: [-] expected ")
    fix = line.split("; fix: ", 1)[1]
    assert "thresholds.rules_path" not in fix and fix.startswith("pass the path of "), line


def test_the_daemons_rules_file_still_names_its_config_key(tmp_path: Path) -> None:
    src = RulesSource(tmp_path / "gone.json", Settings())
    with pytest.raises(ConfigError) as info:
        src.load_initial()
    assert info.value.fix == "create it, or fix thresholds.rules_path"


def test_a_central_source_url_that_is_not_http_gets_a_fix(tmp_path: Path) -> None:
    src = RulesSource(None, Settings())
    with pytest.raises(ConfigError) as info:
        CentralRules("ftp://x/rules", src, tmp_path / "c.json", FakeClock())
    assert info.value.fix and 'source_url = "https://' in info.value.fix
