"""The JSONL sink: whole lines, torn-line recovery, fsync per batch, a full disk."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from hostagent.config.sinks import JsonlSinkConfig
from hostagent.delivery.sinks import jsonl
from hostagent.delivery.sinks.jsonl import JsonlSink
from hostagent.errors import SinkUnavailable
from tests.standins.queue import usage_event


def parsed(path: Path) -> list[dict[str, object]]:
    """What a consumer reads: valid JSON lines, torn fragments skipped."""
    out = []
    for line in path.read_bytes().splitlines():
        try:
            out.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            continue
    return out


async def test_appends_one_line_per_event(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "events.jsonl"
    sink = JsonlSink(JsonlSinkConfig(path=str(path)))
    events = [usage_event("i0", k) for k in range(3)]
    for e in events:
        await sink.send(e)
    await sink.flush()
    await sink.aclose()
    assert path.read_bytes() == b"".join(e.payload + b"\n" for e in events)
    sink = JsonlSink(JsonlSinkConfig(path=str(path)))  # reopening adds no blank line
    await sink.send(events[0])  # a redelivery repeats the line: consumers dedupe on event_id
    await sink.aclose()
    assert path.read_bytes().count(b"\n") == 4
    assert len({e["event_id"] for e in parsed(path)}) == 3


async def test_torn_last_line_does_not_corrupt_later_lines(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    first, second = usage_event("i0", 0), usage_event("i0", 1)
    path.write_bytes(first.payload + b"\n" + second.payload[:40])  # crash mid-write
    sink = JsonlSink(JsonlSinkConfig(path=str(path)))
    await sink.send(second)
    await sink.flush()
    await sink.aclose()
    lines = path.read_bytes().split(b"\n")
    assert lines == [first.payload, second.payload[:40], second.payload, b""]
    assert [e["event_id"] for e in parsed(path)] == [first.event_id, second.event_id]


@pytest.fixture
def tiny_fs(tmpfs: Callable[[str], Path]) -> Path:
    """A 64k tmpfs for the test."""
    return tmpfs("64k")


async def test_full_disk_is_transient_and_lines_stay_whole(tiny_fs: Path) -> None:
    path = tiny_fs / "events.jsonl"
    (tiny_fs / "filler").write_bytes(b"\0" * 40_000)
    sink = JsonlSink(JsonlSinkConfig(path=str(path)))
    sent = []
    k = 0
    with pytest.raises(SinkUnavailable, match="write failed"):  # noqa: PT012
        while True:  # lines are written by flush (one write per batch): a batch of one here
            ev = usage_event("i0", k, pad=3000)
            await sink.send(ev)
            await sink.flush()
            sent.append(ev.event_id)
            k += 1
    assert sent  # some lines fitted before the disk filled up
    (tiny_fs / "filler").unlink()  # the operator frees space
    again = usage_event("i0", k, pad=3000)  # the failed event, sent again
    await sink.send(again)
    await sink.flush()
    await sink.aclose()
    assert [e["event_id"] for e in parsed(path)] == [*sent, again.event_id]


class Syscalls:
    """The sink's writes (their bytes) and fsyncs, in order; they still happen."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.writes: list[bytes] = []


@pytest.fixture
def syscalls(monkeypatch: pytest.MonkeyPatch) -> Syscalls:
    seen = Syscalls()
    real_write, real_fsync = os.write, os.fsync

    def write(fd: int, data: bytes) -> int:
        seen.calls.append("write")
        seen.writes.append(bytes(data))
        return real_write(fd, data)

    def fsync(fd: int) -> None:
        seen.calls.append("fsync")
        real_fsync(fd)

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "fsync", fsync)
    return seen


async def test_a_batch_is_one_write_and_one_fsync(tmp_path: Path, syscalls: Syscalls) -> None:
    path = tmp_path / "events.jsonl"
    sink = JsonlSink(JsonlSinkConfig(path=str(path)))
    events = [usage_event(f"i{i}", 0) for i in range(50)]
    for e in events:
        await sink.send(e)
    assert not path.exists() or path.read_bytes() == b""  # nothing before flush
    await sink.flush()
    await sink.flush()  # nothing queued: no syscalls
    await sink.aclose()
    assert syscalls.calls == ["write", "fsync"]
    assert path.read_bytes() == b"".join(e.payload + b"\n" for e in events)


async def test_a_large_batch_is_written_in_whole_lines_and_synced_once(
        tmp_path: Path, syscalls: Syscalls) -> None:
    """A batch of more than WRITE_LINES events is never copied whole: each write carries whole
    lines, the fsync comes once, after the last."""
    path = tmp_path / "events.jsonl"
    sink = JsonlSink(JsonlSinkConfig(path=str(path)))
    events = [usage_event(f"i{i}", 0) for i in range(2 * jsonl.WRITE_LINES + 3)]
    sink.write_batch([e.payload for e in events])
    assert syscalls.calls == ["write", "write", "write", "fsync"]
    writes = syscalls.writes
    assert [w.count(b"\n") for w in writes] == [jsonl.WRITE_LINES, jsonl.WRITE_LINES, 3]
    assert all(w.endswith(b"\n") for w in writes)
    assert path.read_bytes() == b"".join(e.payload + b"\n" for e in events)


async def test_a_write_failing_mid_batch_leaves_whole_lines_and_a_fresh_line_after(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second chunk's write is cut short by a full disk: the batch fails (sent again
    whole), the first chunk's lines stay whole, and the torn fragment never swallows the
    line written after it."""
    path = tmp_path / "events.jsonl"
    sink = JsonlSink(JsonlSinkConfig(path=str(path)))
    real_write = os.write
    n = {"writes": 0}

    def write(fd: int, data: bytes) -> int:
        n["writes"] += 1
        if n["writes"] == 2:
            real_write(fd, bytes(data)[:50])  # torn, then the disk is full
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    events = [usage_event(f"i{i}", 0) for i in range(jsonl.WRITE_LINES + 5)]
    with pytest.raises(SinkUnavailable, match="write failed"):
        sink.write_batch([e.payload for e in events])
    sink.write_batch([e.payload for e in events])  # the delivery sends the batch again
    got = [e["event_id"] for e in parsed(path)]
    assert got == [e.event_id for e in events[:jsonl.WRITE_LINES]] + [e.event_id for e in events]
    torn = path.read_bytes().split(b"\n")[jsonl.WRITE_LINES]
    assert torn == events[jsonl.WRITE_LINES].payload[:50]  # a line of its own


async def test_a_renamed_or_deleted_file_is_created_again(tmp_path: Path) -> None:
    """The sink kept its descriptor for good: after logrotate's `create` (rename), lines went
    on into the rotated file; after a delete, into a file nobody could see, and were acked."""
    path = tmp_path / "events.jsonl"
    sink = JsonlSink(JsonlSinkConfig(path=str(path)))
    events = [usage_event("i0", k) for k in range(3)]
    sink.write_batch([events[0].payload])
    path.rename(tmp_path / "events.jsonl.1")  # rotated by renaming
    sink.write_batch([events[1].payload])
    assert path.read_bytes() == events[1].payload + b"\n"
    assert (tmp_path / "events.jsonl.1").read_bytes() == events[0].payload + b"\n"
    path.unlink()  # deleted by hand
    sink.write_batch([events[2].payload])
    assert path.read_bytes() == events[2].payload + b"\n"
    await sink.aclose()


async def test_a_path_replaced_by_a_directory_fails_the_write(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    sink = JsonlSink(JsonlSinkConfig(path=str(path)))
    sink.write_batch([usage_event("i0", 0).payload])
    path.unlink()
    path.mkdir()
    with pytest.raises(SinkUnavailable, match="write failed"):  # sent again later
        sink.write_batch([usage_event("i0", 1).payload])
    path.rmdir()  # the operator puts it right: the next write creates the file
    sink.write_batch([usage_event("i0", 1).payload])
    assert parsed(path) == [orjson.loads(usage_event("i0", 1).payload)]
    await sink.aclose()


async def test_a_fifo_at_the_path_is_refused_not_written(tmp_path: Path) -> None:
    """A FIFO was opened (O_RDWR never blocks) and written: lines went into the pipe buffer,
    lost unless read, and once it was full the write blocked the delivery's worker thread for
    good (and the daemon's shutdown behind it)."""
    path = tmp_path / "events.jsonl"
    os.mkfifo(path)
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        sink = JsonlSink(JsonlSinkConfig(path=str(path)))
        with pytest.raises(SinkUnavailable, match=r"not a regular file \(a FIFO\)"):
            sink.write_batch([usage_event("i0", k).payload for k in range(10)])  # < 64 KiB
        await sink.send(usage_event("i0", 0))
        with pytest.raises(SinkUnavailable, match="not a regular file"):
            await sink.flush()
        try:
            in_pipe = os.read(reader, 65536)  # b"": no writer left, and nothing written
        except BlockingIOError:
            in_pipe = b""
        assert in_pipe == b""
        await sink.aclose()
    finally:
        os.close(reader)
