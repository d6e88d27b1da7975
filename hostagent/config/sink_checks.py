"""What `load()` checks in every [[sinks]] table beyond types and ranges (the NATS sink's own
checks are `config.nats_check`), and what start-up checks of the files the sinks write.

At load (`check_sink`): `kinds` names only event kinds hostagent emits and at least one; an
email sink's server, addresses, link URL, channel and its secret and CA files (the password
file like the NATS sink's secrets: a regular file only its owner can read).

At start-up (`check_written_paths`, from `config.preflight`): no two things hostagent writes
share a file (a JSONL sink appending to the SQLite state store, to another sink's file, to
an email journal, to the config or a rules file would destroy them), compared by real path.

Every problem is ONE `ConfigError` naming the file, the dotted key, what was expected, what
was found and the fix.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from urllib.parse import urlsplit

from hostagent.config.nats_check import check_file
from hostagent.config.sinks import EVENT_KINDS, EmailSinkConfig, JsonlSinkConfig, SinkConfig
from hostagent.errors import ConfigError

_LINE_BREAKS = frozenset("\r\n")
# The store's side files (hostagent.store.guard.SIDE_FILES; .lock: one daemon a store, .new: a
# store being created): config must not import the store.
STORE_SIDE_FILES = ("-wal", "-shm", "-journal", ".id", ".lock", ".new")


def check_sink(sink: SinkConfig, source: str, key: str) -> None:
    """Raise ConfigError for the first problem `load()` can see in one built sink table."""
    if not sink.kinds:
        raise ConfigError(source, f"{key}.kinds", f"at least one of {list(EVENT_KINDS)}", [],
                          "list the event kinds this sink receives, or remove `kinds` for its "
                          "default")
    unknown = [k for k in sink.kinds if k not in EVENT_KINDS]
    if unknown:
        raise ConfigError(source, f"{key}.kinds", f"event kinds among {list(EVENT_KINDS)}",
                          unknown, "fix the spelling: a sink with an unknown kind receives "
                          "nothing of it")
    if not sink.name.strip() or any(c in _LINE_BREAKS or c == "\t" for c in sink.name):
        raise ConfigError(source, f"{key}.name", "a non-empty one-line sink name", sink.name,
                          "name the sink with printable characters (it appears in logs, "
                          "metrics and the outbox)")
    if isinstance(sink, EmailSinkConfig):
        _check_email(sink, source, key)


def _check_email(cfg: EmailSinkConfig, source: str, key: str) -> None:
    if not cfg.host.strip() or any(c.isspace() for c in cfg.host):
        raise ConfigError(source, f"{key}.host", "an SMTP server host name or address",
                          cfg.host, 'e.g. host = "smtp.example.com"')
    if not is_address(cfg.sender):
        raise ConfigError(source, f"{key}.sender", "one mail address (user@domain, one line)",
                          cfg.sender, 'e.g. sender = "hostagent@example.com"')
    for i, rcpt in enumerate(cfg.to):
        if not is_address(rcpt):
            raise ConfigError(source, f"{key}.to[{i}]", "a mail address (user@domain)", rcpt,
                              "write each recipient as user@domain, one per string")
    if any(c in _LINE_BREAKS for c in cfg.subject_prefix):
        raise ConfigError(source, f"{key}.subject_prefix", "one line of text",
                          cfg.subject_prefix, "remove the line breaks")
    if cfg.api_url:
        try:
            parts = urlsplit(cfg.api_url)
            port = parts.port  # ValueError when out of range or not a number
        except ValueError:
            parts, port = None, None
        if (parts is None or parts.scheme not in ("http", "https") or not parts.hostname
                or port == 0 or any(c.isspace() for c in cfg.api_url)):
            raise ConfigError(source, f"{key}.api_url", "an http:// or https:// URL with a host",
                              cfg.api_url, 'e.g. api_url = "https://hv-7.example.com:8080", or ""'
                              " for no link")
    if bool(cfg.username) != bool(cfg.password_file):
        bad = "password_file" if cfg.username else "username"
        raise ConfigError(source, f"{key}.{bad}", "username and password_file together",
                          getattr(cfg, bad), "set both or neither")
    if cfg.password_file:
        check_file(cfg.password_file, source, f"{key}.password_file", secret=True)
    if cfg.ca_file:
        check_file(cfg.ca_file, source, f"{key}.ca_file", secret=False)


def is_address(text: str) -> bool:
    """A bare mail address: one `@` between a non-empty local part and domain, no spaces,
    line breaks or angle brackets (what SMTP's MAIL FROM / RCPT TO take)."""
    local, at, domain = text.rpartition("@")
    return (bool(at and local and domain) and "." not in (domain[0], domain[-1])
            and not any(c.isspace() or c in "<>,;\"()" for c in text))


def written_files(sinks: tuple[SinkConfig, ...], state_path: str) -> Iterator[tuple[str, str]]:
    """(dotted key, path) of every file the store, the JSONL sinks and email journals write."""
    yield "collector.state_path", state_path
    for suffix in STORE_SIDE_FILES:
        yield "collector.state_path", state_path + suffix
    for i, sink in enumerate(sinks):
        if isinstance(sink, JsonlSinkConfig):
            yield f"sinks[{i}].path", sink.path
        elif isinstance(sink, EmailSinkConfig):
            for suffix in ("", "-wal", "-shm", "-journal"):
                yield f"sinks[{i}].journal_path", sink.journal_path + suffix


def check_written_paths(source: str, sinks: tuple[SinkConfig, ...], state_path: str,
                        read_files: dict[str, str]) -> None:
    """No JSONL sink or email journal shares a file with anything else hostagent writes or
    reads (`read_files`: dotted key → path, e.g. the config and the rules files)."""
    seen: dict[str, str] = {}  # real path → what named it first
    for what, path in read_files.items():
        if path:
            seen.setdefault(os.path.realpath(path), what)
    for key, path in written_files(sinks, state_path):
        real = os.path.realpath(path)
        other = seen.get(real)
        if other is not None and other != key:
            raise ConfigError(source, key, "a file of its own", path,
                              f"{other} already uses {real}: give {key} a path of its own")
        seen.setdefault(real, key)
