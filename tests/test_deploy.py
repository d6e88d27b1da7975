"""Deployment files agree with the code: example config, systemd unit, ansible role.

Fast and root-free; the heavy checks (systemd-analyze, build, ansible) are in
deploy/ci/check_deploy.sh.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from hostagent.config.load import Config, load, reference
from hostagent.config.sinks import SINK_TYPES, JsonlSinkConfig

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "deploy/config/hostagent.example.toml"
UNIT = REPO / "deploy/systemd/hostagent.service"
NVIDIA = REPO / "deploy/systemd/hostagent.service.d/nvidia.conf"
ROLE = REPO / "deploy/ansible/roles/hostagent"

Unit = dict[str, dict[str, list[str]]]


def parse_unit(path: Path) -> Unit:
    """A systemd unit as section -> key -> values (keys may repeat; an empty value resets)."""
    unit: Unit = {}
    section: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not key=value: {raw!r}"
        values = section.setdefault(key.strip(), [])
        if value.strip() == "":
            values.clear()
        values.append(value.strip())
    return unit


def example_keys() -> set[str]:
    """Every key the example sets or shows commented out, named like reference()."""
    text = EXAMPLE.read_text()
    keys: set[str] = set()

    def walk(table: dict[str, Any], prefix: str) -> None:
        for key, value in table.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                keys.add(f"{prefix}{key}")

    doc = tomllib.loads(text)
    for section, table in doc.items():
        if section == "sinks":
            for sink in table:
                walk(sink, f"sinks[{sink['type']}].")
        else:
            walk(table, f"{section}.")
    # `# key = value` lines directly under a [section] header: documented, left at default.
    section = ""
    for line in text.splitlines():
        if m := re.match(r"^\[([a-z_.]+)\]$", line):
            section = m.group(1)
        elif m := re.match(r"^# ?([a-z_][a-z0-9_]*) = \S", line):
            assert section not in ("", "sinks"), f"commented key outside a section: {line}"
            keys.add(f"{section}.{m.group(1)}")
    return keys


def test_example_config_loads() -> None:
    cfg = load(EXAMPLE)
    assert cfg.source == str(EXAMPLE)
    assert {s.type for s in cfg.sinks} == set(SINK_TYPES)


def test_example_uses_every_section() -> None:
    doc = tomllib.loads(EXAMPLE.read_text())
    sections = {f.name for f in dataclasses.fields(Config)} - {"source"}
    assert sections - set(doc) == set(), "add these sections to the example config"


def test_example_keys_exist_in_reference() -> None:
    known = {key for key, _, _ in reference()}
    unknown = example_keys() - known
    assert unknown == set(), f"keys in {EXAMPLE.name} that the config schema does not know"


def test_example_documents_every_key() -> None:
    known = {key for key, _, _ in reference()}
    missing = known - example_keys()
    assert missing == set(), (
        f"document these keys in {EXAMPLE.name} (set, or as a `# key = value` comment)"
    )


def test_example_defaults_where_set() -> None:
    """Values the example sets are the defaults (so the comments' 'default' claim holds)."""
    defaults = {key: default for key, default, _ in reference()}
    doc = tomllib.loads(EXAMPLE.read_text())
    for section, table in doc.items():
        if section == "sinks":
            continue
        for key, value in table.items():
            assert repr(value) == defaults[f"{section}.{key}"] or (
                isinstance(value, float) and value == float(defaults[f"{section}.{key}"])
            ), f"{section}.{key} = {value!r} differs from the default"


def test_unit_required_settings() -> None:
    svc = parse_unit(UNIT)["Service"]
    single = {k: v[-1] for k, v in svc.items()}
    assert single["Type"] == "notify"
    assert single["ExecStart"] == (
        "/opt/hostagent/venv/bin/hostagent run --config /etc/hostagent/hostagent.toml"
    )
    assert single["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert single["Restart"] == "on-failure"
    assert single["User"] == "hostagent"
    assert single["SupplementaryGroups"] == "libvirt"
    assert single["StateDirectory"] == "hostagent"
    assert single["ConfigurationDirectory"] == "hostagent"
    for key in ("TimeoutStopSec", "MemoryMax", "TasksMax", "WatchdogSec"):
        assert single.get(key), f"{key}= missing"
    hardening = {
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
        "PrivateTmp": "yes", "PrivateDevices": "yes", "ProtectKernelTunables": "yes",
        "ProtectControlGroups": "yes", "RestrictNamespaces": "yes",
        "MemoryDenyWriteExecute": "yes", "LockPersonality": "yes",
    }
    for key, value in hardening.items():
        assert single.get(key) == value, f"{key}={value} expected"
    assert single["CapabilityBoundingSet"] == ""
    families = set(single["RestrictAddressFamilies"].split())
    assert families == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}
    assert "@system-service" in svc["SystemCallFilter"]
    assert parse_unit(UNIT)["Install"]["WantedBy"] == ["multi-user.target"]


def seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(s|min)?", value)
    assert m, f"unsupported time span {value!r}"
    return int(m.group(1)) * (60 if m.group(2) == "min" else 1)


def test_unit_matches_config_defaults() -> None:
    svc = {k: v[-1] for k, v in parse_unit(UNIT)["Service"].items()}
    defaults = Config()
    # The watchdog must survive a few passes (WATCHDOG=1 is sent once per pass).
    assert seconds(svc["WatchdogSec"]) >= 3 * defaults.collector.interval_s
    # READY=1 follows the first pass: it must fit in the start timeout.
    assert seconds(svc["TimeoutStartSec"]) > defaults.collector.pass_timeout_s
    # The only writable place is the state directory: the default files must live there.
    state_dir = Path("/var/lib") / svc["StateDirectory"]
    assert Path(defaults.collector.state_path).parent == state_dir
    assert all(Path(s.path).parent == state_dir for s in defaults.sinks
               if isinstance(s, JsonlSinkConfig))
    assert int(svc["TasksMax"]) > 4 * defaults.collector.max_threads


def test_nvidia_dropin_opens_only_nvidia_devices() -> None:
    svc = parse_unit(NVIDIA)["Service"]
    assert svc["PrivateDevices"] == ["no"]
    assert svc["DevicePolicy"] == ["closed"]
    assert svc["DeviceAllow"] == ["char-nvidia* rw"]


def test_role_installs_the_shipped_unit_files() -> None:
    assert (ROLE / "files/hostagent.service").resolve() == UNIT.resolve()
    assert (ROLE / "files/nvidia.conf").resolve() == NVIDIA.resolve()


def test_role_validates_with_the_real_check_config() -> None:
    defaults = (ROLE / "defaults/main.yml").read_text()
    assert 'hostagent_venv: "{{ hostagent_prefix }}/venv"' in defaults
    assert "hostagent_prefix: /opt/hostagent" in defaults
    assert re.search(r'hostagent_config_validate: "\{\{ hostagent_venv \}\}/bin/hostagent '
                     r'check-config %s"', defaults)
    config_tasks = (ROLE / "tasks/config.yml").read_text()
    assert 'validate: "{{ hostagent_config_validate }}"' in config_tasks


@pytest.mark.parametrize("script", ["deploy/ci/check_deploy.sh"])
def test_ci_script_parses(script: str) -> None:
    subprocess.run(["bash", "-n", str(REPO / script)], check=True)
