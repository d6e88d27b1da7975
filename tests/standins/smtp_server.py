"""A real SMTP server (aiosmtpd) on 127.0.0.1 that records mails and injects faults.

`Handler.data_faults` is consumed one per DATA: "ok", "451", "554", "slow" (waits past a 1 s
client timeout), "drop" (the connection closes before the reply to DATA);
`Handler.rcpt_refuse` maps an address to its RCPT reply.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from email import message_from_bytes, policy
from email.message import Message

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session


class Handler:
    """Records accepted mails; `faults` is consumed one per DATA/RCPT as configured."""

    def __init__(self) -> None:
        self.mails: list[tuple[list[str], Message]] = []
        self.data_faults: list[str] = []  # "451", "554", "slow", "drop"
        self.rcpt_refuse: dict[str, str] = {}  # address → reply
        self.lock = threading.Lock()

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> str:
        if address in self.rcpt_refuse:
            return self.rcpt_refuse[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
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
def smtp_server(port: int | None = None) -> Iterator[tuple[Handler, int]]:
    """A running server (on `port`, or a free one): (handler, port)."""
    h = Handler()
    port = port or free_port()
    ctl = Controller(h, hostname="127.0.0.1", port=port)
    ctl.start()
    try:
        yield h, port
    finally:
        ctl.stop()
