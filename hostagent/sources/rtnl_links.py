"""The RTM_GETLINK link dump on a NETLINK_ROUTE socket, decoded by hand (sources/net.py's
LinkStatsReader, sources/stop_watch.py's RTM_NEWLINK/RTM_DELLINK notifications).

Only what hostagent needs is decoded: ifindex, IFLA_IFNAME, IFLA_ADDRESS, IFLA_STATS64's rx/tx
bytes and IFLA_LINKINFO's kind; ~10 µs a link against ~16x that for pyroute2's full decoding
(`IPRoute().get_links()`), which the tests keep as the reference decoder (docs/sources.md).
pyroute2 opens the socket inside a named network namespace. Blocking: call from a worker thread.
"""

from __future__ import annotations

import os
import socket
import struct

from hostagent.errors import SourceError
from hostagent.source_model import LinkStats

_NETLINK_ROUTE = 0
_RTM_NEWLINK, _RTM_GETLINK = 16, 18
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_NLM_F_REQUEST, _NLM_F_DUMP, _NLM_F_DUMP_INTR = 0x1, 0x300, 0x10
_IFLA_ADDRESS, _IFLA_IFNAME, _IFLA_LINKINFO, _IFLA_STATS64 = 1, 3, 18, 23
_IFLA_INFO_KIND = 1
_NLA_TYPE_MASK = 0x3FFF  # strips NLA_F_NESTED / NLA_F_NET_BYTEORDER

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
_NLATTR = struct.Struct("=HH")  # len, type
_RX_TX_BYTES = struct.Struct("=16xQQ")  # rtnl_link_stats64: rx_packets, tx_packets, rx/tx_bytes
_ERRNO = struct.Struct("=i")
_HDR_BYTES = _NLMSGHDR.size + _IFINFOMSG.size
RECV_BYTES = 65536  # the kernel fills at most 32 KiB per dump message batch


def _align(n: int) -> int:
    return (n + 3) & ~3


def parse_link(data: bytes, off: int, end: int) -> LinkStats | None:
    """One RTM_NEWLINK (or RTM_DELLINK: the same layout) message, reading only the attributes
    we use; SourceError on a malformed attribute, None without a name."""
    _, _, ifindex, _, _ = _IFINFOMSG.unpack_from(data, off + _NLMSGHDR.size)
    name: str | None = None
    mac: str | None = None
    rx: int | None = None
    tx: int | None = None
    kind: str | None = None
    at = off + _HDR_BYTES
    while at + 4 <= end:
        alen, atype = _NLATTR.unpack_from(data, at)
        if alen < 4 or at + alen > end:
            raise SourceError(f"malformed netlink attribute in the link dump (ifindex {ifindex})")
        atype &= _NLA_TYPE_MASK
        if atype == _IFLA_IFNAME:
            name = data[at + 4 : at + alen].rstrip(b"\0").decode("utf-8", "replace")
        elif atype == _IFLA_ADDRESS:
            mac = data[at + 4 : at + alen].hex(":") or None
        elif atype == _IFLA_STATS64 and alen >= 4 + _RX_TX_BYTES.size:
            rx, tx = _RX_TX_BYTES.unpack_from(data, at + 4)
        elif atype == _IFLA_LINKINFO:
            kind = _info_kind(data, at + 4, at + alen)
        at += _align(alen)
    if name is None:
        return None
    return LinkStats(ifindex=ifindex, ifname=name, mac=mac, rx_bytes=rx, tx_bytes=tx, kind=kind)


def _info_kind(data: bytes, at: int, end: int) -> str | None:
    while at + 4 <= end:
        alen, atype = _NLATTR.unpack_from(data, at)
        if alen < 4:
            return None
        if atype & _NLA_TYPE_MASK == _IFLA_INFO_KIND:
            return data[at + 4 : at + alen].rstrip(b"\0").decode("ascii", "replace")
        at += _align(alen)
    return None


def dump_links(sock: socket.socket, seq: int) -> tuple[dict[str, LinkStats], bool]:
    """One RTM_GETLINK dump on `sock`: links by name, and whether the kernel flagged it
    interrupted (links changed meanwhile: every counter read is still a real value)."""
    ifinfo = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
    sock.send(_NLMSGHDR.pack(_HDR_BYTES, _RTM_GETLINK, _NLM_F_REQUEST | _NLM_F_DUMP, seq, 0)
              + ifinfo)
    links: dict[str, LinkStats] = {}
    interrupted = False
    while True:
        data, _, msg_flags, _ = sock.recvmsg(RECV_BYTES)
        if msg_flags & socket.MSG_TRUNC:
            raise SourceError("netlink link dump: message larger than the receive buffer")
        if not data:
            raise SourceError("netlink link dump: socket closed")
        off = 0
        while off + _NLMSGHDR.size <= len(data):
            mlen, mtype, mflags, mseq, _ = _NLMSGHDR.unpack_from(data, off)
            if mlen < _NLMSGHDR.size or off + mlen > len(data):
                raise SourceError("netlink link dump: malformed message header")
            if mseq == seq:  # anything else is a late answer to an earlier request
                interrupted |= bool(mflags & _NLM_F_DUMP_INTR)
                if mtype == _NLMSG_DONE:
                    return links, interrupted
                if mtype == _NLMSG_ERROR:
                    code = -_ERRNO.unpack_from(data, off + _NLMSGHDR.size)[0]
                    raise SourceError(f"netlink link dump refused: {os.strerror(code)}")
                if mtype == _RTM_NEWLINK and mlen >= _HDR_BYTES:
                    link = parse_link(data, off, off + mlen)
                    if link is not None:
                        links[link.ifname] = link
            off += _align(mlen)


def route_socket(netns: str | None = None) -> socket.socket:
    """A new, unbound NETLINK_ROUTE socket, in network namespace `netns` if named."""
    if netns is None:
        return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                             _NETLINK_ROUTE)
    # pyroute2 is heavy to import and only needed to enter a named netns.
    from pyroute2 import netns as pr_netns

    sock: socket.socket = pr_netns.create_socket(netns, family=socket.AF_NETLINK,
                                                 socket_type=socket.SOCK_RAW,
                                                 proto=_NETLINK_ROUTE, flags=0)
    return sock
