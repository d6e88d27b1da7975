"""The queue sink honours a Notify rule's channels; Alert rules and usage always go out."""

from __future__ import annotations

import orjson
import trio

from hostagent.config import QueueSinkConfig
from hostagent.model import OutEvent
from hostagent.sinks.formation_queue import FormationQueueSink, wants
from tests.standins.queue import read_topic, serve_queue, usage_event


def alert(action: str, channels: list[str], n: int) -> OutEvent:
    body = {"event_type": "threshold_violation", "event_id": f"a-{n}", "action": action,
            "channels": channels, "instance_id": "vm-1"}
    return OutEvent(event_id=f"a-{n}", kind="threshold_violation", instance_id="vm-1",
                    period_start_ns=n, period_end_ns=n + 1, payload=orjson.dumps(body))


def test_wants() -> None:
    assert wants(usage_event("vm-1", 0))
    assert wants(alert("alert", [], 1))
    assert wants(alert("notify", ["queue", "email"], 2))
    assert not wants(alert("notify", ["webhook_0badc0de"], 3))
    assert not wants(alert("notify", [], 4))


async def test_only_the_queue_bound_alerts_reach_the_queue() -> None:
    with serve_queue() as q:
        sink = FormationQueueSink(QueueSinkConfig(name="q", url=q.url))
        try:
            for ev in (alert("alert", [], 1), alert("notify", ["webhook_0badc0de"], 2),
                       alert("notify", ["queue"], 3)):
                await sink.send(ev)  # the skipped one returns as delivered: nothing is owed
        finally:
            await sink.aclose()
        got = await trio.to_thread.run_sync(read_topic, q.url, "usage_alerts")
    ids = [orjson.loads(bytes(m[1:]))["event_id"] for m in got]
    assert ids == ["a-1", "a-3"]
