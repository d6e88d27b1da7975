"""The NATS JetStream sink's client side (hostagent.delivery.sinks.nats_jetstream): connection
options (servers, credentials from their files, TLS), the stream `create_stream = true` makes,
what the server counts against `max_payload`, and nats-py's JetStream context with refused
async publishes failing their future (nats-io/nats.py#985).
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats.js.errors
import trio
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig, StreamInfo

from hostagent.config.sinks import NatsSinkConfig

log = logging.getLogger("hostagent.delivery.sinks.nats_jetstream")  # as before the split

MSG_ID = "Nats-Msg-Id"
EXPECTED_STREAM = "Nats-Expected-Stream"
ERR_MSG_TOO_LARGE = 10054
ERR_STORE_FAILED = 10077  # "maximum bytes/messages exceeded": a full stream that discards new
CLOSE_TIMEOUT_S = 3.0
# Attempts per server after a disconnect before the client gives up; the next send opens a
# fresh connection (the outbox holds the events meanwhile, the breaker paces the attempts).
RECONNECTS = 1
PROBE_STREAM = "hostagent-sink-check-probe"  # a name no real stream has: the probe is refused


class SetupError(Exception):
    """The connection or the stream is not usable as configured (one line, no traceback)."""


class JetStream(JetStreamContext):
    """nats-py's JetStream context, except that a refused async publish fails its future.

    nats-py (2.16; nats-io/nats.py#985) turns a JetStream error reply to `publish_async` into
    an exception with `APIError.from_error`, which raises: the error escapes into the
    subscription's task (an error_cb line) and the publish's future never completes. A refusal
    then looked like a lost PubAck: an event the stream can never take (over its max_msg_size)
    was retried forever, a full stream waited `timeout_s` per attempt, both without a reason."""

    async def _handle_async_reply(self, msg: Msg) -> None:
        try:
            await super()._handle_async_reply(msg)
        except nats.js.errors.APIError as err:
            prefix = self._async_reply_prefix
            future = self._publish_async_futures.get(msg.subject[len(prefix):]) if prefix else None
            if future is None or future.done():
                raise
            future.set_exception(err)


@dataclass(eq=False)
class Pub:
    """One publish of a batch and its outcome."""

    subject: str
    event_id: str
    payload: bytes
    done: trio.Event = field(default_factory=trio.Event)
    duplicate: bool = False
    error: BaseException | None = None


@dataclass
class Conn:
    nc: Client
    js: JetStreamContext
    info: StreamInfo
    errors: list[str] = field(default_factory=list)


def connect_options(cfg: NatsSinkConfig, errors: list[str]) -> dict[str, Any]:
    """nats.connect keyword arguments: servers, credentials read from their files, TLS."""

    async def error_cb(err: Exception) -> None:
        line = f"{type(err).__name__}: {err}".strip().rstrip(":")
        errors.append(line)
        del errors[:-5]
        log.warning("nats client error", extra={"sink": cfg.name, "error": line})

    async def disconnected_cb() -> None:
        log.info("nats disconnected", extra={"sink": cfg.name})

    opts: dict[str, Any] = {
        "servers": list(cfg.servers), "connect_timeout": cfg.connect_timeout_s,
        "allow_reconnect": True, "max_reconnect_attempts": RECONNECTS, "reconnect_time_wait": 0.5,
        "dont_randomize": True, "error_cb": error_cb, "disconnected_cb": disconnected_cb,
        "name": f"hostagent {cfg.name}"}
    if cfg.password_file:
        opts["user"] = cfg.user
        opts["password"] = Path(cfg.password_file).read_text(encoding="utf-8").strip()
    if cfg.token_file:
        opts["token"] = Path(cfg.token_file).read_text(encoding="utf-8").strip()
    if cfg.nkey_seed_file:
        opts["nkeys_seed"] = cfg.nkey_seed_file
    if cfg.creds_file:
        opts["user_credentials"] = cfg.creds_file
    if cfg.tls_ca_file or cfg.tls_cert_file or any(s.startswith("tls:") for s in cfg.servers):
        ctx = ssl.create_default_context(cafile=cfg.tls_ca_file or None)
        if cfg.tls_cert_file:
            ctx.load_cert_chain(cfg.tls_cert_file, cfg.tls_key_file)
        opts["tls"] = ctx
    return opts


def message_bytes(payload: bytes, event_id: str, stream: str) -> int:
    """What the server holds against its `max_payload`: the payload AND the header block
    nats-py sends with it (``NATS/1.0``, Nats-Msg-Id, Nats-Expected-Stream). A message over it
    is not refused by a reply: the server closes the connection (-ERR 'Maximum Payload
    Violation'), taking every PubAck in flight with it."""
    head = f"NATS/1.0\r\n{MSG_ID}: {event_id}\r\n{EXPECTED_STREAM}: {stream}\r\n\r\n"
    return len(head.encode()) + len(payload)


def connect_budget_s(cfg: NatsSinkConfig) -> float:
    """How long opening a connection may take: every server, 1 + RECONNECTS times."""
    return (cfg.connect_timeout_s + 0.5) * (1 + RECONNECTS) * len(cfg.servers)


def stream_config(cfg: NatsSinkConfig) -> StreamConfig:
    """The stream `create_stream = true` creates: file storage, replicas, max age, max bytes
    and the duplicate window from the sink's settings."""
    return StreamConfig(name=cfg.stream, subjects=list(cfg.stream_subjects),
                        storage=StorageType.FILE, num_replicas=cfg.stream_replicas,
                        max_age=cfg.stream_max_age_s or None,
                        max_bytes=cfg.stream_max_bytes or -1,
                        duplicate_window=cfg.duplicate_window_s)
