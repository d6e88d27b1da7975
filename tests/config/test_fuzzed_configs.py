"""Configs a fuzzing pass found to crash, hang or pass `check-config`: each is now one line
naming the config file, the dotted key and the fix, and exit 2 (never a traceback)."""

from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path

import pytest

from hostagent.accounting.events import EVENT_TYPE
from hostagent.alerts import violations
from hostagent.cli.main import main
from hostagent.config.load import Config, load
from hostagent.config.sinks import EVENT_KINDS, SINK_TYPES
from hostagent.errors import ConfigError


def base(tmp_path: Path) -> str:
    return (f'[libvirt]\nuri = "test:///default"\n[collector]\n'
            f'state_path = "{tmp_path}/state/state.db"\n')


def jsonl(tmp_path: Path) -> str:
    return f'[[sinks]]\ntype = "jsonl"\npath = "{tmp_path}/events.jsonl"\n'


def check_config(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]) -> str:
    """Run `hostagent check-config` on `text`; assert exit 2 and return the one error line."""
    path = tmp_path / "hostagent.toml"
    path.write_text(text)
    rc = main(["check-config", str(path)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert f"config error: {path}: [" in err, err  # the config file, then the key
    return err


# --- NATS sink: server URLs and subject templates (B1, B2, D4) -------------------------------


@pytest.mark.parametrize(("line", "key"), [
    ('servers = ["nats://[::1"]', "servers"),
    ('servers = ["nats://127.0.0.1:99999"]', "servers"),
    ('servers = ["nats://127.0.0.1:abc"]', "servers"),
    ('servers = ["nats://127.0.0.1:0"]', "servers"),
    ('subject = "a.{node_id.foo}"', "subject"),
    ('alert_subject = "a.{node_id.foo}"', "alert_subject"),
    ('subject = "a.{node_id[0]}"', "subject"),
    ('subject = "a.{node_id!r}"', "subject"),
    ('subject = "a.{kind:>10}"', "subject"),
    ('subject = "a.{}"', "subject"),
    ('subject = "a.{node_id"', "subject"),
])
def test_nats_urls_and_subject_templates_are_config_errors(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str, key: str) -> None:
    err = check_config(tmp_path, base(tmp_path) + jsonl(tmp_path)
                       + f'[[sinks]]\ntype = "nats"\n{line}\n', capsys)
    assert f"[sinks[1].{key}]" in err and "fix:" in err


def test_plain_nats_placeholders_still_pass(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(base(tmp_path) + '[[sinks]]\ntype = "nats"\nservers = ["nats://[::1]:4222"]\n'
                    'subject = "a.{node_id}.{kind}"\nalert_subject = "b.{{x}}.{kind}"\n')
    assert load(path).sinks[0].type == "nats"


# --- sinks: kinds, the empty array, names (D3, D5, G) ---------------------------------------


def test_event_kinds_are_the_kinds_hostagent_emits() -> None:
    assert set(EVENT_KINDS) == {EVENT_TYPE, violations.KIND}


@pytest.mark.parametrize("sink", ["jsonl", "formation-queue", "webhook", "email", "nats"])
@pytest.mark.parametrize("kinds", ['["nope"]', "[]", '["resource_usage", "threshold"]'])
def test_unknown_or_no_kinds_are_refused_on_every_sink(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], sink: str, kinds: str) -> None:
    err = check_config(tmp_path, base(tmp_path)
                       + f'[[sinks]]\ntype = "{sink}"\nkinds = {kinds}\n', capsys)
    assert "[sinks[0].kinds]" in err and "resource_usage" in err


def test_an_empty_sinks_array_is_refused_and_no_sinks_key_keeps_the_default(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = check_config(tmp_path, "sinks = []\n" + base(tmp_path), capsys)
    assert "[sinks]" in err and "remove `sinks = []` for the default JSONL sink" in err
    path = tmp_path / "default.toml"
    path.write_text(base(tmp_path))
    assert [s.type for s in load(path).sinks] == ["jsonl"]


@pytest.mark.parametrize("name", ['""', '"  "', '"a\\nb"'])
def test_empty_or_multiline_sink_names_are_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str) -> None:
    err = check_config(tmp_path, base(tmp_path) + jsonl(tmp_path) + f"name = {name}\n", capsys)
    assert "[sinks[0].name]" in err


# --- a JSONL sink must not write into another file (D1) --------------------------------------


@pytest.mark.parametrize("target", [
    "{tmp}/state/state.db", "{tmp}/state/state.db-wal", "{tmp}/state/state.db-shm",
    "{tmp}/state/state.db.id", "{tmp}/state/state.db.lock", "{tmp}/state/state.db.new",
    "{tmp}/hostagent.toml", "{tmp}/rules.json",
    "{tmp}/state/api-rules.json", "{tmp}/other.jsonl", "{tmp}/journal.db",
    "{tmp}/state/../state/state.db",
])
def test_a_jsonl_sink_sharing_a_file_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], target: str) -> None:
    (tmp_path / "rules.json").write_text("[]")
    text = (base(tmp_path) + f'[thresholds]\nrules_path = "{tmp_path}/rules.json"\n'
            f'[[sinks]]\ntype = "jsonl"\nname = "other"\npath = "{tmp_path}/other.jsonl"\n'
            f'[[sinks]]\ntype = "email"\nhost = "127.0.0.1"\ntls = "none"\n'
            f'journal_path = "{tmp_path}/journal.db"\n'
            f'[[sinks]]\ntype = "jsonl"\nname = "dup"\npath = "{target.format(tmp=tmp_path)}"\n')
    if target.endswith("other.jsonl"):
        text = text.replace('name = "dup"', 'name = "dup2"')
    err = check_config(tmp_path, text, capsys)
    assert "[sinks[2].path]" in err and "a file of its own" in err


def test_a_symlinked_jsonl_path_to_the_store_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "state" / "state.db")
    err = check_config(tmp_path, base(tmp_path) + f'[[sinks]]\ntype = "jsonl"\n'
                       f'path = "{tmp_path}/link.jsonl"\n', capsys)
    assert "[sinks[0].path]" in err and "collector.state_path already uses" in err


# --- the email sink (D2, E) ------------------------------------------------------------------


@pytest.mark.parametrize(("lines", "key"), [
    ('host = "smtp.example.com"\ntls = "none"', "tls"),
    ('channel = "a:b"', "channel"),
    ('channel = ""', "channel"),
    ('host = ""', "host"),
    ('api_url = "not a url"', "api_url"),
    ('api_url = "ftp://example.com"', "api_url"),
    ('to = ["ops"]', "to[0]"),
    ('to = ["ops@example.com", ""]', "to[1]"),
    ('sender = "a@b.example\\r\\nBcc: x@y.example"', "sender"),
    ('subject_prefix = "[x]\\nBcc: y"', "subject_prefix"),
    ('journal_path = "{tmp}"', "journal_path"),
    ('journal_path = "{tmp}/regular/j.db"', "journal_path"),
    ('journal_path = ""', "journal_path"),
    ('username = "u"\npassword_file = "{tmp}/missing"', "password_file"),
    ('username = "u"\npassword_file = "{tmp}/open"', "password_file"),
    ('password_file = "{tmp}/secret"', "username"),
    ('ca_file = "{tmp}/missing"', "ca_file"),
])
def test_email_sink_settings_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         lines: str, key: str) -> None:
    (tmp_path / "regular").write_text("")
    for name, mode in (("open", 0o644), ("secret", 0o600)):
        (tmp_path / name).write_text("pw")
        os.chmod(tmp_path / name, mode)
    err = check_config(tmp_path, base(tmp_path) + jsonl(tmp_path)
                       + '[[sinks]]\ntype = "email"\n' + lines.format(tmp=tmp_path) + "\n",
                       capsys)
    assert f"[sinks[1].{key}]" in err and "; fix: " in err


def test_a_sound_email_sink_passes(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("secret")
    os.chmod(tmp_path / "pw", 0o600)
    path = tmp_path / "c.toml"
    path.write_text(base(tmp_path) + '[[sinks]]\ntype = "email"\nhost = "smtp.example.com"\n'
                    'port = 587\nsender = "hostagent@hv-7.example.com"\nto = ["ops@example.com"]\n'
                    f'username = "u"\npassword_file = "{tmp_path}/pw"\n'
                    'api_url = "https://hv-7.example.com:8080"\n')
    assert main(["check-config", "-q", str(path)]) == 0


# --- numbers the daemon would crash on (C) ---------------------------------------------------


@pytest.mark.parametrize(("table", "key", "value"), [
    ("outbox", "retention_s", "1e12"),
    ("outbox", "retention_s", "1e300"),
    ("collector", "baseline_retention_s", "1e300"),
    ("thresholds", "repeat_interval_s", "1e300"),
    ("thresholds", "cooldown_s", "1e300"),
    ("owners", "ttl_s", "1e300"),
    ("api", "max_pass_age_s", "1e300"),
])
def test_huge_finite_numbers_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         table: str, key: str, value: str) -> None:
    text = base(tmp_path).replace("[collector]\n", f"[collector]\n{key} = {value}\n") \
        if table == "collector" else base(tmp_path) + f"[{table}]\n{key} = {value}\n"
    err = check_config(tmp_path, text, capsys)
    assert f"[{table}.{key}] expected a value <=" in err


def _numbers(cls: type[typing.Any], prefix: str) -> list[tuple[str, dict[str, typing.Any]]]:
    out: list[tuple[str, dict[str, typing.Any]]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            out += _numbers(tp, f"{prefix}.{f.name}")
        elif tp in (int, float):
            out.append((f"{prefix}.{f.name}", dict(f.metadata)))
    return out


def _every_number() -> list[tuple[str, dict[str, typing.Any]]]:
    hints = typing.get_type_hints(Config)
    out: list[tuple[str, dict[str, typing.Any]]] = []
    for f in dataclasses.fields(Config):
        if f.name not in ("sinks", "source"):
            out += _numbers(hints[f.name], f.name)
    for kind, cls in SINK_TYPES.items():
        out += _numbers(cls, f"sinks[{kind}]")
    return out


def test_every_number_key_has_a_maximum_that_fits_in_nanoseconds() -> None:
    """A duration becomes int(s * 1e9) and meets SQLite's signed 64-bit INTEGER: any key
    without a maximum let `check-config` pass what `run` crashed on (OverflowError)."""
    numbers = _every_number()
    assert len(numbers) > 60
    for key, meta in numbers:
        assert meta["max"] is not None, key
        if key.endswith("_s"):
            assert meta["max"] * 1e9 < 2**63, key


# --- the config file itself (G) ---------------------------------------------------------------


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="a regular file"):
        load(fifo)  # before: blocked forever in open()


def test_a_byte_order_mark_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf" + base(tmp_path).encode())
    with pytest.raises(ConfigError, match="BOM") as err:
        load(path)
    assert err.value.file == str(path) and "without a BOM" in str(err.value.fix)


@pytest.mark.parametrize("state", ["state.db", "{tmp}/dir/", "{tmp}/loop/state.db",
                                   "{tmp}/loop"])
def test_unusable_state_paths_are_config_errors(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], state: str) -> None:
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    err = check_config(tmp_path, f'[collector]\nstate_path = "{state.format(tmp=tmp_path)}"\n'
                       + jsonl(tmp_path), capsys)
    assert "[collector.state_path]" in err


def test_an_unparseable_xpath_gets_a_fix_that_helps(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = check_config(tmp_path, base(tmp_path) + 'instance_id_xpath = "[[["\n'
                       + jsonl(tmp_path), capsys)
    assert "[collector.instance_id_xpath]" in err and "NoneType" not in err
    assert "nova:instance" in err
