"""Serving: loopback by default, TLS for remote binds, graceful shutdown on the stop event."""

from __future__ import annotations

import datetime as dt
import json
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from hostagent.api.server import check_bind, is_loopback, make_app, serve_api
from hostagent.api.view import ApiView
from hostagent.errors import ConfigError
from tests.api.support import Keys, api_config


def self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    import ipaddress

    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    cf, kf = tmp / "cert.pem", tmp / "key.pem"
    cf.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kf.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                     serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    return cf, kf


def test_bind_rules(keys: Keys) -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    assert api_config(keys).bind == "127.0.0.1"
    with pytest.raises(ConfigError, match=r"api\.bind"):
        check_bind(api_config(keys, bind="0.0.0.0"))
    with pytest.raises(ConfigError, match="tls"):
        check_bind(api_config(keys, bind="0.0.0.0", tls_cert_file="/x"))
    check_bind(api_config(keys, bind="0.0.0.0", tls_cert_file="/c", tls_key_file="/k"))
    check_bind(api_config(keys, bind="0.0.0.0", allow_plaintext_remote=True))


async def test_tls(nursery: trio.Nursery, keys: Keys, tmp_path: Path) -> None:
    cf, kf = self_signed(tmp_path)
    cfg = api_config(keys, tls_cert_file=str(cf), tls_key_file=str(kf))
    stop = trio.Event()
    binds = await nursery.start(serve_api, cfg, make_app(cfg, ApiView()), stop)
    assert binds[0].startswith("https://127.0.0.1:")
    ctx = ssl.create_default_context(cafile=str(cf))
    async with httpx.AsyncClient(base_url=binds[0], verify=ctx) as c:
        r = await c.get("/health")
    assert r.text == "healthy"
    stop.set()


async def test_graceful_shutdown_finishes_in_flight(keys: Keys) -> None:
    cfg = api_config(keys)
    inner = make_app(cfg, ApiView())
    gate, started = trio.Event(), trio.Event()

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["type"] == "http" and scope["path"] == "/health":
            started.set()
            await gate.wait()  # hold the request until shutdown has begun
        await inner(scope, receive, send)

    stop = trio.Event()
    results: list[int] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            binds = await n.start(serve_api, cfg, app, stop)

            async def call() -> None:
                async with httpx.AsyncClient(base_url=binds[0]) as c:
                    results.append((await c.get("/health")).status_code)

            n.start_soon(call)
            await started.wait()
            stop.set()  # shutdown begins while the request is in flight
            await trio.sleep(0.1)
            gate.set()
    assert results == [200]  # the nursery exited: serve_api returned after the request


def test_under_log_format_json_every_stderr_line_of_a_daemon_serving_the_api_is_json(
        tmp_path: Path) -> None:
    # hypercorn's own stderr logger wrote "[2026-...] [6277] [INFO] Running on http://..." in
    # its own format among the daemon's JSON lines: `journalctl -o cat | jq` stopped there.
    config = tmp_path / "hostagent.toml"
    config.write_text(f'[collector]\nstate_path = "{tmp_path}/state/state.db"\n'
                      f'[libvirt]\nuri = "test:///default"\n'
                      f'[[sinks]]\ntype = "jsonl"\npath = "{tmp_path}/events.jsonl"\n'
                      "[api]\nenabled = true\nport = 0\n")
    got = subprocess.run([sys.executable, "-m", "hostagent.cli", "run", "--once", "-c",
                          str(config), "--log-format", "json"],
                         cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True,
                         timeout=60, check=False)
    assert got.returncode == 0, got.stderr
    records = []
    for line in got.stderr.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            pytest.fail(f"a stderr line that is not JSON: {line!r}")
    running = [r for r in records if r["msg"].startswith("Running on http://127.0.0.1:")]
    assert [r["logger"] for r in running] == ["hostagent.api.hypercorn"]
    assert any(r["msg"] == "api starting" for r in records)  # the API did serve
