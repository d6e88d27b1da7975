"""Every config mistake is one clear line on stderr and exit 2, from `check-config` and from
`run` alike (issue 13 §4): never a traceback, never a pass committed and then a crash."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from hostagent.cli.main import main

Maker = Callable[[Path], Path]


def base(tmp: Path, extra: str = "", collector: str = "") -> str:
    """A config that runs one pass on libvirt's test driver, files under `tmp`."""
    return (f'[collector]\nstate_path = "{tmp}/state/state.db"\n{collector}\n'
            f'[libvirt]\nuri = "test:///default"\n{extra}\n'
            f'[[sinks]]\ntype = "jsonl"\npath = "{tmp}/events.jsonl"\n')


def write(tmp: Path, text: str, name: str = "hostagent.toml") -> Path:
    path = tmp / name
    path.write_text(text)
    return path


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def nan_interval(tmp: Path) -> Path:
    return write(tmp, base(tmp, collector="interval_s = nan"))


def inf_timeout(tmp: Path) -> Path:
    return write(tmp, base(tmp, extra="call_timeout_s = inf"))


def neg_inf_sink_retry(tmp: Path) -> Path:
    return write(tmp, base(tmp) + "[sinks.retry]\nmax_backoff_s = -inf\n")


def directory(tmp: Path) -> Path:
    (tmp / "conf.d").mkdir()
    return tmp / "conf.d"


def symlink_loop(tmp: Path) -> Path:
    (tmp / "loop.toml").symlink_to(tmp / "loop.toml")
    return tmp / "loop.toml"


def unreadable(tmp: Path) -> Path:
    path = write(tmp, base(tmp))
    path.chmod(0)
    return path


def deep_array(tmp: Path) -> Path:
    path = tmp / "deep.toml"
    path.write_text("a = " + "[" * 50_000 + "]" * 50_000 + "\n")
    return path


def deep_value(tmp: Path) -> Path:
    return write(tmp, base(tmp, collector="pass_timeout_s = " + "[" * 300 + "]" * 300))


def remote_bind_without_tls(tmp: Path) -> Path:
    return write(tmp, base(tmp, extra='[api]\nenabled = true\nport = 0\nbind = "0.0.0.0"'))


def missing_tls_files(tmp: Path) -> Path:
    return write(tmp, base(tmp, extra=f'[api]\nenabled = true\nport = 0\n'
                                      f'tls_cert_file = "{tmp}/no.crt"\n'
                                      f'tls_key_file = "{tmp}/no.key"'))


def missing_api_keys_file(tmp: Path) -> Path:
    return write(tmp, base(tmp, extra=f'[api]\nenabled = true\nport = 0\n'
                                      f'api_keys_file = "{tmp}/no-keys.toml"'))


def bad_xpath(tmp: Path) -> Path:
    return write(tmp, base(tmp, collector='instance_id = "metadata"\n'
                                          'instance_id_xpath = "[[["'))


def bad_xpath_other_scheme(tmp: Path) -> Path:
    return write(tmp, base(tmp, collector='instance_id_xpath = "[[["'))


def state_under_a_file(tmp: Path) -> Path:
    (tmp / "plain").write_text("")
    return write(tmp, base(tmp).replace(f"{tmp}/state/state.db", f"{tmp}/plain/state.db"))


def state_is_a_directory(tmp: Path) -> Path:
    (tmp / "state" / "state.db").mkdir(parents=True)
    return write(tmp, base(tmp))


def sink_under_a_file(tmp: Path) -> Path:
    (tmp / "plain").write_text("")
    return write(tmp, base(tmp).replace(f"{tmp}/events.jsonl", f"{tmp}/plain/events.jsonl"))


def missing_rules_file(tmp: Path) -> Path:
    return write(tmp, base(tmp, extra=f'[thresholds]\nrules_path = "{tmp}/rules.json"'))


def api_rules_a_directory(tmp: Path) -> Path:  # found by the generated documents
    return write(tmp, base(tmp, extra='[thresholds]\napi_rules_path = "/"'))


def api_rules_damaged(tmp: Path) -> Path:
    """The API's rules file next to the state store (the default) is not a rules document."""
    (tmp / "state").mkdir(exist_ok=True)
    (tmp / "state" / "api-rules.json").write_text("{not json")
    return write(tmp, base(tmp))


def sink_type_not_a_string(tmp: Path) -> Path:  # found by the generated documents
    return write(tmp, base(tmp).replace('type = "jsonl"', "type = []"))


def bad_allow_list(tmp: Path) -> Path:
    return write(tmp, base(tmp) + '[[sinks]]\ntype = "webhook"\n'
                                  'allow_list = ["10.0.0.0/8", "10.0.0.0/33"]\n')


def queue_url(url: str) -> Maker:
    def make(tmp: Path) -> Path:
        return write(tmp, base(tmp) + f'[[sinks]]\ntype = "formation-queue"\nurl = "{url}"\n')
    return make


CASES: dict[str, tuple[Maker, str]] = {
    "queue url [::1": (queue_url("http://[::1"), "sinks[1].url"),
    "queue url ftp": (queue_url("ftp://x/"), "sinks[1].url"),
    "queue url empty": (queue_url(""), "sinks[1].url"),
    "queue url port": (queue_url("http://127.0.0.1:99999"), "sinks[1].url"),
    "allow_list not a CIDR": (bad_allow_list, "sinks[1].allow_list"),
    "sink type []": (sink_type_not_a_string, "sinks[0].type"),
    "nan": (nan_interval, "collector.interval_s"),
    "inf": (inf_timeout, "libvirt.call_timeout_s"),
    "-inf": (neg_inf_sink_retry, "sinks[0].retry.max_backoff_s"),
    "directory": (directory, "a readable TOML file"),
    "symlink loop": (symlink_loop, "symbolic links"),
    "deep array": (deep_array, "nested"),
    "deep value": (deep_value, "collector.pass_timeout_s"),
    "0.0.0.0 without TLS": (remote_bind_without_tls, "api.bind"),
    "missing TLS files": (missing_tls_files, "api.tls_cert_file"),
    "missing API keys file": (missing_api_keys_file, "no-keys.toml"),
    "xpath [[[": (bad_xpath, "collector.instance_id_xpath"),
    "xpath [[[ unused": (bad_xpath_other_scheme, "collector.instance_id_xpath"),
    "state under a file": (state_under_a_file, "collector.state_path"),
    "state is a directory": (state_is_a_directory, "collector.state_path"),
    "sink under a file": (sink_under_a_file, "sinks[0].path"),
    "missing rules file": (missing_rules_file, "rules.json"),
    "API rules path a directory": (api_rules_a_directory, "thresholds.api_rules_path"),
    "API rules file damaged": (api_rules_damaged, "api-rules.json"),
}
if os.geteuid() != 0:  # root reads a mode-0 file
    CASES["unreadable"] = (unreadable, "Permission denied")


@pytest.mark.parametrize("command", ["check-config", "run"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_each_mistake_is_one_line_and_exit_2(case: str, command: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    make, needle = CASES[case]
    path = make(tmp_path)
    argv = ["check-config", str(path)] if command == "check-config" else \
        ["run", "--once", "--config", str(path)]
    assert main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert needle in line
    assert line.startswith("hostagent: config error: ")
    assert not (tmp_path / "events.jsonl").exists()  # nothing ran before the refusal
    assert not (tmp_path / "state" / "state.db.id").exists()


def test_api_port_in_use_is_one_line_and_exit_2(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = write(tmp_path, base(tmp_path, extra=f"[api]\nenabled = true\nport = {port}"))
        assert main(["check-config", str(path)]) == 0  # only running can tell
        capsys.readouterr()
        assert main(["run", "--once", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if x.startswith("hostagent:")]
    assert len(line) == 1, err
    assert "api.port" in line[0] and str(port) in line[0]
    assert "Traceback" not in err and "ExceptionGroup" not in err


def test_a_good_config_passes_both(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, base(tmp_path))
    assert main(["check-config", str(path)]) == 0
    assert "no state store yet" in capsys.readouterr().out
    assert main(["run", "--once", "--config", str(path)]) == 0
    assert main(["check-config", str(path)]) == 0
    assert "state store OK" in capsys.readouterr().out


@pytest.mark.parametrize("command", [["dump", "--all"], ["top", "--json"], ["top", "--once"],
                                     ["top"]])
@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf", "1e12", "1e309", "3600.5", "soon"])
def test_dump_and_top_interval_outside_0_3600_is_a_usage_error(
        command: list[str], value: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    # top took any float: nan raised ValueError, inf and 1e12 hung, -1 and 0 became 0.2
    path = write(tmp_path, base(tmp_path))
    with pytest.raises(SystemExit) as info:
        main([*command, f"--interval={value}", "--config", str(path)])
    assert info.value.code == 2
    assert "--interval" in capsys.readouterr().err


def test_dump_interval_at_the_bounds_is_accepted() -> None:
    from hostagent.cli.main import interval_arg

    assert interval_arg("3600") == 3600.0
    assert interval_arg("0.001") == 0.001
