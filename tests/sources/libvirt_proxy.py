"""A unix-socket proxy in front of libvirtd's socket, so a test can cut or freeze ITS OWN
connections (a libvirtd restart as the client sees it) without touching the shared daemon."""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import threading

LIBVIRTD_SOCK = "/run/libvirt/libvirt-sock"


class SocketProxy:
    """Listens on `path`, forwards every connection to `target`; `cut()` closes the current
    ones (EOF, like a daemon restart), `freeze()` stops forwarding them (a hung peer)."""

    def __init__(self, path: str, target: str) -> None:
        self.path = path
        self.target = target
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(8)
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket, threading.Event]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.connect(self.target)
            frozen = threading.Event()
            with self._lock:
                self._pairs.append((client, upstream, frozen))
            threading.Thread(target=self._pump, args=(client, upstream, frozen),
                             daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket, frozen: threading.Event) -> None:
        sel = selectors.DefaultSelector()
        sel.register(a, selectors.EVENT_READ, b)
        sel.register(b, selectors.EVENT_READ, a)
        try:
            while not frozen.is_set():
                for key, _ in sel.select(timeout=0.1):
                    if frozen.is_set():
                        break
                    src: socket.socket = key.fileobj  # type: ignore[assignment]
                    data = src.recv(65536)
                    if not data:
                        return
                    key.data.sendall(data)
        except OSError:
            return
        finally:
            sel.close()
            if not frozen.is_set():  # a frozen pair stays open and silent until close()
                for s in (a, b):
                    with contextlib.suppress(OSError):
                        s.close()

    @property
    def connections(self) -> int:
        """Connections accepted so far."""
        with self._lock:
            return len(self._pairs)

    def cut(self) -> None:
        """Close every current connection, both ends."""
        with self._lock:
            pairs = list(self._pairs)
        for a, b, _ in pairs:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def freeze(self) -> None:
        """Stop forwarding on every current connection (new ones still work)."""
        with self._lock:
            for _, _, frozen in self._pairs:
                frozen.set()

    def close(self) -> None:
        """Stop accepting and close everything."""
        self._stop.set()
        self._listener.close()
        with self._lock:
            pairs = list(self._pairs)
        for a, b, _ in pairs:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
