"""A raw HTTP/1.1 server for chaos tests: every answer is bytes (and pauses, closes, resets)
written by a script, so a reply can be anything a broken or hostile server sends: half a
response, a reset mid-body, a drip-fed answer, 1xx before the answer, a body of megabytes,
garbage instead of HTTP. Real sockets on 127.0.0.1, one thread per connection."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

# An answer: writes to the connection, may sleep or close it; True keeps the connection open
# for the next request.
Answer = Callable[[socket.socket], bool]


def send(data: bytes, *, keep: bool = False) -> Answer:
    """Write `data` at once."""
    def answer(conn: socket.socket) -> bool:
        conn.sendall(data)
        return keep
    return answer


def drip(data: bytes, every_s: float) -> Answer:
    """Write `data` a byte at a time, `every_s` apart (a slow-loris answer)."""
    def answer(conn: socket.socket) -> bool:
        for i in range(len(data)):
            conn.sendall(data[i:i + 1])
            time.sleep(every_s)
        return False
    return answer


def reset_after(data: bytes) -> Answer:
    """Write `data`, then reset the connection (RST, not FIN)."""
    def answer(conn: socket.socket) -> bool:
        conn.sendall(data)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return False
    return answer


def response(status: int, body: bytes = b"", headers: tuple[str, ...] = (),
             reason: str = "X") -> bytes:
    """A whole HTTP/1.1 response with a Content-Length."""
    head = [f"HTTP/1.1 {status} {reason}", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


@dataclass
class RawServer:
    """`answers` are used one per request, the last one for every request after it."""

    answers: list[Answer]
    requests: list[bytes] = field(default_factory=list)  # each request's body
    _sock: socket.socket | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def port(self) -> int:
        assert self._sock is not None
        return int(self._sock.getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> RawServer:
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._sock is not None:
            self._sock.close()

    def _accept(self) -> None:
        assert self._sock is not None
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                head, buf = buf.split(b"\r\n\r\n", 1)
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(buf) < length:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                body, buf = buf[:length], buf[length:]
                with self._lock:
                    self.requests.append(body)
                    answer = self.answers[min(len(self.requests), len(self.answers)) - 1]
                if not answer(conn):
                    return
        except OSError:
            return
        finally:
            conn.close()


def close_when_reused(data: bytes) -> Answer:
    """Write `data`, then close the connection the moment the client sends its next request
    on it (unread: the kernel resets it), as a server whose keep-alive timeout fires just as
    the client reuses the connection."""
    def answer(conn: socket.socket) -> bool:
        conn.sendall(data)
        conn.recv(1, socket.MSG_PEEK)
        return False
    return answer
