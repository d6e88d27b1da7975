"""The [[sinks]] tables of the configuration and their [sinks.retry] / [sinks.breaker] parts.

`SINK_TYPES` maps a sink's `type` key to its table; `config_load.build_sinks` uses it. The
fields carry `_meta` like the [section] tables in `config_schema`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from hostagent.config.schema import MAX_RETENTION_S, _meta
from hostagent.errors import ConfigError

# Internal services a KVM host or its neighbours run (README "HTTP API" → Webhooks):
# docker, etcd, mysql, postgres, VNC/SPICE consoles, redis, kubernetes API, prometheus and
# node exporter, kubelet, memcached, libvirtd (tcp/tls), mongodb, the Formation queue.
WEBHOOK_DENIED_PORTS = ("2375-2376", "2379-2380", "3306", "5432", "5900-5999", "6379", "6443",
                        "9090", "9100", "10250", "11211", "16509", "16514", "27017", "53333")


@dataclass(frozen=True, slots=True)
class RetryConfig:
    """[sinks.retry]: one round of attempts; after a failed round the event waits in the outbox."""

    max_retries: int = field(default=3, metadata=_meta("retries per round", minimum=0, maximum=100))
    initial_backoff_s: float = field(default=0.1, metadata=_meta("first backoff", minimum=0,
                                                                 maximum=86400))
    max_backoff_s: float = field(default=10.0, metadata=_meta("backoff cap", minimum=0,
                                                              maximum=86400))
    multiplier: float = field(default=2.0, metadata=_meta("backoff growth", minimum=1,
                                                          maximum=10))
    jitter: float = field(default=0.1, metadata=_meta("jitter fraction", minimum=0, maximum=1))
    round_backoff_max_s: float = field(
        default=300.0,
        metadata=_meta("cap of the wait between rounds (max_backoff_s × multiplier^(rounds−1) "
                       "while the event waits in the outbox)", minimum=0, maximum=86400),
    )


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """[sinks.breaker]"""

    failure_threshold: int = field(default=5, metadata=_meta("failures to open", minimum=1,
                                                             maximum=1_000_000))
    reset_timeout_s: float = field(default=60.0, metadata=_meta("open → half-open", minimum=0,
                                                                maximum=86400))
    half_open_calls: int = field(default=2, metadata=_meta("trial calls when half-open",
                                                           minimum=1, maximum=1000))


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
    timeout_s: float = field(default=5.0, metadata=_meta("HTTP timeout", minimum=0.1,
                                                         maximum=600))
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
    allowed_ports: tuple[str, ...] = field(
        default=("80", "443", "1024-65535"),
        metadata=_meta("ports (\"N\") and ranges (\"N-M\") a webhook URL may use; port 0 "
                       "never"),
    )
    denied_ports: tuple[str, ...] = field(
        default=WEBHOOK_DENIED_PORTS,
        metadata=_meta("internal service ports a webhook URL may never use, even when "
                       "allowed_ports covers them"),
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
                                   "(4xx other than 408/429 count 5 each)", minimum=1,
                                   maximum=1_000_000))
    max_response_bytes: int = field(
        default=64 * 1024, metadata=_meta("reply bytes read (and ignored) per delivery",
                                          minimum=0, maximum=16 * 1024 * 1024))
    retention_s: float = field(
        default=86400.0, metadata=_meta("keep delivered/dead webhook rows this long", minimum=0,
                                        maximum=MAX_RETENTION_S))
    retry: RetryConfig = field(default_factory=RetryConfig)
    breaker: BreakerConfig = field(default_factory=BreakerConfig)


LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
# Every event kind hostagent emits (hostagent.accounting.events.EVENT_TYPE and
# hostagent.alerts.violations.KIND; a test keeps them equal): what `kinds` may name.
EVENT_KINDS = ("resource_usage", "threshold_violation")
# The file a table's __post_init__ names in its ConfigError; `build_table` puts the config
# file's path and the sink's dotted key in its place.
PLACEHOLDER_FILE = "[[sinks]] email"


@dataclass(frozen=True, slots=True)
class EmailSinkConfig:
    """[[sinks]] type = "email": one mail per alert transition and recipient, over SMTP."""

    type: Literal["email"] = "email"
    name: str = field(default="email", metadata=_meta("sink name (unique)"))
    channel: str = field(
        default="email", metadata=_meta("the notification channel this sink answers to; a rule "
                                        "naming `<channel>:<address>` mails that address"))
    host: str = field(default="127.0.0.1", metadata=_meta("SMTP server"))
    port: int = field(default=25, metadata=_meta("SMTP port (587 STARTTLS, 465 implicit TLS)",
                                                 minimum=1, maximum=65535))
    tls: Literal["starttls", "implicit", "none"] = field(
        default="starttls", metadata=_meta("\"starttls\", \"implicit\" or \"none\" (loopback "
                                           "servers only)"))
    ca_file: str = field(default="", metadata=_meta("CA bundle for the server's certificate "
                                                    "(empty: the system's)"))
    sender: str = field(default="hostagent@localhost", metadata=_meta("From address"))
    to: tuple[str, ...] = field(default=(), metadata=_meta(
        "recipients of every alert this sink gets (a rule may add its own)"))
    username: str = field(default="", metadata=_meta("SMTP AUTH user (empty: no AUTH)"))
    password_file: str = field(default="", metadata=_meta(
        "file holding the SMTP password (mode 0600 or stricter)"))
    subject_prefix: str = field(default="[hostagent]", metadata=_meta(
        "start of every subject, for mail filters"))
    api_url: str = field(default="", metadata=_meta(
        "this host's API base URL, for the link in each mail (empty: no link)"))
    digest_after: int = field(default=5, metadata=_meta(
        "more alerts than this for one recipient in one delivery batch go out as one digest",
        minimum=1, maximum=10000))
    journal_path: str = field(default="/var/lib/hostagent/email-sent.db", metadata=_meta(
        "which (event, recipient) pairs were sent or refused: a retry never mails twice"))
    timeout_s: float = field(default=30.0, metadata=_meta("SMTP timeout per command",
                                                          minimum=0.1, maximum=600))
    kinds: tuple[str, ...] = field(default=("threshold_violation",),
                                   metadata=_meta("event kinds this sink receives"))
    retry: RetryConfig = field(default_factory=RetryConfig)
    breaker: BreakerConfig = field(default_factory=BreakerConfig)

    def __post_init__(self) -> None:
        if self.tls == "none" and self.host not in LOOPBACK_HOSTS:
            raise ConfigError(PLACEHOLDER_FILE, "tls", '"starttls" or "implicit" for a '
                              f"non-loopback server (host = {self.host!r})", self.tls,
                              'tls = "none" is for a server on 127.0.0.1, ::1 or localhost '
                              'only: use tls = "starttls" (port 587) or "implicit" (465)')
        if (not self.channel or any(c in ": \t\r\n" for c in self.channel)):
            raise ConfigError(PLACEHOLDER_FILE, "channel", "a non-empty name without ':' or "
                              "spaces", self.channel, 'e.g. channel = "email" or "email-ops"; a '
                              "rule names `<channel>:<address>` to mail one address")


@dataclass(frozen=True, slots=True)
class NatsSinkConfig:
    """[[sinks]] type = "nats": NATS JetStream (publish with `Nats-Msg-Id: <event_id>`)."""

    type: Literal["nats"] = "nats"
    name: str = field(default="nats", metadata=_meta("sink name (unique)"))
    servers: tuple[str, ...] = field(
        default=("nats://127.0.0.1:4222",),
        metadata=_meta("server URLs (nats:// or tls://), tried in turn: failover"))
    subject: str = field(
        default="hostagent.usage.{node_id}",
        metadata=_meta("subject of usage events; {node_id} and {kind} are filled in"))
    alert_subject: str = field(
        default="hostagent.alerts.{node_id}",
        metadata=_meta("subject of threshold_violation events; {node_id} and {kind} filled in"))
    stream: str = field(default="HOSTAGENT",
                        metadata=_meta("the stream that must own both subjects"))
    create_stream: bool = field(
        default=False,
        metadata=_meta("create the stream at start if it is missing (file storage, the "
                       "stream_* settings below); false: a missing stream is an error"))
    stream_subjects: tuple[str, ...] = field(
        default=("hostagent.>",), metadata=_meta("subjects of a stream created by the sink"))
    stream_replicas: int = field(default=1, metadata=_meta(
        "replicas of a created stream (3 on a 3-node cluster)", minimum=1, maximum=5))
    stream_max_age_s: float = field(default=30 * 86400.0, metadata=_meta(
        "a created stream keeps messages this long (0: forever)", minimum=0,
        maximum=MAX_RETENTION_S))
    stream_max_bytes: int = field(default=0, metadata=_meta(
        "size limit of a created stream (0: unlimited)", minimum=0, maximum=1 << 50))
    duplicate_window_s: float = field(default=86400.0, metadata=_meta(
        "a created stream drops a re-sent event_id within this window; keep it >= the longest "
        "outage you retry through and >= retry.round_backoff_max_s", minimum=1,
        maximum=MAX_RETENTION_S))
    user: str = field(default="", metadata=_meta("user name (with password_file)"))
    password_file: str = field(default="", metadata=_meta("file holding the password (0600)"))
    token_file: str = field(default="", metadata=_meta("file holding a token (0600)"))
    nkey_seed_file: str = field(default="", metadata=_meta("file holding an nkey seed (0600)"))
    creds_file: str = field(default="", metadata=_meta("a .creds file: JWT + nkey seed (0600)"))
    tls_ca_file: str = field(default="", metadata=_meta("CA bundle that signs the servers"))
    tls_cert_file: str = field(default="", metadata=_meta("client certificate (mutual TLS)"))
    tls_key_file: str = field(default="", metadata=_meta("client key (0600, with tls_cert_file)"))
    max_in_flight: int = field(default=256, metadata=_meta(
        "publishes awaiting their PubAck at once", minimum=1, maximum=4096))
    timeout_s: float = field(default=5.0, metadata=_meta("wait for one PubAck", minimum=0.1,
                                                         maximum=120))
    connect_timeout_s: float = field(default=2.0, metadata=_meta(
        "connect timeout per server", minimum=0.1, maximum=60))
    kinds: tuple[str, ...] = field(
        default=("resource_usage", "threshold_violation"),
        metadata=_meta("event kinds this sink receives"),
    )
    retry: RetryConfig = field(default_factory=RetryConfig)
    breaker: BreakerConfig = field(default_factory=BreakerConfig)


SinkConfig = (JsonlSinkConfig | QueueSinkConfig | WebhookSinkConfig | EmailSinkConfig
              | NatsSinkConfig)
SINK_TYPES: dict[str, type[Any]] = {"jsonl": JsonlSinkConfig, "formation-queue": QueueSinkConfig,
                                    "webhook": WebhookSinkConfig, "email": EmailSinkConfig,
                                    "nats": NatsSinkConfig}
