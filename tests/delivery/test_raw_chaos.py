"""Chaos at the byte level: the Formation queue sink (both HTTP clients) and the webhook
dispatcher against a server whose answers are scripted bytes (tests/delivery/raw_http.py):
garbage, half-written answers, resets mid-body, slow-loris answers past the timeout, 1xx
before the answer, 204, redirects, odd statuses, bodies and headers of megabytes, 429 with
odd `Retry-After` values. Every answer ends as a SinkUnavailable (retried, never dropped), a
SinkRejected (the queue's refusal) or a success that the server really gave; within the
timeout; and a reused keep-alive connection the server closed is replaced, not failed."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator

import httpx
import pytest
import trio

from hostagent.clock import SystemClock
from hostagent.config.sinks import QueueSinkConfig, RetryConfig, WebhookSinkConfig
from hostagent.delivery.sinks.formation_queue import FormationQueueSink
from hostagent.delivery.sinks.webhook import WebhookDispatcher
from hostagent.errors import SinkRejected, SinkUnavailable
from hostagent.store.webhooks import Delivery, Registration
from tests.delivery.raw_http import (
    Answer,
    RawServer,
    close_when_reused,
    drip,
    reset_after,
    response,
    send,
)
from tests.standins.queue import usage_event

OK = response(200, b'"OpSuccess"')
CHUNKED_MB = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
              + (b"10000\r\n" + b"x" * 0x10000 + b"\r\n") * 64 + b"0\r\n\r\n")

# name: (answer, what the queue sink must make of it: "ok", "unavailable" or "rejected")
QUEUE_ANSWERS: dict[str, tuple[Answer, str]] = {
    "garbage instead of HTTP": (send(b"\x00\xffnot http\r\n\r\n"), "unavailable"),
    "200 with an HTML body": (send(response(200, b"<html>")), "unavailable"),
    "headers cut short": (send(b"HTTP/1.1 200 OK\r\nContent-Le"), "unavailable"),
    "body cut short": (send(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n\"OpSu"),
                       "unavailable"),
    "reset mid-body": (reset_after(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n\"Op"),
                       "unavailable"),
    "reset before answering": (reset_after(b""), "unavailable"),
    "closed without an answer": (send(b""), "unavailable"),
    "slow loris": (drip(OK, 0.3), "unavailable"),
    "100 Continue then OpSuccess": (send(b"HTTP/1.1 100 Continue\r\n\r\n" + OK), "ok"),
    "204": (send(b"HTTP/1.1 204 No Content\r\n\r\n"), "unavailable"),
    "301": (send(response(301, b"", ("Location: /elsewhere",))), "unavailable"),
    "429, Retry-After -5": (send(response(429, b"", ("Retry-After: -5",))), "unavailable"),
    "101 unasked": (send(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n"
                         b"Connection: upgrade\r\n\r\n"), "unavailable"),
    "status 999": (send(response(999, b'"OpSuccess"')), "unavailable"),
    "10 MB body": (send(response(200, b"x" * 10_000_000)), "unavailable"),
    "4 MB chunked body": (send(CHUNKED_MB), "unavailable"),
    "1 MB header": (send(b"HTTP/1.1 200 OK\r\nX: " + b"a" * 1_000_000 + b"\r\n\r\n"),
                    "unavailable"),
    "Failure with an object reason": (
        send(response(200, b'{"Failure": {"reason": {"a": [1]}}}')), "rejected"),
    "HTTP/1.0 OpSuccess, read to the close": (send(b"HTTP/1.0 200 OK\r\n\r\n\"OpSuccess\""),
                                              "ok"),
}


@pytest.fixture(params=["h11", "httpx"])
def client(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def outcome(err: BaseException | None) -> str:
    if err is None:
        return "ok"
    if isinstance(err, SinkRejected):
        return "rejected"
    assert isinstance(err, SinkUnavailable), repr(err)
    return "unavailable"


@pytest.fixture
def server() -> Iterator[list[RawServer]]:
    started: list[RawServer] = []
    yield started
    for s in started:
        s.stop()


@pytest.mark.parametrize(("answer", "want"), QUEUE_ANSWERS.values(), ids=QUEUE_ANSWERS.keys())
async def test_the_queue_sink_makes_a_retry_or_a_refusal_of_any_answer(
        server: list[RawServer], client: str, answer: Answer, want: str) -> None:
    srv = RawServer([answer]).start()
    server.append(srv)
    sink = FormationQueueSink(QueueSinkConfig(url=srv.url, timeout_s=1.0,
                                              http_client=client))  # type: ignore[arg-type]
    got = []
    try:
        for i in range(3):
            t0 = time.monotonic()
            try:
                await sink.send(usage_event("i0", i))
                got.append(outcome(None))
            except Exception as err:  # classified just below
                got.append(outcome(err))
            assert time.monotonic() - t0 < 1.0 + 0.5  # the timeout holds, slow loris too
    finally:
        await sink.aclose()
    assert got == [want] * 3
    # each event reached the server, at most once more (the same bytes) when no answer at
    # all came, as on a reused connection the server had just closed
    assert 3 <= len(srv.requests) <= 6
    assert len(set(srv.requests)) == 3
    if want != "unavailable":
        assert len(srv.requests) == 3


async def test_a_keep_alive_connection_the_queue_closes_as_it_is_reused_is_replaced(
        server: list[RawServer], client: str) -> None:
    # The queue answers, then closes the idle connection just as the next write comes on it
    # (its keep-alive timeout racing our reuse): the write meets a reset before any reply.
    # The h11 pool failed that write ("BrokenResourceError: ... Connection reset by peer"):
    # a failure against the breaker (5 open it for 60 s) for a write the queue never saw.
    srv = RawServer([close_when_reused(OK)]).start()
    server.append(srv)
    sink = FormationQueueSink(QueueSinkConfig(url=srv.url, timeout_s=2.0,
                                              http_client=client))  # type: ignore[arg-type]
    try:
        for i in range(10):
            await sink.send(usage_event("i0", i))
    finally:
        await sink.aclose()
    assert len(srv.requests) == 10


RETRY = RetryConfig(max_backoff_s=10.0, multiplier=2.0, jitter=0.0, round_backoff_max_s=300.0)
# Retry-After: the wait the row gets (seconds), after its first failure (backoff 10 s).
RETRY_AFTERS = {
    "-5": 10.0, "+10": 10.0, "1.5": 10.0, "soon": 10.0, "0": 10.0, "60": 60.0,
    "99999999999999999999999": 300.0,  # capped at round_backoff_max_s
    "Wed, 21 Oct 2099 07:28:00 GMT": 300.0,
    "Wed, 21 Oct 2015 07:28:00 GMT": 10.0,  # in the past
    "Mon, 01 Jan 0001 00:00:00 GMT": 10.0,
    "Wed, 21 Oct 99999 07:28:00 GMT": 10.0,  # not a date
    "Wed, 21 Oct 2099 07:28:00 -0000": 10.0,  # not GMT: not an HTTP-date
}


@pytest.mark.parametrize(("value", "wait_s"), RETRY_AFTERS.items(), ids=RETRY_AFTERS.keys())
async def test_odd_retry_after_values_wait_between_the_backoff_and_its_cap(
        server: list[RawServer], value: str, wait_s: float) -> None:
    srv = RawServer([send(response(429, b"", (f"Retry-After: {value}",)))]).start()
    server.append(srv)
    cfg = WebhookSinkConfig(allow_list=("127.0.0.1",), timeout_s=1.0, retry=RETRY)
    dispatcher = WebhookDispatcher(cfg, None, SystemClock(),  # type: ignore[arg-type]
                                   rng=random.Random(0))
    reg = Registration("webhook_x", f"{srv.url}/hook", ("metrics",), None, 0)
    async with httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=1.0) as c:
        error, weight, transient, asked_s = await dispatcher._post(
            c, reg, Delivery("webhook_x", "e1", "metrics", b"{}", 0))
    assert error is not None and error.startswith("HTTP 429") and transient and weight == 1
    now_ns = SystemClock().now().wall_ns
    waited_s = (dispatcher._later_ns(1, asked_s) - now_ns) / 1e9
    assert waited_s == pytest.approx(wait_s, abs=1.0)


WEBHOOK_ANSWERS: dict[str, tuple[Answer, bool | None]] = {  # None: delivered
    "garbage": (send(b"\x00\xffnot http\r\n\r\n"), True),
    "body cut short": (send(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\nok"), True),
    "reset mid-body": (reset_after(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\nok"), True),
    "slow loris": (drip(response(200, b"ok"), 0.5), True),
    "100 then 200": (send(b"HTTP/1.1 100 Continue\r\n\r\n" + response(200, b"ok")), None),
    "204": (send(b"HTTP/1.1 204 No Content\r\n\r\n"), None),
    "302 to the metadata address": (
        send(response(302, b"", ("Location: http://169.254.169.254/",))), False),
    "10 MB body": (send(response(200, b"x" * 10_000_000)), None),
    "1 MB header": (send(b"HTTP/1.1 200 OK\r\nX: " + b"a" * 1_000_000 + b"\r\n\r\n"), True),
    "status 999": (send(response(999)), True),
}


@pytest.mark.parametrize(("answer", "transient"), WEBHOOK_ANSWERS.values(),
                         ids=WEBHOOK_ANSWERS.keys())
async def test_a_webhook_answer_is_delivered_retried_or_held_never_a_crash(
        server: list[RawServer], answer: Answer, transient: bool | None) -> None:
    srv = RawServer([answer]).start()
    server.append(srv)
    cfg = WebhookSinkConfig(allow_list=("127.0.0.1",), timeout_s=1.0)
    dispatcher = WebhookDispatcher(cfg, None, SystemClock())  # type: ignore[arg-type]
    reg = Registration("webhook_x", f"{srv.url}/hook", ("metrics",), None, 0)
    t0 = time.monotonic()
    async with httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=1.0) as c:
        error, _, is_transient, _ = await dispatcher._post(
            c, reg, Delivery("webhook_x", "e1", "metrics", b"{}", 0))
    assert time.monotonic() - t0 < 2 * 1.0 + 1.0 + 0.5  # the attempt's own deadline
    if transient is None:
        assert error is None
    else:
        assert error is not None and is_transient is transient
    assert len(srv.requests) == 1  # never a redirect followed
    await trio.lowlevel.checkpoint()
