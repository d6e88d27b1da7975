"""Start-up validation of the API and webhook registration: what `run` checks before serving.

`validate_startup(cfg)` raises the first ConfigError (file, key, expected, found, fix);
`hostagent check-config` and the daemon call it, so a mistake is one line and exit 2 before
the service starts, never a traceback after.
"""

from __future__ import annotations

from hostagent.config.load import Config
from hostagent.config.sinks import WebhookSinkConfig
from hostagent.delivery.ssrf import Guard
from hostagent.errors import ConfigError


def validate_startup(cfg: Config) -> None:
    """Every webhook sink's SSRF guard (allow_list, ports) and, with [api] enabled, every key
    file, JWKS and reserved-principal rule; ConfigError at the first defect."""
    for i, sink in enumerate(cfg.sinks):
        if isinstance(sink, WebhookSinkConfig):
            try:
                Guard.from_config(sink, cfg.source)
            except ConfigError as err:  # name the sink as the config file lists it
                key = err.key.replace("sinks.", f"sinks[{i}].", 1)
                raise ConfigError(err.file, key, err.expected, err.found, err.fix) from err
    if cfg.api.enabled:
        # Imported only when enabled: the web and JWT stack cost start-up time otherwise.
        from hostagent.api.auth import load_credentials, reserved_principals

        load_credentials(cfg.api, reserved=reserved_principals(cfg.owners.unassigned))
