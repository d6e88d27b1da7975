"""A stand-in for Formation's message queue (form-p2p): a real HTTP server on 127.0.0.1.

Routes and replies follow ../shared/FORMATION.md §1:

- POST /queue/write_local  {"Write": {"content": [byte, ...], "topic": "<sha3-256 hex>"}}
  → 200 "OpSuccess" | 200 {"Failure": {"reason": ...}}; 415 without application/json,
  400 on bad JSON, 422 on a wrong shape. Every write is stored forever, never deduplicated.
- GET /queue/<topic NAME>/<idx>/get_after → {"List": [[byte, ...], ...]} from idx INCLUSIVE;
  {"Failure": ...} when idx is at/after the end (caught up) or the topic is unknown.
- GET /queue/<topic NAME>/get → {"List": [...]} (all messages).

Faults, switchable at runtime (`faults` attributes, or `stop()`/`start()` for "down": the port
refuses connections and open keep-alive connections are cut): `slow_s` (delay before the
reply), `status` (reply with this HTTP status, e.g. 503), `garbage` (200 with a non-JSON
body), `failure` (every write gets a Failure reply), `reject_every` (every Nth write gets a
Failure), `reset` (read the request, then close the connection without a reply),
`reject_if(event) -> reason | status | None` (a Failure reply, or that HTTP status, for chosen
events), `unsolicited` (after each write's reply, an extra `200 "OpSuccess"` reply nobody asked
for on the same connection: in the same segment, or `unsolicited_after_s` later). A faulted
write is not stored.
`writes` counts every write request that reached the server (faulted or not);
`max_in_flight` is the most write requests it was serving at once.

`read_topic()` reads a topic back like a consumer (get_after with an index cursor) and
`decode()` turns a stored message into (sub_topic, event dict). `usage_event()` is the
producer-side helper the delivery tests share (their clock is `tests.clocks.TrioClock`).
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

import httpx

from hostagent.accounting.events import build_usage_event
from hostagent.model import OutEvent, Owner, Usage


def topic_hash(name: str) -> str:
    """What form-p2p keys a topic by."""
    return hashlib.sha3_256(name.encode()).hexdigest()


def decode(message: bytes | list[int]) -> tuple[int, dict[str, Any]]:
    """A stored message → (sub-topic byte, event dict), as a consumer decodes it."""
    raw = bytes(message)
    return raw[0], json.loads(raw[1:].decode("utf-8"))


@dataclass
class Faults:
    """What the server does wrong right now."""

    slow_s: float = 0.0
    status: int | None = None
    garbage: bool = False
    failure: bool = False
    reject_every: int = 0
    reset: bool = False
    reject_if: Callable[[dict[str, Any]], str | int | None] | None = None
    unsolicited: bool = False
    unsolicited_after_s: float = 0.0

    def clear(self) -> None:
        """Back to a healthy queue."""
        self.__init__()  # type: ignore[misc]


class QueueStandIn:
    """The queue's state plus the HTTP server in a thread."""

    def __init__(self) -> None:
        self.topics: dict[str, list[bytes]] = {}
        self.faults = Faults()
        self.writes = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        self.port = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()

    @property
    def url(self) -> str:
        """Base URL."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        """False while stopped ("down")."""
        return self._server is not None

    def start(self) -> None:
        """Listen (again, on the same port after `stop()`)."""
        standin = self

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 256
            allow_reuse_address = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # clients that vanish mid-request (killed, timed out) are expected here

        class Handler(_Handler):
            queue = standin

        self._server = Server(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Go down: refuse new connections and cut the open ones."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        with self.lock:
            conns, self._conns = list(self._conns), set()
        for c in conns:
            with suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        self._server = None

    def messages(self, topic_name: str) -> list[bytes]:
        """Everything stored under a topic, in arrival order."""
        with self.lock:
            return list(self.topics.get(topic_hash(topic_name), []))

    def events(self, topic_name: str = "usage_events") -> list[dict[str, Any]]:
        """Stored messages of a topic decoded to event dicts."""
        return [decode(m)[1] for m in self.messages(topic_name)]

    def _write(self, doc: Any) -> tuple[int, bytes]:
        w = doc.get("Write") if isinstance(doc, dict) else None
        content = w.get("content") if isinstance(w, dict) else None
        topic = w.get("topic") if isinstance(w, dict) else None
        if (not isinstance(content, list) or not isinstance(topic, str)
                or not all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b <= 255
                           for b in content)):
            return 422, b"Failed to deserialize the JSON body into the target type"
        with self.lock:
            self.writes += 1
            nth = self.writes
        f = self.faults
        if f.failure or (f.reject_every and nth % f.reject_every == 0):
            return 200, b'{"Failure":{"reason":"injected failure"}}'
        if f.reject_if is not None:
            try:
                reason = f.reject_if(decode(content)[1])
            except ValueError:
                reason = None
            if isinstance(reason, int):
                return reason, b"injected client error"
            if reason is not None:
                return 200, json.dumps({"Failure": {"reason": reason}}).encode()
        with self.lock:
            self.topics.setdefault(topic, []).append(bytes(content))
        return 200, b'"OpSuccess"'

    def _read(self, name: str, idx: int | None) -> bytes:
        with self.lock:
            msgs = self.topics.get(topic_hash(name))
            if msgs is None:
                return json.dumps({"Failure": {"reason": f"topic {name} not found"}}).encode()
            start = idx or 0
            if idx is not None and start >= len(msgs):
                return json.dumps({"Failure": {"reason": "no messages after index"}}).encode()
            return json.dumps({"List": [list(m) for m in msgs[start:]]}).encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    queue: QueueStandIn

    def setup(self) -> None:
        super().setup()
        # One segment per reply and no Nagle delay, like the real (hyper) server.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.queue.lock:
            self.queue._conns.add(self.connection)

    def finish(self) -> None:
        with self.queue.lock:
            self.queue._conns.discard(self.connection)
        with suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(self, status: int, body: bytes, ctype: str = "application/json",
               extra: bytes = b"") -> None:
        head = (f"HTTP/1.1 {status} {self.responses.get(status, ('',))[0]}\r\n"
                f"content-type: {ctype}\r\ncontent-length: {len(body)}\r\n\r\n").encode()
        try:
            self.wfile.write(head + body + extra)
        except OSError:
            self.close_connection = True

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        if self.path != "/queue/write_local":
            self._reply(404, b"", "text/plain")
            return
        q = self.queue
        with q.lock:
            q.in_flight += 1
            q.max_in_flight = max(q.max_in_flight, q.in_flight)
        try:
            self._post(body)
        finally:
            with q.lock:
                q.in_flight -= 1

    def _post(self, body: bytes) -> None:
        q, f = self.queue, self.queue.faults
        if f.slow_s:
            time.sleep(f.slow_s)
        if f.reset:
            with q.lock:
                q.writes += 1
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if f.status is not None:
            with q.lock:
                q.writes += 1
            self._reply(f.status, b"injected error", "text/plain")
            return
        if f.garbage:
            with q.lock:
                q.writes += 1
            self._reply(200, b"<html>garbage", "text/html")
            return
        if (self.headers.get("Content-Type") or "").split(";")[0].strip() != "application/json":
            self._reply(415, b"Expected request with `Content-Type: application/json`",
                        "text/plain")
            return
        try:
            doc = json.loads(body)
        except ValueError:
            self._reply(400, b"Failed to parse the request body as JSON", "text/plain")
            return
        status, out = q._write(doc)
        extra = b""
        if f.unsolicited:
            extra = b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n' \
                    b'content-length: 11\r\n\r\n"OpSuccess"'
        now = extra if not f.unsolicited_after_s else b""
        self._reply(status, out, "application/json" if status == 200 else "text/plain", now)
        if extra and not now:
            time.sleep(f.unsolicited_after_s)
            with suppress(OSError):
                self.wfile.write(extra)

    def do_GET(self) -> None:
        parts = [unquote(p) for p in self.path.strip("/").split("/")]
        if len(parts) == 4 and parts[0] == "queue" and parts[3] == "get_after":
            try:
                idx = int(parts[2])
            except ValueError:
                self._reply(400, b"bad index", "text/plain")
                return
            self._reply(200, self.queue._read(parts[1], idx))
        elif len(parts) == 3 and parts[0] == "queue" and parts[2] == "get":
            self._reply(200, self.queue._read(parts[1], None))
        else:
            self._reply(404, b"", "text/plain")


@contextmanager
def serve_queue() -> Iterator[QueueStandIn]:
    """Run a stand-in queue for the duration of a `with` block."""
    q = QueueStandIn()
    q.start()
    try:
        yield q
    finally:
        q.stop()


def read_topic(url: str, topic_name: str, start: int = 0) -> list[bytes]:
    """Read a topic like a consumer: get_after from an index cursor until caught up."""
    out: list[bytes] = []
    idx = start
    with httpx.Client(base_url=url, timeout=10, trust_env=False) as client:
        while True:
            reply = client.get(f"/queue/{topic_name}/{idx}/get_after").json()
            if "List" not in reply or not reply["List"]:
                return out
            out.extend(bytes(m) for m in reply["List"])
            idx += len(reply["List"])


# --- producer-side helpers shared by the delivery tests ------------------------------------

T0_NS = 1_700_000_000 * 10**9
PERIOD_NS = 30 * 10**9


def usage_event(instance: str, k: int, *, host: str = "host-a", incarnation: str = "inc-1",
                t0_ns: int = T0_NS, period_ns: int = PERIOD_NS, user: str = "user-1",
                pad: int = 0) -> OutEvent:
    """The real `resource_usage` event (hostagent.accounting.events) of period `k` of `instance`.

    Counters are a deterministic function of (instance, k): regenerating a period after a
    crash yields byte-identical events, like the collector does from its persisted baseline.
    """
    h = int.from_bytes(hashlib.sha256(f"{instance}|{k}".encode()).digest()[:8], "big")
    cpu_ns = h % (60 * 10**9)
    mem = (1 + h % 7) << 28
    start = t0_ns + k * period_ns
    u = Usage(
        instance_id=instance, uuid=instance, name=instance, incarnation=incarnation,
        new_incarnation=k == 0, period_start_ns=start, period_end_ns=start + period_ns,
        vcpus=2, memory_alloc_bytes=2 << 30, cpu_ns=cpu_ns, cpu_seconds=cpu_ns // 10**9,
        cpu_percent_avg=cpu_ns / period_ns / 2 * 100, memory_bytes=mem,
        memory_source="balloon", memory_percent=mem / (2 << 30) * 100,
        storage_bytes=(10 << 30) + k, storage_capacity_bytes=20 << 30,
        net_egress_bytes=h % 10**7, net_ingress_bytes=(h >> 8) % 10**7,
        disk_read_bytes=(h >> 16) % 10**8, disk_write_bytes=(h >> 24) % 10**8,
        gpu_count=0, gpu_seconds=0, gpu_util_avg=None,
        missing={"pad": "x" * pad} if pad else {})
    return build_usage_event(u, Owner(user, "org-1", "metadata"), host, time_format="unix")
