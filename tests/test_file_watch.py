"""inotify on the directories of a few files (hostagent/file_watch.py): what counts as a change
of a watched name, and what does not; real files in a temporary directory."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from hostagent.file_watch import DirWatch


def settle(w: DirWatch) -> bool:
    """The events queued so far (inotify queues them at once, in the writer's syscall)."""
    return w.drain()


def test_a_write_a_replace_and_a_delete_of_the_watched_name_count(tmp_path: Path) -> None:
    p = tmp_path / "rules.json"
    w = DirWatch([p])
    try:
        assert not settle(w)
        p.write_text("[]")  # created, written, closed
        assert settle(w)
        assert not settle(w)  # each event once
        tmp = tmp_path / ".rules.json.tmp"
        tmp.write_text("[1]")
        assert not settle(w)  # another name in the same directory
        tmp.replace(p)  # an editor's or ansible's write-and-rename
        assert settle(w)
        os.utime(p, ns=(1, 1))
        assert settle(w)
        p.unlink()
        assert settle(w) and not w.lost
    finally:
        w.close()


def test_a_busy_neighbour_written_in_place_does_not_wake_it(tmp_path: Path) -> None:
    # The state directory: SQLite writes its open files all the time (IN_MODIFY, not watched).
    db = tmp_path / "state.db"
    with db.open("wb") as f:
        w = DirWatch([tmp_path / "api-rules.json"])
        try:
            for _ in range(100):
                f.write(b"x" * 4096)
                f.flush()
            assert not settle(w)
        finally:
            w.close()


def test_a_symlink_swap_counts_and_a_removed_directory_is_reported_lost(
        tmp_path: Path) -> None:
    # A ConfigMap-style layout: rules.json -> ..data/rules.json, ..data -> a versioned dir.
    conf = tmp_path / "conf"
    (conf / "v1").mkdir(parents=True)
    (conf / "v1" / "rules.json").write_text("[]")
    (conf / "..data").symlink_to("v1")
    (conf / "rules.json").symlink_to("..data/rules.json")
    w = DirWatch([conf / "rules.json"])
    try:
        assert not settle(w)
        (conf / "v2").mkdir()
        (conf / "v2" / "rules.json").write_text("[1]")
        (conf / "..data.new").symlink_to("v2")
        (conf / "..data.new").replace(conf / "..data")
        assert settle(w)
        (conf / "v1" / "rules.json").write_text("[2]")  # the old target, watched too
        assert settle(w)
        shutil.rmtree(conf / "v1")
        assert settle(w) and w.lost
    finally:
        w.close()


def test_a_directory_that_does_not_exist_cannot_be_watched(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        DirWatch([tmp_path / "missing" / "rules.json"])
