"""A central rules source: a real HTTP server on 127.0.0.1 serving a rule set with an ETag.

`body` is served with `ETag: "<sha256 prefix>"`; a request whose If-None-Match matches gets
304. `fault` makes the next replies misbehave: "500", "slow" (waits `slow_s` before
answering), "garbage" (200 with non-JSON), "huge" (200 with a body past any sane limit),
"drop" (closes the connection without a reply). Every request's headers are recorded.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class RulesServer:
    """See the module doc; `start()` returns self, `url` is the rules URL."""

    def __init__(self, body: bytes = b"[]") -> None:
        self.body = body
        self.fault: str | None = None
        self.slow_s = 3.0
        self.requests: list[dict[str, str]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_a: Any) -> None:
                pass

            def do_GET(self) -> None:
                owner.requests.append(dict(self.headers.items()))
                fault = owner.fault
                if fault == "drop":
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault == "slow":
                    time.sleep(owner.slow_s)
                if fault == "500":
                    self.send_response(500)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = owner.body
                if fault == "garbage":
                    body = b"<html>not rules</html>"
                elif fault == "huge":
                    body = b"[" + b" " * (4 << 20) + b"]"
                etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
                if fault is None and self.headers.get("If-None-Match") == etag:
                    self.send_response(304)
                    self.send_header("ETag", etag)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("ETag", etag)
                if fault != "huge":  # no length: the client must cap what it reads
                    self.send_header("Content-Length", str(len(body)))
                else:
                    self.close_connection = True
                self.end_headers()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(body)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1/thresholds"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> RulesServer:
        """Serve in a thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()
