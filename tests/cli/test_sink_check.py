"""`hostagent check-config` on NATS sink settings and `hostagent sink check NAME` against a real
nats-server: one clear line for every bad setting, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from hostagent.cli.main import main
from tests.nats_support import nats_server


def write_config(tmp: Path, nats: str) -> Path:
    path = tmp / "hostagent.toml"
    path.write_text(f"""
[host]
node_id = "node-7"
[[sinks]]
type = "jsonl"
path = "{tmp}/events.jsonl"
[[sinks]]
type = "nats"
{nats}
""")
    return path


def secret(tmp: Path, name: str, mode: int = 0o600) -> Path:
    path = tmp / name
    path.write_text("s3cret\n")
    path.chmod(mode)
    return path


BAD = [
    ('subject = "usage.{host}"', "sinks[1].subject", "placeholders"),
    ('subject = "usage..{node_id}"', "sinks[1].subject", "NATS subject"),
    ('subject = "usage.*"', "sinks[1].subject", "NATS subject"),
    ('create_stream = true\nsubject = "billing.{node_id}"', "sinks[1].subject",
     "covered by stream_subjects"),
    ('servers = ["http://127.0.0.1:4222"]', "sinks[1].servers", "nats://HOST:PORT"),
    ('servers = []', "sinks[1].servers", "at least one server"),
    ('stream = "A.B"', "sinks[1].stream", "a stream name"),
    ('duplicate_window_s = 60.0', "sinks[1].duplicate_window_s", "round_backoff_max_s"),
    ('token_file = "{tmp}/missing"', "sinks[1].token_file", "a readable file"),
    ('token_file = "{tmp}/open"', "sinks[1].token_file", "chmod 600"),
    ('token_file = "{tmp}/tok"\ncreds_file = "{tmp}/creds"', "sinks[1]", "one credential"),
    ('user = "u"', "sinks[1].password_file", "together"),
    ('tls_cert_file = "{tmp}/open"', "sinks[1].tls_key_file", "together"),
    ('stream_subjects = ["a.>.b"]', "sinks[1].stream_subjects", "subject filters"),
]


@pytest.mark.parametrize(("nats", "key", "words"), BAD)
def test_check_config_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     nats: str, key: str, words: str) -> None:
    secret(tmp_path, "open", 0o644)
    secret(tmp_path, "tok")
    secret(tmp_path, "creds")
    path = write_config(tmp_path, nats.replace("{tmp}", str(tmp_path)))
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"hostagent: config error: {path}: [{key}")
    assert words in err
    assert "Traceback" not in err


def test_check_config_accepts_a_full_nats_table(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    pw, key = secret(tmp_path, "pw"), secret(tmp_path, "key")
    cert = tmp_path / "cert.pem"
    cert.write_text("-")
    path = write_config(tmp_path, f"""servers = ["nats://10.0.0.1:4222", "tls://n2:4222"]
user = "hostagent"
password_file = "{pw}"
tls_ca_file = "{cert}"
tls_cert_file = "{cert}"
tls_key_file = "{key}"
create_stream = true
stream_replicas = 3""")
    assert main(["check-config", str(path)]) == 0
    assert "nats (nats)" in capsys.readouterr().out


def test_sink_check_reports_the_stream_and_subjects(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with nats_server(tmp_path) as srv:
        path = write_config(tmp_path, f'servers = ["{srv.url}"]\ncreate_stream = true')
        assert main(["sink", "check", "nats", "--config", str(path)]) == 0
        out = capsys.readouterr().out
        bad = write_config(tmp_path, f'servers = ["{srv.url}"]\nstream = "OTHER"')
        assert main(["sink", "check", "nats", "--config", str(bad)]) == 1
        err = capsys.readouterr().err
    assert out.startswith("nats (nats): OK\n")
    assert f"connected: {srv.url} (nats-server 2." in out
    assert "stream HOSTAGENT: subjects ['hostagent.>'], storage file" in out
    assert "subject hostagent.usage.node-7 (resource_usage): covered by HOSTAGENT" in out
    assert "subject hostagent.alerts.node-7 (threshold_violation): covered" in out
    assert "publish permitted" in out
    assert err.count("\n") == 1
    assert "stream 'OTHER' does not exist" in err


def test_sink_check_unreachable_server_and_unknown_names(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, 'servers = ["nats://127.0.0.1:1"]\nconnect_timeout_s = 0.2')
    assert main(["sink", "check", "nats", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot connect to nats://127.0.0.1:1" in err
    assert main(["sink", "check", "nope", "--config", str(path)]) == 2
    assert "no sink named 'nope'" in capsys.readouterr().err
    assert main(["sink", "check", "jsonl", "--config", str(path)]) == 0
    assert "no remote check" in capsys.readouterr().out
