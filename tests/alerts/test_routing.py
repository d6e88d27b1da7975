"""Routing by kind and channel (hostagent.alerts.routing): the rule, and that every destination gets
exactly what it got when every sink had a row and the queue sink dropped Notify alerts itself."""

from __future__ import annotations

import orjson
from hypothesis import given
from hypothesis import strategies as st

from hostagent.alerts.routing import UNCLAIMED, Route, claimed, sinks_for
from hostagent.delivery.sinks.formation_queue import CHANNEL as QUEUE_CHANNEL
from hostagent.delivery.sinks.jsonl import JsonlSink
from hostagent.delivery.sinks.webhook import WebhookSink
from hostagent.model import OutEvent
from hostagent.store.webhooks import ALL_WEBHOOKS_CHANNELS, Registration, wants

ALERT = "threshold_violation"
QUEUE = Route(frozenset({"resource_usage", ALERT}), frozenset({QUEUE_CHANNEL}))
HOOKS = Route(frozenset({"resource_usage", ALERT}), WebhookSink.channels)
FILE = Route(frozenset({"resource_usage", ALERT}), JsonlSink.channels)
ALL = {"q": QUEUE, "hooks": HOOKS, "file": FILE}
REGS = [Registration(f"webhook_{i:08x}", "http://127.0.0.1/", (ALERT,), None, 0)
        for i in range(3)]


def test_sinks_declare_their_channels() -> None:
    assert QUEUE.channels == {"queue"}
    assert HOOKS.channels == {"webhook", "webhooks", "api_callback", UNCLAIMED}
    assert FILE.channels is None
    assert claimed(ALL) == {"queue", "webhook", "webhooks", "api_callback"}


def test_the_rule() -> None:
    assert sinks_for(ALL, "resource_usage", None) == ["q", "hooks", "file"]
    assert sinks_for(ALL, ALERT, None) == ["q", "hooks", "file"]  # an Alert rule's alert
    assert sinks_for(ALL, ALERT, frozenset({"queue"})) == ["q", "file"]
    assert sinks_for(ALL, ALERT, frozenset({"webhook"})) == ["hooks", "file"]
    assert sinks_for(ALL, ALERT, frozenset({"webhook_0badc0de"})) == ["hooks", "file"]
    assert sinks_for(ALL, ALERT, frozenset({"queue", "api_callback"})) == ["q", "hooks", "file"]
    assert sinks_for(ALL, ALERT, frozenset()) == ["file"]
    # kinds still come first: a sink that does not take the kind never gets it
    usage_only = {**ALL, "q": Route(frozenset({"resource_usage"}), QUEUE.channels)}
    assert sinks_for(usage_only, ALERT, None) == ["hooks", "file"]
    # a sink nobody told its channels (None) takes every channel, as before
    assert sinks_for({"x": Route()}, ALERT, frozenset({"elsewhere"})) == ["x"]


def _old(sinks: set[str], channels: list[str] | None) -> dict[str, bool]:
    """Who got the alert before: every sink had a row; the queue sink skipped Notify alerts
    not naming "queue"; the webhook fan-out picked registrations."""
    doc = {"action": "alert" if channels is None else "notify", "channels": channels or []}
    ev = OutEvent("a", ALERT, "vm-1", 0, 1, orjson.dumps(doc))
    got = {"q": "q" in sinks and (channels is None or "queue" in channels),
           "file": "file" in sinks}
    got |= {r.id: "hooks" in sinks and wants(r, ev, doc) for r in REGS}
    return got


def _new(sinks: set[str], channels: list[str] | None) -> dict[str, bool]:
    """Who gets it now: the outbox's rows, then the same fan-out."""
    doc = {"action": "alert" if channels is None else "notify", "channels": channels or []}
    ev = OutEvent("a", ALERT, "vm-1", 0, 1, orjson.dumps(doc),
                  None if channels is None else frozenset(channels))
    rows = set(sinks_for({n: r for n, r in ALL.items() if n in sinks}, ALERT, ev.channels))
    got = {"q": "q" in rows, "file": "file" in rows}
    got |= {r.id: "hooks" in rows and wants(r, ev, doc) for r in REGS}
    return got


NAMES = st.sampled_from(["queue", "webhook", "webhooks", "api_callback", "email", "jsonl",
                         "default", UNCLAIMED, *(r.id for r in REGS), "webhook_ffffffff"])


@given(sinks=st.sets(st.sampled_from(sorted(ALL))),
       channels=st.none() | st.lists(NAMES, max_size=4))
def test_every_destination_gets_what_it_got_before(sinks: set[str],
                                                   channels: list[str] | None) -> None:
    assert _new(sinks, channels) == _old(sinks, channels)


def test_webhook_sink_rows_only_where_a_registration_could_want_the_alert() -> None:
    for chans in (["queue"], [], ["queue", "queue"]):
        assert "hooks" not in sinks_for(ALL, ALERT, frozenset(chans))
    for chans in (["webhook_0badc0de"], ["queue", REGS[0].id], sorted(ALL_WEBHOOKS_CHANNELS)):
        assert "hooks" in sinks_for(ALL, ALERT, frozenset(chans))
