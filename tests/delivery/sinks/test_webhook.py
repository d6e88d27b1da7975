"""Webhook sink end to end: outbox → fan-out → signed POSTs to a real receiver on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trio

from hostagent.accounting import events
from hostagent.alerts import violations
from hostagent.alerts.index import Settings, build_index
from hostagent.alerts.state import AlertState, evaluate
from hostagent.clock import SystemClock
from hostagent.config.schema import OutboxConfig
from hostagent.config.sinks import JsonlSinkConfig, RetryConfig
from hostagent.delivery.engine import Delivery
from hostagent.delivery.sinks.base import build_sink, dispatchers
from hostagent.delivery.sinks.webhook import WebhookDispatcher, WebhookSink, signature_headers
from hostagent.errors import ConfigError
from hostagent.model import OutEvent, Owner
from hostagent.store.outbox import Store
from hostagent.store.webhooks import WebhookStore
from tests.alerts.test_rules_index import CPU, usage
from tests.delivery.sinks.conftest import Rig
from tests.standins.webhook_receiver import verify_legacy, verify_standard

OWNER = Owner("user_123456", "org_789012", "service")


def test_standard_webhooks_reference_vector() -> None:
    # the example of the Standard Webhooks specification
    h = signature_headers("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                          "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}')
    assert h["webhook-signature"] == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_both_signatures_verify_and_detect_tampering() -> None:
    h = {k.lower(): v for k, v in signature_headers("s3cret", "id1", 5, b"{}").items()}
    h |= {"webhook-id": "id1", "webhook-timestamp": "5"}
    assert verify_standard("s3cret", h, b"{}") and verify_legacy("s3cret", h, b"{}")
    assert not verify_standard("s3cret", h, b"{ }") and not verify_legacy("other", h, b"{}")
    assert signature_headers(None, "id1", 5, b"{}") == {}



def alert_event(values: list[float]) -> list[OutEvent]:
    idx = build_index([CPU], Settings(repeat_interval_s=0))
    states: dict[str, AlertState] = {}
    out: list[OutEvent] = []
    for i, v in enumerate(values):
        u = usage(t=i * 30, cpu_percent_avg=v)
        ev = evaluate(idx, [u], {}, states, u.period_end_ns)
        states = dict(ev.states)
        out += violations.route(ev.transitions, {"vm-1": OWNER}, "host-a", time_format="unix")
    return out


def usage_event() -> OutEvent:
    return events.build_usage_event(usage(t=0), OWNER, "host-a", time_format="unix")


async def until(pred: Callable[[], bool], timeout_s: float = 10.0) -> None:
    with trio.fail_after(timeout_s):
        while not pred():  # noqa: ASYNC110 -- the receiver is a thread: poll it
            await trio.sleep(0.02)


async def running(rig: Rig, **kw: Any) -> AsyncIterator[tuple[WebhookSink, Delivery]]:
    clock = SystemClock()
    sink = build_sink(dataclasses.replace(rig.cfg, **kw), clock=clock, webhook_store=rig.hooks)
    assert isinstance(sink, WebhookSink) and sink.dispatcher is not None
    delivery = Delivery(rig.store, [sink], clock, OutboxConfig(maintenance_interval_s=0.5))
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.dispatcher.run)
        await nursery.start(delivery.run)
        yield sink, delivery
        nursery.cancel_scope.cancel()


async def test_routing_signatures_and_body(rig: Rig) -> None:
    alert_hook = rig.hooks.register(rig.receiver.url + "?kind=alerts", ["threshold_violation"],
                                    "s3cret")
    metrics_hook = rig.hooks.register(rig.receiver.url + "?kind=metrics", ["metrics"])
    evs = [usage_event(), *alert_event([90.0, 10.0])]
    rig.store.commit_pass([], evs)
    async for _sink, delivery in running(rig):
        delivery.wake()
        await until(lambda: len(rig.receiver.received) == 3)
        await trio.sleep(0.2)  # nothing more arrives
        # a request is noted before its answer is back: wait for the outbox's acks
        await until(lambda: rig.store.stats()["webhooks"].acked == 3)
    got = rig.receiver.received
    assert len(got) == 3
    alerts_got = [r for r in got if r.path.endswith("alerts")]
    metrics_got = [r for r in got if r.path.endswith("metrics")]
    assert [r.json["data"]["transition"] for r in alerts_got] == ["exceeded", "resolved"]
    assert all(r.std_ok and r.legacy_ok for r in alerts_got)
    assert all(r.json["event_type"] == "threshold_violation" for r in alerts_got)
    assert all(r.headers["x-webhook-event"] == "threshold_violation" for r in alerts_got)
    assert [r.json["event_type"] for r in metrics_got] == ["metrics"]
    assert metrics_got[0].json["data"]["event_type"] == "resource_usage"
    assert "webhook-signature" not in metrics_got[0].headers  # no secret, no signature
    assert {r.headers["webhook-id"] for r in got} == {e.event_id for e in evs}
    assert got[0].headers["host"] == f"127.0.0.1:{rig.receiver.port}"
    assert orjson.loads(alerts_got[0].body)["data"]["fingerprint"] == "cpu|vm-1"
    counts = rig.hooks.counts()
    assert counts[alert_hook.id] == {"delivered": 2} and counts[metrics_hook.id] == {
        "delivered": 1}
    assert rig.store.stats()["webhooks"].acked == 3  # the outbox acked after the fan-out


async def test_retries_with_the_same_id_and_fresh_signatures(rig: Rig) -> None:
    rig.receiver.script = [500, 503]
    rig.hooks.register(rig.receiver.url, ["threshold_violation"], "s3cret")
    rig.store.commit_pass([], alert_event([90.0]))
    async for _sink, delivery in running(rig):
        delivery.wake()
        await until(lambda: len(rig.receiver.received) == 3)
        await trio.sleep(0.2)
        await until(lambda: list(rig.hooks.counts().values()) == [{"delivered": 1}])
    got = rig.receiver.received
    assert len(got) == 3 and len({r.headers["webhook-id"] for r in got}) == 1
    assert all(r.std_ok and r.legacy_ok for r in got)
    assert list(rig.hooks.counts().values()) == [{"delivered": 1}]


async def test_redirects_are_not_followed(rig: Rig) -> None:
    rig.receiver.script = [302]
    hook = rig.hooks.register(rig.receiver.url, ["threshold_violation"], "s3cret")
    rig.store.commit_pass([], alert_event([90.0]))
    async for _sink, delivery in running(rig, dead_after_attempts=5):
        delivery.wake()
        await until(lambda: rig.hooks.counts().get(hook.id) == {"dead": 1})
    assert [(r.method, r.path) for r in rig.receiver.received] == [("POST", "/hook")]


async def test_breaker_opens_per_endpoint(rig: Rig) -> None:
    rig.receiver.script = [500] * 100
    rig.hooks.register(rig.receiver.url, ["threshold_violation"], "s3cret")
    rig.store.commit_pass([], alert_event([90.0, 10.0, 90.0, 10.0]))
    async for sink, delivery in running(rig, endpoint_concurrency=1):
        delivery.wake()
        await until(lambda: len(rig.receiver.received) >= 3)
        await trio.sleep(0.5)  # backoff is 50 ms: without the breaker many more would come
        assert sink.dispatcher is not None
        stats = next(iter(sink.dispatcher.stats.values()))
    assert len(rig.receiver.received) == 3 and stats.failed == 3
    assert all(v.get("pending") == 4 for v in rig.hooks.counts().values())


async def test_ssrf_guard_refuses_unlisted_loopback(rig: Rig) -> None:
    hook = rig.hooks.register(rig.receiver.url, ["threshold_violation"], "s3cret")
    rig.store.commit_pass([], alert_event([90.0]))
    async for sink, delivery in running(rig, allow_list=(), dead_after_attempts=5):
        delivery.wake()
        await until(lambda: rig.hooks.counts().get(hook.id) == {"dead": 1})
        assert sink.dispatcher is not None
        assert sink.dispatcher.stats[hook.id].refused == 1
    assert rig.receiver.received == []


def test_fan_out_is_idempotent_and_filters_notify(rig: Rig) -> None:
    named = rig.hooks.register("http://127.0.0.1:9/a", ["threshold_violation"])
    other = rig.hooks.register("http://127.0.0.1:9/b", ["threshold_violation", "metrics"])
    notify = dataclasses.replace(CPU, action="notify", channels=(named.id,))
    idx = build_index([notify], Settings())
    u = usage(cpu_percent_avg=95.0)
    ev = evaluate(idx, [u], {}, {}, u.period_end_ns)
    (alert,) = violations.route(ev.transitions, {}, "h", time_format="unix")
    assert rig.hooks.fan_out(alert) == 1  # only the registration named in the channels
    assert rig.hooks.fan_out(alert) == 1  # a resend after a crash: still one row
    assert rig.hooks.counts() == {named.id: {"pending": 1}}
    assert rig.hooks.fan_out(usage_event()) == 1
    assert rig.hooks.counts()[other.id] == {"pending": 1}


def notify_alert(rule_id: str, channels: list[str]) -> OutEvent:
    rule = dataclasses.replace(CPU, id=rule_id, action="notify", channels=tuple(channels))
    u = usage(cpu_percent_avg=95.0)
    ev = evaluate(build_index([rule], Settings()), [u], {}, {}, u.period_end_ns)
    (alert,) = violations.route(ev.transitions, {"vm-1": OWNER}, "host-a", time_format="unix")
    return alert


async def test_notify_alerts_reach_only_the_registrations_they_name(rig: Rig) -> None:
    named = rig.hooks.register(rig.receiver.url + "?to=named", ["threshold_violation"],
                               "s3cret")
    other = rig.hooks.register(rig.receiver.url + "?to=other", ["threshold_violation"])
    evs = {n: notify_alert(n, chans) for n, chans in (
        ("to-named", [named.id]), ("to-all", ["webhook"]), ("to-queue", ["queue"]),
        ("to-none", []))}
    clock = SystemClock()
    # next to a queue sink (answering to "queue"), which nobody drains here
    store = Store.open(rig.store.path, clock=clock, node_id="host-a",
                       sink_names=["webhooks", "formation-queue"],
                       sink_channels={"formation-queue": ["queue"]})
    sink = build_sink(rig.cfg, clock=clock, webhook_store=rig.hooks)
    assert isinstance(sink, WebhookSink) and sink.dispatcher is not None
    delivery = Delivery(store, [sink], clock, OutboxConfig(maintenance_interval_s=0.5))
    delivery.prepare()  # routing by channel (construction writes nothing)
    try:
        store.commit_pass([], list(evs.values()))
        # the webhook sink gets no row for alerts that name no webhook
        assert sorted(p.event.event_id for p in store.pending("webhooks", 10, 2**62)) == sorted(
            evs[n].event_id for n in ("to-named", "to-all"))
        async with trio.open_nursery() as nursery:
            await nursery.start(sink.dispatcher.run)
            await nursery.start(delivery.run)
            await until(lambda: len(rig.receiver.received) == 3)
            await trio.sleep(0.2)  # nothing more arrives
            await until(lambda: store.stats()["webhooks"].acked == 2)
            nursery.cancel_scope.cancel()
        st = store.stats()
        assert (st["webhooks"].acked, st["webhooks"].pending) == (2, 0)
        assert st["formation-queue"].pending == 1
    finally:
        store.close()
    got = {(r.path.rsplit("=", 1)[1], r.headers["webhook-id"]) for r in rig.receiver.received}
    assert got == {("named", evs["to-named"].event_id), ("named", evs["to-all"].event_id),
                   ("other", evs["to-all"].event_id)}
    assert rig.hooks.counts() == {named.id: {"delivered": 2}, other.id: {"delivered": 1}}


def test_registrations_persist_and_validate(rig: Rig, tmp_path: Path) -> None:
    reg = rig.hooks.register("https://hooks.example/x", ["metrics"], "k")
    again = WebhookStore(tmp_path / "state.db", SystemClock())
    assert [r.id for r in again.registrations()] == [reg.id]
    assert again.registrations()[0].public()["secret"] is None
    assert reg.id.startswith("webhook_") and len(reg.id) == len("webhook_") + 8
    assert again.delete(reg.id) and not again.delete(reg.id)
    again.close()
    with pytest.raises(ConfigError):
        rig.hooks.register("https://hooks.example/x", ["billing"])
    with pytest.raises(ConfigError):
        rig.hooks.register("ftp://hooks.example/x", ["metrics"])


def test_dispatcher_type_is_exported() -> None:
    assert WebhookDispatcher.__name__ == "WebhookDispatcher"


async def arrivals(rig: Rig, retry: RetryConfig, requests: int) -> list[float]:
    """One alert delivered to one registration with `retry`: when each of the first
    `requests` requests reached the receiver (trio time), once the row is delivered."""
    hook = rig.hooks.register(rig.receiver.url, ["threshold_violation"], "s3cret")
    rig.store.commit_pass([], alert_event([90.0]))
    t: list[float] = []
    async for _sink, delivery in running(rig, retry=retry):
        delivery.wake()
        with trio.fail_after(20):
            while len(t) < requests:  # the receiver is a thread: note each request's arrival
                if len(rig.receiver.received) > len(t):
                    t.append(trio.current_time())
                await trio.sleep(0.005)
            # The receiver notes a request before its answer reaches the dispatcher: wait for
            # the dispatcher to record the 200 before delivery stops.
            await until(lambda: rig.hooks.counts()[hook.id] == {"delivered": 1})
    assert rig.hooks.counts()[hook.id] == {"delivered": 1}
    return t


async def test_a_failed_row_waits_the_one_backoff_formula(rig: Rig) -> None:
    # the drain engine's round_backoff_s: the first wait is max_backoff_s, not initial_backoff_s
    rig.receiver.script = [503, 503]
    retry = RetryConfig(max_retries=0, initial_backoff_s=0.01, max_backoff_s=0.6,
                        multiplier=2.0, jitter=0.0, round_backoff_max_s=60)
    t = await arrivals(rig, retry, 3)
    assert 0.55 <= t[1] - t[0] <= 1.0  # max_backoff_s × 2^0
    assert 1.15 <= t[2] - t[1] <= 1.6  # max_backoff_s × 2^1


def test_the_daemon_finds_the_webhook_dispatcher_by_protocol(rig: Rig, tmp_path: Path) -> None:
    clock = SystemClock()
    hook_sink = build_sink(rig.cfg, clock=clock, webhook_store=rig.hooks)
    file_sink = build_sink(JsonlSinkConfig(path=str(tmp_path / "e.jsonl")))
    assert isinstance(hook_sink, WebhookSink) and hook_sink.dispatcher is not None
    assert dispatchers([file_sink, hook_sink]) == [hook_sink.dispatcher]
    assert dispatchers([file_sink, WebhookSink(rig.cfg, rig.hooks)]) == []  # none to run


@pytest.mark.parametrize("secret", ["whsec_", "whsec_!!!!", "whsec_c2hvcnQ=",
                                    "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw=",
                                    "whsec_" + "A" * 33 + "B=="])  # non-canonical bits
def test_malformed_whsec_secrets_are_refused_never_used_raw(rig: Rig, secret: str) -> None:
    """Issue 13 §2: a bad whsec_ secret was silently used as its raw bytes."""
    with pytest.raises(ConfigError, match="whsec_"):
        signature_headers(secret, "id1", 5, b"{}")
    with pytest.raises(ConfigError, match="whsec_"):
        rig.hooks.register("https://hooks.example/x", ["metrics"], secret)
    assert rig.hooks.registrations() == []


async def test_a_stored_malformed_secret_is_refused_at_delivery(rig: Rig,
                                                                tmp_path: Path) -> None:
    hook = rig.hooks.register(rig.receiver.url, ["threshold_violation"], "s3cret")
    with sqlite3.connect(tmp_path / "state.db") as db:  # written before registration checked
        db.execute("UPDATE webhooks SET secret = 'whsec_!!' WHERE id = ?", (hook.id,))
    rig.store.commit_pass([], alert_event([90.0]))
    async for sink, delivery in running(rig, dead_after_attempts=5):
        delivery.wake()
        await until(lambda: rig.hooks.counts().get(hook.id) == {"dead": 1})
        assert sink.dispatcher is not None
        assert sink.dispatcher.stats[hook.id].refused == 1
    assert rig.receiver.received == []


def test_a_malformed_allow_list_is_a_config_error(rig: Rig) -> None:
    with pytest.raises(ConfigError) as err:
        build_sink(dataclasses.replace(rig.cfg, allow_list=("10.0.0.0/99",)),
                   clock=SystemClock(), webhook_store=rig.hooks)
    assert err.value.key == "sinks.allow_list[0]"


async def test_an_attempt_failing_outside_httpx_s_contract_never_ends_the_dispatcher(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception httpx does not document (a header it cannot encode, a bug) fails that
    delivery hard; the dispatcher (and the daemon with it) goes on delivering the others."""
    bad = rig.hooks.register(rig.receiver.url + "?bad", ["threshold_violation"], "s3cret")
    good = rig.hooks.register(rig.receiver.url + "?good", ["threshold_violation"], "s3cret")
    real = httpx.AsyncClient.stream

    def stream(self: httpx.AsyncClient, method: str, url: Any, **kw: Any) -> Any:
        if "bad" in str(url):
            raise UnicodeEncodeError("ascii", "ä", 0, 1, "not encodable")
        return real(self, method, url, **kw)

    monkeypatch.setattr(httpx.AsyncClient, "stream", stream)
    rig.store.commit_pass([], alert_event([90.0]))
    async for _sink, delivery in running(rig, dead_after_attempts=5):
        delivery.wake()
        await until(lambda: rig.hooks.counts().get(bad.id) == {"dead": 1}
                    and rig.hooks.counts().get(good.id) == {"delivered": 1})
    assert [r.path for r in rig.receiver.received] == ["/hook?good"]
