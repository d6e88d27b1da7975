"""Kept-open descriptors: every read answers what `cat` would, on real cgroups and on trees.

Plain files are not kept (a rename or unlink + create would go unseen), so the cache's own
mechanics are tested on tmp trees whose device a stand-in mountinfo declares to be cgroup2;
what only the kernel can show (ENODEV after rmdir, a new cgroup at the same path) runs on
real cgroups.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostagent.errors import SourceError
from hostagent.sources import fdcache
from hostagent.sources.fdcache import FdCache, cgroup_devices, default_max_fds
from hostagent.sources.files import cat, kv_value
from tests.sources.conftest import RealCgroups, fds_on, trusting


def files(tree: Path, count: int) -> list[str]:
    paths = []
    for i in range(count):
        p = tree / f"f{i}"
        p.write_text(f"usage_usec {i}\n")
        paths.append(str(p))
    return paths


# --- plain files: read like cat, never kept ----------------------------------------------------


def test_plain_files_answer_like_cat_and_are_not_kept(tmp_path: Path) -> None:
    (tmp_path / "n").write_text("42\n")
    (tmp_path / "big").write_text("".join(f"key{i} {i}\n" for i in range(5000)))
    (tmp_path / "dir").mkdir()
    cache = FdCache()
    for name in ("n", "big", "absent", "n/below"):
        for _ in range(2):
            assert cache.read(str(tmp_path / name)) == cat(str(tmp_path / name))
    with pytest.raises(SourceError, match=r"cannot read .*/dir") as info:
        cache.read(str(tmp_path / "dir"))
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.__cause__.errno == errno.EISDIR
    assert cache.open_fds == 0
    assert fds_on(tmp_path / "n") == 0
    # A plain file replaced by rename is a new inode: a kept descriptor would miss it.
    (tmp_path / "new").write_text("43\n")
    (tmp_path / "new").rename(tmp_path / "n")
    assert cache.read(str(tmp_path / "n")) == "43\n"
    assert cache.stats().opened == 0
    cache.close()


# --- the cache's mechanics (tree declared cgroupfs) -----------------------------------------------


def test_plain_files_cost_one_remembered_directory_not_an_entry_each(tmp_path: Path) -> None:
    """The cache remembers which directories are plain (what a 5,000-domain recorded tree
    would otherwise keep as 35,000 per-file entries), reads their files like cat, and forgets
    a directory no pass read."""
    dirs = [tmp_path / f"vm{i}" for i in range(50)]
    names = ("cpu.stat", "memory.current", "memory.stat")
    for d in dirs:
        d.mkdir()
        for n in names:
            (d / n).write_text(f"{d.name} {n}\n")
    cache = FdCache()
    for _ in range(2):
        for d in dirs:
            for n in names:
                assert cache.read(str(d / n)) == f"{d.name} {n}\n"
        cache.sweep()
    assert cache.stats().uncached == 2 * len(dirs) * len(names)
    assert (cache.stats().opened, cache.open_fds) == (0, 0)
    assert len(cache._entries) == 0  # no per-file state for plain files
    assert len(cache._plain) == len(dirs)
    (dirs[0] / "cpu.stat").write_text("changed\n")  # a remembered directory's files: fresh
    (dirs[0] / "new").write_text("also read\n")
    assert cache.read(str(dirs[0] / "cpu.stat")) == "changed\n"
    assert cache.read(str(dirs[0] / "new")) == "also read\n"
    assert cache.read(str(dirs[0] / "absent")) is None
    cache.sweep()  # only vm0 was read in this period
    assert set(cache._plain) == {str(dirs[0])}
    cache.sweep()
    assert cache._plain == {}
    cache.close()


def test_a_kept_descriptor_reads_each_new_value(tmp_path: Path) -> None:
    p = tmp_path / "cpu.stat"
    p.write_text("usage_usec 1\n")
    cache = FdCache(mountinfo=trusting(tmp_path))
    assert cache.read(str(p)) == "usage_usec 1\n"
    p.write_text("usage_usec 22\nuser_usec 3\n")  # same inode, new text
    assert cache.read(str(p)) == "usage_usec 22\nuser_usec 3\n"
    p.write_text("")
    assert cache.read(str(p)) == ""
    assert (cache.stats().opened, cache.stats().hits) == (1, 2)
    assert cache.open_fds == 1
    assert fds_on(p) == 1
    cache.close()
    assert fds_on(p) == 0


def test_a_file_longer_than_a_chunk_is_read_whole(tmp_path: Path) -> None:
    text = "".join(f"key{i} {i}\n" for i in range(50))
    (tmp_path / "memory.stat").write_text(text)
    cache = FdCache(chunk_bytes=64, mountinfo=trusting(tmp_path))
    assert cache.read(str(tmp_path / "memory.stat")) == text
    assert cache.read(str(tmp_path / "memory.stat")) == text
    (tmp_path / "memory.stat").write_text("x" * 64)  # exactly one chunk
    assert cache.read(str(tmp_path / "memory.stat")) == "x" * 64
    assert cache.stats().hits == 2
    cache.close()


def failing_pread(monkeypatch: pytest.MonkeyPatch, err: int, *, times: int) -> list[int]:
    """Make the next `times` preads of a kept descriptor fail with `err`; returns the fds hit."""
    real = os.pread
    hit: list[int] = []

    def pread(fd: int, n: int, offset: int) -> bytes:
        if len(hit) < times:
            hit.append(fd)
            raise OSError(err, os.strerror(err))
        return real(fd, n, offset)

    monkeypatch.setattr(fdcache.os, "pread", pread)
    return hit


def test_enodev_on_a_kept_descriptor_reopens_the_path_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = tmp_path / "cpu.stat"
    p.write_text("usage_usec 900\n")
    cache = FdCache(mountinfo=trusting(tmp_path))
    assert cache.read(str(p)) == "usage_usec 900\n"
    # The cgroup was removed and a new one made at the same path (kernfs: ENODEV on the old fd).
    p.unlink()
    p.write_text("usage_usec 0\n")
    failing_pread(monkeypatch, errno.ENODEV, times=1)
    assert cache.read(str(p)) == "usage_usec 0\n"
    s = cache.stats()
    assert (s.opened, s.stale, s.hits) == (2, 1, 0)
    assert cache.open_fds == 1
    assert fds_on(p) == 1  # the new file's; the old descriptor is closed
    cache.close()


def test_enodev_and_the_path_gone_reads_as_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = tmp_path / "cpu.stat"
    p.write_text("usage_usec 900\n")
    cache = FdCache(mountinfo=trusting(tmp_path))
    assert cache.read(str(p)) is not None
    p.unlink()
    failing_pread(monkeypatch, errno.ENODEV, times=1)
    assert cache.read(str(p)) is None
    assert cache.open_fds == 0
    assert cache.stats().stale == 1
    cache.close()


def test_an_io_error_is_judged_by_a_fresh_read_like_cat(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = tmp_path / "memory.stat"
    p.write_text("inactive_file 5\n")
    cache = FdCache(mountinfo=trusting(tmp_path))
    cache.read(str(p))
    failing_pread(monkeypatch, errno.EIO, times=1)  # the kept one fails, a fresh one works
    assert cache.read(str(p)) == "inactive_file 5\n"
    failing_pread(monkeypatch, errno.EIO, times=2)  # both fail: cat's error, naming the path
    with pytest.raises(SourceError, match=f"cannot read {p}") as info:
        cache.read(str(p))
    assert isinstance(info.value.__cause__, OSError)
    assert cache.open_fds == 0
    assert fds_on(p) == 0
    cache.close()


def test_read_many_answers_each_path_like_read_bytes_in_one_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b, c = files(tmp_path, 3)
    (tmp_path / "dir").mkdir()
    cache = FdCache(mountinfo=trusting(tmp_path))
    gone, bad = str(tmp_path / "gone"), str(tmp_path / "dir")
    first = cache.read_many([a, b, None, gone, bad, a])
    assert first[:4] == [b"usage_usec 0\n", b"usage_usec 1\n", None, None]
    assert isinstance(first[4], SourceError)
    assert str(first[4]) == f"cannot read {bad}: Is a directory"
    assert first[5] == b"usage_usec 0\n"
    assert (cache.open_fds, fds_on(Path(a)), fds_on(Path(b))) == (2, 1, 1)  # the spare closed
    Path(b).write_text("usage_usec 7\n")  # in place, as a cgroup counter moves
    assert cache.read_many([a, b, c]) == [b"usage_usec 0\n", b"usage_usec 7\n",
                                          b"usage_usec 2\n"]
    s = cache.stats()
    assert (s.opened, s.hits, cache.open_fds) == (3, 3, 3)  # the first batch's second `a` hit
    # A path twice in a batch of kept ones: the second reader opens its own, one is kept.
    assert cache.read_many([c, c]) == [b"usage_usec 2\n"] * 2
    assert (cache.open_fds, fds_on(Path(c))) == (3, 1)
    # A kept descriptor that fails (the cgroup removed: ENODEV) is closed and the path read
    # afresh, as `read_bytes` does; the others of the batch are answered from theirs.
    Path(a).unlink()
    failing_pread(monkeypatch, errno.ENODEV, times=1)
    assert cache.read_many([a, b]) == [None, b"usage_usec 7\n"]
    assert (cache.stats().stale, cache.open_fds, fds_on(Path(b))) == (1, 2, 1)
    cache.close()
    assert cache.read_many([b]) == [b"usage_usec 7\n"]  # after close: uncached, like cat
    assert fds_on(Path(b)) == 0


def test_sweep_closes_what_a_whole_pass_did_not_read(tmp_path: Path) -> None:
    a, b, c = files(tmp_path, 3)
    cache = FdCache(mountinfo=trusting(tmp_path))
    for p in (a, b, c):
        cache.read(p)
    assert cache.sweep() == 0  # all read in this pass
    cache.read(a)
    cache.read(b)  # c's domain went away
    assert cache.sweep() == 1
    assert (fds_on(a), fds_on(b), fds_on(c)) == (1, 1, 0)
    assert cache.open_fds == 2
    assert cache.sweep() == 2  # a pass that read nothing
    assert cache.open_fds == 0
    assert cache.read(a) == "usage_usec 0\n"  # comes back: opened again
    assert cache.stats().swept == 3
    cache.close()


def test_at_most_max_fds_are_kept_the_rest_read_uncached(tmp_path: Path) -> None:
    paths = files(tmp_path, 5)
    cache = FdCache(max_fds=2, mountinfo=trusting(tmp_path))
    for _ in range(3):
        for i, p in enumerate(paths):
            assert cache.read(p) == f"usage_usec {i}\n"
        assert cache.open_fds == 2
        cache.sweep()
    assert sum(fds_on(p) for p in paths) == 2
    assert cache.stats().uncached == 9  # three files, three passes
    # Gone domains free their slots for the next new ones.
    cache.sweep()
    assert cache.open_fds == 0
    cache.read(paths[4])
    assert fds_on(paths[4]) == 1
    assert FdCache(max_fds=0, mountinfo=trusting(tmp_path)).read(paths[0]) == "usage_usec 0\n"
    cache.close()


def test_close_closes_all_and_later_reads_are_uncached(tmp_path: Path) -> None:
    paths = files(tmp_path, 4)
    cache = FdCache(mountinfo=trusting(tmp_path))
    for p in paths:
        cache.read(p)
    assert sum(fds_on(p) for p in paths) == 4
    cache.close()
    assert sum(fds_on(p) for p in paths) == 0
    assert cache.open_fds == 0
    assert cache.read(paths[1]) == "usage_usec 1\n"
    assert fds_on(paths[1]) == 0
    cache.close()  # idempotent


def test_a_dropped_cache_closes_its_descriptors(tmp_path: Path) -> None:
    paths = files(tmp_path, 3)
    cache = FdCache(mountinfo=trusting(tmp_path))
    for p in paths:
        cache.read(p)
    del cache  # no close(): the finalizer still closes them
    assert sum(fds_on(p) for p in paths) == 0


def test_concurrent_readers_and_sweeps_never_share_or_leak_a_descriptor(tmp_path: Path) -> None:
    paths = files(tmp_path, 20)
    cache = FdCache(max_fds=15, mountinfo=trusting(tmp_path))
    errors: list[str] = []
    stop = threading.Event()

    def reader(seed: int) -> None:
        for n in range(300):
            i = (seed * 7 + n) % len(paths)
            got = cache.read(paths[i])
            if got != f"usage_usec {i}\n":
                errors.append(f"{paths[i]}: {got!r}")

    def sweeper() -> None:
        while not stop.is_set():
            cache.sweep()

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(8)]
    sweeping = threading.Thread(target=sweeper)
    sweeping.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    sweeping.join()
    assert errors == []
    kept = sum(fds_on(p) for p in paths)
    assert kept == cache.open_fds <= 15
    cache.close()
    assert sum(fds_on(p) for p in paths) == 0


# --- the bound and the mount table ----------------------------------------------------------


@pytest.mark.parametrize(("soft", "bound"), [(1024, 384), (4096, 1920), (16384, 8064),
                                             (200, 0), (10**7, 65536)])
def test_default_bound_is_half_the_soft_limit_minus_a_reserve(
    monkeypatch: pytest.MonkeyPatch, soft: int, bound: int
) -> None:
    monkeypatch.setattr(fdcache.resource, "getrlimit", lambda _: (soft, soft))
    assert default_max_fds() == bound


def test_cgroup_devices_come_from_mountinfo(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "23 29 0:21 / /sys rw,nosuid - sysfs sysfs rw\n"
        "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
        "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
        "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw\n"
        "garbage line\n")
    assert cgroup_devices(str(info)) == {os.makedev(0, 32), os.makedev(0, 38)}
    assert cgroup_devices(str(tmp_path / "absent")) == frozenset()
    # Nothing is kept when the mount table cannot be read.
    (tmp_path / "f").write_text("1\n")
    cache = FdCache(mountinfo=str(tmp_path / "absent"))
    assert cache.read(str(tmp_path / "f")) == "1\n"
    assert cache.open_fds == 0


# --- property: whatever happens to the files, a read answers what cat answers -------------------

def outcome(read: Callable[[str], str | None], path: str) -> str | type[SourceError] | None:
    """What a read gave: the text, None (gone) or SourceError (unreadable)."""
    try:
        return read(path)
    except SourceError:
        return SourceError


def batched(got: bytes | SourceError | None) -> str | type[SourceError] | None:
    """One answer of `read_many` as `outcome` gives it."""
    if isinstance(got, SourceError):
        return SourceError
    return None if got is None else got.decode("utf-8", "replace")


_OPS = st.lists(st.tuples(st.sampled_from(["write", "remake", "replace", "delete", "dir",
                                           "read", "sweep"]),
                          st.integers(0, 1), st.integers(0, 10**6)), min_size=3, max_size=30)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_OPS, kept=st.booleans(), max_fds=st.integers(0, 4), batch=st.booleans())
def test_reads_always_agree_with_cat(tmp_path: Path, ops: list[tuple[str, int, int]],
                                     kept: bool, max_fds: int, batch: bool) -> None:
    """`read` and `read_many` (`batch`: a pass reads each path, one twice, and a None)."""
    tree = Path(tempfile.mkdtemp(dir=tmp_path))
    # On a tree declared cgroupfs only what cgroupfs can do happens: in-place writes, and
    # removal (which the kernel reports as ENODEV on kept descriptors: simulated here).
    cache = FdCache(max_fds=max_fds, mountinfo=trusting(tree) if kept else "/nonexistent")
    real_pread = os.pread

    def pread(fd: int, n: int, offset: int) -> bytes:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(" (deleted)"):
            raise OSError(errno.ENODEV, "removed")  # what kernfs answers after rmdir
        return real_pread(fd, n, offset)

    paths = [str(tree / f"c{i}") for i in range(2)]
    with pytest.MonkeyPatch.context() as mp:
        if kept:
            mp.setattr(fdcache.os, "pread", pread)
        for n, (op, i, value) in enumerate(ops):
            p = paths[i]
            if op == "write":
                if os.path.isdir(p):
                    os.rmdir(p)
                Path(p).write_text(f"usage_usec {value}\n" * (value % 3))
            elif op == "replace" and not kept:
                Path(p + ".new").write_text(f"new {value}\n")
                if os.path.isdir(p):
                    os.rmdir(p)
                os.replace(p + ".new", p)
            elif op in ("delete", "remake"):  # remake: a new cgroup at the same path
                if os.path.isdir(p):
                    os.rmdir(p)
                elif os.path.exists(p):
                    os.unlink(p)
                if op == "remake":
                    Path(p).write_text(f"usage_usec {value}\n")
            elif op == "dir" and not kept and not os.path.exists(p):
                os.mkdir(p)
            elif op == "sweep":
                cache.sweep()
            if op == "read" or n == len(ops) - 1:  # a pass: files may change many times between
                if batch:
                    got = cache.read_many([*paths, None, paths[0]])
                    want = [outcome(cat, q) for q in paths]
                    assert [batched(g) for g in got] == [*want, None, want[0]], n
                else:
                    for q in paths:
                        assert outcome(cache.read, q) == outcome(cat, q), (n, q)
            assert cache.open_fds <= max_fds
    cache.close()
    assert sum(fds_on(p) for p in paths) == 0
    shutil.rmtree(tree)


# --- real cgroups: what the kernel guarantees -----------------------------------------------------


def usage_usec(text: str | None) -> int | None:
    return None if text is None else kv_value(text, "usage_usec")


def test_real_cgroup_files_are_kept_and_read_fresh(real_cgroups: RealCgroups) -> None:
    cg = real_cgroups.mkdir("fresh")
    cache = FdCache()
    stat = f"{cg}/cpu.stat"
    assert usage_usec(cache.read(stat)) == 0
    real_cgroups.burn_cpu(cg)
    used = usage_usec(cache.read(stat))
    assert used is not None
    assert used >= 40_000  # 50 ms of CPU, read through the kept descriptor
    assert cache.read(stat) == cat(stat)
    assert cache.read(f"{cg}/cpu.pressure") == cat(f"{cg}/cpu.pressure")
    assert (cache.stats().opened, cache.open_fds, fds_on(stat)) == (2, 2, 1)
    cache.close()
    assert fds_on(stat) == 0


def test_real_cgroup_seq_file_longer_than_a_chunk(real_cgroups: RealCgroups) -> None:
    cg = real_cgroups.mkdir("chunks")
    real_cgroups.burn_cpu(cg, 0.01)
    cache = FdCache(chunk_bytes=16)
    for _ in range(3):
        assert cache.read(f"{cg}/cpu.stat") == cat(f"{cg}/cpu.stat")
    assert cache.open_fds == 1
    cache.close()


def test_a_kept_descriptor_of_a_removed_cgroup_never_answers(real_cgroups: RealCgroups) -> None:
    cg = real_cgroups.mkdir("vm")
    real_cgroups.burn_cpu(cg)
    cache = FdCache()
    stat = f"{cg}/cpu.stat"
    old = usage_usec(cache.read(stat))
    assert old is not None
    assert old > 0
    fd = next(int(f) for f in os.listdir("/proc/self/fd")
              if os.readlink(f"/proc/self/fd/{f}") == stat)
    os.rmdir(cg)
    with pytest.raises(OSError) as info:  # what the kernel says on the old descriptor
        os.pread(fd, 100, 0)
    assert info.value.errno == errno.ENODEV
    assert cache.read(stat) is None  # gone, exactly like cat
    assert cache.open_fds == 0
    assert cache.read(stat) is None
    # The VM starts again and its new cgroup lands at the same path: the new counters.
    os.mkdir(cg)
    assert usage_usec(cache.read(stat)) == 0
    assert (cache.stats().stale, cache.open_fds) == (1, 1)
    cache.close()


def test_a_cgroup_made_again_at_the_same_path_reads_its_own_counters(
    real_cgroups: RealCgroups,
) -> None:
    cg = real_cgroups.mkdir("vm")
    real_cgroups.burn_cpu(cg)
    cache = FdCache()
    stat = f"{cg}/cpu.stat"
    assert (usage_usec(cache.read(stat)) or 0) > 0
    os.rmdir(cg)
    os.mkdir(cg)  # between two passes: rmdir and mkdir, the old descriptor still cached
    assert usage_usec(cache.read(stat)) == 0
    s = cache.stats()
    assert (s.opened, s.stale, s.hits) == (2, 1, 0)
    assert fds_on(stat) == 1
    cache.close()


@pytest.mark.parametrize("name", ["memory.stat", "memory.usage_in_bytes"])
def test_v1_memory_files_of_a_remade_cgroup(real_cgroups: RealCgroups, name: str) -> None:
    cg = real_cgroups.mkdir("vm-mem", v1_memory=True)
    path = f"{cg}/{name}"
    cache = FdCache()
    assert cache.read(path) == cat(path)
    assert cache.open_fds == 1
    os.rmdir(cg)
    assert cache.read(path) is None
    os.mkdir(cg)
    assert cache.read(path) == cat(path)
    assert (cache.stats().stale, cache.open_fds) == (1, 1)
    cache.close()


def test_mountinfo_finds_this_hosts_cgroupfs(real_cgroups: RealCgroups) -> None:
    assert os.stat(real_cgroups.v2_parent).st_dev in cgroup_devices()

