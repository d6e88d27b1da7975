"""What a reload (SIGHUP) may change while the daemon runs, and what waits for a restart.

Live keys are the ones whose every reader looks at the config again each time it acts, and
whose change cannot shift what an event means:

* ``collector.interval_s``, ``collector.align``: the wait before the next pass;
* ``collector.pass_timeout_s``: the deadline of the next pass's reads;
* ``collector.baseline_retention_s``: how long an unseen instance's baseline is kept;
* ``collector.sample_interval_s``, ``collector.watched_sample_interval_s``: the wait before
  the next light sample (hostagent/tailing.py);
* ``log.level``, ``log.format``;
* the API's credentials (``api.jwt_*``, ``api.jwks_file``, ``api.api_keys_file``,
  ``api.admin_principals``: `hostagent.api.auth.CREDENTIAL_KEYS`), re-read from their files;
* the threshold rules: the rules *file* is re-read on SIGHUP (and when it changes); the
  [thresholds] keys themselves are restart keys.

Every other key needs a restart: it is either identity (``host.node_id``,
``collector.instance_id`` / ``instance_id_xpath``, ``time_format``, ``count_preexisting``:
changing them live would shift event ids or orphan baselines) or held by a component built at
start (paths, libvirt, sinks, outbox, owners, GPU, the API server, the state store).

`apply(running, new)` is the config in force after a reload: the running one with only the
live keys taken from `new`; `restart_keys` names every other key that differs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hostagent.config.load import Config

# hostagent.api.auth.CREDENTIAL_KEYS, spelled out: config must not import the web stack.
API_CREDENTIAL_KEYS = ("jwt_algorithms", "jwt_keys_file", "jwks_file", "jwt_hmac_secret_file",
                       "jwt_audience", "jwt_issuer", "jwt_leeway_s", "jwt_admin_claim",
                       "api_keys_file", "admin_principals")

LIVE_KEYS: frozenset[str] = frozenset({
    "collector.interval_s", "collector.align", "collector.pass_timeout_s",
    "collector.baseline_retention_s", "collector.sample_interval_s",
    "collector.watched_sample_interval_s", "log.level", "log.format",
    *(f"api.{k}" for k in API_CREDENTIAL_KEYS),
})


def _flat(cfg: Config) -> dict[str, Any]:
    """Dotted key → value for every [section] key; the [[sinks]] array as one key."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        if f.name == "source":
            continue
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            for g in dataclasses.fields(value):
                out[f"{f.name}.{g.name}"] = getattr(value, g.name)
        else:
            out[f.name] = value
    return out


def changed_keys(old: Config, new: Config) -> list[str]:
    """Every dotted key whose value differs (``sinks`` stands for the whole array)."""
    a, b = _flat(old), _flat(new)
    return sorted(k for k in a if a[k] != b[k])


def restart_keys(old: Config, new: Config) -> list[str]:
    """The changed keys a reload does not apply."""
    return [k for k in changed_keys(old, new) if k not in LIVE_KEYS]


def apply(running: Config, new: Config) -> Config:
    """`running` with the live keys of `new`: the config in force after a reload."""
    sections: dict[str, Any] = {}
    for key in LIVE_KEYS:
        section, name = key.split(".", 1)
        sections.setdefault(section, {})[name] = getattr(getattr(new, section), name)
    return dataclasses.replace(running, **{
        section: dataclasses.replace(getattr(running, section), **values)
        for section, values in sections.items()})
