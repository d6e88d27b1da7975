"""A value of the wrong type or outside a key's choices gets a fix naming what is accepted
(the choices, or the type with an example), like every other config error. Before, these
errors ended at "found ...": `[log.level] expected one of 'debug', ..., found 'loud'`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hostagent.cli.main import main
from hostagent.config.load import from_mapping, reference
from hostagent.errors import ConfigError

CASES = [
    ('[collector]\ninterval_s = "x"', "collector.interval_s", "expected a number, found 'x'",
     "write a number without quotes, e.g. interval_s = 30.0"),
    ('[log]\nlevel = "loud"', "log.level", "found 'loud'",
     'set level = "debug", "info", "warning" or "error"'),
    ("[log]\nformat = 3", "log.format", "found 3", 'set format = "auto", "json" or "text"'),
    ('[collector]\ntime_format = "UNIX"', "collector.time_format", "found 'UNIX'",
     'set time_format = "unix" or "rfc3339"'),
    ("[collector]\nalign = 1", "collector.align", "expected true or false",
     "write align = true or align = false, without quotes"),
    ("[collector]\nmax_threads = 1.5", "collector.max_threads", "expected an integer",
     "write a whole number without quotes, e.g. max_threads = 8"),
    ("[libvirt]\nuri = 5", "libvirt.uri", "expected a string, found 5",
     'write it in double quotes, e.g. uri = "qemu:///system"'),
    ('[api]\nadmin_principals = "x"', "api.admin_principals", "expected an array of strings",
     'write an array of quoted strings, e.g. admin_principals = ["a", "b"]'),
    ("[api]\njwt_algorithms = [1]", "api.jwt_algorithms", "found [1]",
     'e.g. jwt_algorithms = ["RS256", "ES256", "EdDSA"]'),
    ('[api]\njwt_issuer = "a\\u0000"', "api.jwt_issuer", "without NUL characters",
     "remove the NUL (\\u0000) characters"),
    ('[[sinks]]\ntype = "email"\ntls = "off"', "sinks[0].tls", "found 'off'",
     'set tls = "starttls", "implicit" or "none"'),
    ('[[sinks]]\ntype = "jsonl"\npath = "/tmp/x.jsonl"\n[sinks.retry]\nmax_retries = "3"',
     "sinks[0].retry.max_retries", "expected an integer, found '3'", "max_retries = 3"),
]


@pytest.mark.parametrize(("text", "key", "found", "fix"), CASES, ids=[c[1] for c in CASES])
def test_a_type_or_choice_error_names_what_is_accepted(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, key: str, found: str,
        fix: str) -> None:
    path = tmp_path / "hostagent.toml"
    path.write_text(text + "\n")
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"hostagent: config error: {path}: [{key}] expected ")
    assert found in lines[0]
    assert "; fix: " in lines[0] and lines[0].endswith(fix), lines[0]


def _nest(key: str, value: Any) -> dict[str, Any]:
    """{"a": {"b": value}} for "a.b"; a sink key "sinks[jsonl].retry.x" in a sink of that type."""
    if key.startswith("sinks["):
        kind, _, rest = key[len("sinks["):].partition("].")
        sink: dict[str, Any] = {"type": kind}
        if kind == "jsonl":
            sink["path"] = "/tmp/hostagent-test.jsonl"
        inner: dict[str, Any] = sink
        *tables, leaf = rest.split(".")
        for t in tables:
            inner = inner.setdefault(t, {})
        inner[leaf] = value
        return {"sinks": [sink]}
    *tables, leaf = key.split(".")
    doc: dict[str, Any] = {}
    inner = doc
    for t in tables:
        inner = inner.setdefault(t, {})
    inner[leaf] = value
    return doc


KEYS = [k for k, _, _ in reference() if not k.endswith("].type")]


@pytest.mark.parametrize("key", KEYS)
def test_every_key_given_a_value_of_the_wrong_type_gets_a_fix(key: str) -> None:
    for wrong in ({"nested": 1}, [[1]]):  # wrong for every scalar, array and choice key
        with pytest.raises(ConfigError) as info:
            from_mapping(_nest(key, wrong), "test.toml")
        err = info.value
        assert err.key.endswith(key.rsplit("].", maxsplit=1)[-1]), (key, str(err))
        assert err.fix, str(err)


MORE = [
    ('[[sinks]]\ntype = "nats"\nstream = "a b"', "sinks[0].stream", 'e.g. stream = "HOSTAGENT"'),
    ('[[sinks]]\ntype = "nats"\nstream_subjects = ["a b"]', "sinks[0].stream_subjects",
     'e.g. stream_subjects = ["hostagent.>"]'),
    ('[[sinks]]\ntype = "nats"\ntls_ca_file = "{tmp}"', "sinks[0].tls_ca_file",
     "name a regular file, not a directory or special file"),
    ('[[sinks]]\ntype = "formation-queue"\nurl = "ftp://x:1"', "sinks[0].url",
     'e.g. "http://127.0.0.1:53333"'),
]


@pytest.mark.parametrize(("text", "key", "fix"), MORE, ids=[c[1] for c in MORE])
def test_the_other_checks_without_a_fix_have_one(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, key: str,
        fix: str) -> None:
    path = tmp_path / "hostagent.toml"
    path.write_text(text.format(tmp=tmp_path) + "\n")
    assert main(["check-config", str(path)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert f": [{key}] expected " in line and "; fix: " in line and line.endswith(fix), line
