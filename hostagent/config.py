"""TOML configuration → typed, validated, frozen config.

Every section is a dataclass; `load()` walks the fields, so a wrong value always yields a
`ConfigError` naming the file, the dotted key, what was expected, what was found and the fix.
Unknown keys are errors too (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
import socket
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hostagent.errors import ConfigError

TimeFormat = Literal["unix", "rfc3339"]
InstanceIdScheme = Literal["uuid", "name", "metadata", "formation"]


def _meta(doc: str, *, minimum: float | None = None, maximum: float | None = None) -> Any:
    return {"doc": doc, "min": minimum, "max": maximum}


@dataclass(frozen=True, slots=True)
class HostConfig:
    """[host]"""

    node_id: str = field(
        default_factory=socket.gethostname,
        metadata=_meta("this host's id in events (`host`) and event ids; default: hostname"),
    )


@dataclass(frozen=True, slots=True)
class LibvirtConfig:
    """[libvirt]"""

    uri: str = field(default="qemu:///system", metadata=_meta("libvirt connection URI"))
    call_timeout_s: float = field(
        default=10.0,
        metadata=_meta("deadline of one blocking libvirt call; past it the call is abandoned",
                       minimum=0.1, maximum=600),
    )
    reconnect_max_s: float = field(
        default=60.0, metadata=_meta("cap of the reconnect backoff", minimum=1, maximum=3600)
    )
    readonly: bool = field(
        default=True,
        metadata=_meta("connect read-only (libvirt-sock-ro): bulk stats and XML need no more"),
    )
    nowait: bool = field(
        default=True,
        metadata=_meta("ask libvirt not to wait on a domain's job lock (stale-but-fast stats)"),
    )


@dataclass(frozen=True, slots=True)
class PathsConfig:
    """[paths]: where the host's pseudo-filesystems are (tests point them at fixture trees)."""

    root: str = field(default="/", metadata=_meta("prefix for /proc, /sys and /run"))
    cgroup_root: str = field(
        default="/sys/fs/cgroup", metadata=_meta("cgroup mount point, relative to root")
    )


@dataclass(frozen=True, slots=True)
class CollectorConfig:
    """[collector]"""

    interval_s: float = field(
        default=30.0, metadata=_meta("seconds between passes", minimum=1, maximum=3600)
    )
    align: bool = field(
        default=True, metadata=_meta("start passes on multiples of interval_s of wall time")
    )
    state_path: str = field(
        default="/var/lib/hostagent/state.db",
        metadata=_meta("SQLite file with baselines, outbox and alert state"),
    )
    pass_timeout_s: float = field(
        default=20.0,
        metadata=_meta("deadline for reading all sources in one pass", minimum=0.5, maximum=3600),
    )
    max_threads: int = field(
        default=8, metadata=_meta("worker threads for blocking sources", minimum=1, maximum=256)
    )
    time_format: TimeFormat = field(
        default="unix", metadata=_meta("event timestamps: unix seconds or RFC 3339 strings")
    )
    instance_id: InstanceIdScheme = field(
        default="uuid", metadata=_meta("what identifies an instance in events and the API")
    )
    instance_id_xpath: str = field(
        default="",
        metadata=_meta("with instance_id = \"metadata\": XPath into <metadata> (ElementTree "
                       "syntax, {namespace}tag) whose text or `uuid` attribute is the id; "
                       "empty = OpenStack nova:instance"),
    )
    pressure: bool = field(
        default=True,
        metadata=_meta("read the VM cgroup's PSI files (pressure in events; ~20 µs per domain)"),
    )
    baseline_retention_s: float = field(
        default=30 * 86400.0,
        metadata=_meta("forget the baseline of an instance not seen for this long", minimum=3600),
    )
    count_preexisting: bool = field(
        default=False,
        metadata=_meta("bill usage a domain accrued before this store first saw it "
                       "(only right when no other collector billed it)"),
    )


@dataclass(frozen=True, slots=True)
class OwnersConfig:
    """[owners]: the account service and the owner resolution chain."""

    enabled: bool = field(default=False, metadata=_meta("look owners up in the account service"))
    url: str = field(default="http://127.0.0.1:3004", metadata=_meta("account service base URL"))
    prefix: str = field(default="/v1", metadata=_meta("route prefix (\"\" on older nodes)"))
    refresh_s: float = field(
        default=60.0, metadata=_meta("owner index refresh period", minimum=1, maximum=86400)
    )
    ttl_s: float = field(
        default=600.0, metadata=_meta("how long a looked-up owner is fresh", minimum=1)
    )
    negative_ttl_s: float = field(
        default=60.0, metadata=_meta("how long an unknown instance is not asked again", minimum=1)
    )
    timeout_s: float = field(default=5.0, metadata=_meta("HTTP timeout", minimum=0.1, maximum=120))
    max_response_bytes: int = field(
        default=16 * 1024 * 1024, metadata=_meta("responses larger than this are refused",
                                                 minimum=1024)
    )
    lookups_per_s: float = field(
        default=2.0, metadata=_meta("rate limit of point lookups for unknown instances",
                                    minimum=0.01)
    )
    key_file: str = field(
        default="", metadata=_meta("secp256k1 private key (hex, mode 0600) to sign requests")
    )
    unassigned: str = field(
        default="unassigned", metadata=_meta("user_id of events whose owner is unknown")
    )
    default_org_id: str = field(
        default="", metadata=_meta("org_id when neither metadata nor the service has one")
    )


@dataclass(frozen=True, slots=True)
class OutboxConfig:
    """[outbox]"""

    max_bytes: int = field(
        default=512 * 1024 * 1024,
        metadata=_meta("outbox size cap; near it, pending events of an instance are merged",
                       minimum=1024 * 1024),
    )
    retention_s: float = field(
        default=86400.0, metadata=_meta("keep acknowledged events this long", minimum=0)
    )
    dead_letter_after: int = field(
        default=3,
        metadata=_meta("rejections (Failure reply or 4xx) before an event is dead-lettered",
                       minimum=1, maximum=1000),
    )
    batch_size: int = field(
        default=256,
        metadata=_meta("events a sink claims per delivery batch (sent max_in_flight at a time, "
                       "in order per instance)", minimum=1, maximum=10000),
    )
    maintenance_interval_s: float = field(
        default=10.0,
        metadata=_meta("how often delivery prunes, checks the size cap and refreshes depth "
                       "gauges", minimum=0.1, maximum=3600),
    )


@dataclass(frozen=True, slots=True)
class RetryConfig:
    """[sinks.retry]: one round of attempts; after a failed round the event waits in the outbox."""

    max_retries: int = field(default=3, metadata=_meta("retries per round", minimum=0, maximum=100))
    initial_backoff_s: float = field(default=0.1, metadata=_meta("first backoff", minimum=0))
    max_backoff_s: float = field(default=10.0, metadata=_meta("backoff cap", minimum=0))
    multiplier: float = field(default=2.0, metadata=_meta("backoff growth", minimum=1))
    jitter: float = field(default=0.1, metadata=_meta("jitter fraction", minimum=0, maximum=1))
    round_backoff_max_s: float = field(
        default=300.0,
        metadata=_meta("cap of the wait between rounds (max_backoff_s × multiplier^(rounds−1) "
                       "while the event waits in the outbox)", minimum=0, maximum=86400),
    )


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """[sinks.breaker]"""

    failure_threshold: int = field(default=5, metadata=_meta("failures to open", minimum=1))
    reset_timeout_s: float = field(default=60.0, metadata=_meta("open → half-open", minimum=0))
    half_open_calls: int = field(default=2, metadata=_meta("trial calls when half-open",
                                                           minimum=1))


@dataclass(frozen=True, slots=True)
class JsonlSinkConfig:
    """[[sinks]] type = "jsonl": one JSON event per line, fsynced."""

    type: Literal["jsonl"] = "jsonl"
    name: str = field(default="jsonl", metadata=_meta("sink name (unique)"))
    path: str = field(default="/var/lib/hostagent/events.jsonl", metadata=_meta("file to append"))
    kinds: tuple[str, ...] = field(
        default=("resource_usage", "threshold_violation"),
        metadata=_meta("event kinds this sink receives"),
    )
    retry: RetryConfig = field(default_factory=RetryConfig)
    breaker: BreakerConfig = field(default_factory=BreakerConfig)


@dataclass(frozen=True, slots=True)
class QueueSinkConfig:
    """[[sinks]] type = "formation-queue": Formation's form-p2p queue."""

    type: Literal["formation-queue"] = "formation-queue"
    name: str = field(default="formation-queue", metadata=_meta("sink name (unique)"))
    url: str = field(default="http://127.0.0.1:53333", metadata=_meta("queue base URL"))
    topic: str = field(default="usage_events", metadata=_meta("topic NAME (hashed on the wire)"))
    alert_topic: str = field(
        default="usage_alerts", metadata=_meta("topic NAME for threshold_violation events")
    )
    sub_topic: int = field(default=0, metadata=_meta("sub-topic byte", minimum=0, maximum=255))
    max_in_flight: int = field(default=8, metadata=_meta("concurrent requests", minimum=1,
                                                         maximum=256))
    timeout_s: float = field(default=5.0, metadata=_meta("HTTP timeout", minimum=0.1))
    http_client: Literal["h11", "httpx"] = field(
        default="h11",
        metadata=_meta("HTTP client: \"h11\" (built-in keep-alive HTTP/1.1 pool, ~5x less CPU "
                       "per event; http:// only) or \"httpx\" (also used for https:// URLs)"),
    )
    max_request_bytes: int = field(
        default=1_887_436,
        metadata=_meta("largest encoded request (the queue's body limit is 2 MiB); a bigger "
                       "event is dead-lettered without being sent", minimum=1024,
                       maximum=2 * 1024 * 1024),
    )
    kinds: tuple[str, ...] = field(
        default=("resource_usage", "threshold_violation"),
        metadata=_meta("event kinds this sink receives"),
    )
    retry: RetryConfig = field(default_factory=RetryConfig)
    breaker: BreakerConfig = field(default_factory=BreakerConfig)


@dataclass(frozen=True, slots=True)
class WebhookSinkConfig:
    """[[sinks]] type = "webhook": fan-out to the registered webhooks (FORMATION.md §4)."""

    type: Literal["webhook"] = "webhook"
    name: str = field(default="webhooks", metadata=_meta("sink name (unique)"))
    kinds: tuple[str, ...] = field(
        default=("resource_usage", "threshold_violation"),
        metadata=_meta("event kinds fanned out (registrations pick `metrics` and/or "
                       "`threshold_violation`)"),
    )
    allow_list: tuple[str, ...] = field(
        default=(),
        metadata=_meta("host names, IPs or CIDRs a webhook URL may reach even when they are "
                       "loopback/private/link-local (the SSRF guard refuses those otherwise)"),
    )
    timeout_s: float = field(default=5.0, metadata=_meta("HTTP timeout per delivery attempt",
                                                         minimum=0.1, maximum=120))
    max_in_flight: int = field(default=4, metadata=_meta("concurrent fan-out writes",
                                                         minimum=1, maximum=256))
    endpoint_concurrency: int = field(
        default=1, metadata=_meta("concurrent requests per endpoint (1 keeps events in order)",
                                  minimum=1, maximum=64))
    dead_after_attempts: int = field(
        default=50, metadata=_meta("attempts before a delivery to one endpoint is dead "
                                   "(4xx other than 408/429 count 5 each)", minimum=1))
    max_response_bytes: int = field(
        default=64 * 1024, metadata=_meta("reply bytes read (and ignored) per delivery",
                                          minimum=0))
    retention_s: float = field(
        default=86400.0, metadata=_meta("keep delivered/dead webhook rows this long", minimum=0))
    retry: RetryConfig = field(default_factory=RetryConfig)
    breaker: BreakerConfig = field(default_factory=BreakerConfig)


SinkConfig = JsonlSinkConfig | QueueSinkConfig | WebhookSinkConfig
SINK_TYPES: dict[str, type[Any]] = {"jsonl": JsonlSinkConfig, "formation-queue": QueueSinkConfig,
                                    "webhook": WebhookSinkConfig}


@dataclass(frozen=True, slots=True)
class ThresholdsConfig:
    """[thresholds]: threshold rules and the alert state machine."""

    rules_path: str = field(
        default="", metadata=_meta("rules file (JSON or TOML, both seed formats); reloaded on "
                                   "SIGHUP and when it changes; empty: no rules"))
    reload_check_s: float = field(
        default=5.0, metadata=_meta("how often the rules file's mtime is checked",
                                    minimum=0.1, maximum=3600))
    approaching_fraction: float = field(
        default=0.9, metadata=_meta("an alert is `approaching` at this fraction of its threshold "
                                    "(1 = no approaching state)", minimum=0, maximum=1))
    hysteresis_fraction: float = field(
        default=0.05, metadata=_meta("a firing alert resolves below threshold × (1 − this)",
                                     minimum=0, maximum=0.9))
    default_for_passes: int = field(
        default=1, metadata=_meta("consecutive passes at/above the threshold before an alert "
                                  "fires (a rule's `for_passes` overrides it)",
                                  minimum=1, maximum=1000))
    repeat_interval_s: float = field(
        default=3600.0, metadata=_meta("a still-firing alert notifies again this often "
                                       "(0: never)", minimum=0))
    cooldown_s: float = field(
        default=0.0, metadata=_meta("least time between two notifications of one alert; held-back"
                                    " ones are counted and the latest status sent after it",
                                    minimum=0))
    channel_per_minute: float = field(
        default=60.0, metadata=_meta("notifications per minute per channel (0: unlimited); "
                                     "held-back ones are counted, never lost", minimum=0))
    channel_burst: int = field(
        default=20, metadata=_meta("burst size of the per-channel rate limit", minimum=1))


@dataclass(frozen=True, slots=True)
class GpuConfig:
    """[gpu]"""

    nvml: Literal["auto", "off"] = field(
        default="auto", metadata=_meta("read vGPU utilisation through NVML when present")
    )
    timeout_s: float = field(default=5.0, metadata=_meta("NVML call deadline", minimum=0.1))


@dataclass(frozen=True, slots=True)
class LogConfig:
    """[log]"""

    level: Literal["debug", "info", "warning", "error"] = field(
        default="info", metadata=_meta("debug, info, warning or error"))
    format: Literal["json", "text"] = field(
        default="json", metadata=_meta("json: one object per line (journald); text: for humans"))


@dataclass(frozen=True, slots=True)
class ApiConfig:
    """[api]: the HTTP API (current usage, health, webhooks, rules, Prometheus)."""

    enabled: bool = field(default=False, metadata=_meta("serve the HTTP API"))
    bind: str = field(
        default="127.0.0.1",
        metadata=_meta("address to listen on; a non-loopback bind requires tls_cert_file/key"),
    )
    port: int = field(default=8080, metadata=_meta("TCP port (0: any free port)",
                                                   minimum=0, maximum=65535))
    tls_cert_file: str = field(default="", metadata=_meta("PEM certificate chain for TLS"))
    tls_key_file: str = field(default="", metadata=_meta("PEM private key for TLS"))
    allow_plaintext_remote: bool = field(
        default=False,
        metadata=_meta("allow a non-loopback bind without TLS (behind a TLS-terminating proxy)"),
    )
    metrics_unauthenticated: bool = field(
        default=False,
        metadata=_meta("serve Prometheus `GET /metrics` without credentials (else admin scope)"),
    )
    legacy_get_unauthenticated: bool = field(
        default=False,
        metadata=_meta("serve the legacy `GET /get` without credentials (upstream compatibility)"),
    )
    jwt_algorithms: tuple[str, ...] = field(
        default=("RS256", "ES256", "EdDSA"),
        metadata=_meta("JWT algorithms accepted (allow-list; `none` is always refused)"),
    )
    jwt_keys_file: str = field(
        default="", metadata=_meta("PEM file(s) of JWT verification keys (public keys)"))
    jwks_file: str = field(default="", metadata=_meta("JWKS file of JWT verification keys"))
    jwt_hmac_secret_file: str = field(
        default="", metadata=_meta("file holding an HMAC secret, for HS* algorithms only"))
    jwt_audience: str = field(default="", metadata=_meta("required `aud` claim (\"\": unchecked)"))
    jwt_issuer: str = field(default="", metadata=_meta("required `iss` claim (\"\": unchecked)"))
    jwt_leeway_s: float = field(
        default=30.0, metadata=_meta("clock skew allowed on exp/nbf", minimum=0, maximum=600))
    jwt_admin_claim: str = field(
        default="scope",
        metadata=_meta("claim whose space-separated values grant `admin` when they contain it"),
    )
    api_keys_file: str = field(
        default="",
        metadata=_meta("TOML file of hashed API keys (`python -m hostagent.api.keys new`)"),
    )
    admin_principals: tuple[str, ...] = field(
        default=(), metadata=_meta("principals (JWT `sub` or key principal) that are admins"))
    rate_per_principal_s: float = field(
        default=50.0, metadata=_meta("requests/s refilled per principal", minimum=0.01))
    burst_per_principal: int = field(
        default=100, metadata=_meta("token bucket size per principal", minimum=1))
    rate_per_address_s: float = field(
        default=100.0, metadata=_meta("requests/s refilled per client address", minimum=0.01))
    burst_per_address: int = field(
        default=200, metadata=_meta("token bucket size per client address", minimum=1))
    max_body_bytes: int = field(
        default=65536, metadata=_meta("largest request body accepted (413 past it)",
                                      minimum=1, maximum=16 * 1024 * 1024))
    max_header_bytes: int = field(
        default=8192, metadata=_meta("largest Authorization header accepted",
                                     minimum=256, maximum=65536))
    page_size: int = field(default=100, metadata=_meta("default page size", minimum=1,
                                                       maximum=10000))
    max_page_size: int = field(default=1000, metadata=_meta("largest page size a client may ask",
                                                            minimum=1, maximum=100000))
    max_pass_age_s: float = field(
        default=180.0,
        metadata=_meta("/api/v1/health/status answers 503 when the last committed pass is older",
                       minimum=1),
    )
    max_outbox_age_s: float = field(
        default=3600.0,
        metadata=_meta("503 when a sink's oldest pending event is older", minimum=1),
    )
    shutdown_grace_s: float = field(
        default=5.0, metadata=_meta("seconds in-flight requests get at shutdown", minimum=0))
    yield_to_pass_max_s: float = field(
        default=2.0,
        metadata=_meta("requests arriving during a collector pass wait for it to end, at most "
                       "this long, so API load never slows a pass (0: never wait)",
                       minimum=0, maximum=60),
    )


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
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ConfigError(str(p), "-", "a readable TOML file", "no such file",
                          "create it or pass --config") from err
    except UnicodeDecodeError as err:
        raise ConfigError(str(p), "-", "UTF-8 text", "undecodable bytes") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(str(p), "-", "valid TOML", str(err), "fix the syntax") from err
    return from_mapping(raw, str(p))


def from_mapping(raw: Mapping[str, Any], source: str = "<inline>") -> Config:
    """Validate an already-parsed TOML document."""
    top = {k: v for k, v in raw.items() if k != "sinks"}
    cfg: Config = _build(Config, top, source, "", skip={"sinks", "source"})
    sinks_raw = raw.get("sinks")
    sinks: tuple[SinkConfig, ...] = cfg.sinks
    if sinks_raw is not None:
        sinks = _build_sinks(sinks_raw, source)
    return dataclasses.replace(cfg, sinks=sinks, source=source)


def _build_sinks(raw: Any, source: str) -> tuple[SinkConfig, ...]:
    if not isinstance(raw, list):
        raise ConfigError(source, "sinks", "an array of tables ([[sinks]])", raw)
    out: list[SinkConfig] = []
    names: set[str] = set()
    for i, item in enumerate(raw):
        key = f"sinks[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(source, key, "a table", item)
        kind = item.get("type")
        if kind not in SINK_TYPES:
            raise ConfigError(source, f"{key}.type", f"one of {sorted(SINK_TYPES)}", kind,
                              'set type = "jsonl", "formation-queue" or "webhook"')
        sink = _build(SINK_TYPES[kind], item, source, key)
        if "name" not in item and sink.name in names:
            sink = dataclasses.replace(sink, name=f"{sink.name}-{i}")  # only to avoid a clash
        if sink.name in names:
            raise ConfigError(source, f"{key}.name", "a unique sink name", sink.name,
                              "give each [[sinks]] its own name")
        names.add(sink.name)
        out.append(sink)
    return tuple(out)


def _build(cls: type[Any], raw: Any, source: str, prefix: str,
           skip: frozenset[str] | set[str] = frozenset()) -> Any:
    where = prefix or "top level"
    if not isinstance(raw, dict):
        raise ConfigError(source, where, "a table", raw)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in skip}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(source, key, f"one of {sorted(fields)}", unknown[0],
                          "remove the key or fix its spelling")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(hints[name], raw[name], source, key, f.metadata)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, source: str, key: str, meta: Mapping[str, Any]) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _build(tp, value, source, key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(source, key, "one of " + ", ".join(repr(c) for c in choices), value)
        return value
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(args[0], value, source, key, meta)
    if origin is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(source, key, "an array of strings", value)
        return tuple(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(source, key, "true or false", value)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(source, key, "an integer", value)
        _check_range(value, source, key, meta)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(source, key, "a number", value)
        _check_range(float(value), source, key, meta)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(source, key, "a string", value)
        return value
    raise ConfigError(source, key, f"a value of type {tp}", value)  # pragma: no cover


def _check_range(value: float, source: str, key: str, meta: Mapping[str, Any]) -> None:
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and value < lo:
        raise ConfigError(source, key, f"a value >= {lo}", value)
    if hi is not None and value > hi:
        raise ConfigError(source, key, f"a value <= {hi}", value)


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
    return rows


def reference_markdown() -> str:
    """The README's configuration table."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, doc in reference():
        lines.append(f"| `{key}` | `{default}` | {doc} |")
    return "\n".join(lines)


if __name__ == "__main__":  # `python -m hostagent.config` prints the README table
    print(reference_markdown())
