"""Which notification channels the configured sinks serve; a rule naming another is refused.

A channel is served when a sink answers to it by name, or to its family (the part before the
first ":": ``email:ops@example.com`` is the ``email`` family, served by an email sink whose
`channel` is ``email``, and names the recipient), or, for a webhook registration id
(``webhook_<hex>``, made at run time), when a webhook sink is configured. The JSONL audit file
keeps every event but serves no channel: a rule whose only channel reaches nothing but the
audit file would be a silent channel. `check` is used by `check-rules`, the rules API (400)
and every rules load (the previous set stays in force).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from hostagent.alerts.routing import UNCLAIMED, Route, family
from hostagent.alerts.rules import Rule
from hostagent.errors import ConfigError

REGISTRATION_PREFIX = "webhook_"


def served(routes: Mapping[str, Route]) -> dict[str, list[str]]:
    """channel (family) → the sinks answering to it, for `check-rules` and the docs."""
    out: dict[str, list[str]] = {}
    for name, r in routes.items():
        for ch in sorted(r.channels or ()):
            key = f"{REGISTRATION_PREFIX}<id>" if ch == UNCLAIMED else ch
            out.setdefault(key, []).append(name)
    return dict(sorted(out.items()))


def unserved(channels: Iterable[str], routes: Mapping[str, Route]) -> list[str]:
    """The channels of `channels` that no configured sink serves."""
    table = served(routes)
    return [c for c in channels
            if family(c) not in table
            and not (c.startswith(REGISTRATION_PREFIX) and f"{REGISTRATION_PREFIX}<id>" in table)]


def check(rules: Sequence[Rule], routes: Mapping[str, Route] | None, *,
          source: str = "<rules>") -> None:
    """ConfigError for the first rule naming a channel no sink serves (None: not checked).

    Log rules only log: their channels are not used and not checked.
    """
    if routes is None:
        return
    for i, rule in enumerate(rules):
        check_rule(rule, routes, source=source, index=i)


def check_rule(rule: Rule, routes: Mapping[str, Route], *, source: str, index: int) -> None:
    """ConfigError when `rule` (`rules[index]` of `source`) names a channel no sink serves."""
    if rule.action == "log":
        return
    bad = unserved(rule.channels, routes)
    if bad:
        known = ", ".join(f"{c} ({'/'.join(s)})" for c, s in served(routes).items())
        raise ConfigError(source, f"rules[{index}].notification_channels",
                          f"channels a configured sink serves: {known or 'none'}",
                          bad[0], "configure a sink for it ([[sinks]]) or fix the name")
