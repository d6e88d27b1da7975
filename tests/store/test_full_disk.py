"""A daemon started on a full disk says so: the store's path, "no space left" and the fix,
where it said SQLite's "disk I/O error" (an existing store: WAL mode's -shm index cannot be
created), "database or disk is full" (a new store) or "its write-ahead log was not
checkpointed on close" (a store that fits, but not its first checkpoint). Real small tmpfs
mounts (root only), filled up."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from hostagent.cli.main import main
from hostagent.errors import StoreFull
from hostagent.store.outbox import Store
from tests.clocks import FakeClock
from tests.store.test_guard import HOST, used_store
from tests.store.test_refusals import refusal


def fill(directory: Path) -> None:
    """Write zeros into `directory` until its file system refuses (ENOSPC)."""
    fd = os.open(directory / "fill", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)


def config(tmp: Path, state_dir: Path) -> Path:
    """The daemon's config, beside (not on) the full file system."""
    cfg = tmp / "hostagent.toml"
    cfg.write_text(f'[host]\nnode_id = "{HOST}"\n[collector]\nstate_path = '
                   f'"{state_dir}/state.db"\n[libvirt]\nuri = "test:///default"\n'
                   f'[[sinks]]\ntype = "jsonl"\nname = "q"\npath = "{tmp}/events.jsonl"\n')
    return cfg


def says_no_space(line: str, path: Path) -> None:
    assert str(path) in line, line
    assert "no space left" in line, line
    assert "free space there" in line and "collector.state_path" in line, line
    assert "disk I/O error" not in line.split("(", maxsplit=1)[0], line


def test_a_new_store_on_a_full_disk_says_no_space_left(
        tmp_path: Path, tmpfs: Callable[[str], Path], capsys: pytest.CaptureFixture[str]) -> None:
    fs = tmpfs("256k")
    fill(fs)
    assert main(["run", "--once", "--config", str(config(tmp_path, fs))]) == 1
    says_no_space(refusal(capsys), fs / "state.db")
    assert sorted(os.listdir(fs)) == ["fill"]  # no store, no temporary left behind


def test_an_existing_store_on_a_full_disk_says_no_space_left_and_starts_once_freed(
        tmp_path: Path, tmpfs: Callable[[str], Path], capsys: pytest.CaptureFixture[str]) -> None:
    # Before: "cannot read the state store: disk I/O error" (SQLITE_IOERR_SHMSIZE: WAL mode
    # creates the -shm index, which a full disk cannot hold).
    fs = tmpfs("256k")
    path = fs / "state.db"
    clock = FakeClock()
    used_store(path, clock)
    before = path.read_bytes()
    fill(fs)
    cfg = str(config(tmp_path, fs))
    assert main(["run", "--once", "--config", cfg]) == 1
    says_no_space(refusal(capsys), path)
    assert path.read_bytes() == before
    (fs / "fill").unlink()
    assert main(["run", "--once", "--config", cfg]) == 0, capsys.readouterr().err
    s = Store.open(path, clock=clock, node_id=HOST, sink_names=["q"], read_only=True)
    try:
        assert s.created_ns  # the same store, opened
    finally:
        s.close()


def test_a_store_that_fits_but_not_its_first_checkpoint_says_no_space_left(
        tmpfs: Callable[[str], Path]) -> None:
    # Before: "cannot create the state store: its write-ahead log was not checkpointed on
    # close" (the checkpoint grows the file; on a full disk it fails unseen).
    fs = tmpfs("128k")
    path = fs / "state.db"
    with pytest.raises(StoreFull, match="no space left") as caught:
        Store.open(path, clock=FakeClock(), node_id=HOST, sink_names=["q"])
    says_no_space(str(caught.value), path)
    assert not any(name.startswith("state.db") for name in os.listdir(fs))


def test_a_file_system_out_of_inodes_says_no_space_left(
        tmp_path: Path, tmpfs: Callable[[str], Path], capsys: pytest.CaptureFixture[str]) -> None:
    # Before: "state.db.lock: cannot lock the state store: No space left on device" (no fix).
    fs = tmpfs("1m,nr_inodes=16")
    for i in range(64):
        try:
            (fs / f"f{i}").touch()
        except OSError:
            break
    assert main(["run", "--once", "--config", str(config(tmp_path, fs))]) == 1
    line = refusal(capsys)
    says_no_space(line, fs / "state.db")
    assert "no inode left" in line, line
