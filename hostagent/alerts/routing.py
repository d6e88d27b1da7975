"""Outbox routing: which sinks get a delivery row for an event, by kind and by channel. Pure.

Each sink declares the event kinds it takes (`Sink.kinds`) and the notification channels it
answers to (`Sink.channels`); the daemon hands both to the outbox (`Store.configure`), which
routes every event once, when the pass commits it, and writes a pending delivery row only for
the sinks the event is meant for. Nothing is decided at send time: a sink sends every row it
is given, and no sink reads a payload to find out whether the event is its own.

The rule, for an event of kind K with routing channels C (`OutEvent.channels`):

* C is None (usage events, `Alert` rules' alerts): every sink whose kinds hold K;
* C is a set (a `Notify` rule's `notification_channels`, possibly empty): every sink whose
  kinds hold K and where

  - the sink's channels are None: an audit sink (the JSONL file) keeps every event; or
  - C meets the sink's channels ("queue" for the Formation queue; "webhook", "webhooks" and
    "api_callback" for the webhook sink; "email" for an email sink), a channel counting by its
    family (`family`: ``email:ops@example.com`` is ``email``); or
  - the sink's channels hold UNCLAIMED and some channel in C is named by no configured sink.
    That is the webhook sink: registration ids (`webhook_<hex>`) are made at run time, so it
    takes every channel no other sink answers to, and its fan-out picks the registrations
    (`hostagent.store.webhooks.wants`: the ids named, or all of them for "webhook").

What reaches each destination is exactly what it was when every sink got every alert and the
queue sink dropped, at send time, the Notify alerts that did not name "queue": the queue gets
a Notify alert iff "queue" is among its channels; a registration gets one iff its id,
"webhook", "webhooks" or "api_callback" is among them (a registration id is never a channel
another sink names, so such an alert always reaches the webhook sink); the JSONL file gets
all of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

UNCLAIMED = "*"  # in a sink's channels: also every channel that no configured sink names


def family(channel: str) -> str:
    """A channel's family: the part before the first ":" (``email:ops@x`` → ``email``)."""
    return channel.split(":", 1)[0]


@dataclass(frozen=True, slots=True)
class Route:
    """What one sink takes: event kinds and channels (None: every kind / every channel)."""

    kinds: frozenset[str] | None = None
    channels: frozenset[str] | None = None


EVERYTHING = Route()


def claimed(routes: Mapping[str, Route]) -> frozenset[str]:
    """The channel names some sink answers to by name."""
    names: set[str] = set()
    for r in routes.values():
        names |= r.channels or frozenset()
    return frozenset(names - {UNCLAIMED})


def takes(route: Route, kind: str, channels: frozenset[str] | None,
          named: frozenset[str]) -> bool:
    """Does a sink with `route` get this event? `named`: `claimed()` of every sink."""
    if route.kinds is not None and kind not in route.kinds:
        return False
    if channels is None or route.channels is None:
        return True
    fams = frozenset(family(c) for c in channels)
    if fams & route.channels:
        return True
    return UNCLAIMED in route.channels and not fams <= named


def sinks_for(routes: Mapping[str, Route], kind: str,
              channels: frozenset[str] | None) -> list[str]:
    """The sinks an event goes to, in `routes` order."""
    named = claimed(routes) if channels is not None else frozenset()
    return [n for n, r in routes.items() if takes(r, kind, channels, named)]
