"""Rules from a central source: `[thresholds] source_url`, pulled every `refresh_s`.

Seed 000 §3.1/3.2 and seed 003 (`ThresholdManager::new(config_source)`, `load_configs`): a
threshold client pulls the fleet's rule set. Each pull is ``GET source_url`` with
``If-None-Match: <ETag>`` (and, with `source_signed`, Formation's ``Authorization: Signature``
header made with the node's key, ``owners.key_file``; see hostagent.owners.signing):

* 304: the set in force is current (its age restarts);
* 200: the body (JSON, at most `source_max_bytes`) is validated exactly like the rules file,
  and the merged rule set's channels are checked; one invalid rule refuses the whole set.
  A valid set becomes the `central` layer (hostagent.alerts.rules_source) and is persisted
  (``central-rules.json`` next to the state store: ETag, time, rules), so a restart while the
  source is down starts with it;
* anything else (down, timeout, 3xx/4xx/5xx, garbage, too large, invalid): the last good set
  stays in force (stale-while-error), the error is logged and counted, and
  ``hostagent_threshold_rules_central_age_seconds`` keeps growing.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson
import trio

from hostagent import handoff
from hostagent.alerts.rules import Rule, parse_rules
from hostagent.alerts.rules_file import atomic_write, parse_document, rule_dict
from hostagent.alerts.rules_source import RulesSource
from hostagent.clock import Clock
from hostagent.config.schema import ThresholdsConfig
from hostagent.errors import ConfigError
from hostagent.owners.signing import Signer, load_key_file

if TYPE_CHECKING:  # imported when used: httpx costs ~18 MB of RSS in a daemon without it
    import httpx

log = logging.getLogger(__name__)
USER_AGENT = "hostagent-rules/1"


class CentralRules:
    """Pulls the central rule set into `source`'s `central` layer; see the module doc."""

    def __init__(self, url: str, source: RulesSource, persist_path: str | Path, clock: Clock, *,
                 refresh_s: float = 60.0, timeout_s: float = 10.0,
                 max_bytes: int = 1 << 20, signer: Signer | None = None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError("<config>", "thresholds.source_url", "an http:// or https:// URL",
                              url, 'write it as http://HOST:PORT/PATH or https://HOST:PORT/PATH, '
                              'e.g. source_url = "https://rules.example/v1/thresholds"')
        self.url = url
        self.path = parts.path or "/"
        self.source = source
        self.persist_path = Path(persist_path)
        self.clock = clock
        self.refresh_s = refresh_s
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.signer = signer
        self._transport = transport
        self.etag: str | None = None
        self.fetched_wall_ns: int | None = None  # when the set in force was last confirmed
        self.last_error: str | None = None
        self.pulls = 0
        self.failures = 0

    # --- the persisted last good set ---------------------------------------------------

    def load_persisted(self) -> bool:
        """At start: the last good set, if any, becomes the central layer (False: none)."""
        try:
            doc = orjson.loads(self.persist_path.read_bytes())
            rules = parse_rules(doc["rules"], source=str(self.persist_path))
            self.source.set_layer("central", rules)
        except FileNotFoundError:
            return False
        except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ConfigError) as err:
            self.last_error = f"persisted central rules unusable: {err}"
            log.error("persisted central rules unusable; starting without them",
                      extra={"path": str(self.persist_path), "error": str(err)})
            return False
        self.etag = doc.get("etag") if isinstance(doc.get("etag"), str) else None
        at = doc.get("fetched_wall_ns")
        self.fetched_wall_ns = at if isinstance(at, int) else None
        return True

    def _persist(self, rules: tuple[Rule, ...]) -> None:
        body = orjson.dumps({"url": self.url, "etag": self.etag,
                             "fetched_wall_ns": self.fetched_wall_ns,
                             "rules": [rule_dict(r) for r in rules]})
        atomic_write(self.persist_path, body)

    # --- pulling -------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        h = {"Accept": "application/json", "User-Agent": USER_AGENT}
        if self.etag:
            h["If-None-Match"] = self.etag
        if self.signer is not None:
            h.update(self.signer.header_for("GET", self.path, int(self.clock.now().wall_s)))
        return h

    async def _fetch(self) -> tuple[int, bytes, str | None]:
        import httpx

        async with httpx.AsyncClient(timeout=httpx.Timeout(self.timeout_s), trust_env=False,
                                     follow_redirects=False, transport=self._transport) as c:
            with trio.fail_after(self.timeout_s * 2):  # a server trickling bytes
                async with c.stream("GET", self.url, headers=self._headers()) as r:
                    declared = r.headers.get("content-length", "")
                    if declared.isdigit() and int(declared) > self.max_bytes:
                        raise ValueError(f"body of {declared} bytes > source_max_bytes")
                    buf = bytearray()
                    async for chunk in r.aiter_raw():
                        buf += chunk
                        if len(buf) > self.max_bytes:
                            raise ValueError(f"body larger than {self.max_bytes} bytes")
                    return r.status_code, bytes(buf), r.headers.get("etag")

    async def _pull(self) -> int:
        """Fetch and install; the number of rules installed (-1: 304, unchanged)."""
        status, body, etag = await self._fetch()
        if status == 304:
            self.fetched_wall_ns = self.clock.now().wall_ns
            return -1
        if status != 200:
            raise ValueError(f"HTTP {status}")
        rules = parse_document(body, source=self.url)
        self.source.set_layer("central", rules)  # ConfigError: a channel nobody serves
        self.etag, self.fetched_wall_ns = etag, self.clock.now().wall_ns
        await handoff.run_sync(self._persist, rules)
        return len(rules)

    async def refresh(self) -> bool:
        """One pull; True when the set in force is current (200 installed, or 304)."""
        import httpx

        self.pulls += 1
        try:
            n = await self._pull()
        except (httpx.HTTPError, trio.TooSlowError, ValueError, ConfigError, OSError) as err:
            self.failures += 1
            self.last_error = f"{type(err).__name__}: {err}"
            log.error("central rules refused; keeping the last good set", extra={
                "url": self.url, "error": self.last_error, "age_s": self.age_s()})
            return False
        self.last_error = None
        if n >= 0:
            log.info("central rules installed", extra={"url": self.url, "rules": n})
        return True

    def age_s(self) -> float | None:
        """Seconds since the set in force was last confirmed by the source (None: never)."""
        if self.fetched_wall_ns is None:
            return None
        return max(self.clock.now().wall_ns - self.fetched_wall_ns, 0) / 1e9

    def health(self) -> dict[str, Any]:
        """Merged into the rules' health: age, last error, counts."""
        age = self.age_s()
        return {"central_url": self.url, "central_age_s": None if age is None else round(age, 3),
                "central_last_error": self.last_error, "central_pulls": self.pulls,
                "central_failures": self.failures}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Pull now, then every `refresh_s`, until cancelled."""
        task_status.started()
        while True:
            await self.refresh()
            await trio.sleep(self.refresh_s if math.isfinite(self.refresh_s) else 60.0)


def check_source(cfg: ThresholdsConfig, *, key_file: str,
                 config_source: str = "<config>") -> Signer | None:
    """`source_url` is an http(s) URL with a host, and a signed source has a readable key
    (ConfigError otherwise: start-up and `check-config` alike); the signer, if signed."""
    from hostagent.config.preflight import check_http_url

    check_http_url(config_source, "thresholds.source_url", cfg.source_url)
    if not cfg.source_signed:
        return None
    if not key_file:
        raise ConfigError(config_source, "thresholds.source_signed", "owners.key_file set",
                          "", "set owners.key_file (the node's key) or source_signed = false")
    return load_key_file(key_file, config_source=config_source)


def from_config(cfg: ThresholdsConfig, source: RulesSource, clock: Clock, *,
                state_path: str | Path, key_file: str = "",
                config_source: str = "<config>") -> CentralRules | None:
    """The central source of [thresholds] (None without `source_url`), its last good set
    already in force."""
    if not cfg.source_url:
        return None
    signer = check_source(cfg, key_file=key_file, config_source=config_source)
    central = CentralRules(cfg.source_url, source, Path(state_path).parent / "central-rules.json",
                           clock, refresh_s=cfg.refresh_s, timeout_s=cfg.source_timeout_s,
                           max_bytes=cfg.source_max_bytes, signer=signer)
    central.load_persisted()
    return central
