"""Files an operator names: reading a small one (keys, secrets, JWKS) without ever blocking on
it, and saying which link on a path's way loops.

`Path.read_bytes()` on a FIFO waits for a writer forever: named as a key file, it hung
`check-config` and the daemon's start. Here the file is opened non-blocking and refused unless
it is a regular file, and read up to a bound, so that a device or a huge file put at the path is
refused instead of read whole. Errors are OSError (with a `strerror` to quote), as from
`open()`, so callers keep their one `except OSError` and its message.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path


class NotRegularFile(OSError):
    """The path names a directory (errno EISDIR), FIFO, socket or device (EINVAL)."""


class FileTooLarge(OSError):
    """The file is larger than the reader's bound."""


def read_regular(path: str, max_bytes: int) -> bytes:
    """The bytes of the regular file at `path` (symlinks followed), at most `max_bytes`."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):  # what reading it would say
            raise NotRegularFile(errno.EISDIR, os.strerror(errno.EISDIR), path)
        if not stat.S_ISREG(mode):
            raise NotRegularFile(errno.EINVAL, "not a regular file (a FIFO, socket or device)",
                                 path)
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(max_bytes + 1)
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise FileTooLarge(errno.EFBIG, f"larger than {max_bytes} bytes", path)
    return data


def loop_link(path: Path) -> str:
    """Which link on `path`'s way loops (the first whose lookup fails with ELOOP), for a
    message: `/a is a symbolic link loop (-> b): Too many levels of symbolic links`."""
    for at in (*reversed(path.parents), path):
        try:
            os.stat(at)
        except OSError as err:
            if err.errno != errno.ELOOP:
                break
            try:
                target = f" (-> {os.readlink(at)})"
            except OSError:
                target = ""
            return f"{at} is a symbolic link loop{target}: {err.strerror}"
    return f"a symbolic link loop on the way: {os.strerror(errno.ELOOP)}"
