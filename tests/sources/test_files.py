"""The file helper: gone files read as None, broken ones raise SourceError naming the path."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hostagent.errors import SourceError
from hostagent.sources.files import (
    HostRoot,
    cat,
    cat_bytes,
    cgroup_mounts,
    kv_bytes,
    kv_value,
    parse_kv,
    parse_mountinfo,
)


def test_paths_are_joined_under_the_root(tmp_path: Path) -> None:
    root = HostRoot(tmp_path)
    assert root.abspath("/proc/1/stat") == f"{tmp_path}/proc/1/stat"
    assert root.abspath("proc/1/stat") == f"{tmp_path}/proc/1/stat"
    assert HostRoot("/").abspath("/proc/stat") == "/proc/stat"
    assert HostRoot().read_text("/proc/self/stat") is not None


def test_read_text_int_kv(tmp_path: Path) -> None:
    (tmp_path / "n").write_text("42\n")
    (tmp_path / "kv").write_text("usage_usec 10\nbroken line here\nnovalue\nuser_usec 7\n")
    root = HostRoot(tmp_path)
    assert root.read_text("n") == "42\n"
    assert root.read_int("/n") == 42
    assert root.read_kv("kv") == {"usage_usec": 10, "user_usec": 7}


def test_gone_reads_as_none_not_as_zero(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("1")
    root = HostRoot(tmp_path)
    assert root.read_text("absent") is None
    assert root.read_int("absent") is None
    assert root.read_kv("absent") is None  # not {}: absent is not "no keys"
    assert root.read_text("file/below") is None  # ENOTDIR: a half-removed tree
    assert not root.exists("absent")
    assert root.exists("file")


def test_vanished_process_reads_as_none() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert HostRoot().read_text(f"/proc/{proc.pid}/stat") is None
    assert HostRoot().read_int(f"/proc/{proc.pid}/oom_score") is None


def test_malformed_int_is_an_error_naming_the_path(tmp_path: Path) -> None:
    (tmp_path / "n").write_text("twelve\n")
    with pytest.raises(SourceError, match=r"/n: expected an integer, found 'twelve'") as info:
        HostRoot(tmp_path).read_int("n")
    assert isinstance(info.value.__cause__, ValueError)


def test_unreadable_file_is_an_error_with_its_cause(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    with pytest.raises(SourceError, match=r"cannot read .*/dir") as info:
        HostRoot(tmp_path).read_text("dir")  # EISDIR on read
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.__cause__.errno == errno.EISDIR


def test_eio_is_an_error_not_gone() -> None:
    # Reading the unmapped page 0 of a process's memory fails with EIO: a real I/O error.
    with pytest.raises(SourceError, match="/proc/self/mem") as info:
        cat("/proc/self/mem")
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.__cause__.errno == errno.EIO


def test_permission_denied_is_an_error(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("1")
    secret.chmod(0o600)
    tmp_path.chmod(0o755)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop root (root reads everything), report what the read raised
        result = "no error"
        try:
            os.setgid(65534)
            os.setuid(65534)
            HostRoot(tmp_path).read_text("secret")
        except SourceError as err:
            result = f"{type(err.__cause__).__name__} {err}"
        except BaseException as err:  # anything else fails the assertion below
            result = repr(err)
        os.write(write_fd, result.encode())
        os._exit(0)
    os.close(write_fd)
    os.waitpid(pid, 0)
    with os.fdopen(read_fd) as pipe:
        result = pipe.read()
    assert result.startswith("PermissionError cannot open "), result
    assert str(secret) in result


def test_large_files_are_read_whole(tmp_path: Path) -> None:
    text = "".join(f"key{i} {i}\n" for i in range(5000))  # ~50 KiB, several read chunks
    (tmp_path / "big").write_text(text)
    assert cat(str(tmp_path / "big")) == text
    assert HostRoot(tmp_path).read_kv("big") == {f"key{i}": i for i in range(5000)}


def test_kv_value_finds_whole_keys_only() -> None:
    text = "total_inactive_file 5\ninactive_file 3\nhierarchical_memory_limit 9\nbad x\n"
    assert kv_value(text, "inactive_file") == 3
    assert kv_value(text, "total_inactive_file") == 5
    assert kv_value(text, "hierarchical_memory_limit") == 9
    assert kv_value(text, "file") is None
    assert kv_value(text, "bad") is None
    assert kv_value("usage_usec 12", "usage_usec") == 12  # no trailing newline
    assert kv_value("", "usage_usec") is None


def test_kv_bytes_agrees_with_kv_value() -> None:
    texts = ["total_inactive_file 5\ninactive_file 3\nhierarchical_memory_limit 9\nbad x\n",
             "usage_usec 12", "", "usage_usec\n", "x 1\nusage_usec  7 \n", "usage_usec -3\n"]
    for text in texts:
        for key in ("inactive_file", "total_inactive_file", "hierarchical_memory_limit", "file",
                    "bad", "usage_usec", "x"):
            assert kv_bytes(text.encode(), f"{key} ".encode()) == kv_value(text, key), (text, key)


def test_cat_bytes_is_cat_undecoded(tmp_path: Path) -> None:
    text = "".join(f"key{i} {i}\n" for i in range(5000))
    (tmp_path / "big").write_text(text)
    assert cat_bytes(str(tmp_path / "big")) == text.encode()
    assert cat_bytes(str(tmp_path / "absent")) is None


def test_parse_kv_skips_malformed_lines() -> None:
    assert parse_kv("a 1\n\nb\nc 2 3\nd -4\n") == {"a": 1, "d": -4}


MOUNTINFO = """\
24 1 259:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw,errors=remount-ro
35 24 0:30 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
36 35 0:31 / /sys/fs/cgroup/unified rw,nosuid,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
40 35 0:35 / /sys/fs/cgroup/memory rw,nosuid,relatime shared:15 - cgroup cgroup rw,memory
41 35 0:36 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:16 - cgroup cgroup rw,cpu,cpuacct
garbage line without separator
"""


def test_mountinfo_parsing_and_cgroup_mounts() -> None:
    mounts = parse_mountinfo(MOUNTINFO)
    assert [m.fstype for m in mounts] == ["ext4", "tmpfs", "cgroup2", "cgroup", "cgroup"]
    assert mounts[2].dev == os.makedev(0, 31)
    assert mounts[3].options == frozenset({"rw", "memory"})
    assert cgroup_mounts(MOUNTINFO) == {"cgroup2": "/sys/fs/cgroup/unified",
                                        "memory": "/sys/fs/cgroup/memory"}
