"""A webhook endpoint that answers 429 or 503 with `Retry-After` gets its next attempt no sooner
than it asked (seconds or an HTTP-date), and never later than `round_backoff_max_s`: against
the real receiver on 127.0.0.1, the dispatcher and the outbox running."""

from __future__ import annotations

import email.utils
import time

import pytest

from hostagent.config.sinks import RetryConfig
from hostagent.delivery.drain import at_least_s, retry_after_s
from tests.delivery.sinks.conftest import Rig
from tests.delivery.sinks.test_webhook import arrivals

RETRY = RetryConfig(max_retries=0, initial_backoff_s=0.05, max_backoff_s=0.1, multiplier=1.0,
                    jitter=0.0, round_backoff_max_s=60)


async def _gap_s(rig: Rig, retry: RetryConfig) -> float:
    """Seconds between the refused first request and the delivered second one."""
    t = await arrivals(rig, retry, 2)
    return t[1] - t[0]


@pytest.mark.parametrize("status", [429, 503])
async def test_retry_after_seconds_is_waited(rig: Rig, status: int) -> None:
    rig.receiver.script = [status]
    rig.receiver.retry_after = "2"
    assert 1.9 <= await _gap_s(rig, RETRY) <= 3.5  # the backoff alone: 0.1 s


async def test_retry_after_as_an_http_date_is_waited(rig: Rig) -> None:
    rig.receiver.script = [429]
    # Whole seconds, and read when the reply comes (the daemon's start and the first request
    # in between): 6 s ahead is 3.5 s or more when the dispatcher reads it.
    rig.receiver.retry_after = email.utils.formatdate(time.time() + 6, usegmt=True)
    assert 3.0 <= await _gap_s(rig, RETRY) <= 7.5


async def test_a_retry_after_past_round_backoff_max_s_is_capped(rig: Rig) -> None:
    rig.receiver.script = [503]
    rig.receiver.retry_after = "86400"
    capped = RetryConfig(max_retries=0, initial_backoff_s=0.05, max_backoff_s=0.1,
                         multiplier=1.0, jitter=0.0, round_backoff_max_s=1.0)
    assert 0.9 <= await _gap_s(rig, capped) <= 2.5


async def test_without_retry_after_the_backoff_alone(rig: Rig) -> None:
    rig.receiver.script = [429]
    assert await _gap_s(rig, RETRY) < 1.0


def test_retry_after_values() -> None:
    now = 1_800_000_000.0
    assert retry_after_s("120", now) == 120.0
    assert retry_after_s(" 0 ", now) == 0.0
    assert retry_after_s("9" * 400, now) == 1e9  # no float overflow: capped by the caller
    assert retry_after_s(email.utils.formatdate(now + 30, usegmt=True), now) == 30.0
    assert retry_after_s(email.utils.formatdate(now - 30, usegmt=True), now) == 0.0
    for bad in (None, "", "-5", "1.5", "soon", "Wed, 99 Foo 2026 07:28:00 GMT",
                "Sun, 06 Nov 1994 08:49:37", "٣"):
        assert retry_after_s(bad, now) is None, bad
    assert at_least_s(0.5, None, RETRY) == 0.5
    assert at_least_s(0.5, 0.1, RETRY) == 0.5
    assert at_least_s(0.5, 30.0, RETRY) == 30.0
    assert at_least_s(0.5, 1e9, RETRY) == RETRY.round_backoff_max_s
