"""SSRF guard for webhook URLs: one `Guard`, used at registration and at every delivery.

A URL is refused (UrlRefused, with the reason) when it is not plain ASCII http(s) (control
characters, spaces, backslashes, CR/LF, credentials, no host), longer than MAX_URL_BYTES, aims
at a port outside the port policy (`:0` always), or at an address that is not global unicast
by the explicit table in `hostagent.delivery.special_addresses` (IANA special-purpose ranges,
multicast, IPv4 embedded in IPv6) unless the operator's allow-list names the host or address
(exact host name, IP, or CIDR). IPv4 written in odd forms that libc's inet_aton accepts
(decimal `2130706433`, hex `0x7f000001`, octal `0177.0.0.1`, short `127.1`) is refused
outright, whatever it decodes to: different parsers read such hosts differently, which is how
SSRF filters are bypassed.

A DNS name is resolved once (through an injectable resolver); if ANY address it resolves to is
refused, the URL is refused (an attacker's zone may mix public and private answers). At
delivery the request then connects to the first checked address (the URL's host replaced by
the IP, with the original `Host` header and TLS SNI/certificate name), so a second lookup
cannot rebind it. At registration (`Guard.check_registration`) a name that does not resolve
(or not in time) is accepted: delivery checks it again.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import trio

from hostagent.config.sinks import WebhookSinkConfig
from hostagent.delivery.special_addresses import refusal
from hostagent.errors import ConfigError, SinkRejected

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
_LOOSE_V4 = re.compile(r"^(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}\.?$", re.I)
MAX_URL_BYTES = 2048
_UNSAFE_CHARS = re.compile(r"[\x00-\x20\x7f-\U0010ffff\\]")
_NUMERIC_LAST_LABEL = re.compile(r"(^|\.)(0x[0-9a-f]*|[0-9]+)\.?$")


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


@dataclass(frozen=True, slots=True)
class AllowList:
    """Operator exceptions: host names (exact), addresses and networks."""

    hosts: frozenset[str]
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]

    @classmethod
    def parse(cls, entries: Iterable[str], source: str = "<config>") -> AllowList:
        """Entries are names, IPs or CIDRs; ConfigError names a malformed one."""
        hosts: set[str] = set()
        nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for i, entry in enumerate(entries):
            e = entry.strip().lower().strip("[]")
            try:
                nets.append(ipaddress.ip_network(e, strict=False))
            except ValueError as err:
                if not _HOSTNAME.fullmatch(e) or loose_ipv4(e) is not None:
                    raise ConfigError(source, f"sinks.allow_list[{i}]",
                                      "a host name, an IP address or a CIDR network", entry,
                                      f"write it like 10.0.0.0/8 or hooks.example ({err})"
                                      ) from err
                hosts.add(e.rstrip("."))
        return cls(frozenset(hosts), tuple(nets))

    def allows_host(self, host: str) -> bool:
        """The host name itself is allow-listed."""
        return host.lower().rstrip(".") in self.hosts

    def allows_ip(self, ip: IP) -> bool:
        """The address is in an allow-listed network."""
        return any(ip.version == n.version and ip in n for n in self.networks)


_HOSTNAME = re.compile(r"(?=.{1,253}\.?$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\.)*"
                       r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\.?")


@dataclass(frozen=True, slots=True)
class PortPolicy:
    """Ports a webhook may use: in one of `allowed` ranges and none of `denied`; never 0."""

    allowed: tuple[tuple[int, int], ...]
    denied: tuple[tuple[int, int], ...]

    @classmethod
    def parse(cls, allowed: Iterable[str], denied: Iterable[str],
              source: str = "<config>") -> PortPolicy:
        """Entries are "N" or "N-M" (1..65535); ConfigError names a malformed one."""
        return cls(_ranges(allowed, "sinks.allowed_ports", source),
                   _ranges(denied, "sinks.denied_ports", source))

    def refusal(self, port: int) -> str | None:
        """Why `port` may not be used, or None."""
        if port == 0:
            return "port 0 is never allowed"
        if any(lo <= port <= hi for lo, hi in self.denied):
            return f"port {port} is an internal service port (sinks.denied_ports)"
        if not any(lo <= port <= hi for lo, hi in self.allowed):
            return f"port {port} is not in sinks.allowed_ports"
        return None


def _ranges(entries: Iterable[str], key: str, source: str) -> tuple[tuple[int, int], ...]:
    out: list[tuple[int, int]] = []
    for i, entry in enumerate(entries):
        m = re.fullmatch(r"\s*([0-9]{1,5})\s*(?:-\s*([0-9]{1,5})\s*)?", entry)
        lo = int(m.group(1)) if m else -1
        hi = int(m.group(2) or lo) if m else -1
        if not 1 <= lo <= hi <= 65535:
            raise ConfigError(source, f"{key}[{i}]", "a port \"N\" or range \"N-M\" within "
                              "1-65535", entry)
        out.append((lo, hi))
    return tuple(out)


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
    if len(url.encode("utf-8", "surrogatepass")) > MAX_URL_BYTES:
        raise UrlRefused(f"URL longer than {MAX_URL_BYTES} bytes")
    bad = _UNSAFE_CHARS.search(url)
    if bad is not None:
        raise UrlRefused(f"URL contains {bad.group()!r} (control, space, backslash or "
                         "non-ASCII: percent-encode it, use punycode for names)")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as err:
        raise UrlRefused(f"malformed URL: {err}") from err
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise UrlRefused(f"scheme {scheme!r} is not http or https")
    if "@" in parts.netloc:
        raise UrlRefused("credentials in the URL are not allowed")
    host = (parts.hostname or "").lower()
    if not host:
        raise UrlRefused("URL has no host")
    if "[" in parts.netloc:
        if ":" not in host or _literal(host) is None:
            raise UrlRefused(f"host [{host}] is not an IPv6 address")
    elif not _HOSTNAME.fullmatch(host):
        raise UrlRefused(f"host {host!r} is not a valid host name")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return scheme, host, (443 if scheme == "https" else 80) if port is None else port, path


async def system_resolver(host: str, port: int) -> list[str]:
    """Resolve with the system resolver (getaddrinfo in a thread, via trio)."""
    infos = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


@dataclass(frozen=True, slots=True)
class Guard:
    """The allow-list and port policy of the webhook sink: what a webhook URL may reach."""

    allow: AllowList
    ports: PortPolicy

    @classmethod
    def from_config(cls, cfg: WebhookSinkConfig, source: str = "<config>") -> Guard:
        """The guard a [[sinks]] type = "webhook" table describes; ConfigError when malformed."""
        return cls(AllowList.parse(cfg.allow_list, source),
                   PortPolicy.parse(cfg.allowed_ports, cfg.denied_ports, source))

    def check_static(self, url: str) -> tuple[str, str, int, str, IP | None]:
        """Checks that need no DNS: syntax, port, odd IPv4 forms, literal addresses."""
        scheme, host, port, path = split(url)
        why_port = self.ports.refusal(port)
        if why_port is not None:
            raise UrlRefused(f"refused: {why_port}")
        literal = _literal(host)
        if self.allow.allows_host(host):
            return scheme, host, port, path, literal
        if ":" not in host and literal is None and _NUMERIC_LAST_LABEL.search(host):
            raise UrlRefused(f"host {host!r} is an IPv4 address in an ambiguous form")
        if literal is not None and not self.allow.allows_ip(literal):
            why = refusal(literal)
            if why is not None:
                raise UrlRefused(f"refused: {why}")
        return scheme, host, port, path, literal

    def _judge(self, host: str, addrs: Sequence[IP]) -> None:
        if self.allow.allows_host(host):
            return
        for ip in addrs:
            why = None if self.allow.allows_ip(ip) else refusal(ip)
            if why is not None:
                raise UrlRefused(f"refused: {host} resolves to {why}")

    async def check_registration(self, url: str, resolver: Resolver = system_resolver,
                                 timeout_s: float = 2.0) -> None:
        """Registration-time check: static checks, and the DNS answer when there is one."""
        _scheme, host, port, _path, literal = self.check_static(url)
        if literal is not None:
            return
        raw: Sequence[str] = ()
        with trio.move_on_after(timeout_s):
            try:
                raw = await resolver(host, port)
            except OSError:
                return  # no answer now: delivery resolves and checks again
        self._judge(host, _addresses(host, raw))

    async def resolve(self, url: str, resolver: Resolver = system_resolver) -> Target:
        """Check `url`, resolve it once and pin an address; UrlRefused when it may not be called."""
        scheme, host, port, path, literal = self.check_static(url)
        if literal is not None:
            addrs: list[IP] = [literal]
        else:
            try:
                raw = await resolver(host, port)
            except OSError as err:
                raise UrlRefused(f"cannot resolve {host}: {err}") from err
            addrs = _addresses(host, raw)
            if not addrs:
                raise UrlRefused(f"{host} resolved to no address")
        self._judge(host, addrs)
        ip = addrs[0]
        ip_text = f"[{ip}]" if ip.version == 6 else str(ip)
        default = 443 if scheme == "https" else 80
        netloc_host = f"[{host}]" if ":" in host else host
        host_header = netloc_host if port == default else f"{netloc_host}:{port}"
        return Target(url, scheme, host, port, str(ip), f"{scheme}://{ip_text}:{port}{path}",
                      host_header)


def _addresses(host: str, raw: Sequence[str]) -> list[IP]:
    addrs: list[IP] = []
    for a in raw:
        try:
            addrs.append(ipaddress.ip_address(a.split("%", maxsplit=1)[0]))
        except ValueError:
            raise UrlRefused(f"{host} resolved to a non-address {a!r}") from None
    return addrs


def _literal(host: str) -> IP | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None

