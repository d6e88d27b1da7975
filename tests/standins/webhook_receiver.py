"""A webhook receiver: a real HTTP server on 127.0.0.1 that verifies both signature schemes.

Every POST is recorded as a `Received` (path, headers, body, parsed JSON) with the result of
checking the Standard Webhooks signature (`webhook-id`, `webhook-timestamp`,
`webhook-signature: v1,<base64 HMAC-SHA256(secret, "id.ts.body")>`) and the legacy
`X-Webhook-Signature` (hex HMAC-SHA256(secret, body)) against `secret`. Replies come from
`script` (a list of statuses consumed one per request; 200 when empty); a 3xx reply carries
`Location: /elsewhere` so a client that followed redirects would show up as a GET there, and a
429 or 503 carries `Retry-After: <retry_after>` when that is set.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Received:
    """One request the receiver got."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    std_ok: bool
    legacy_ok: bool

    @property
    def json(self) -> Any:
        """The parsed body."""
        return json.loads(self.body)


def verify_standard(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """Check `webhook-signature` the way a Standard Webhooks consumer does."""
    msg_id, ts = headers.get("webhook-id", ""), headers.get("webhook-timestamp", "")
    key = (base64.b64decode(secret[6:]) if secret.startswith("whsec_") else secret.encode())
    want = base64.b64encode(hmac.new(key, f"{msg_id}.{ts}.".encode() + body,
                                     hashlib.sha256).digest()).decode()
    sigs = headers.get("webhook-signature", "").split()
    return any(s.startswith("v1,") and hmac.compare_digest(s[3:], want) for s in sigs)


def verify_legacy(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """Check upstream's `X-Webhook-Signature`."""
    want = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(headers.get("x-webhook-signature", ""), want)


@dataclass
class WebhookReceiver:
    """Start with `start()`; `url` is where to register; `received` what came in."""

    secret: str = ""
    script: list[int] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    answer_after_s: float = 0.0  # a slow consumer: the answer comes this long after the body
    retry_after: str | None = None  # sent as `Retry-After` with every 429 and 503 reply
    host: str = "127.0.0.1"
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def port(self) -> int:
        """The ephemeral port."""
        assert self._server is not None
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """The hook URL."""
        return f"http://{self.host}:{self.port}/hook"

    def start(self) -> WebhookReceiver:
        """Listen on an ephemeral port in a background thread."""
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                del format, args

            def _handle(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n)
                headers = {k.lower(): v for k, v in self.headers.items()}
                sec = receiver.secret
                rec = Received(self.command, self.path, headers, body,
                               bool(sec) and verify_standard(sec, headers, body),
                               bool(sec) and verify_legacy(sec, headers, body))
                with receiver._lock:
                    receiver.received.append(rec)
                    status = receiver.script.pop(0) if receiver.script else 200
                if receiver.answer_after_s:
                    time.sleep(receiver.answer_after_s)
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("Location", "/elsewhere")
                if status in (429, 503) and receiver.retry_after is not None:
                    self.send_header("Retry-After", receiver.retry_after)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            do_POST = _handle
            do_GET = _handle

        self._server = ThreadingHTTPServer((self.host, 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        """Shut the server down."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
