"""Serving the app: hypercorn's trio worker inside the daemon's nursery.

    view = ApiView(...)
    await nursery.start(serve_api, cfg.api, view, stop_event)   # → ["http://127.0.0.1:8080"]

Binds 127.0.0.1 by default; a non-loopback bind needs TLS (cert/key files) unless
`api.allow_plaintext_remote` says a proxy terminates TLS. Setting `stop` starts a graceful
shutdown: no new connections, in-flight requests get `api.shutdown_grace_s`.
"""

from __future__ import annotations

import ipaddress
import logging

import trio
from hypercorn.config import Config as HyperConfig
from hypercorn.trio import serve as hyper_serve
from starlette.applications import Starlette

from hostagent.api.app import Api, build_app
from hostagent.api.auth import Authenticator
from hostagent.api.pass_gate import PassGate
from hostagent.api.seams import RuleStore, WebhookRegistry
from hostagent.api.view import ApiView
from hostagent.api.wire_errors import install as install_wire_errors
from hostagent.api.wire_guards import ALPN
from hostagent.api.wire_guards import install as install_wire_guards
from hostagent.clock import Clock
from hostagent.config.schema import ApiConfig
from hostagent.errors import ConfigError

log = logging.getLogger(__name__)
# Hypercorn's own messages (its "Running on", its errors). Not "hypercorn.error": hypercorn
# attaches a stderr handler to that logger whenever a Config with the default errorlog is used.
HYPERCORN_LOG = logging.getLogger("hostagent.api.hypercorn")

# A connection silent this long is closed (hypercorn's read timeout): idle between requests
# (as keep_alive_timeout), or in the middle of a request body, which the handler then sees
# cut off (400) while passes never waited for it (PassGate.away).
READ_TIMEOUT_S = 30


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and `localhost`."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(cfg: ApiConfig) -> None:
    """Refuse a remote plaintext bind and half-configured TLS."""
    if bool(cfg.tls_cert_file) != bool(cfg.tls_key_file):
        raise ConfigError("<config>", "api.tls_cert_file", "both tls_cert_file and tls_key_file",
                          "only one", "set both, or neither for a loopback bind")
    if not is_loopback(cfg.bind) and not cfg.tls_cert_file and not cfg.allow_plaintext_remote:
        raise ConfigError("<config>", "api.bind", "a loopback address unless TLS is configured",
                          cfg.bind, "set api.tls_cert_file/tls_key_file, or bind 127.0.0.1")


def hypercorn_config(cfg: ApiConfig) -> HyperConfig:
    """Hypercorn settings from [api]."""
    check_bind(cfg)
    hc = HyperConfig()
    host = f"[{cfg.bind}]" if ":" in cfg.bind and not cfg.bind.startswith("[") else cfg.bind
    hc.bind = [f"{host}:{cfg.port}"]
    if cfg.tls_cert_file:
        hc.certfile, hc.keyfile = cfg.tls_cert_file, cfg.tls_key_file
    hc.alpn_protocols = list(ALPN)  # no HTTP/2: it could stop the server (api/wire_guards.py)
    hc.graceful_timeout = cfg.shutdown_grace_s
    hc.include_server_header = False
    hc.accesslog = None
    # A Logger is used as it is; hypercorn's default ("-") gave its "hypercorn.error" logger
    # a handler of its own on stderr, in its own text format: under `--log-format json` that
    # line ("[...] [INFO] Running on http://...") broke `journalctl -o cat | jq`. This one has
    # no handler: its records reach the daemon's handler, in the daemon's format and level.
    hc.errorlog = HYPERCORN_LOG
    # Headers past this size are refused by the protocol layer before the app sees them.
    # Request line + headers: room for every query parameter at its documented maximum
    # (openapi.MAX_PARAM_CHARS, percent-encoded), so the app answers those with its own 400
    # problem; past it, hypercorn answers 431 (a problem+json too: see wire_errors).
    hc.h11_max_incomplete_size = 64 * 1024 + cfg.max_header_bytes * 2
    hc.keep_alive_timeout = READ_TIMEOUT_S
    hc.read_timeout = READ_TIMEOUT_S
    return hc


def make_app(cfg: ApiConfig, view: ApiView, *, clock: Clock | None = None,
             webhooks: WebhookRegistry | None = None, rules: RuleStore | None = None,
             authenticator: Authenticator | None = None, gate: PassGate | None = None
             ) -> Starlette:
    """The ASGI app for `cfg` (keys and key files are loaded here: errors are ConfigError).

    With a `gate`, requests wait while a collector pass runs (see hostagent.api.pass_gate).
    """
    auth = authenticator or Authenticator(cfg)
    return build_app(Api(cfg, view, auth, clock=clock, webhooks=webhooks, rules=rules,
                         gate=gate))


async def serve_api(
    cfg: ApiConfig,
    app: Starlette,
    stop: trio.Event,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until `stop` is set; `task_status.started(binds)` once the socket listens."""
    hc = hypercorn_config(cfg)
    # Requests h11 refuses never reach the app; this gives hypercorn's own answers to them a
    # problem+json body (once per process; a warning, not a failed start, if it cannot).
    install_wire_errors()
    # Keeps requests that made hypercorn raise out of a connection, which ended the server
    # and the daemon with it, from the code that raised (once per process; a warning if not).
    install_wire_guards()
    log.info("api starting", extra={"bind": hc.bind, "tls": bool(cfg.tls_cert_file)})
    await hyper_serve(app, hc, shutdown_trigger=stop.wait,  # type: ignore[arg-type]
                      task_status=task_status)
    log.info("api stopped")
