"""The Formation queue sink: exact wire format, reply classification, and behaviour against the
stand-in queue (a real HTTP server), including what the stand-in itself answers."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import orjson
import pytest
import trio

from hostagent.config.sinks import QueueSinkConfig
from hostagent.delivery.sinks.base import Undeliverable, build_sink
from hostagent.delivery.sinks.formation_queue import (
    FormationQueueSink,
    classify_reply,
    encode_write,
    topic_hash,
)
from hostagent.errors import SinkRejected, SinkUnavailable
from hostagent.model import OutEvent
from tests.standins.queue import QueueStandIn, decode, read_topic, serve_queue, usage_event

# FORMATION.md §1: the topic key of `usage_events`.
USAGE_EVENTS = "ed54877daae9a0ac5d8dd627316b43916b5b010503be90c37d5f12c048405a72"


@pytest.fixture
def queue() -> Iterator[QueueStandIn]:
    with serve_queue() as q:
        yield q


@pytest.fixture(params=["h11", "httpx"])
def client(request: pytest.FixtureRequest) -> str:
    """Every stand-in test runs with both HTTP clients."""
    return str(request.param)


def sink_for(q: QueueStandIn, client: str = "h11", **kw: object) -> FormationQueueSink:
    return FormationQueueSink(QueueSinkConfig(name="q", url=q.url, http_client=client,  # type: ignore[arg-type]
                                              **kw))


def test_topic_hash_is_sha3_256_of_the_name() -> None:
    assert topic_hash("usage_events") == USAGE_EVENTS


def test_request_body_is_exactly_the_write_envelope() -> None:
    body = encode_write(b'{"a":"\xc3\xa9"}', 0, USAGE_EVENTS)
    assert body == (b'{"Write":{"content":[0,123,34,97,34,58,34,195,169,34,125],'
                    b'"topic":"' + USAGE_EVENTS.encode() + b'"}}')


@pytest.mark.parametrize(("status", "body", "error"), [
    (200, b'"OpSuccess"', None),
    (200, b'{"Failure":{"reason":"disk"}}', SinkRejected),
    (200, b'{"Failure":{"reason":null}}', SinkRejected),
    (200, b'"Other"', SinkUnavailable),
    (200, b"<html>", SinkUnavailable),
    (200, b"", SinkUnavailable),
    (500, b"", SinkUnavailable),
    (503, b"busy", SinkUnavailable),
    (408, b"", SinkUnavailable),
    (429, b"", SinkUnavailable),
    (302, b"", SinkUnavailable),
    (400, b"bad json", SinkRejected),
    (415, b"", SinkRejected),
    (422, b"shape", SinkRejected),
])
def test_reply_classification(status: int, body: bytes, error: type[Exception] | None) -> None:
    if error is None:
        classify_reply(status, body)
    else:
        with pytest.raises(error):
            classify_reply(status, body)


async def test_events_reach_their_topics_byte_for_byte(queue: QueueStandIn, client: str) -> None:
    sink = sink_for(queue, client, sub_topic=7)
    ev = usage_event("i0", 0)
    alert = OutEvent("a1", "threshold_violation", "i0", 0, 0, b'{"event_id":"a1"}')
    await sink.send(ev)
    await sink.send(alert)
    await sink.aclose()
    assert queue.messages("usage_events") == [bytes([7]) + ev.payload]
    assert read_topic(queue.url, "usage_events") == [bytes([7]) + ev.payload]
    assert decode(read_topic(queue.url, "usage_alerts")[0]) == (7, {"event_id": "a1"})


async def test_build_sink_from_config(queue: QueueStandIn) -> None:
    sink = build_sink(QueueSinkConfig(name="q", url=queue.url + "/", kinds=("resource_usage",)))
    assert (sink.name, sink.kinds, sink.max_in_flight) == ("q", frozenset({"resource_usage"}), 8)
    await sink.send(usage_event("i0", 0))
    await sink.aclose()
    assert len(queue.messages("usage_events")) == 1


@pytest.mark.parametrize(("fault", "error"), [
    ("status", SinkUnavailable), ("garbage", SinkUnavailable), ("reset", SinkUnavailable),
    ("down", SinkUnavailable), ("slow", SinkUnavailable), ("failure", SinkRejected),
])
async def test_faults_map_to_the_error_tree(queue: QueueStandIn, fault: str, client: str,
                                            error: type[Exception]) -> None:
    sink = sink_for(queue, client, timeout_s=0.3)
    await sink.send(usage_event("i0", 0))  # a pooled keep-alive connection exists now
    if fault == "status":
        queue.faults.status = 502
    elif fault == "garbage":
        queue.faults.garbage = True
    elif fault == "reset":
        queue.faults.reset = True
    elif fault == "down":
        queue.stop()
    elif fault == "slow":
        queue.faults.slow_s = 1.0
    else:
        queue.faults.failure = True
    t0 = trio.current_time()
    with pytest.raises(error):
        await sink.send(usage_event("i0", 1))
    assert trio.current_time() - t0 < 0.9  # bounded by timeout_s, never stuck
    queue.faults.clear()
    if fault == "down":
        queue.start()
    await sink.send(usage_event("i0", 2))  # and it recovers on the same sink
    await sink.aclose()


async def test_oversized_event_is_undeliverable_without_a_request(queue: QueueStandIn) -> None:
    sink = sink_for(queue)
    big = usage_event("i0", 0, pad=500_000)
    with pytest.raises(Undeliverable, match="max_request_bytes"):
        await sink.send(big)
    assert queue.writes == 0
    await sink.aclose()


def test_standin_answers_like_form_p2p(queue: QueueStandIn) -> None:
    with httpx.Client(base_url=queue.url, trust_env=False) as c:
        good = {"Write": {"content": [0, 123, 125], "topic": topic_hash("t")}}
        assert c.post("/queue/write_local", content=orjson.dumps(good)).status_code == 415
        js = {"Content-Type": "application/json"}
        assert c.post("/queue/write_local", content=b"{nope", headers=js).status_code == 400
        bad = {"Write": {"content": [0, 256], "topic": topic_hash("t")}}
        assert c.post("/queue/write_local", json=bad).status_code == 422
        assert c.post("/queue/write_local", json={"Read": {}}).status_code == 422
        for _ in range(2):  # stored twice: no dedupe
            r = c.post("/queue/write_local", json=good)
            assert (r.status_code, r.json()) == (200, "OpSuccess")
        assert c.get("/queue/t/0/get_after").json() == {"List": [[0, 123, 125]] * 2}
        assert c.get("/queue/t/1/get_after").json() == {"List": [[0, 123, 125]]}
        assert "Failure" in c.get("/queue/t/2/get_after").json()  # caught up
        assert "Failure" in c.get("/queue/unknown/0/get_after").json()
        assert c.get("/queue/t/get").json() == {"List": [[0, 123, 125]] * 2}


async def test_keep_alive_survives_the_queue_restarting(queue: QueueStandIn, client: str) -> None:
    sink = sink_for(queue, client)
    await sink.send(usage_event("i0", 0))
    queue.stop()  # pooled connections are now dead
    queue.start()
    await sink.send(usage_event("i0", 1))  # a stale pooled connection is replaced, not an error
    await sink.aclose()
    assert len(queue.messages("usage_events")) == 2


@pytest.mark.parametrize("after_s", [0.0, 0.05])
async def test_a_reply_nobody_asked_for_never_acks_the_next_event(
        queue: QueueStandIn, after_s: float) -> None:
    """The queue answers a write, then sends an extra `200 "OpSuccess"` on the same keep-alive
    connection (in the same segment, or a moment later while it idles). The h11 pool reused
    the connection: the next event read that stale reply as its own and was acked, though the
    queue refused it (here) and never stored it: lost."""
    queue.faults.unsolicited, queue.faults.unsolicited_after_s = True, after_s
    queue.faults.reject_if = lambda ev: "no" if ev["instance_id"] == "x" else None
    sink = sink_for(queue, "h11")
    with pytest.raises(SinkRejected):
        await sink.send(usage_event("x", 0))
    await trio.sleep(0.2)  # the connection idles in the pool
    with pytest.raises(SinkRejected):
        await sink.send(usage_event("x", 1))
    queue.faults.reject_if = None
    await trio.sleep(0.2)
    await sink.send(usage_event("y", 0))  # a good write still goes through
    await sink.aclose()
    assert [e["event_id"] for e in queue.events()] == [usage_event("y", 0).event_id]
