"""The NATS JetStream sink against a real nats-server (JetStream on, store in a temp dir):
exactly once in the stream with the right subject, Nats-Msg-Id and the JSONL line's bytes;
re-sends (lost PubAcks) stored once; the server down for a while; a 3-node cluster losing a
server; bad settings at start as one clear line."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from hostagent.clock import SystemClock
from hostagent.config.schema import OutboxConfig
from hostagent.config.sinks import BreakerConfig, JsonlSinkConfig, NatsSinkConfig, RetryConfig
from hostagent.delivery.engine import Delivery
from hostagent.delivery.sinks.base import Sink, Undeliverable, build_sink
from hostagent.delivery.sinks.jsonl import JsonlSink
from hostagent.delivery.sinks.nats_client import SetupError, message_bytes
from hostagent.delivery.sinks.nats_jetstream import NatsSink
from hostagent.errors import SinkUnavailable
from hostagent.model import Baseline, OutEvent
from hostagent.store.outbox import Store
from tests.nats_support import nats_cluster, nats_server, read_stream, wait_jetstream
from tests.standins.queue import PERIOD_NS, T0_NS, usage_event

NODE = "host-a"
# Real time against a real server: short waits so an outage is retried through in seconds.
FAST = RetryConfig(max_retries=1, initial_backoff_s=0.05, max_backoff_s=0.2,
                   round_backoff_max_s=0.5)


def alert_event(instance: str, k: int) -> OutEvent:
    body = {"event_id": f"alert-{instance}-{k}", "event_type": "threshold_violation",
            "instance_id": instance, "k": k}
    return OutEvent(f"alert-{instance}-{k}", "threshold_violation", instance,
                    T0_NS + k * PERIOD_NS, T0_NS + (k + 1) * PERIOD_NS, orjson.dumps(body))


def self_signed(tmp: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (its own CA) and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    cf, kf = tmp / f"{name}.pem", tmp / f"{name}.key"
    cf.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kf.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                     serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    return cf, kf


def nats_cfg(url: str | list[str], **kw: object) -> NatsSinkConfig:
    servers = (url,) if isinstance(url, str) else tuple(url)
    base: dict[str, object] = {"name": "nats", "servers": servers, "create_stream": True,
                               "timeout_s": 2.0, "connect_timeout_s": 1.0, "retry": FAST,
                               "breaker": BreakerConfig(reset_timeout_s=0.5)}
    return NatsSinkConfig(**{**base, **kw})  # type: ignore[arg-type]


async def drain(store: Store, sinks: list[Sink], events: list[list[OutEvent]],
                between: object = None) -> Delivery:
    """Commit the passes (one per list), waking delivery after each, and wait until drained."""
    d = Delivery(store, sinks, SystemClock(), OutboxConfig(maintenance_interval_s=0.2))
    async with trio.open_nursery() as nursery:
        await nursery.start(d.run)
        for k, evs in enumerate(events):
            bases = [Baseline(e.instance_id, "inc-1", T0_NS + (k + 1) * PERIOD_NS, k + 1)
                     for e in evs]
            await trio.to_thread.run_sync(store.commit_pass, bases, evs)
            d.wake()
            if callable(between):
                await between(k)
        # A cluster re-electing leaders on a loaded 2-core VM has taken up to ~40 s.
        with trio.fail_after(60 + float(os.environ.get("HOSTAGENT_NATS_OUTAGE_S", "3"))):
            while True:
                await d.drained()
                await d.refresh_metrics()
                if all(s.depth == 0 for s in d.metrics().sinks.values()):
                    break
                d.wake()
                await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    return d


async def test_every_event_once_with_subject_header_and_jsonl_bytes(tmp_path: Path) -> None:
    with nats_server(tmp_path) as srv:
        store = Store.open(tmp_path / "state.db", clock=SystemClock(), node_id=NODE,
                           sink_names=["jsonl", "nats"])
        nats_sink = build_sink(nats_cfg(srv.url), node_id=NODE)
        jsonl = JsonlSink(JsonlSinkConfig(path=str(tmp_path / "events.jsonl")))
        passes = [[usage_event(f"i{i}", k) for i in range(8)] + [alert_event("i0", k)]
                  for k in range(5)]
        await drain(store, [jsonl, nats_sink], passes)
        stored = await trio.to_thread.run_sync(read_stream, srv.url, "HOSTAGENT")
        assert isinstance(nats_sink, NatsSink)
        # Lost PubAcks: every event sent again is recognised, nothing new is stored.
        for ev in passes[0]:
            await nats_sink.send(ev)
        assert nats_sink.duplicates == len(passes[0])
        again = await trio.to_thread.run_sync(read_stream, srv.url, "HOSTAGENT")
        await nats_sink.aclose()
        store.close()
    committed = [e for evs in passes for e in evs]
    assert len(again) == len(stored) == len(committed)
    lines = (tmp_path / "events.jsonl").read_bytes().splitlines()
    by_id = {m.headers["Nats-Msg-Id"]: m for m in stored}
    assert set(by_id) == {e.event_id for e in committed}  # each exactly once
    for line in lines:  # byte-identical to the JSONL sink's line
        eid = orjson.loads(line)["event_id"]
        assert by_id[eid].data == line
    for e in committed:
        m = by_id[e.event_id]
        want = (f"hostagent.alerts.{NODE}" if e.kind == "threshold_violation"
                else f"hostagent.usage.{NODE}")
        assert m.subject == want
        assert m.data == e.payload


async def test_server_down_for_a_while_then_everything_once(tmp_path: Path) -> None:
    with nats_server(tmp_path) as srv:
        store = Store.open(tmp_path / "state.db", clock=SystemClock(), node_id=NODE,
                           sink_names=["nats"])
        sink = NatsSink(nats_cfg(srv.url), node_id=NODE)
        down_s = float(os.environ.get("HOSTAGENT_NATS_OUTAGE_S", "3"))  # CI nightly: 60

        async def outage(k: int) -> None:
            if k == 1:
                srv.kill()  # publishes in flight lose their PubAcks
            if k == 3:
                await trio.sleep(down_s)
                await trio.to_thread.run_sync(srv.start)
            await trio.sleep(0.2)

        passes = [[usage_event(f"i{i}", k) for i in range(6)] for k in range(6)]
        t0 = time.monotonic()
        d = await drain(store, [sink], passes, between=outage)
        stored = await trio.to_thread.run_sync(read_stream, srv.url, "HOSTAGENT")
        await sink.aclose()
        store.close()
    assert time.monotonic() - t0 < 40 + down_s
    ids = [m.headers["Nats-Msg-Id"] for m in stored]
    assert sorted(ids) == sorted(e.event_id for evs in passes for e in evs)  # 0 missing, 0 dup
    assert d.metrics().sinks["nats"].failed > 0  # the outage was seen


async def test_three_node_cluster_keeps_publishing_with_one_server_killed(
        tmp_path: Path) -> None:
    with nats_cluster(tmp_path) as servers:
        urls = [s.url for s in servers]
        await trio.to_thread.run_sync(wait_jetstream, urls)
        store = Store.open(tmp_path / "state.db", clock=SystemClock(), node_id=NODE,
                           sink_names=["nats"])
        sink = NatsSink(nats_cfg(urls, stream_replicas=3, timeout_s=3.0), node_id=NODE)

        async def kill_first(k: int) -> None:
            if k == 2:
                servers[0].kill()  # the server the sink is connected to (tried in order)

        passes = [[usage_event(f"i{i}", k) for i in range(5)] for k in range(6)]
        await drain(store, [sink], passes, between=kill_first)
        await sink.aclose()
        store.close()
        stored = await trio.to_thread.run_sync(read_stream, urls[1:], "HOSTAGENT")
    ids = sorted(m.headers["Nats-Msg-Id"] for m in stored)
    assert ids == sorted(e.event_id for evs in passes for e in evs)


@pytest.mark.parametrize(("kw", "expect"), [
    ({"create_stream": False, "stream": "NOPE"}, "stream 'NOPE' does not exist"),
    ({"subject": "billing.usage.{node_id}"}, "subject 'billing.usage.host-a' is not covered"),
])
async def test_bad_stream_settings_fail_at_start_in_one_line(
        tmp_path: Path, kw: dict[str, object], expect: str) -> None:
    with nats_server(tmp_path) as srv:
        if "subject" in kw:  # the stream exists, owning only hostagent.>
            ok = NatsSink(nats_cfg(srv.url), node_id=NODE)
            await ok.send(usage_event("i0", 0))
            await ok.aclose()
        sink = NatsSink(nats_cfg(srv.url, **kw), node_id=NODE)
        with pytest.raises(SinkUnavailable) as err:
            await sink.send(usage_event("i0", 1))
        with pytest.raises(SetupError):
            await sink.report()
        await sink.aclose()
    assert expect in str(err.value)
    assert "\n" not in str(err.value)


async def assert_refused_for_authorization(make: Callable[[], NatsSink]) -> None:
    """A refused login is "cannot connect" in one line, naming the authorization failure.

    nats-server sends `-ERR 'Authorization Violation'` and closes; under load the client can
    see the reset before that line (three resets in a row were seen in CI), so the reason must
    show within eight tries, a moment apart."""
    messages: list[str] = []
    for attempt in range(8):
        if attempt:
            await trio.sleep(0.2)
        bad = make()
        with pytest.raises(SinkUnavailable, match="cannot connect") as err:
            await bad.send(usage_event("i0", 1))
        await bad.aclose()
        messages.append(str(err.value))
        if "uthorization" in messages[-1]:
            break
    assert any("uthorization" in m for m in messages), messages
    assert all("\n" not in m for m in messages)


async def test_wrong_credentials_fail_in_one_line(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("wrong\n")
    pw.chmod(0o600)
    extra = "authorization { user: hostagent, password: right }"
    with nats_server(tmp_path, extra=extra) as srv:
        await assert_refused_for_authorization(
            lambda: NatsSink(nats_cfg(srv.url, user="hostagent", password_file=str(pw)),
                             node_id=NODE))
        pw.write_text("right\n")
        good = NatsSink(nats_cfg(srv.url, user="hostagent", password_file=str(pw)),
                        node_id=NODE)
        await good.send(usage_event("i0", 0))
        lines = await good.report()
        await good.aclose()
    assert any("publish permitted" in line for line in lines)


async def test_tls_mismatch_fails_in_one_line(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path, "server")
    other, _ = self_signed(tmp_path, "other")
    extra = f'tls {{ cert_file: "{cert}", key_file: "{key}" }}'
    with nats_server(tmp_path, extra=extra) as srv:
        url = f"tls://127.0.0.1:{srv.port}"
        bad = NatsSink(nats_cfg(url, tls_ca_file=str(other)), node_id=NODE)
        with pytest.raises(SinkUnavailable) as err:
            await bad.send(usage_event("i0", 0))
        await bad.aclose()
        good = NatsSink(nats_cfg(url, tls_ca_file=str(cert)), node_id=NODE)
        await good.send(usage_event("i0", 0))
        await good.aclose()
    assert "cannot connect" in str(err.value)
    assert "CERTIFICATE_VERIFY_FAILED" in str(err.value) or "certificate" in str(err.value)
    assert "\n" not in str(err.value)


async def test_event_over_max_payload_is_undeliverable(tmp_path: Path) -> None:
    with nats_server(tmp_path, extra="max_payload: 4096") as srv:
        sink = NatsSink(nats_cfg(srv.url), node_id=NODE)
        with pytest.raises(Undeliverable, match="over the server's max_payload 4096"):
            await sink.send(usage_event("i0", 0, pad=5000))
        await sink.send(usage_event("i0", 1))  # the next one goes through
        stored = await trio.to_thread.run_sync(read_stream, srv.url, "HOSTAGENT")
        await sink.aclose()
    assert [m.headers["Nats-Msg-Id"] for m in stored] == [usage_event("i0", 1).event_id]


async def test_event_under_max_payload_but_over_it_with_headers_is_undeliverable(
        tmp_path: Path) -> None:
    """The server counts the header block (Nats-Msg-Id, Nats-Expected-Stream) against
    max_payload. An event whose payload alone fits used to be published anyway: the server
    closed the connection, no PubAck came, and the event was retried forever (holding back
    its instance's later events, cutting the connection under every other publish)."""
    with nats_server(tmp_path, extra="max_payload: 4096") as srv:
        sink = NatsSink(nats_cfg(srv.url), node_id=NODE)
        await sink.send(usage_event("i0", 0))  # connected
        pad = 0
        while len(usage_event("i1", 0, pad=pad).payload) < 4096 - 20:
            pad += 1
        big = usage_event("i1", 0, pad=pad)
        assert len(big.payload) <= 4096 < message_bytes(big.payload, big.event_id, "HOSTAGENT")
        conn = sink._conn
        t0 = time.monotonic()
        with pytest.raises(Undeliverable, match=r"with its headers .* over the server's "
                                                 r"max_payload 4096"):
            await sink.send(big)
        assert time.monotonic() - t0 < 1.0  # refused before sending, not after a timeout
        await sink.send(usage_event("i0", 1))
        assert sink._conn is conn  # the connection was never cut
        stored = await trio.to_thread.run_sync(read_stream, srv.url, "HOSTAGENT")
        await sink.aclose()
        log = srv.log_tail()
    assert [m.headers["Nats-Msg-Id"] for m in stored] == [usage_event("i0", k).event_id
                                                          for k in (0, 1)]
    assert "maximum payload exceeded" not in log


async def test_aclose_of_an_unused_sink_is_a_no_op() -> None:
    sink = NatsSink(nats_cfg("nats://127.0.0.1:1"), node_id=NODE)
    await sink.aclose()


async def test_the_daemon_on_a_replayed_host_publishes_its_jsonl_lines(tmp_path: Path) -> None:
    from tests.replay import Host, build_daemon, daemon_config

    host = Host(tmp_path, "lab-hybrid")
    with nats_server(tmp_path) as srv:
        cfg = daemon_config(tmp_path, host, sinks=f"""
[[sinks]]
type = "nats"
servers = ["{srv.url}"]
create_stream = true
""")
        daemon = build_daemon(cfg, host)
        await daemon.run(passes=2)
        stored = await trio.to_thread.run_sync(read_stream, srv.url, "HOSTAGENT")
    lines = (tmp_path / "events.jsonl").read_bytes().splitlines()
    assert len(lines) == 2 * len(host.meta["guests"])
    # The same bytes under the same ids (instances publish concurrently: any order).
    assert {m.headers["Nats-Msg-Id"]: m.data for m in stored} == {
        orjson.loads(line)["event_id"]: line for line in lines}
    assert len(stored) == len(lines)
    assert {m.subject for m in stored} == {"hostagent.usage.replay-test"}  # [host] node_id


def user_nkey_seed() -> tuple[str, str]:
    """A fresh user nkey: (seed, public key)."""
    import nkeys

    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    return seed.decode(), nkeys.from_seed(bytearray(seed)).public_key.decode()


@pytest.mark.parametrize("kind", ["token", "nkey"])
async def test_token_and_nkey_credentials_from_0600_files(tmp_path: Path, kind: str) -> None:
    right, wrong = tmp_path / "right", tmp_path / "wrong"
    if kind == "token":
        right.write_text("t0ken-right\n")
        wrong.write_text("t0ken-wrong\n")
        extra, key = 'authorization { token: "t0ken-right" }', "token_file"
    else:
        seed, public = user_nkey_seed()
        right.write_text(seed + "\n")
        wrong.write_text(user_nkey_seed()[0] + "\n")
        extra, key = f"authorization {{ users: [ {{ nkey: {public} }} ] }}", "nkey_seed_file"
    for f in (right, wrong):
        f.chmod(0o600)
    with nats_server(tmp_path, extra=extra) as srv:
        good = NatsSink(nats_cfg(srv.url, **{key: str(right)}), node_id=NODE)
        await good.send(usage_event("i0", 0))
        await good.aclose()
        await assert_refused_for_authorization(
            lambda: NatsSink(nats_cfg(srv.url, **{key: str(wrong)}), node_id=NODE))


async def test_publish_permission_denied_is_named(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("p\n")
    pw.chmod(0o600)
    extra = ('authorization { users: [ { user: h, password: p, permissions: '
             '{ publish: { deny: ["hostagent.alerts.>"] } } } ] }')
    with nats_server(tmp_path, extra=extra) as srv:
        sink = NatsSink(nats_cfg(srv.url, user="h", password_file=str(pw), timeout_s=1.0),
                        node_id=NODE)
        await sink.send(usage_event("i0", 0))  # usage subject: allowed
        with pytest.raises(SinkUnavailable) as err:
            await sink.send(alert_event("i0", 0))
        with pytest.raises(SetupError) as report:
            await sink.report()
        await sink.aclose()
    assert "permissions violation for publish" in str(err.value)
    assert "hostagent.alerts.host-a" in str(report.value)
    assert "publish permissions" in str(report.value)


async def test_mutual_tls_client_certificate(tmp_path: Path) -> None:
    srv_cert, srv_key = self_signed(tmp_path, "server")
    cli_cert, cli_key = self_signed(tmp_path, "client")
    cli_key.chmod(0o600)
    extra = (f'tls {{ cert_file: "{srv_cert}", key_file: "{srv_key}", '
             f'ca_file: "{cli_cert}", verify: true }}')
    with nats_server(tmp_path, extra=extra) as srv:
        url = f"tls://127.0.0.1:{srv.port}"
        good = NatsSink(nats_cfg(url, tls_ca_file=str(srv_cert), tls_cert_file=str(cli_cert),
                                 tls_key_file=str(cli_key)), node_id=NODE)
        await good.send(usage_event("i0", 0))
        await good.aclose()
        anonymous = NatsSink(nats_cfg(url, tls_ca_file=str(srv_cert)), node_id=NODE)
        with pytest.raises(SinkUnavailable, match="cannot connect") as err:
            await anonymous.send(usage_event("i0", 1))
        await anonymous.aclose()
    assert "\n" not in str(err.value)
