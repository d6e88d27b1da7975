"""Alert mails: who gets a `threshold_violation` event, and the message they get. Pure.

Recipients: an Alert rule's event, or a Notify rule naming the sink's channel (``email``), goes
to the sink's `to`; a Notify rule naming ``email:<address>`` goes to that address (both: the
union). Subject, for mail filters::

    [hostagent] EXCEEDED cpu-high on vm-1 (host-a): cpu 95.2 percent >= 80

One message per transition; a digest (``[hostagent] 12 alerts on host-a``) when one recipient
has more than `digest_after` in one delivery batch. Each message carries a plain-text and an
HTML body (instance, owner, rule, value, threshold, since when, API link) and a Message-ID
derived from the event id and the recipient, so a receiver can drop a rare duplicate.
"""

from __future__ import annotations

import hashlib
import html
import re
from collections.abc import Sequence
from email import policy
from email.message import EmailMessage
from email.utils import formatdate
from typing import Any

import orjson

from hostagent.alerts.routing import family
from hostagent.config.sinks import EmailSinkConfig

_POLICY = policy.default.clone(max_line_length=998)  # a subject stays one line for filters
_SIGN = {"exceeded": ">=", "repeat": ">=", "approaching": "near", "resolved": "<"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class Unmailable(ValueError):
    """This message cannot be built for this recipient (e.g. a control character in the
    address): refused for good, never retried."""


def one_line(text: str) -> str:
    """Header text taken from an event (rule id, instance, host ...): control characters, CR
    and LF above all, become spaces, so a field can neither add a header nor break the
    message (the email package refuses a header value with a line break)."""
    return _CONTROL.sub(" ", text)


def recipients(cfg: EmailSinkConfig, doc: dict[str, Any]) -> list[str]:
    """Who gets this event (see the module doc); empty when nobody."""
    chans = [str(c) for c in doc.get("channels") or []]
    specific = [c.split(":", 1)[1] for c in chans
                if family(c) == cfg.channel and ":" in c and c.split(":", 1)[1]]
    bare = doc.get("action") != "notify" or cfg.channel in chans
    out = list(cfg.to) if bare or not specific else []
    return list(dict.fromkeys(out + specific))


def _facts(doc: dict[str, Any]) -> dict[str, str]:
    cfg = doc.get("config") or {}
    res = str(cfg.get("resource_type", "?")).lower()
    return {"transition": str(doc.get("transition", "?")), "rule": str(cfg.get("id", "?")),
            "instance": str(doc.get("instance_id", "?")), "host": str(doc.get("host", "?")),
            "owner": str(doc.get("user_id", "?")), "resource": res,
            "value": f"{doc.get('current_value')}", "threshold": f"{doc.get('threshold_value')}",
            "unit": str(doc.get("unit", "")), "since": str(doc.get("since", "?")),
            "state": str(doc.get("state", "?")), "reason": str(doc.get("reason") or ""),
            "period_end": str((doc.get("period") or {}).get("end", "?"))}


def subject_line(prefix: str, doc: dict[str, Any]) -> str:
    """`[hostagent] EXCEEDED rule on instance (host): resource value unit >= threshold`."""
    f = _facts(doc)
    return one_line(f"{prefix} {f['transition'].upper()} {f['rule']} on {f['instance']} "
                    f"({f['host']}): {f['resource']} {f['value']} {f['unit']} "
                    f"{_SIGN.get(f['transition'], '?')} {f['threshold']}")


def _link(api_url: str, instance: str) -> str:
    return f"{api_url.rstrip('/')}/api/v1/metrics/instances/{instance}" if api_url else ""


def _text(doc: dict[str, Any], api_url: str) -> str:
    f = _facts(doc)
    lines = [f"{f['transition'].upper()}: rule {f['rule']} on instance {f['instance']}",
             f"host:      {f['host']}", f"owner:     {f['owner']}",
             f"value:     {f['value']} {f['unit']} ({f['resource']})",
             f"threshold: {f['threshold']} {f['unit']}", f"state:     {f['state']} since "
             f"{f['since']}", f"period end: {f['period_end']}"]
    if f["reason"]:
        lines.append(f"reason:    {f['reason']}")
    if api_url:
        lines.append(f"details:   {_link(api_url, f['instance'])}")
    return "\n".join(lines) + "\n"


def _html(docs: Sequence[dict[str, Any]], api_url: str) -> str:
    rows = []
    for doc in docs:
        f = {k: html.escape(v) for k, v in _facts(doc).items()}
        link = _link(api_url, _facts(doc)["instance"])
        inst = (f'<a href="{html.escape(link)}">{f["instance"]}</a>' if link else f["instance"])
        rows.append(f"<tr><td>{f['transition'].upper()}</td><td>{f['rule']}</td><td>{inst}</td>"
                    f"<td>{f['owner']}</td><td>{f['value']} {f['unit']}</td>"
                    f"<td>{f['threshold']} {f['unit']}</td><td>{f['since']}</td>"
                    f"<td>{f['reason']}</td></tr>")
    head = ("<tr><th>transition</th><th>rule</th><th>instance</th><th>owner</th><th>value</th>"
            "<th>threshold</th><th>since</th><th>reason</th></tr>")
    return f"<html><body><table border=\"1\">{head}{''.join(rows)}</table></body></html>\n"


def message_id(event_ids: Sequence[str], recipient: str) -> str:
    """Stable per (events, recipient): a resend has the same Message-ID."""
    h = hashlib.sha256(("|".join(event_ids) + "|" + recipient).encode()).hexdigest()[:32]
    return f"<{h}@hostagent>"


def build(cfg: EmailSinkConfig, payloads: Sequence[bytes], recipient: str,
          now_s: float) -> EmailMessage:
    """One mail to `recipient`: one event, or a digest of several. Unmailable when the
    recipient cannot be a header (a Notify channel ``email:<address>`` with a control
    character in it)."""
    bad = _CONTROL.search(recipient)
    if bad is not None:
        raise Unmailable(f"recipient {recipient!r} contains the control character "
                         f"{bad.group()!r}")
    docs = [orjson.loads(p) for p in payloads]
    msg = EmailMessage(policy=_POLICY)
    msg["From"] = cfg.sender
    try:
        msg["To"] = recipient
    except ValueError as err:  # (the email package's own refusals of an address)
        raise Unmailable(f"recipient {recipient!r}: {err}") from err
    msg["Date"] = formatdate(now_s, usegmt=True)
    msg["Message-ID"] = message_id([str(d.get("event_id")) for d in docs], recipient)
    msg["X-Hostagent-Events"] = one_line(",".join(str(d.get("event_id")) for d in docs))
    if len(docs) == 1:
        msg["Subject"] = subject_line(cfg.subject_prefix, docs[0])
        msg.set_content(_text(docs[0], cfg.api_url))
    else:
        hosts = sorted({str(d.get("host")) for d in docs})
        msg["Subject"] = one_line(f"{cfg.subject_prefix} {len(docs)} alerts on "
                                  f"{', '.join(hosts)}")
        msg.set_content("\n".join(_text(d, cfg.api_url) for d in docs))
    msg.add_alternative(_html(docs, cfg.api_url), subtype="html")
    return msg
