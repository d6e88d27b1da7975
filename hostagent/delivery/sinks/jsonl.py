"""JSONL file sink: one compact JSON event per line, appended; fsynced once per delivery batch.

Each line is written with ONE `os.write` on an O_APPEND descriptor, so lines never interleave.
A crash can leave a torn last line; before appending again the sink makes sure the file ends
with a newline, so the torn fragment stays a line of its own and later lines are intact.
Readers skip lines that are not valid JSON. Redelivery after a crash (an event written but its
acknowledgement not yet committed) repeats a line: consumers dedupe on `event_id`.

It is the audit log: it answers to every channel, so it gets every event of its kinds, Notify
alerts for any channel included.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import trio

from hostagent.config.sinks import JsonlSinkConfig
from hostagent.delivery.sinks.base import ConfiguredSink
from hostagent.errors import SinkUnavailable
from hostagent.model import OutEvent

log = logging.getLogger(__name__)


class JsonlSink(ConfiguredSink[JsonlSinkConfig]):
    """Appends events to a file; a failed write or fsync is transient (retried)."""

    max_in_flight = 1
    channels: frozenset[str] | None = None  # every channel: the audit log keeps every event

    def __init__(self, cfg: JsonlSinkConfig) -> None:
        self.cfg = cfg
        self.path = Path(cfg.path)
        self._fd: int | None = None
        self._needs_newline = False
        self._limiter = trio.CapacityLimiter(1)

    def _open(self) -> int:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            size = os.fstat(fd).st_size
            # A torn line from a crash must not swallow the next line.
            self._needs_newline = size > 0 and os.pread(fd, 1, size - 1) != b"\n"
            self._fd = fd
        return self._fd

    def _write(self, line: bytes) -> None:
        fd = self._open()
        data = (b"\n" + line) if self._needs_newline else line
        self._needs_newline = True  # until the whole line is known to be written
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(f"short write ({written} of {len(data)} bytes)")
        self._needs_newline = False

    async def send(self, event: OutEvent) -> None:
        """Append the event's payload as one line (not yet fsynced)."""
        try:
            await trio.to_thread.run_sync(self._write, event.payload + b"\n",
                                          limiter=self._limiter)
        except OSError as err:
            raise SinkUnavailable(f"{self.path}: write failed: {err}") from err

    def _fsync(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)

    async def flush(self) -> None:
        """fsync the file."""
        try:
            await trio.to_thread.run_sync(self._fsync, limiter=self._limiter)
        except OSError as err:
            raise SinkUnavailable(f"{self.path}: fsync failed: {err}") from err

    async def aclose(self) -> None:
        """Close the file."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
