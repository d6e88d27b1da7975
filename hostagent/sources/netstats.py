"""Tap byte counters for light samples: ONE RTM_GETSTATS dump, 64-bit link stats by ifindex.

The pass's RTM_GETLINK dump (sources/net.py) carries ~40 attributes per link (name, MAC, kind,
...), and decoding them costs ~11 µs per link; a light sample only needs the byte counters of
links the pass already matched to NICs, by ifindex. RTM_GETSTATS with the
IFLA_STATS_LINK_64 filter answers exactly that: per link an `if_stats_msg` and one
`rtnl_link_stats64`, nothing else (kernel >= 4.7). Keying by ifindex is also the safe key:
a tap deleted and re-created gets a new ifindex, so it is reported missing, never compared
with the old tap's counters. Blocking: call from a worker thread.
"""

from __future__ import annotations

import os
import socket
import struct

from hostagent.errors import SourceError, SourceTimeout
from hostagent.sources.net import NetlinkSocket

_RTM_NEWSTATS, _RTM_GETSTATS = 92, 94
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_IFLA_STATS_LINK_64 = 1
_FILTER_LINK_64 = 1 << (_IFLA_STATS_LINK_64 - 1)

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IF_STATS_MSG = struct.Struct("=BBHII")  # family, pad1, pad2, ifindex, filter_mask
# Header, if_stats_msg (ifindex at 20, filter_mask), nlattr (type at 30), stats64 from 32.
_STATS_MSG = struct.Struct("=16x4xI4x2xH16xQQ")
_ERRNO = struct.Struct("=i")
_RECV_BYTES = 65536


class StatsRefused(SourceError):
    """The kernel answered RTM_GETSTATS with an error (e.g. EOPNOTSUPP before Linux 4.7)."""


_REQUEST = _NLMSGHDR.pack(_NLMSGHDR.size + _IF_STATS_MSG.size, _RTM_GETSTATS,
                          _NLM_F_REQUEST | _NLM_F_DUMP, 0, 0) + _IF_STATS_MSG.pack(
    socket.AF_UNSPEC, 0, 0, 0, _FILTER_LINK_64)
_SEQ = struct.Struct("=I")  # nlmsghdr.seq at offset 8


def dump_stats64(sock: socket.socket, seq: int,
                 buf: bytearray | None = None) -> dict[int, tuple[int, int]]:
    """(rx_bytes, tx_bytes) of every link by ifindex, from one RTM_GETSTATS dump on `sock`.

    `buf`: a receive buffer of at least _RECV_BYTES to reuse across dumps (its owner must not
    share it between threads); without it one is made for this dump.
    """
    req = bytearray(_REQUEST)
    _SEQ.pack_into(req, 8, seq)
    sock.send(req)
    out: dict[int, tuple[int, int]] = {}
    unpack_hdr = _NLMSGHDR.unpack_from
    unpack_stats = _STATS_MSG.unpack_from
    need = _STATS_MSG.size
    data = bytearray(_RECV_BYTES) if buf is None else buf
    while True:
        end = sock.recv_into(data, _RECV_BYTES)
        if not end:
            raise SourceError("netlink stats dump: socket closed")
        off = 0
        while off + 16 <= end:
            mlen, mtype, _, mseq, _ = unpack_hdr(data, off)
            if mlen < 16 or off + mlen > end:
                raise SourceError("netlink stats dump: malformed message header")
            if mseq == seq:
                if mtype == _RTM_NEWSTATS and mlen >= need:
                    ifindex, atype, rx, tx = unpack_stats(data, off)
                    if atype == _IFLA_STATS_LINK_64:
                        out[ifindex] = (rx, tx)
                elif mtype == _NLMSG_DONE:
                    return out
                elif mtype == _NLMSG_ERROR:
                    code = -_ERRNO.unpack_from(data, off + 16)[0]
                    raise StatsRefused(f"netlink stats dump refused: {os.strerror(code)}")
            off += (mlen + 3) & ~3


class LinkStats64Reader(NetlinkSocket):
    """`read()`: (rx_bytes, tx_bytes) by ifindex, one dump per call on a kept-open socket
    into a kept receive buffer (the lock makes it one dump at a time)."""

    _buf: bytearray | None = None

    def read(self) -> dict[int, tuple[int, int]]:
        """Counters by ifindex; SourceTimeout past `timeout_s`, SourceError on failure."""
        if not self._lock.acquire(blocking=False):
            raise SourceError("a previous stats dump is still running")
        try:
            for attempt in (1, 2):
                try:
                    if self._buf is None:
                        self._buf = bytearray(_RECV_BYTES)
                    return dump_stats64(self._socket(), self._next_seq(), self._buf)
                except TimeoutError as err:
                    self._drop_socket()
                    raise SourceTimeout(f"stats dump: no answer in {self._timeout_s} s") from err
                except (OSError, SourceError) as err:
                    self._drop_socket()  # a fresh socket fixes one left mid-dump; retry once
                    if attempt == 2:
                        raise SourceError(f"stats dump failed: {err}") from err
            raise AssertionError("unreachable")  # pragma: no cover
        finally:
            self._lock.release()
