"""The webhook tests' rig: a real receiver on 127.0.0.1, the outbox store and the webhook store
on one SQLite file, and the sink's settings (tests/delivery/sinks/test_webhook*.py)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostagent.clock import SystemClock
from hostagent.config.sinks import BreakerConfig, RetryConfig, WebhookSinkConfig
from hostagent.store.outbox import Store
from hostagent.store.webhooks import WebhookStore
from tests.standins.webhook_receiver import WebhookReceiver

FAST = RetryConfig(max_retries=0, initial_backoff_s=0.05, max_backoff_s=0.05, multiplier=1.0,
                   jitter=0.0, round_backoff_max_s=0.05)


@dataclasses.dataclass
class Rig:
    store: Store
    hooks: WebhookStore
    receiver: WebhookReceiver
    cfg: WebhookSinkConfig


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    r = WebhookReceiver(secret="s3cret").start()
    yield r
    r.stop()


@pytest.fixture
def rig(tmp_path: Path, receiver: WebhookReceiver) -> Iterator[Rig]:
    clock = SystemClock()
    path = tmp_path / "state.db"
    store = Store.open(path, clock=clock, node_id="host-a", sink_names=["webhooks"])
    hooks = WebhookStore(path, clock)
    cfg = WebhookSinkConfig(allow_list=("127.0.0.1",), retry=FAST, timeout_s=2.0,
                            breaker=BreakerConfig(failure_threshold=3, reset_timeout_s=60))
    yield Rig(store, hooks, receiver, cfg)
    hooks.close()
    store.close()
