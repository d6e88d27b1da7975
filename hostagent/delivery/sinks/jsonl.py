"""JSONL file sink: one compact JSON event per line, appended; written and fsynced once per batch.

`send` only queues the line in memory; `flush` appends the whole batch with ONE `os.write` on
an O_APPEND descriptor (so lines never interleave) and fsyncs it, in one worker-thread call.
The delivery rather calls `write_batch` (base.BatchWriter), which does the same from the
worker thread that also claims the batch and records its acknowledgements.
The delivery records acknowledgements only after `flush` returned, so nothing is acked before
it is on disk; a failed write or fsync fails the whole batch (sent again later).
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
from collections.abc import Sequence
from pathlib import Path

import trio

from hostagent import handoff
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
        self._batch: list[bytes] = []
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

    def _write_and_sync(self, data: bytes) -> None:
        fd = self._open()
        if self._needs_newline:
            data = b"\n" + data
        self._needs_newline = True  # until the whole batch is known to be written
        view = memoryview(data)
        try:
            while view:  # a short write is continued; an error leaves a torn last line
                view = view[os.write(fd, view):]
        except OSError as err:
            raise SinkUnavailable(f"{self.path}: write failed: {err}") from err
        self._needs_newline = False
        try:
            os.fsync(fd)
        except OSError as err:
            raise SinkUnavailable(f"{self.path}: fsync failed: {err}") from err

    def device(self) -> int:
        """The `st_dev` of the file's directory (OSError while it does not exist)."""
        return os.stat(self.path.parent).st_dev

    def write_batch(self, payloads: Sequence[bytes]) -> None:
        """Append the payloads as lines with one write, then fsync (blocking: a worker thread's
        call); SinkUnavailable if either failed."""
        if not payloads:
            return
        try:
            self._write_and_sync(b"\n".join(payloads) + b"\n")
        except OSError as err:  # opening the file
            raise SinkUnavailable(f"{self.path}: write failed: {err}") from err

    async def send(self, event: OutEvent) -> None:
        """Queue the event's payload as one line (written and fsynced by `flush`)."""
        self._batch.append(event.payload)

    async def flush(self) -> None:
        """Append every queued line with one write, then fsync the file; SinkUnavailable if
        either failed (the delivery then sends the whole batch again later)."""
        if not self._batch:
            return
        data = b"\n".join(self._batch) + b"\n"
        self._batch = []
        try:
            await handoff.run_sync(self._write_and_sync, data, limiter=self._limiter)
        except OSError as err:  # opening the file
            raise SinkUnavailable(f"{self.path}: write failed: {err}") from err

    async def aclose(self) -> None:
        """Write what is still queued (best effort: it was not acknowledged), close the file."""
        try:
            await self.flush()
        except SinkUnavailable as err:
            log.warning("jsonl sink: unflushed lines lost at close (they are sent again)",
                        extra={"path": str(self.path), "error": str(err)})
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
