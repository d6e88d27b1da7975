"""The [section] tables of the configuration: one frozen dataclass per TOML table.

Each field holds its default and, through `_meta`, its one-line doc and the range that
`config_load` enforces and the README table (`python -m hostagent.config`) prints. The
[[sinks]] tables are in `config_sinks`; the root `Config`, `load()` and the README table are in
`config`, which re-exports everything here.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Any, Literal

from hostagent import model
from hostagent.model import InstanceIdScheme

TimeFormat = Literal["unix", "rfc3339"]

# Largest value of a duration key that keeps data or state (10 years of 365 days): every
# duration is turned into nanoseconds and compared with, or stored as, a signed 64-bit
# integer (SQLite INTEGER), and 10 years of ns (3.2e17) is far inside it. Every number key has
# a maximum; a test keeps it so.
MAX_RETENTION_S = 315_360_000
# Largest repeat interval or cooldown of an alert (hostagent.model: the rules' parser, which
# is pure, checks a rule's `repeat_interval_s` against it too).
MAX_REPEAT_S = model.MAX_REPEAT_S
MAX_RATE = 1_000_000  # requests, lookups or notifications per second/minute: past any real use


def _meta(doc: str, *, minimum: float | None = None, maximum: float | None = None) -> Any:
    """A field's metadata: its doc line and the range the loader checks (config_sinks too)."""
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
        metadata=_meta("forget the baseline of an instance not seen for this long",
                       minimum=3600, maximum=MAX_RETENTION_S),
    )
    count_preexisting: bool = field(
        default=False,
        metadata=_meta("bill usage a domain accrued before this store first saw it "
                       "(only right when no other collector billed it)"),
    )
    sample_interval_s: float = field(
        default=2.0,
        metadata=_meta("seconds between light samples (cgroup cpu.stat, tap bytes, v2 io.stat; "
                       "no libvirt call) that bound what a destroyed VM leaves unbilled; 0 = off",
                       minimum=0, maximum=3600),
    )
    watched_sample_interval_s: float = field(
        default=10.0,
        metadata=_meta("seconds between light samples while the end of every VM is watched "
                       "(its v2 cgroup emptying, its taps' deletion: the final counters are read "
                       "then); sample_interval_s applies where it is not", minimum=0,
                       maximum=3600),
    )
    lifecycle_events: bool = field(
        default=True,
        metadata=_meta("subscribe to libvirt lifecycle events: read a domain at start and "
                       "before it goes, close it out at the next pass"),
    )
    lifecycle_keepalive_interval_s: int = field(
        # Above libvirtd's own keepalive_interval (5 s by default): its pings keep traffic on
        # the connection, so this client never pings (it answers); measured: 10 client pings
        # and their answers fewer a minute on the lab (docs/benchmarks.md, thirteenth session).
        default=10,
        metadata=_meta("libvirt keepalive interval of the connection, once events are "
                       "subscribed on it", minimum=1, maximum=600),
    )
    lifecycle_keepalive_count: int = field(
        default=3,
        metadata=_meta("unanswered keepalives before the libvirt connection counts as dead",
                       minimum=1, maximum=100),
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
        default=600.0, metadata=_meta("how long a looked-up owner is fresh", minimum=1,
                                      maximum=MAX_RETENTION_S)
    )
    negative_ttl_s: float = field(
        default=60.0, metadata=_meta("how long an unknown instance is not asked again",
                                     minimum=1, maximum=MAX_RETENTION_S)
    )
    timeout_s: float = field(default=5.0, metadata=_meta("HTTP timeout", minimum=0.1, maximum=120))
    max_response_bytes: int = field(
        default=16 * 1024 * 1024, metadata=_meta("responses larger than this are refused",
                                                 minimum=1024, maximum=1 << 30)
    )
    lookups_per_s: float = field(
        default=2.0, metadata=_meta("rate limit of point lookups for unknown instances",
                                    minimum=0.01, maximum=MAX_RATE)
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
                       minimum=1024 * 1024, maximum=1 << 40),
    )
    retention_s: float = field(
        default=86400.0, metadata=_meta("keep acknowledged events this long", minimum=0,
                                        maximum=MAX_RETENTION_S)
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
    local_batch_size: int = field(
        default=4096,
        metadata=_meta("events the JSONL sink claims, writes and fsyncs as one batch (a "
                       "pass's events usually fit in one)", minimum=1, maximum=100000),
    )
    maintenance_interval_s: float = field(
        default=30.0,
        metadata=_meta("how often delivery prunes, checks the size cap and refreshes depth "
                       "gauges (with a pass's commit while passes come)", minimum=0.1,
                       maximum=3600),
    )



@dataclass(frozen=True, slots=True)
class ThresholdsConfig:
    """[thresholds]: threshold rules and the alert state machine."""

    rules_path: str = field(
        default="", metadata=_meta("rules file (JSON or TOML, both seed formats); reloaded on "
                                   "SIGHUP and when it changes; empty: no rules"))
    api_rules_path: str = field(
        default="", metadata=_meta("where rules written through /api/v1/thresholds are kept "
                                   "(a layer over rules_path); empty: api-rules.json next to "
                                   "collector.state_path"))
    source_url: str = field(
        default="", metadata=_meta("central rule set (http/https, JSON like the rules file), "
                                   "pulled with ETag; the lowest layer (see README)"))
    refresh_s: float = field(default=60.0, metadata=_meta("how often source_url is pulled",
                                                          minimum=1, maximum=86400))
    source_timeout_s: float = field(default=10.0, metadata=_meta("timeout of one pull",
                                                                 minimum=0.1, maximum=300))
    source_max_bytes: int = field(default=1 << 20, metadata=_meta(
        "largest rule set accepted from source_url", minimum=1024, maximum=64 << 20))
    source_signed: bool = field(default=False, metadata=_meta(
        "sign pulls the Formation way with the node's key (owners.key_file)"))
    reload_check_s: float = field(
        default=5.0, metadata=_meta(
            "how often the rules files are polled where inotify cannot watch their directory "
            "(watched: a change is seen at once, and checked every 60 s anyway)",
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
                                       "(0: never)", minimum=0, maximum=MAX_REPEAT_S))
    cooldown_s: float = field(
        default=0.0, metadata=_meta("least time between two notifications of one alert; held-back"
                                    " ones are counted and the latest status sent after it",
                                    minimum=0, maximum=MAX_REPEAT_S))
    channel_per_minute: float = field(
        default=60.0, metadata=_meta("notifications per minute per channel (0: unlimited); "
                                     "held-back ones are counted, never lost", minimum=0,
                                     maximum=MAX_RATE))
    channel_burst: int = field(
        default=20, metadata=_meta("burst size of the per-channel rate limit", minimum=1,
                                   maximum=MAX_RATE))


@dataclass(frozen=True, slots=True)
class GpuConfig:
    """[gpu]"""

    nvml: Literal["auto", "off"] = field(
        default="auto", metadata=_meta("read vGPU utilisation through NVML when present")
    )
    timeout_s: float = field(default=5.0, metadata=_meta("NVML call deadline", minimum=0.1,
                                                         maximum=600))


@dataclass(frozen=True, slots=True)
class LogConfig:
    """[log]"""

    level: Literal["debug", "info", "warning", "error"] = field(
        default="info", metadata=_meta("debug, info, warning or error"))
    format: Literal["auto", "json", "text"] = field(
        default="auto", metadata=_meta("auto: text on a terminal, else json; json: one object "
                                       "per line (journald); text: for humans"))


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
        default=50.0, metadata=_meta("requests/s refilled per principal", minimum=0.01,
                                     maximum=MAX_RATE))
    burst_per_principal: int = field(
        default=100, metadata=_meta("token bucket size per principal", minimum=1,
                                    maximum=MAX_RATE))
    rate_per_address_s: float = field(
        default=100.0, metadata=_meta("requests/s refilled per client address",
                                      minimum=0.01, maximum=MAX_RATE))
    burst_per_address: int = field(
        default=200, metadata=_meta("token bucket size per client address", minimum=1,
                                    maximum=MAX_RATE))
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
                       minimum=1, maximum=MAX_RETENTION_S),
    )
    max_outbox_age_s: float = field(
        default=3600.0,
        metadata=_meta("503 when a sink's oldest pending event is older", minimum=1,
                       maximum=MAX_RETENTION_S),
    )
    shutdown_grace_s: float = field(
        default=5.0, metadata=_meta("seconds in-flight requests get at shutdown", minimum=0,
                                    maximum=3600))
    yield_to_pass_max_s: float = field(
        default=2.0,
        metadata=_meta("requests arriving during a collector pass wait for it to end, at most "
                       "this long, so API load never slows a pass (0: never wait)",
                       minimum=0, maximum=60),
    )
