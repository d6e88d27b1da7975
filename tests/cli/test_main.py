"""The command line: exit codes and messages a person or a script relies on."""

from __future__ import annotations

from pathlib import Path

import pytest

from hostagent import __version__
from hostagent.cli.main import main

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "config" / "hostagent.example.toml"


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_check_config_ok(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(EXAMPLE)]) == 0
    assert "OK" in capsys.readouterr().out


def test_check_config_error_names_file_and_key(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[collector]\ninterval_s = -3\n")
    assert main(["check-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err
    assert "collector.interval_s" in err
    assert "-3" in err


def test_config_accepted_before_and_after_the_subcommand(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    cfg = tmp_path / "h.toml"
    cfg.write_text(f'[collector]\nstate_path = "{tmp_path}/state.db"\n'
                   f'[[sinks]]\ntype = "jsonl"\npath = "{tmp_path}/e.jsonl"\n')
    assert main(["--config", str(cfg), "outbox", "status"]) in (0, 1)
    first = capsys.readouterr()
    assert main(["outbox", "status", "--config", str(cfg)]) in (0, 1)
    second = capsys.readouterr()
    assert "unrecognized" not in first.err + second.err


def test_check_rules_and_check_config_validate_the_rules(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "rules.json"
    good.write_text('[{"resource_type": "storage", "threshold_type": "absolute", '
                    '"threshold_value": 500, "units": "GB", "action": "notify", '
                    '"user_id": "*", "notification_channels": ["queue"]}]')
    sinks = tmp_path / "sinks.toml"
    sinks.write_text('[[sinks]]\ntype = "formation-queue"\n[[sinks]]\ntype = "email"\n'
                     'to = ["ops@example.test"]\n')
    assert main(["check-rules", str(good), "--config", str(sinks)]) == 0
    out = capsys.readouterr().out
    assert "1 rule(s)" in out
    assert "queue" in out and "email" in out  # the channels and the sinks serving them
    # no silent channel: without a queue sink the same rule is refused, naming the channel
    bare = tmp_path / "bare.toml"
    bare.write_text('[[sinks]]\ntype = "jsonl"\n')
    assert main(["check-rules", str(good), "--config", str(bare)]) == 2
    assert "'queue'" in capsys.readouterr().err
    assert main(["check-rules", str(good)]) == 0  # no --config: channels are not checked
    assert "not checked" in capsys.readouterr().out
    cfg_bare = tmp_path / "bare-rules.toml"
    cfg_bare.write_text(f'[thresholds]\nrules_path = "{good}"\n[[sinks]]\ntype = "jsonl"\n')
    assert main(["check-config", str(cfg_bare)]) == 2  # check-config always checks them
    assert "'queue'" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('[{"resource_type": "storage", "threshold_type": "absolute", '
                   '"threshold_value": 500, "units": "percent", "action": "notify", '
                   '"user_id": "*"}]')
    assert main(["check-rules", str(bad)]) == 2
    assert str(bad) in capsys.readouterr().err
    cfg = tmp_path / "h.toml"
    cfg.write_text(f'[thresholds]\nrules_path = "{bad}"\n')
    assert main(["check-config", str(cfg)]) == 2   # the config names a broken rules file
    assert str(bad) in capsys.readouterr().err


def test_dump_without_a_domain_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(EXAMPLE), "dump"]) == 2
    assert "name a DOMAIN" in capsys.readouterr().err
