"""Host-side byte counters of network links, matched to guest NICs by tap name, keyed by NIC.

`LinkStatsReader` reads on a kept-open NETLINK_ROUTE socket: an RTM_GETLINK dump decoding only
what we need (sources/rtnl_links.py: ~10 µs a link, ~16x less than pyroute2's full decoding,
docs/sources.md), and between those only the counters: ONE RTM_GETSTATS dump
(sources/netstats.py, ~0.4 µs a link) laid over the last link dump's names (see
`LinkStatsReader`). pyroute2 opens the socket inside a named network namespace and is, in the
tests, the reference decoder. `SysfsLinkReader` reads the
same counters from /sys/class/net through a `HostRoot` (fixture trees, or a host without
netlink access). Both are blocking: call them from a worker thread.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from hostagent.errors import SourceError, SourceTimeout
from hostagent.model import Nic, NicCounters
from hostagent.source_model import LinkStats
from hostagent.sources.files import HostRoot
from hostagent.sources.rtnl_links import RECV_BYTES, dump_links, route_socket

if TYPE_CHECKING:
    from hostagent.config.load import Config

log = logging.getLogger(__name__)

_MAX_INTERRUPTED_RETRIES = 2
# Seconds between two full link dumps when no link came or went (renames, MAC changes).
NAMES_EVERY_S = 60.0


class NetlinkSocket:
    """A NETLINK_ROUTE socket kept open across dumps (in `netns` if named), guarded by a lock:
    one dump at a time; a second caller (an abandoned, timed-out worker thread) fails fast."""

    def __init__(self, netns: str | None = None, timeout_s: float = 5.0) -> None:
        self._netns = netns
        self._timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self._seq = 0
        self._lock = threading.Lock()

    def _next_seq(self) -> int:
        self._seq = self._seq % 0x7FFFFFFF + 1
        return self._seq

    def _socket(self) -> socket.socket:
        if self._sock is None:
            sock = route_socket(self._netns)
            sock.settimeout(self._timeout_s)
            sock.bind((0, 0))
            self._sock = sock
        return self._sock

    def _drop_socket(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def close(self) -> None:
        """Close the netlink socket (a later read() opens a new one)."""
        with self._lock:
            self._drop_socket()


class LinkStatsReader(NetlinkSocket):
    """Host link counters by name, on a socket kept open across calls.

    Names, MACs and kinds change only when links do: a full RTM_GETLINK dump is made on the
    first read, every `names_every_s`, and whenever the ifindexes of an RTM_GETSTATS dump are
    not exactly those of the last link dump (a tap added, deleted, or deleted and made again
    under the same name: a new ifindex). Between, a read is one RTM_GETSTATS dump (only the
    64-bit counters, by ifindex: the same `rtnl_link_stats64` as IFLA_STATS64) over the last
    names. What a kept name map can miss is a rename or a MAC change of a link that stays:
    its counters are still that link's, under the old name, until the next full dump.
    A kernel without RTM_GETSTATS (< 4.7) gets a full dump every read.

    Not re-entrant: a second call while one is still running (an abandoned, timed-out worker
    thread) fails fast with SourceError instead of interleaving on the socket.
    """

    def __init__(self, netns: str | None = None, timeout_s: float = 5.0, *,
                 names_every_s: float = NAMES_EVERY_S,
                 monotonic_s: Callable[[], float] = time.monotonic) -> None:
        super().__init__(netns, timeout_s)
        self._names_every_s = names_every_s
        self._now_s = monotonic_s
        self._names: dict[str, LinkStats] = {}  # the last link dump
        self._ifindexes: frozenset[int] | None = None  # its ifindexes; None: dump again
        self._names_at = 0.0
        self._stats_ok = True  # False once the kernel refused RTM_GETSTATS
        self._buf = bytearray(RECV_BYTES)
        self.link_dumps = 0  # full RTM_GETLINK dumps made (tests count them)

    def read(self) -> Mapping[str, LinkStats]:
        """All links by name; SourceTimeout past `timeout_s`, SourceError when netlink fails."""
        if not self._lock.acquire(blocking=False):
            raise SourceError("a previous link dump is still running")
        try:
            if (self._ifindexes is not None and self._stats_ok
                    and self._now_s() - self._names_at < self._names_every_s):
                stats = self._stats_locked()
                if stats is not None and stats.keys() == self._ifindexes:
                    return _Links(self._names, stats)
            now_s = self._now_s()
            links = self._read_locked()
            self._names, self._names_at = links, now_s
            self._ifindexes = frozenset(link.ifindex for link in links.values())
            self.link_dumps += 1
            return links
        finally:
            self._lock.release()

    def _stats_locked(self) -> dict[int, tuple[int, int]] | None:
        """One RTM_GETSTATS dump; None when it failed (the full dump then judges netlink)."""
        from hostagent.sources.netstats import StatsRefused, dump_stats64  # it imports us

        try:
            return dump_stats64(self._socket(), self._next_seq(), self._buf)
        except TimeoutError as err:  # netlink hangs: no second wait on a full dump
            self._drop_socket()
            raise SourceTimeout(f"stats dump: no answer within {self._timeout_s} s") from err
        except StatsRefused:
            self._stats_ok = False  # an old kernel: stop asking
        except (OSError, SourceError):
            pass
        self._drop_socket()  # a fresh socket fixes one left mid-dump
        return None

    def _read_locked(self) -> dict[str, LinkStats]:
        failures = interruptions = 0
        while True:
            try:
                links, interrupted = dump_links(self._socket(), self._next_seq())
            except TimeoutError as err:
                self._drop_socket()
                raise SourceTimeout(f"link dump: no answer within {self._timeout_s} s") from err
            except (OSError, SourceError) as err:
                # A fresh socket fixes a socket left mid-dump or closed under us; retry once.
                self._drop_socket()
                failures += 1
                if failures > 1:
                    raise SourceError(f"link dump failed: {err}") from err
                log.info("link dump failed, reopening", extra={"error": str(err)})
                continue
            if interrupted and interruptions < _MAX_INTERRUPTED_RETRIES:
                interruptions += 1
                continue
            return links


class _Links(Mapping[str, LinkStats]):
    """The last link dump's names with this read's counters; a LinkStats made when asked."""

    __slots__ = ("_names", "_stats")

    def __init__(self, names: dict[str, LinkStats], stats: dict[int, tuple[int, int]]) -> None:
        self._names = names
        self._stats = stats

    def __getitem__(self, name: str) -> LinkStats:
        link = self._names[name]
        rx, tx = self._stats[link.ifindex]  # the same ifindexes: checked before
        return LinkStats(ifindex=link.ifindex, ifname=link.ifname, mac=link.mac, rx_bytes=rx,
                         tx_bytes=tx, kind=link.kind)

    def parts(self, name: str) -> tuple[LinkStats | None, int | None, int | None]:
        """The link dump's entry for `name` (its counters stale) and this read's counters."""
        link = self._names.get(name)
        if link is None:
            return None, None, None
        rx, tx = self._stats[link.ifindex]
        return link, rx, tx

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def get(self, name: str, default: Any = None) -> Any:  # nic_counters: one per NIC
        """The link called `name`, or `default`."""
        return self[name] if name in self._names else default

class SysfsLinkReader:
    """The same counters from <root>/sys/class/net/<if>/{ifindex,address,statistics/*_bytes}."""

    def __init__(self, root: HostRoot) -> None:
        self._root = root

    def read(self, names: Iterable[str] | None = None) -> dict[str, LinkStats]:
        """Links by name (only `names` when given); a link that vanishes mid-read is left out."""
        base = "/sys/class/net"
        if names is None:
            try:
                names = sorted(os.listdir(self._root.abspath(base)))
            except FileNotFoundError:
                return {}
            except OSError as err:
                raise SourceError(f"cannot list {self._root.abspath(base)}: {err}") from err
        out: dict[str, LinkStats] = {}
        for name in names:
            if "/" in name or name in (".", ".."):
                continue
            try:
                link = self._link(name)
            except SourceError as err:
                # One unreadable link costs only that link (its NIC falls back to libvirt's
                # counters), never the whole dump.
                log.debug("link unreadable", extra={"link": name, "error": str(err)})
                continue
            if link is not None:
                out[name] = link
        return out

    def _link(self, name: str) -> LinkStats | None:
        d = f"/sys/class/net/{name}"
        ifindex = self._root.read_int(f"{d}/ifindex")
        if ifindex is None:
            return None
        address = self._root.read_text(f"{d}/address")
        return LinkStats(
            ifindex=ifindex,
            ifname=name,
            mac=(address.strip() or None) if address is not None else None,
            rx_bytes=self._root.read_int(f"{d}/statistics/rx_bytes"),
            tx_bytes=self._root.read_int(f"{d}/statistics/tx_bytes"),
            source="sysfs",
        )


# --- matching NICs to links (pure) ---------------------------------------------------------------

_NO_HOST_NETDEV = {
    "hostdev": "hostdev NIC (PCI passthrough / SR-IOV VF): its traffic bypasses the host "
               "kernel, no host-side counter",
    "vhostuser": "vhost-user NIC: packets are switched in user space (e.g. OVS-DPDK), no host "
                 "kernel netdev to count",
    "vdpa": "vDPA NIC: the datapath is in hardware, no host tap",
    "user": "user-mode networking (SLIRP/passt): no host tap",
}


def nic_counters(
    nics: Sequence[Nic], links: Mapping[str, LinkStats]
) -> tuple[tuple[NicCounters, ...], dict[str, str]]:
    """Guest-oriented counters of each NIC from its own tap (its target dev), and why the
    others are missing (`net:<key>`, `Nic.key`). NICs may share a MAC: each is matched by its
    target dev, never by its MAC, and a tap counts for one NIC only."""
    counters: list[NicCounters] = []
    missing: dict[str, str] = {}
    # Once per NIC and pass: the `missing` key is made only for a NIC that has no counters.
    parts = links.parts if isinstance(links, _Links) else None  # no LinkStats made: ~1 µs
    taps: set[str] | None = set() if len(nics) > 1 else None  # one NIC: no tap to share
    for nic in nics:
        reason = _NO_HOST_NETDEV.get(nic.kind)
        if reason is not None:
            missing[f"net:{nic.key}"] = reason
            continue
        target = nic.target
        if not target:
            missing[f"net:{nic.key}"] = f"{nic.kind} NIC without a target dev: no host tap to count"
            continue
        if taps is not None:
            if target in taps:
                missing[f"net:{nic.key}"] = (f"tap {target} is counted for another NIC of the "
                                             "domain (two NICs name one target dev)")
                continue
            taps.add(target)
        if parts is not None:
            link, rx, tx = parts(target)
        else:
            link = links.get(target)
            rx, tx = (None, None) if link is None else (link.rx_bytes, link.tx_bytes)
        if link is None:
            missing[f"net:{nic.key}"] = (f"tap {target} not found on the host "
                                         "(unplugged or renamed?)")
            continue
        if rx is None or tx is None:
            missing[f"net:{nic.key}"] = f"{target} has no 64-bit byte counters"
            continue
        # A tap sees the guest's traffic mirrored (host rx = guest tx); a macvtap shares the
        # guest's view (libvirt's virDomainNetTypeSharesHostView), so it is not swapped.
        if nic.kind == "direct" or link.kind == "macvtap":
            guest_rx, guest_tx = rx, tx
        else:
            guest_rx, guest_tx = tx, rx
        # Positional, in NicCounters' field order (keyword binding costs ~0.2 µs a NIC).
        counters.append(NicCounters(nic.mac, link.ifname, link.ifindex, guest_rx, guest_tx,
                                    link.source, nic.key))
    return tuple(counters), missing


def link_reader_for(cfg: Config) -> LinkStatsReader | SysfsLinkReader:
    """Netlink on a real host; /sys/class/net under the root when it points at a recorded tree."""
    if cfg.paths.root in ("/", ""):
        return LinkStatsReader(timeout_s=cfg.libvirt.call_timeout_s)
    return SysfsLinkReader(HostRoot(cfg.paths.root))
