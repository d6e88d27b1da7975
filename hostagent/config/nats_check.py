"""What `check-config` (and the daemon at start) checks in a `[[sinks]] type = "nats"` table
beyond types and ranges, and the NATS subject grammar the sink shares.

Every problem is ONE `ConfigError` line naming the file, the key, what was expected, what was
found and the fix: subject templates that do not render to a valid subject or are not covered
by `stream_subjects` of a stream the sink would create, server URLs, more than one credential,
secret files that are missing or readable by others (mode must be 0600 or stricter), TLS files,
a duplicate window shorter than the retry schedule's longest wait.
"""

from __future__ import annotations

import os
import stat
import string
from urllib.parse import urlsplit

from hostagent.config.sinks import NatsSinkConfig
from hostagent.errors import ConfigError

PLACEHOLDERS = ("node_id", "kind")
SCHEMES = ("nats", "tls")
_BAD_TOKEN_CHARS = frozenset(" \t\r\n*>.")


def subject_token(value: str) -> str:
    """`value` made safe as ONE subject token (dots, wildcards and spaces become `_`)."""
    out = "".join("_" if c in _BAD_TOKEN_CHARS else c for c in value)
    return out or "_"


def render_subject(template: str, *, node_id: str, kind: str) -> str:
    """The subject a template gives for this node and event kind."""
    return template.format(node_id=subject_token(node_id), kind=subject_token(kind))


def template_error(template: str) -> str | None:
    """Why `template` is not a subject template (only plain `{node_id}` / `{kind}` fields: no
    attribute, index, conversion or format spec), or None."""
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as err:  # an unmatched brace
        return f"the unmatched brace ({err})"
    for name, spec, conv in fields:
        if name not in PLACEHOLDERS or spec or conv:
            shown = name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "")
            return f"field {{{shown}}}"
    return None


def subject_valid(subject: str, *, wildcards: bool = False) -> bool:
    """A publishable subject (or, with `wildcards`, a stream's subject filter)."""
    tokens = subject.split(".")
    for i, tok in enumerate(tokens):
        if not tok or any(c in " \t\r\n" for c in tok):
            return False
        if tok == ">" and wildcards and i == len(tokens) - 1:
            continue
        if tok == "*" and wildcards:
            continue
        if "*" in tok or ">" in tok:
            return False
    return True


def subject_matches(pattern: str, subject: str) -> bool:
    """Whether a stream's subject filter (`*` one token, trailing `>` one or more) covers
    `subject`."""
    pt, st = pattern.split("."), subject.split(".")
    for i, p in enumerate(pt):
        if p == ">":
            return len(st) > i
        if i >= len(st) or (p != "*" and p != st[i]):
            return False
    return len(pt) == len(st)


def covered(patterns: tuple[str, ...] | list[str], subject: str) -> bool:
    """Whether any of a stream's subject filters covers `subject`."""
    return any(subject_matches(p, subject) for p in patterns)


def check(cfg: NatsSinkConfig, source: str, key: str) -> None:
    """Raise ConfigError for the first problem in a validated nats table."""
    if not cfg.servers:
        raise ConfigError(source, f"{key}.servers", "at least one server URL", [],
                          'servers = ["nats://127.0.0.1:4222"]')
    for url in cfg.servers:
        try:
            parts = urlsplit(url)
            port = parts.port  # ValueError: not a number or out of 0-65535
        except ValueError as err:
            raise ConfigError(source, f"{key}.servers", "nats://HOST:PORT or tls://HOST:PORT",
                              url, f"write each server as a URL with a host and a port "
                              f"1-65535 ({err})") from None
        if parts.scheme not in SCHEMES or not parts.hostname or port == 0:
            raise ConfigError(source, f"{key}.servers", "nats://HOST:PORT or tls://HOST:PORT",
                              url, "write each server as a URL with a host (and a port "
                              "1-65535, default 4222)")
    for field in ("subject", "alert_subject"):
        template = getattr(cfg, field)
        bad = template_error(template)
        if bad is not None:
            raise ConfigError(source, f"{key}.{field}", "a subject with only plain {node_id} "
                              "and {kind} placeholders", template,
                              f"remove {bad} (no other fields, '.attr', '[i]', '!r' or ':spec';"
                              " write a literal brace as {{ or }})")
        subject = render_subject(template, node_id="node", kind="kind")
        if not subject_valid(subject):
            raise ConfigError(source, f"{key}.{field}", "a NATS subject (dot-separated tokens, "
                              "no spaces or wildcards)", template, "e.g. hostagent.usage.{node_id}")
        if cfg.create_stream and not covered(cfg.stream_subjects, subject):
            raise ConfigError(source, f"{key}.{field}", "a subject covered by stream_subjects "
                              f"{list(cfg.stream_subjects)}", template,
                              "add a matching filter to stream_subjects")
    for pattern in cfg.stream_subjects:
        if not subject_valid(pattern, wildcards=True):
            raise ConfigError(source, f"{key}.stream_subjects", "subject filters ('*' for one "
                              "token, a trailing '>' for the rest)", pattern,
                              'e.g. stream_subjects = ["hostagent.>"]')
    if not cfg.stream or any(c in _BAD_TOKEN_CHARS or c in "/\\" for c in cfg.stream):
        raise ConfigError(source, f"{key}.stream", "a stream name (no spaces, '.', '*', '>', "
                          "'/')", cfg.stream, 'e.g. stream = "HOSTAGENT"')
    if cfg.duplicate_window_s < cfg.retry.round_backoff_max_s:
        raise ConfigError(source, f"{key}.duplicate_window_s", "a duplicate window >= "
                          f"retry.round_backoff_max_s ({cfg.retry.round_backoff_max_s})",
                          cfg.duplicate_window_s, "raise duplicate_window_s: a re-sent event "
                          "must still be recognised as a duplicate")
    secrets = [f for f in ("password_file", "token_file", "nkey_seed_file", "creds_file")
               if getattr(cfg, f)]
    if len(secrets) > 1:
        raise ConfigError(source, f"{key}.{secrets[1]}", "one credential", secrets,
                          f"keep only one of {', '.join(secrets)}")
    if bool(cfg.user) != bool(cfg.password_file):
        bad = "password_file" if cfg.user else "user"
        raise ConfigError(source, f"{key}.{bad}", "user and password_file together",
                          getattr(cfg, bad), "set both or neither")
    for f in (*secrets, "tls_key_file"):
        if getattr(cfg, f):
            check_file(getattr(cfg, f), source, f"{key}.{f}", secret=True)
    for f in ("tls_ca_file", "tls_cert_file"):
        if getattr(cfg, f):
            check_file(getattr(cfg, f), source, f"{key}.{f}", secret=False)
    if bool(cfg.tls_cert_file) != bool(cfg.tls_key_file):
        raise ConfigError(source, f"{key}.tls_key_file", "tls_cert_file and tls_key_file "
                          "together", cfg.tls_key_file, "set both or neither")


def check_file(path: str, source: str, key: str, *, secret: bool) -> None:
    """`path` is a regular file; with `secret`, only its owner can read it (mode 0600)."""
    try:
        st = os.stat(path)
    except OSError as err:
        raise ConfigError(source, key, "a readable file", path,
                          f"create it ({err.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(source, key, "a regular file", path,
                          "name a regular file, not a directory or special file")
    if secret and st.st_mode & 0o077:
        raise ConfigError(source, key, "a file only its owner can read (mode 0600)",
                          f"{path} (mode {stat.S_IMODE(st.st_mode):04o})", f"chmod 600 {path}")
