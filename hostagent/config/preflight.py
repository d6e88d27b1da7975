"""Every check start-up makes of a loaded config, in one function both `run` and
`check-config` call (the ansible role validates with `check-config`, so it must refuse what
`run` would refuse).

`check(cfg)` looks at what a config names outside itself: the rules files (the operator's and
the one the API writes), the instance-id scheme against the node id, the queue sinks' and the
account service's URLs, where the state store (an absolute file path), the JSONL sinks and the
email journals would be written and that no two of them (nor the config, a rules file or a key
file) share a file (`config.sink_checks`), the owners signing key, with the API enabled the
bind address, the TLS files and the page sizes, and then the API's own start-up validation
(`hostagent.api.startup.validate_startup`: every webhook sink's SSRF guard — allow-list and
ports — and the key files, JWKS and reserved principals).
Each defect is a `ConfigError` naming the config file and the key. What only running can
tell (the API port being taken) is reported by the daemon the same way.

It reads, never writes: nothing is created, opened for writing or bound.
"""

from __future__ import annotations

import errno
import os
import ssl
import stat
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from hostagent.accounting import identity
from hostagent.alerts import rules_file, rules_source
from hostagent.config import sink_checks
from hostagent.config.load import Config
from hostagent.config.sinks import EmailSinkConfig, JsonlSinkConfig, QueueSinkConfig
from hostagent.errors import ConfigError
from hostagent.file_read import FileTooLarge, NotRegularFile, loop_link, read_regular

# A PEM certificate chain or private key is a few KiB; a bound keeps the look before
# load_cert_chain from reading a huge file whole.
MAX_TLS_FILE_BYTES = 1 << 20


def check(cfg: Config) -> None:
    """Raise ConfigError for the first defect start-up would hit; return when it would start."""
    src = cfg.source
    check_state_path(src, cfg.collector.state_path)
    for i, sink in enumerate(cfg.sinks):
        if isinstance(sink, JsonlSinkConfig):
            check_writable_path(src, f"sinks[{i}].path", sink.path)
        if isinstance(sink, EmailSinkConfig):
            check_writable_path(src, f"sinks[{i}].journal_path", sink.journal_path)
        if isinstance(sink, QueueSinkConfig):
            check_http_url(src, f"sinks[{i}].url", sink.url)
    sink_checks.check_written_paths(src, cfg.sinks, cfg.collector.state_path, _read_files(cfg))
    if cfg.owners.enabled:
        check_http_url(src, "owners.url", cfg.owners.url)
    if cfg.thresholds.rules_path:  # its errors name the rules file: the fix names this one
        rules_file.load_rules(cfg.thresholds.rules_path, key=f"thresholds.rules_path in {src}")
    # The API's rules file: written by PUT /api/v1/thresholds, loaded at start-up if present.
    api_rules = rules_source.api_rules_path(cfg.thresholds, cfg.collector.state_path)
    check_writable_path(src, rules_source.API_KEY, str(api_rules))
    if api_rules.exists():
        rules_file.load_rules(api_rules, key=rules_source.API_KEY)
    if cfg.thresholds.source_url:
        from hostagent.alerts.central import check_source

        check_source(cfg.thresholds, key_file=cfg.owners.key_file, config_source=src)
    _check_scheme(cfg)
    if cfg.owners.enabled and cfg.owners.key_file:
        from hostagent.owners.signing import load_key_file

        load_key_file(cfg.owners.key_file, config_source=src)
    if cfg.api.enabled:
        _check_api(cfg)
    # Webhook guards (allow_list, ports) and the API's key files, JWKS and reserved principals.
    from hostagent.api.startup import validate_startup

    _as_ours(src, lambda: validate_startup(cfg))


def _read_files(cfg: Config) -> dict[str, str]:
    """What names each file hostagent reads or writes besides the store and the sinks: none
    of them may be a JSONL sink's file or an email journal."""
    state_dir = Path(cfg.collector.state_path).parent
    api = cfg.api
    return {"the config file": "" if cfg.source.startswith("<") else cfg.source,
            "thresholds.rules_path": cfg.thresholds.rules_path,
            rules_source.API_KEY: str(rules_source.api_rules_path(
                cfg.thresholds, cfg.collector.state_path)),
            "the rules in force (next to collector.state_path)":
                str(state_dir / "rules-in-force.json"),
            "the central rules (next to collector.state_path)":
                str(state_dir / "central-rules.json"),
            "owners.key_file": cfg.owners.key_file,
            **{f"api.{k}": getattr(api, k) for k in (
                "tls_cert_file", "tls_key_file", "jwt_keys_file", "jwks_file",
                "jwt_hmac_secret_file", "api_keys_file")}}


def _check_scheme(cfg: Config) -> None:
    src = cfg.source
    try:
        identity.check_scheme(cfg.collector.instance_id, cfg.host.node_id,
                              cfg.collector.instance_id_xpath, src)
    except ConfigError as err:
        if err.key != "collector.instance_id_xpath":
            raise
        # ElementTree's own words ("'NoneType' object is not callable" for "[[[") are no fix.
        detail = "" if isinstance(err.__cause__, TypeError) else f" ({err.fix})"
        raise ConfigError(src, err.key, err.expected, err.found,
                          "write a path such as nova:instance, {urn:example:meta}meta/id or "
                          f"hostagent:instance/@uuid{detail}; empty for OpenStack's "
                          "nova:instance") from err


def check_state_path(source: str, path: str) -> None:
    """`collector.state_path` names a file by an absolute path that start-up can create."""
    key = "collector.state_path"
    if not os.path.isabs(path) or path.endswith("/"):
        raise ConfigError(source, key, "an absolute path of a file", path,
                          'e.g. state_path = "/var/lib/hostagent/state.db" (no trailing /: '
                          "the daemon's working directory is not a place for billing state)")
    check_writable_path(source, key, path)


def check_writable_path(source: str, key: str, path: str) -> None:
    """`path` names a file start-up can create or open: not a directory, not under a file."""
    p = Path(path)
    if not path or p.name in ("", ".", "..") or path.endswith("/"):
        raise ConfigError(source, key, "a file path", path,
                          "name a file, not a directory (no trailing /)")
    if not p.is_absolute():  # it would be checked here and written elsewhere (the daemon: /)
        raise ConfigError(source, key, "an absolute path", path,
                          "start it with /: the daemon does not run in the directory where the "
                          "config was checked")
    try:
        st = _stat(p)
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise ConfigError(source, key, "a regular file (or none yet)", path,
                              "it is a directory or a special file: name a file")
        for parent in p.parents:
            st = _stat(parent)
            if st is not None:
                if not stat.S_ISDIR(st.st_mode):
                    raise ConfigError(source, key, "a path under directories", path,
                                      f"{parent} is a regular file, not a directory")
                return
    except OSError as err:  # ENAMETOOLONG, ELOOP (a symlink loop), EACCES on the way
        if err.errno == errno.ELOOP:
            raise _loop_error(source, key, p) from err
        raise ConfigError(source, key, "a usable file path", path,
                          f"{err.strerror or err}: name a path the daemon can reach") from err


def check_store_reachable(source: str, path: str) -> None:
    """The `store` and `outbox` commands' first look at `collector.state_path`: what
    `check_state_path` refuses, a path that is not absolute or names a directory (or a special
    file) included, is the config's mistake (exit 2, as `run` and `check-config` say), never a
    runtime failure, and never a store to move aside (`store reset` renamed a directory holding
    a running daemon's store, or ./data, and crashed on an empty path). So are a symbolic link
    loop and a regular file on the way. A directory this user may not search is left to the
    store's own checks and messages (exit 1: run it as the service user)."""
    key = "collector.state_path"
    if not path or not os.path.isabs(path) or path.endswith("/") \
            or Path(path).name in ("", ".", ".."):
        raise ConfigError(source, key, "an absolute path of a file", path,
                          'e.g. state_path = "/var/lib/hostagent/state.db" (no trailing /: '
                          "the commands' working directory is not where the daemon's store is)")
    try:
        st = os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise _loop_error(source, key, Path(path)) from err
        if err.errno == errno.ENOTDIR:
            for parent in Path(path).parents:
                if parent.is_file():
                    raise ConfigError(source, key, "a path under directories", path,
                                      f"{parent} is a regular file, not a directory: "
                                      f"{os.strerror(errno.ENOTDIR)}") from err
        return
    if stat.S_ISDIR(st.st_mode):
        raise ConfigError(source, key, "a regular file (or none yet)", path,
                          f"it is a directory: name the store file in it, e.g. "
                          f"{os.path.join(path, 'state.db')}")
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(source, key, "a regular file (or none yet)", path,
                          "it is a special file: name a regular file")


def _loop_error(source: str, key: str, path: Path) -> ConfigError:
    """The error for a path whose lookup loops, naming the first link on the way that does."""
    return ConfigError(source, key, "a path without a symbolic link loop", str(path),
                       f"{loop_link(path)}; repoint or remove the link, or name another path")


def _stat(p: Path) -> os.stat_result | None:
    """`p`'s stat, following links; None when it is not there (yet). Unlike Path.exists, a
    symlink loop raises (ELOOP)."""
    try:
        return p.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None


def check_http_url(source: str, key: str, url: str) -> None:
    """`url` is an http(s) URL with a host and a valid port (the clients refuse others)."""
    try:
        parts = urlsplit(url)
        port = parts.port  # ValueError when out of range or not a number
    except ValueError as err:
        raise ConfigError(source, key, "an http:// or https:// URL", url, str(err)) from err
    if parts.scheme not in ("http", "https") or not parts.hostname or port == 0:
        raise ConfigError(source, key, "an http:// or https:// URL with a host", url,
                          'write it as http://HOST:PORT or https://HOST:PORT, e.g. '
                          '"http://127.0.0.1:53333"')



def _check_api(cfg: Config) -> None:
    # Imported only when enabled: the web stack costs ~120 ms of start-up otherwise.
    from hostagent.api.server import check_bind

    api, src = cfg.api, cfg.source
    _as_ours(src, lambda: check_bind(api))
    if api.page_size > api.max_page_size:
        raise ConfigError(src, "api.page_size", f"at most api.max_page_size ({api.max_page_size})",
                          api.page_size, "lower page_size or raise max_page_size")
    if api.tls_cert_file:
        for key, path in (("api.tls_cert_file", api.tls_cert_file),
                          ("api.tls_key_file", api.tls_key_file)):
            _check_tls_file(src, key, path)
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                api.tls_cert_file, api.tls_key_file)
        except (OSError, ssl.SSLError, ValueError) as err:
            reason = getattr(err, "strerror", None) or str(err)
            raise ConfigError(src, "api.tls_cert_file", "a readable PEM certificate chain and "
                              "its private key (api.tls_key_file)",
                              f"{api.tls_cert_file}: {reason}",
                              "fix the paths or the files' permissions") from err


def _check_tls_file(source: str, key: str, path: str) -> None:
    """`path` is a regular file: `ssl.load_cert_chain` opens it blocking, and a FIFO there
    made `check-config` and `run` wait for a writer forever (Ctrl-C did not stop them). The
    file is opened the way the API's key files are (`file_read.read_regular`: non-blocking,
    refused unless regular) before OpenSSL reads it."""
    try:
        read_regular(path, MAX_TLS_FILE_BYTES)
    except NotRegularFile as err:
        raise ConfigError(source, key, "a regular PEM file", f"{path}: {err.strerror}",
                          "point it at the PEM file itself, not a directory, FIFO, socket "
                          "or device") from err
    except FileTooLarge as err:
        raise ConfigError(source, key, f"a PEM file of at most {MAX_TLS_FILE_BYTES} bytes",
                          f"{path}: {err.strerror}", "point it at the PEM file itself") from err
    except OSError as err:  # absent, unreadable, a loop: load_cert_chain says the same
        raise ConfigError(source, key, "a readable PEM file", f"{path}: {err.strerror or err}",
                          "fix the path or the file's permissions") from err


def _as_ours(source: str, call: Callable[[], object]) -> None:
    """Run `call`; a ConfigError it raises with a placeholder file names the config file."""
    try:
        call()
    except ConfigError as err:
        if err.file.startswith("<") or err.file == "ApiConfig":
            raise ConfigError(source, err.key, err.expected, err.found, err.fix) from err
        raise
