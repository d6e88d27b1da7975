"""A real SMTP server (aiosmtpd) on 127.0.0.1 that records mails and injects faults.

`Handler.data_faults` is consumed one per DATA: "ok", "451", "554", "slow" (waits past a 1 s
client timeout), "drop" (the connection closes before the reply to DATA);
`Handler.rcpt_refuse` maps an address to its RCPT reply.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from email import message_from_bytes, policy
from email.message import Message
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session


class Handler:
    """Records accepted mails; `faults` is consumed one per DATA/RCPT as configured."""

    def __init__(self) -> None:
        self.mails: list[tuple[list[str], Message]] = []
        self.data_faults: list[str] = []  # "451", "554", "slow", "drop"
        self.rcpt_refuse: dict[str, str] = {}  # address → reply
        self.lock = threading.Lock()
        self.delay_s = 0.0  # before every reply to DATA

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> str:
        if address in self.rcpt_refuse:
            return self.rcpt_refuse[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        fault = self.data_faults.pop(0) if self.data_faults else None
        if fault == "451":
            return "451 try again later"
        if fault == "554":
            return "554 rejected as spam"
        if fault == "slow":
            await asyncio.sleep(1.5)  # past the sink's timeout (the mail is not counted)
            return "451 too slow"
        if fault == "drop":
            assert server.transport is not None
            server.transport.abort()  # the connection drops before the reply to DATA
            return "451 dropped"
        content = envelope.original_content or b""
        with self.lock:
            self.mails.append((list(envelope.rcpt_tos),
                               message_from_bytes(content, policy=policy.default)))
        return "250 Message accepted"

    def to(self, rcpt: str) -> list[Message]:
        return [m for r, m in self.mails if rcpt in r]


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on (now)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def smtp_server(port: int | None = None, *,
                smtputf8: bool = True) -> Iterator[tuple[Handler, int]]:
    """A running server (on `port`, or a free one): (handler, port). `smtputf8=False`: a
    server that does not offer SMTPUTF8 (internationalized addresses)."""
    h = Handler()
    port = port or free_port()
    ctl = Controller(h, hostname="127.0.0.1", port=port, enable_SMTPUTF8=smtputf8)
    ctl.start()
    try:
        yield h, port
    finally:
        ctl.stop()


def self_signed(tmp: Path) -> tuple[ssl.SSLContext, Path]:
    """A server TLS context for 127.0.0.1 and the CA file a client should trust."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_pem = tmp / "smtp-cert.pem"
    key_pem = tmp / "smtp-key.pem"
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert_pem, key_pem)
    return ctx, cert_pem


@contextmanager
def tls_smtp_server(ctx: ssl.SSLContext, *, implicit: bool, users: dict[str, str]
                    ) -> Iterator[tuple[Handler, int]]:
    """STARTTLS (required) or implicit TLS, with AUTH against `users` (login → password)."""
    h = Handler()
    port = free_port()

    def authenticator(_server: SMTP, _session: Session, _envelope: Envelope, _mechanism: str,
                      data: object) -> AuthResult:
        ok = (isinstance(data, LoginPassword)
              and users.get(data.login.decode()) == data.password.decode())
        return AuthResult(success=ok)

    kw: dict[str, object] = {"authenticator": authenticator, "auth_required": True}
    if implicit:
        ctl = Controller(h, hostname="127.0.0.1", port=port, ssl_context=ctx,
                         auth_require_tls=False, **kw)
    else:
        ctl = Controller(h, hostname="127.0.0.1", port=port, tls_context=ctx,
                         require_starttls=True, **kw)
    ctl.start()
    try:
        yield h, port
    finally:
        ctl.stop()
