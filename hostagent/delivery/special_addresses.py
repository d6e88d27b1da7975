"""The explicit table of addresses a webhook may never reach (IANA special-purpose registries).

A webhook URL is allowed to reach global unicast only. Rather than trusting `ipaddress`'s
`is_global` (which lets 192.0.0.0/24 and fec0::/10 through), every range is listed here with
its registry name, and tested one by one (tests/delivery/test_ssrf.py).

Sources: IANA IPv4 Special-Purpose Address Registry, IANA IPv6 Special-Purpose Address
Registry, the multicast registries, and the IPv6 address space registry (only 2000::/3 is
global unicast). Entries IANA marks globally reachable but that no webhook has a reason to use
(AS112, AMT, ORCHIDv2, the 6to4 relay anycast) are refused as well.

IPv6 ranges that carry an IPv4 address (`EMBEDDING`: IPv4-mapped, NAT64 well-known prefix,
6to4) are judged by the IPv4 address inside; IPv4-compatible (::/96, deprecated) and Teredo
(2001::/32, inside 2001::/23) are refused outright.
"""

from __future__ import annotations

import ipaddress
from typing import Final

Net = ipaddress.IPv4Network | ipaddress.IPv6Network


def _t(*rows: tuple[str, str]) -> tuple[tuple[Net, str], ...]:
    return tuple((ipaddress.ip_network(cidr), name) for cidr, name in rows)


IPV4_REFUSED: Final = _t(
    ("0.0.0.0/8", "'this network' (RFC 791)"),
    ("10.0.0.0/8", "private-use (RFC 1918)"),
    ("100.64.0.0/10", "shared address space / CGNAT (RFC 6598)"),
    ("127.0.0.0/8", "loopback (RFC 1122)"),
    ("169.254.0.0/16", "link-local, cloud metadata (RFC 3927)"),
    ("172.16.0.0/12", "private-use (RFC 1918)"),
    ("192.0.0.0/24", "IETF protocol assignments (RFC 6890)"),
    ("192.0.2.0/24", "documentation TEST-NET-1 (RFC 5737)"),
    ("192.31.196.0/24", "AS112-v4 (RFC 7535)"),
    ("192.52.193.0/24", "AMT (RFC 7450)"),
    ("192.88.99.0/24", "deprecated 6to4 relay anycast (RFC 7526)"),
    ("192.168.0.0/16", "private-use (RFC 1918)"),
    ("192.175.48.0/24", "direct delegation AS112 (RFC 7534)"),
    ("198.18.0.0/15", "benchmarking (RFC 2544)"),
    ("198.51.100.0/24", "documentation TEST-NET-2 (RFC 5737)"),
    ("203.0.113.0/24", "documentation TEST-NET-3 (RFC 5737)"),
    ("224.0.0.0/4", "multicast (RFC 5771)"),
    ("240.0.0.0/4", "reserved (RFC 1112)"),
    ("255.255.255.255/32", "limited broadcast (RFC 919)"),
)

# Judged by the IPv4 address in their last 32 bits (or bits 16-48 for 6to4).
EMBEDDING: Final = _t(
    ("::ffff:0:0/96", "IPv4-mapped (RFC 4291)"),
    ("64:ff9b::/96", "NAT64 well-known prefix (RFC 6052)"),
    ("2002::/16", "6to4 (RFC 3056)"),
)

IPV6_REFUSED: Final = _t(
    ("::/128", "unspecified (RFC 4291)"),
    ("::1/128", "loopback (RFC 4291)"),
    ("::/96", "IPv4-compatible, deprecated (RFC 4291)"),
    ("::ffff:0:0:0/96", "IPv4-translated (RFC 2765)"),
    ("64:ff9b:1::/48", "IPv4-IPv6 local-use translation (RFC 8215)"),
    ("100::/64", "discard-only (RFC 6666)"),
    ("100:0:0:1::/64", "dummy IPv6 prefix (RFC 9780)"),
    ("2001::/23", "IETF protocol assignments, incl. Teredo 2001::/32 (RFC 2928)"),
    ("2001:db8::/32", "documentation (RFC 3849)"),
    ("2620:4f:8000::/48", "direct delegation AS112 (RFC 7534)"),
    ("3fff::/20", "documentation (RFC 9637)"),
    ("5f00::/16", "segment routing SIDs (RFC 9602)"),
    ("fc00::/7", "unique-local (RFC 4193)"),
    ("fe80::/10", "link-local (RFC 4291)"),
    ("fec0::/10", "site-local, deprecated (RFC 3879)"),
    ("ff00::/8", "multicast (RFC 4291)"),
)

GLOBAL_UNICAST_V6: Final = ipaddress.ip_network("2000::/3")
# Most specific first, so an address is named by the narrowest entry that holds it.
_V4_LOOKUP = sorted(IPV4_REFUSED, key=lambda e: -e[0].prefixlen)
_V6_LOOKUP = sorted(IPV6_REFUSED, key=lambda e: -e[0].prefixlen)


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv4-mapped, NAT64 (64:ff9b::/96) or 6to4 address carries."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in EMBEDDING[1][0]:
        return ipaddress.IPv4Address(ip.packed[12:])
    return ip.sixtofour


def refusal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why `ip` may not be called (its table entry), or None for global unicast."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return f"{ip} has a zone (link-scoped)"
        inner = embedded_ipv4(ip)
        if inner is not None:
            why = refusal(inner)
            return None if why is None else f"IPv6 form of {inner}: {why}"
        for net, name in _V6_LOOKUP:
            if ip in net:
                return f"{ip} is in {net}, {name}"
        if ip not in GLOBAL_UNICAST_V6:
            return f"{ip} is outside global unicast 2000::/3"
        return None
    for net4, name in _V4_LOOKUP:
        if ip in net4:
            return f"{ip} is in {net4}, {name}"
    return None
