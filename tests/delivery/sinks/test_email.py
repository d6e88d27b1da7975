"""Email sink against a real SMTP server (aiosmtpd) on 127.0.0.1, with faults.

Each recipient gets each transition exactly once across transient faults (refused connection,
4xx, slow server, connection dropped mid-DATA); a permanent 5xx dead-letters the event; the
journal keeps a restarted sink (kill -9 between the server's 250 and the outbox ack) from
mailing anyone twice.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio

from hostagent.config.schema import OutboxConfig
from hostagent.config.sinks import EmailSinkConfig
from hostagent.delivery.engine import Delivery
from hostagent.delivery.sinks.base import Undeliverable, build_sink
from hostagent.delivery.sinks.email import EmailSink
from hostagent.errors import ConfigError, SinkUnavailable
from hostagent.model import OutEvent
from hostagent.store.outbox import Store
from tests.clocks import TrioClock
from tests.delivery.test_engine import eventually
from tests.standins.smtp_server import (
    Handler,
    free_port,
    self_signed,
    smtp_server,
    tls_smtp_server,
)


@pytest.fixture
def smtp() -> Iterator[tuple[Handler, int]]:
    with smtp_server() as running:
        yield running


def event(n: int, *, channels: list[str] | None = None, transition: str = "exceeded",
          action: str = "notify") -> OutEvent:
    doc: dict[str, Any] = {
        "event_type": "threshold_violation", "event_id": f"ev-{n}", "host": "host-a",
        "instance_id": f"vm-{n}", "user_id": "0xalice", "transition": transition,
        "state": "exceeded", "since": "2026-12-04T22:00:00Z",
        "period": {"start": "2026-12-04T21:59:30Z", "end": "2026-12-04T22:00:00Z"},
        "config": {"id": "cpu-high", "resource_type": "Cpu"}, "current_value": 95.5,
        "threshold_value": 80.0, "unit": "percent", "action": action,
        "channels": ["email"] if channels is None else channels}
    return OutEvent(f"ev-{n}", "threshold_violation", f"vm-{n}", 0, 1, orjson.dumps(doc))


def sink(tmp_path: Path, port: int, **kw: Any) -> EmailSink:
    cfg = EmailSinkConfig(host="127.0.0.1", port=port, tls="none", sender="ha@host-a",
                          to=("ops@example.test",), journal_path=str(tmp_path / "j.db"),
                          timeout_s=1.0, api_url="https://host-a:8443", **kw)
    s = build_sink(cfg)
    assert isinstance(s, EmailSink)
    return s


async def test_one_mail_per_transition_with_text_html_subject_and_link(
        tmp_path: Path, smtp: tuple[Handler, int]) -> None:
    h, port = smtp
    s = sink(tmp_path, port)
    await s.send(event(1, channels=["email", "email:alice@example.test"]))
    await s.flush()
    assert len(h.to("ops@example.test")) == 1 and len(h.to("alice@example.test")) == 1
    m = h.to("ops@example.test")[0]
    assert m["Subject"] == ("[hostagent] EXCEEDED cpu-high on vm-1 (host-a): cpu 95.5 percent "
                            ">= 80.0")
    assert m["From"] == "ha@host-a"
    parts = {p.get_content_type(): p.get_payload(decode=True).decode() for p in m.walk()
             if not p.is_multipart()}
    assert "0xalice" in parts["text/plain"] and "since 2026-12-04T22:00:00Z" in parts["text/plain"]
    assert "https://host-a:8443/api/v1/metrics/instances/vm-1" in parts["text/plain"]
    assert "<td>EXCEEDED</td>" in parts["text/html"]
    # a rule naming only email:<address> mails only that address
    await s.send(event(2, channels=["email:bob@example.test"]))
    assert [r for r, _ in h.mails][-1] == ["bob@example.test"]
    await s.aclose()


@pytest.mark.parametrize("fault", ["451", "slow", "drop"])
async def test_transient_faults_retry_and_each_recipient_gets_it_once(
        tmp_path: Path, smtp: tuple[Handler, int], fault: str) -> None:
    h, port = smtp
    s = sink(tmp_path, port)
    ev = event(1, channels=["email", "email:alice@example.test"])
    h.data_faults = ["ok", fault]  # ops gets it, alice's DATA fails
    with pytest.raises(SinkUnavailable):
        await s.send(ev)
    await s.send(ev)  # the engine's retry: only alice is owed
    await s.send(ev)  # a redelivery after a crash before the ack: nobody is owed
    assert len(h.to("ops@example.test")) == 1
    assert len(h.to("alice@example.test")) == 1
    await s.aclose()


async def test_connection_refused_is_transient(tmp_path: Path) -> None:
    s = sink(tmp_path, free_port())
    with pytest.raises(SinkUnavailable, match=r"Connection refused|ConnectionRefused"):
        await s.send(event(1))
    await s.aclose()


async def test_permanent_5xx_dead_letters_after_the_others_got_it(
        tmp_path: Path, smtp: tuple[Handler, int]) -> None:
    h, port = smtp
    h.rcpt_refuse["alice@example.test"] = "550 no such user"
    s = sink(tmp_path, port)
    ev = event(1, channels=["email", "email:alice@example.test"])
    with pytest.raises(Undeliverable, match="550"):
        await s.send(ev)
    assert len(h.to("ops@example.test")) == 1
    h.data_faults = ["554"]
    with pytest.raises(Undeliverable, match="554"):
        await s.send(event(2))
    await s.aclose()


async def test_a_storm_becomes_one_digest_per_recipient(
        tmp_path: Path, smtp: tuple[Handler, int]) -> None:
    h, port = smtp
    s = sink(tmp_path, port, digest_after=2)
    for n in range(6):
        await s.send(event(n))
    await s.flush()
    mails = h.to("ops@example.test")
    assert len(mails) == 3  # two single mails, then one digest of four
    assert mails[2]["Subject"] == "[hostagent] 4 alerts on host-a"
    assert mails[2]["X-Hostagent-Events"] == "ev-2,ev-3,ev-4,ev-5"
    # a redelivery of the whole batch mails nobody again
    for n in range(6):
        await s.send(event(n))
    await s.flush()
    assert len(h.to("ops@example.test")) == 3
    await s.aclose()


def with_doc(ev: OutEvent, **fields: Any) -> OutEvent:
    doc = {**orjson.loads(ev.payload), **fields}
    return OutEvent(ev.event_id, ev.kind, ev.instance_id, ev.period_start_ns, ev.period_end_ns,
                    orjson.dumps(doc))


async def test_line_breaks_in_alert_fields_are_flattened_in_the_subject(
        tmp_path: Path, smtp: tuple[Handler, int]) -> None:
    """A rule id or instance name with a line break (a rule pushed through the rules API)
    made the email package raise ValueError out of the sink, which ended the delivery task
    and with it the daemon, at every start while the alert sat in the outbox."""
    h, port = smtp
    s = sink(tmp_path, port)
    ev = with_doc(event(1), instance_id="vm-1\r\nBcc: evil@example.test",
                  config={"id": "cpu\nhigh", "resource_type": "Cpu"})
    await s.send(ev)
    await s.flush()
    [m] = h.to("ops@example.test")
    assert m["Subject"] == ("[hostagent] EXCEEDED cpu high on vm-1  Bcc: evil@example.test "
                            "(host-a): cpu 95.5 percent >= 80.0")
    assert [r for r, _ in h.mails] == [["ops@example.test"]]
    await s.aclose()


async def test_an_address_with_a_line_break_is_refused_and_the_others_mailed(
        tmp_path: Path, smtp: tuple[Handler, int]) -> None:
    h, port = smtp
    s = sink(tmp_path, port)
    ev = event(1, channels=["email", "email:alice@example.test\r\nBcc: evil@example.test"])
    with pytest.raises(Undeliverable, match="control character"):
        await s.send(ev)
    assert [r for r, _ in h.mails] == [["ops@example.test"]]
    with pytest.raises(Undeliverable):  # sent again: dead-lettered again, mails nobody
        await s.send(ev)
    assert len(h.mails) == 1
    await s.aclose()


async def test_the_delivery_dead_letters_an_unmailable_alert_and_keeps_running(
        tmp_path: Path, smtp: tuple[Handler, int]) -> None:
    h, port = smtp
    clock = TrioClock(wall0_ns=time.time_ns())
    store = Store.open(tmp_path / "state.db", clock=clock, node_id="host-a",
                       sink_names=["email"])
    s = sink(tmp_path, port)
    bad = event(1, channels=["email:a@example.test\nBcc: evil@example.test"])
    bad = OutEvent(bad.event_id, bad.kind, bad.instance_id, 0, 1, bad.payload,
                   frozenset({"email:a@example.test\nBcc: evil@example.test"}))
    good = event(2)
    good = OutEvent(good.event_id, good.kind, "vm-1", 1, 2, good.payload, frozenset({"email"}))
    d = Delivery(store, [s], clock, OutboxConfig(maintenance_interval_s=0.5))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(d.run)
            await trio.to_thread.run_sync(store.commit_pass, [], [bad, good])
            d.wake()
            await eventually(lambda: len(h.mails) == 1 and not store.stats()["email"].pending,
                             10, 0.05)
            nursery.cancel_scope.cancel()
        st = store.stats()["email"]
        assert (st.pending, st.dead) == (0, 1)
        [dead] = store.dead_letters("email")
        assert dead.event_id == "ev-1" and "control character" in dead.reason
    finally:
        store.close()
    assert [r for r, _ in h.mails] == [["ops@example.test"]]


async def test_an_address_the_server_cannot_take_is_refused_not_retried(
        tmp_path: Path) -> None:
    """An internationalized address and a server without SMTPUTF8: smtplib raises
    SMTPNotSupportedError before sending anything, which was classed transient (as for a
    missing STARTTLS): the alert was retried forever."""
    with smtp_server(smtputf8=False) as (h, port):
        s = sink(tmp_path, port)
        with pytest.raises(Undeliverable, match="SMTPUTF8"):
            await s.send(event(1, channels=["email", "email:jörg@example.test"]))
        assert [r for r, _ in h.mails] == [["ops@example.test"]]
        await s.aclose()


async def test_a_refused_digest_dead_letters_its_events(
        tmp_path: Path, smtp: tuple[Handler, int]) -> None:
    """A digest the server refused for good was journaled `refused` and the batch acked:
    its alerts were dropped for that recipient without a dead letter."""
    h, port = smtp
    s = sink(tmp_path, port, digest_after=1)
    h.data_faults = ["ok", "554"]  # the single mail goes, the digest is refused
    for n in range(3):
        await s.send(event(n))
    with pytest.raises(SinkUnavailable, match="refused"):
        await s.flush()
    # the engine sends the batch again: what was mailed is owed to nobody, the rest is dead
    await s.send(event(0))
    for n in (1, 2):
        with pytest.raises(Undeliverable, match="554"):
            await s.send(event(n))
    await s.flush()
    assert len(h.to("ops@example.test")) == 1
    await s.aclose()


async def test_the_journal_survives_a_restart(tmp_path: Path,
                                              smtp: tuple[Handler, int]) -> None:
    h, port = smtp
    s = sink(tmp_path, port)
    await s.send(event(1))
    # kill -9 here: the outbox never recorded the ack; a new process gets the event again
    s2 = sink(tmp_path, port)
    await s2.send(event(1))
    assert len(h.to("ops@example.test")) == 1
    await s.aclose()
    await s2.aclose()


def test_tls_none_is_loopback_only() -> None:
    with pytest.raises(ConfigError, match="loopback"):
        EmailSinkConfig(host="smtp.example.test", tls="none")
    assert EmailSinkConfig(host="::1", tls="none").tls == "none"


async def test_password_file_must_be_private(tmp_path: Path,
                                             smtp: tuple[Handler, int]) -> None:
    _h, port = smtp
    pw = tmp_path / "pw"
    pw.write_text("secret")
    pw.chmod(0o644)
    s = sink(tmp_path, port, username="u", password_file=str(pw))
    with pytest.raises(SinkUnavailable, match="chmod 600"):
        await s.send(event(1))
    await s.aclose()


@pytest.mark.parametrize("implicit", [False, True])
async def test_tls_and_auth_with_a_private_password_file(tmp_path: Path, implicit: bool) -> None:
    ctx, ca = self_signed(tmp_path)
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    pw.chmod(0o600)
    with tls_smtp_server(ctx, implicit=implicit, users={"ha": "s3cret"}) as (h, port):
        cfg = EmailSinkConfig(host="127.0.0.1", port=port,
                              tls="implicit" if implicit else "starttls", ca_file=str(ca),
                              sender="ha@host-a", to=("ops@example.test",), username="ha",
                              password_file=str(pw), journal_path=str(tmp_path / "j.db"),
                              timeout_s=2.0)
        s = EmailSink(cfg)
        await s.send(event(1))
        assert len(h.to("ops@example.test")) == 1
        # an untrusted certificate is a transient failure, never a plain-text fallback
        bad = EmailSink(dataclasses.replace(cfg, ca_file="", journal_path=str(tmp_path / "k")))
        with pytest.raises(SinkUnavailable, match=r"CERTIFICATE_VERIFY_FAILED|certificate"):
            await bad.send(event(2))
        # a wrong password is retried (the breaker sees it), never dead-lettered
        pw.write_text("wrong")
        with pytest.raises(SinkUnavailable):
            await s.send(event(3))
        assert s.journal.done("ev-3") == {}
        await s.aclose()
        await bad.aclose()
