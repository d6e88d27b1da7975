"""JSONL file sink: one compact JSON event per line, appended; written and fsynced once per batch.

`send` only queues the line in memory; `flush` appends the whole batch on an O_APPEND
descriptor, whole lines to each `os.write` (`WRITE_LINES` of them: a line is never split
between writes, so anything else appended lands between whole lines), and fsyncs it once, in
one worker-thread call.
The delivery rather calls `write_batch` (base.BatchWriter), which does the same from the
worker thread that also claims the batch and records its acknowledgements.
The delivery records acknowledgements only after `flush` returned, so nothing is acked before
it is on disk; a failed write or fsync fails the whole batch (sent again later).
A crash can leave a torn last line; before appending again the sink makes sure the file ends
with a newline, so the torn fragment stays a line of its own and later lines are intact.
Before each batch the sink checks that the path still names the file it has open: a file
renamed (rotation by `create`), deleted or replaced is opened (created) again, never written
on unseen. Only a regular file is written: a FIFO, a device or a directory at the path is a
transient failure naming it (the events wait in the outbox).
Readers skip lines that are not valid JSON. Redelivery after a crash (an event written but its
acknowledgement not yet committed) repeats a line: consumers dedupe on `event_id`.

It is the audit log: it answers to every channel, so it gets every event of its kinds, Notify
alerts for any channel included.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Sequence
from pathlib import Path

import trio

from hostagent import handoff
from hostagent.config.sinks import JsonlSinkConfig
from hostagent.delivery.sinks.base import ConfiguredSink
from hostagent.errors import SinkUnavailable
from hostagent.model import OutEvent

log = logging.getLogger(__name__)


WRITE_LINES = 256
"""Lines per `os.write`: a batch (4,096 events, ~4 MB, at 5,000 domains) is never copied
whole; its copy was the largest block of a large pass's peak heap."""


def lines(payloads: Sequence[bytes]) -> bytes:
    """The payloads as newline-terminated lines, in one allocation."""
    return b"\n".join([*payloads, b""])


def _require_regular(path: Path, mode: int) -> None:
    """SinkUnavailable unless `mode` is a regular file's. A FIFO took lines into its pipe
    buffer (gone unless someone reads them) and then blocked the write for good, and the
    daemon's shutdown behind it."""
    if stat.S_ISREG(mode):
        return
    kind = next((name for test, name in (
        (stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket")) if test(mode)), f"mode {mode:o}")
    raise SinkUnavailable(f"{path}: not a regular file ({kind}); the JSONL sink appends to a "
                          "plain file")


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
        if self._fd is not None and not self._still_at_path(self._fd):
            # Renamed (logrotate's `create`), deleted or replaced: writing on would "deliver"
            # events into a file nobody can see any more. Open (create) the path again.
            fd, self._fd = self._fd, None
            os.close(fd)
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # O_NONBLOCK: opening a FIFO or a device must not hang the worker thread either.
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
                         | os.O_NONBLOCK, 0o640)
            try:
                st = os.fstat(fd)
                _require_regular(self.path, st.st_mode)
                # A torn line from a crash must not swallow the next line.
                self._needs_newline = (st.st_size > 0
                                       and os.pread(fd, 1, st.st_size - 1) != b"\n")
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
        return self._fd

    def _still_at_path(self, fd: int) -> bool:
        """The path still names the open file (one stat and one fstat a batch)."""
        try:
            at_path = os.stat(self.path)
        except FileNotFoundError:
            return False
        except OSError:  # the path cannot be checked now: the open file is all there is
            return True
        mine = os.fstat(fd)
        return (at_path.st_dev, at_path.st_ino) == (mine.st_dev, mine.st_ino)

    def _write_and_sync(self, payloads: Sequence[bytes]) -> None:
        """Append `payloads` as lines, `WRITE_LINES` to an `os.write`, then fsync once."""
        fd = self._open()
        try:
            for at in range(0, len(payloads), WRITE_LINES):
                data = lines(payloads[at:at + WRITE_LINES])
                if self._needs_newline:
                    data = b"\n" + data
                self._needs_newline = True  # until this chunk is known to be written
                view = memoryview(data)
                while view:  # a short write is continued; an error leaves a torn last line
                    view = view[os.write(fd, view):]
                self._needs_newline = False
        except OSError as err:
            raise SinkUnavailable(f"{self.path}: write failed: {err}") from err
        try:
            os.fsync(fd)
        except OSError as err:
            raise SinkUnavailable(f"{self.path}: fsync failed: {err}") from err

    def device(self) -> int:
        """The `st_dev` of the file's directory (OSError while it does not exist)."""
        return os.stat(self.path.parent).st_dev

    def write_batch(self, payloads: Sequence[bytes]) -> None:
        """Append the payloads as lines, then fsync once (blocking: a worker thread's call);
        SinkUnavailable if a write or the fsync failed."""
        if not payloads:
            return
        try:
            self._write_and_sync(payloads)
        except OSError as err:  # opening the file
            raise SinkUnavailable(f"{self.path}: write failed: {err}") from err

    async def send(self, event: OutEvent) -> None:
        """Queue the event's payload as one line (written and fsynced by `flush`)."""
        self._batch.append(event.payload)

    async def flush(self) -> None:
        """Append every queued line, then fsync the file once; SinkUnavailable if a write or
        the fsync failed (the delivery then sends the whole batch again later)."""
        if not self._batch:
            return
        batch, self._batch = self._batch, []
        try:
            await handoff.run_sync(self._write_and_sync, batch, limiter=self._limiter)
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
