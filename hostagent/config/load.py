"""TOML configuration → typed, validated, frozen config.

Every section is a dataclass; `load()` walks the fields, so a wrong value always yields a
`ConfigError` naming the file, the dotted key, what was expected, what was found and the fix.
Unknown keys are errors too (a typo must not silently fall back to a default).

This module holds the root `Config`, `load()`, `from_mapping()` and the README's config table
(`python -m hostagent.config` prints it). Its neighbours:

* `config.schema`: the [section] tables (`HostConfig` … `ApiConfig`) and `_meta`, each field's
  doc line and range;
* `config.sinks`: the [[sinks]] tables with their [sinks.retry] / [sinks.breaker], `SINK_TYPES`;
* `config.walk`: the reflective walk that validates a parsed table against a dataclass.
"""

from __future__ import annotations

import dataclasses
import errno
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hostagent.config.schema import (
    ApiConfig,
    CollectorConfig,
    GpuConfig,
    HostConfig,
    LibvirtConfig,
    LogConfig,
    OutboxConfig,
    OwnersConfig,
    PathsConfig,
    ThresholdsConfig,
)
from hostagent.config.sinks import (
    EmailSinkConfig,
    JsonlSinkConfig,
    NatsSinkConfig,
    QueueSinkConfig,
    SinkConfig,
    WebhookSinkConfig,
)
from hostagent.config.walk import build_sinks, build_table
from hostagent.errors import ConfigError
from hostagent.file_read import FileTooLarge, NotRegularFile, read_regular
from hostagent.model import MAX_OWNER_ID_CHARS, usable_owner_id

# A config file is a few KiB; anything past this is not one (and is not read whole).
MAX_CONFIG_BYTES = 1024 * 1024
UTF8_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration."""

    host: HostConfig = field(default_factory=HostConfig)
    libvirt: LibvirtConfig = field(default_factory=LibvirtConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    collector: CollectorConfig = field(default_factory=CollectorConfig)
    owners: OwnersConfig = field(default_factory=OwnersConfig)
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    gpu: GpuConfig = field(default_factory=GpuConfig)
    log: LogConfig = field(default_factory=LogConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    thresholds: ThresholdsConfig = field(default_factory=ThresholdsConfig)
    sinks: tuple[SinkConfig, ...] = field(default_factory=lambda: (JsonlSinkConfig(),))
    source: str = "<defaults>"


# --- loading ------------------------------------------------------------------------------------


def load(path: str | Path) -> Config:
    """Read and validate a TOML config file."""
    p = Path(path)
    try:  # a FIFO is refused, never waited on (file_read.read_regular)
        data = read_regular(str(p), MAX_CONFIG_BYTES)
    except NotRegularFile as err:
        if err.errno != errno.EISDIR:  # a directory: "Is a directory", below
            raise ConfigError(str(p), "-", "a regular file", "a directory or special file",
                              "pass the path of the TOML config file") from err
        raise ConfigError(str(p), "-", "a readable TOML file", err.strerror,
                          "pass the path of a regular, readable file") from err
    except FileTooLarge as err:
        raise ConfigError(str(p), "-", f"a file of at most {MAX_CONFIG_BYTES} bytes",
                          "a larger file", "pass the path of the TOML config file") from err
    except FileNotFoundError as err:
        raise ConfigError(str(p), "-", "a readable TOML file", "no such file",
                          "create it or pass --config") from err
    except (OSError, ValueError) as err:  # ValueError: a NUL in the path
        reason = (err.strerror if isinstance(err, OSError) else None) or str(err)
        raise ConfigError(str(p), "-", "a readable TOML file", reason,
                          "pass the path of a regular, readable file") from err
    if data.startswith(UTF8_BOM):
        raise ConfigError(str(p), "-", "UTF-8 text without a byte order mark",
                          "a file starting with a UTF-8 BOM (EF BB BF)",
                          "save it as UTF-8 without a BOM (most editors: encoding \"UTF-8\", "
                          "not \"UTF-8 with BOM\")")
    text = decode_utf8(data, str(p))
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(str(p), "-", "valid TOML", str(err), "fix the syntax") from err
    except ValueError as err:  # an integer past Python's 4,300 digits: not a TOMLDecodeError
        raise ConfigError(str(p), "-", "numbers of at most a few thousand digits", "a longer one",
                          "shorten it: every number key's range is far smaller") from err
    except RecursionError as err:  # tomllib recurses once per nesting level
        raise ConfigError(str(p), "-", "TOML nested at most a few hundred levels deep",
                          "deeper nesting", "flatten the arrays or tables") from err
    return from_mapping(raw, str(p))


def decode_utf8(data: bytes, source: str) -> str:
    """`data` as text; ConfigError naming the line and byte of the first one that is not
    UTF-8 (every file hostagent reads as text: the config, rules, API keys)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ConfigError(source, "-", "UTF-8 text",
                          f"undecodable bytes at line {line} (byte {err.start})",
                          "save the file as UTF-8 (not Latin-1 or UTF-16)") from err


def from_mapping(raw: Mapping[str, Any], source: str = "<inline>") -> Config:
    """Validate an already-parsed TOML document."""
    top = {k: v for k, v in raw.items() if k != "sinks"}
    cfg: Config = build_table(Config, top, source, "", skip={"sinks", "source"})
    node = cfg.host.node_id  # in every event, event id, NATS subject and file name of alerts
    if not node.strip() or not node.isprintable():
        raise ConfigError(source, "host.node_id", "this host's id: printable, not blank", node,
                          "e.g. node_id = \"hv-01\", or remove the key for the hostname")
    for key, value in (("paths.root", cfg.paths.root),
                       ("paths.cgroup_root", cfg.paths.cgroup_root)):
        if not value.startswith("/"):  # read from the daemon's directory: every reading missing
            raise ConfigError(source, key, "an absolute path", value,
                              "start it with / (cgroup_root is taken inside root)")
    if not usable_owner_id(cfg.owners.unassigned) or not cfg.owners.unassigned.strip():
        # The user_id of every event whose owner is unknown: "" (or a line break) reached
        # events as it was, an owner no billing pipeline can tell from a missing field.
        raise ConfigError(source, "owners.unassigned", "an owner id an event can carry "
                          f"(printable, not blank, at most {MAX_OWNER_ID_CHARS} characters)",
                          cfg.owners.unassigned,
                          'e.g. unassigned = "unassigned", or remove the key for that default')
    if not cfg.libvirt.uri.strip():  # libvirt would pick its own default (qemu:///system)
        raise ConfigError(source, "libvirt.uri", "a libvirt connection URI", cfg.libvirt.uri,
                          'e.g. uri = "qemu:///system", or remove the key for that default')
    sinks_raw = raw.get("sinks")
    sinks: tuple[SinkConfig, ...] = cfg.sinks
    if sinks_raw is not None:
        sinks = build_sinks(sinks_raw, source)
    return dataclasses.replace(cfg, sinks=sinks, source=source)


def reference() -> list[tuple[str, str, str]]:
    """(key, default, meaning) for every option: the README's config reference is built from it."""
    rows: list[tuple[str, str, str]] = []

    def walk(cls: type[Any], prefix: str) -> None:
        for f in dataclasses.fields(cls):
            if f.name in ("source",):
                continue
            key = f"{prefix}.{f.name}" if prefix else f.name
            if f.default is not dataclasses.MISSING:
                default: Any = f.default
            elif f.default_factory is socket.gethostname:
                rows.append((key, "the host name", str(f.metadata.get("doc", ""))))
                continue
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:  # pragma: no cover
                default = None
            if dataclasses.is_dataclass(default):
                walk(type(default), key)
                continue
            rows.append((key, repr(default), str(f.metadata.get("doc", ""))))

    for f in dataclasses.fields(Config):
        if f.name in ("sinks", "source"):
            continue
        factory: Any = f.default_factory
        walk(type(factory()), f.name)
    walk(JsonlSinkConfig, "sinks[jsonl]")
    walk(QueueSinkConfig, "sinks[formation-queue]")
    walk(WebhookSinkConfig, "sinks[webhook]")
    walk(EmailSinkConfig, "sinks[email]")
    walk(NatsSinkConfig, "sinks[nats]")
    return rows


def reference_markdown() -> str:
    """The README's configuration table."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, doc in reference():
        lines.append(f"| `{key}` | `{default}` | {doc} |")
    return "\n".join(lines)

