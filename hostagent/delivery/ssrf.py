"""SSRF guard for webhook URLs: resolve once, refuse internal addresses, pin what was checked.

Refused unless the operator's allow-list names the host or address (exact host name, IP, or
CIDR): loopback, link-local (169.254.0.0/16 with cloud metadata, fe80::/10), private
(10/8, 172.16/12, 192.168/16, fc00::/7), shared CGNAT (100.64/10), multicast, reserved,
unspecified, documentation/benchmark ranges, broadcast; IPv6 forms that carry an IPv4 address
(IPv4-mapped ::ffff:a.b.c.d, IPv4-compatible ::a.b.c.d, 6to4 2002::/16, NAT64 64:ff9b::/96,
Teredo) are judged by the IPv4 inside. Anything not globally routable (`not is_global`) is
refused. IPv4 written in odd forms that libc's inet_aton accepts (decimal `2130706433`, hex
`0x7f000001`, octal `0177.0.0.1`, short `127.1`) is refused outright, whatever it decodes to:
different parsers read such hosts differently, which is how SSRF filters are bypassed.

A DNS name is resolved once (through an injectable resolver); if ANY address it resolves to is
refused, the URL is refused (an attacker's zone may mix public and private answers). The
request then connects to the first checked address (the URL's host replaced by the IP, with
the original `Host` header and TLS SNI/certificate name), so a second lookup cannot rebind it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import trio

from hostagent.errors import SinkRejected

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
_LOOSE_V4 = re.compile(r"^(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}\.?$", re.I)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_SIXTOFOUR = ipaddress.ip_network("2002::/16")


class UrlRefused(SinkRejected):
    """The webhook URL may not be called (SSRF guard or malformed)."""


def loose_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """An IPv4 written the way inet_aton reads it (decimal, hex, octal, 1-4 parts), else None."""
    if not _LOOSE_V4.match(host):
        return None
    parts = host.rstrip(".").split(".")
    nums: list[int] = []
    for p in parts:
        low = p.lower()
        if low.startswith("0x"):
            nums.append(int(low[2:] or "0", 16))
        elif len(p) > 1 and p.startswith("0"):
            if not set(p) <= set("01234567"):
                return None
            nums.append(int(p, 8))
        else:
            nums.append(int(p))
    *head, last = nums
    if any(n > 255 for n in head) or last >= 256 ** (4 - len(head)):
        return None
    value = 0
    for n in head:
        value = value << 8 | n
    value = value << 8 * (4 - len(head)) | last
    return ipaddress.IPv4Address(value)


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, compatible, 6to4, NAT64, Teredo)."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    packed = ip.packed
    if packed[:12] == bytes(12) and int(ip) > 1:
        return ipaddress.IPv4Address(packed[12:])
    if ip in _NAT64:
        return ipaddress.IPv4Address(packed[12:])
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    return None


def refusal(ip: IP) -> str | None:
    """Why `ip` may not be called, or None when it is a public unicast address."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = embedded_ipv4(ip)
        if inner is not None:
            why = refusal(inner)
            return None if why is None else f"IPv6 form of {inner}: {why}"
    checks = (("unspecified", ip.is_unspecified), ("loopback", ip.is_loopback),
              ("link-local", ip.is_link_local), ("multicast", ip.is_multicast),
              ("private", ip.is_private), ("reserved", ip.is_reserved))
    for name, hit in checks:
        if hit:
            return f"{ip} is {name}"
    if not ip.is_global:
        return f"{ip} is not globally routable"
    return None


@dataclass(frozen=True, slots=True)
class AllowList:
    """Operator exceptions: host names (exact), addresses and networks."""

    hosts: frozenset[str]
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]

    @classmethod
    def parse(cls, entries: Iterable[str]) -> AllowList:
        """Entries are names, IPs or CIDRs; ValueError names a malformed one."""
        hosts: set[str] = set()
        nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for entry in entries:
            e = entry.strip().lower().strip("[]")
            try:
                nets.append(ipaddress.ip_network(e, strict=False))
            except ValueError as err:
                if not e or "/" in e:
                    raise ValueError(f"allow_list entry {e!r} is neither a host, IP nor "
                                     "CIDR") from err
                hosts.add(e.rstrip("."))
        return cls(frozenset(hosts), tuple(nets))

    def allows_host(self, host: str) -> bool:
        """The host name itself is allow-listed."""
        return host.lower().rstrip(".") in self.hosts

    def allows_ip(self, ip: IP) -> bool:
        """The address is in an allow-listed network."""
        return any(ip.version == n.version and ip in n for n in self.networks)


@dataclass(frozen=True, slots=True)
class Target:
    """A checked URL: connect to `ip`, send `host_header`, verify TLS for `host`."""

    url: str
    scheme: str
    host: str
    port: int
    ip: str
    pinned_url: str
    host_header: str


def split(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path+query) of an http(s) URL; UrlRefused when malformed."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as err:
        raise UrlRefused(f"malformed URL: {err}") from err
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise UrlRefused(f"scheme {scheme!r} is not http or https")
    if parts.username is not None or parts.password is not None:
        raise UrlRefused("credentials in the URL are not allowed")
    host = (parts.hostname or "").lower()
    if not host:
        raise UrlRefused("URL has no host")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return scheme, host, port or (443 if scheme == "https" else 80), path


def check_static(url: str, allow: AllowList) -> tuple[str, str, int, str, IP | None]:
    """Checks that need no DNS: scheme, odd IPv4 forms, literal addresses."""
    scheme, host, port, path = split(url)
    if allow.allows_host(host):
        literal = _literal(host)
        return scheme, host, port, path, literal
    if ":" not in host and loose_ipv4(host) is not None:
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise UrlRefused(f"host {host!r} is an IPv4 address in an ambiguous form") from None
    literal = _literal(host)
    if literal is not None and not allow.allows_ip(literal):
        why = refusal(literal)
        if why is not None:
            raise UrlRefused(f"refused: {why}")
    return scheme, host, port, path, literal


def _literal(host: str) -> IP | None:
    try:
        return ipaddress.ip_address(host.split("%", maxsplit=1)[0])
    except ValueError:
        return None


async def system_resolver(host: str, port: int) -> list[str]:
    """Resolve with the system resolver (getaddrinfo in a thread, via trio)."""
    infos = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


async def resolve(url: str, allow: AllowList, resolver: Resolver = system_resolver) -> Target:
    """Check `url`, resolve it once, and pin an address; UrlRefused when it may not be called."""
    scheme, host, port, path, literal = check_static(url, allow)
    if literal is not None:
        addrs: list[IP] = [literal]
    else:
        try:
            raw = await resolver(host, port)
        except OSError as err:
            raise UrlRefused(f"cannot resolve {host}: {err}") from err
        addrs = []
        for a in raw:
            try:
                addrs.append(ipaddress.ip_address(a.split("%", maxsplit=1)[0]))
            except ValueError:
                raise UrlRefused(f"{host} resolved to a non-address {a!r}") from None
        if not addrs:
            raise UrlRefused(f"{host} resolved to no address")
    if not allow.allows_host(host):
        for ip in addrs:
            why = None if allow.allows_ip(ip) else refusal(ip)
            if why is not None:
                raise UrlRefused(f"refused: {host} resolves to {why}")
    ip = addrs[0]
    ip_text = f"[{ip}]" if ip.version == 6 else str(ip)
    default = 443 if scheme == "https" else 80
    netloc_host = f"[{host}]" if ":" in host else host
    host_header = netloc_host if port == default else f"{netloc_host}:{port}"
    return Target(url, scheme, host, port, str(ip), f"{scheme}://{ip_text}:{port}{path}",
                  host_header)
