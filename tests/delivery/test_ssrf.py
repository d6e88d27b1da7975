"""The SSRF guard: a corpus of internal URLs (odd encodings, IPv6 forms, DNS names) is refused,
the special-purpose table entry by entry, ports, URL syntax, and config errors."""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hostagent.config.sinks import WebhookSinkConfig
from hostagent.delivery import ssrf
from hostagent.delivery.special_addresses import (
    EMBEDDING,
    IPV4_REFUSED,
    IPV6_REFUSED,
    embedded_ipv4,
    refusal,
)
from hostagent.errors import ConfigError

# Names resolved by the injected resolver (a local override, no network).
ZONE = {
    "internal.example": ["10.0.0.5"],
    "metadata.example": ["169.254.169.254"],
    "loop.example": ["127.0.0.1"],
    "mixed.example": ["93.184.216.34", "192.168.1.1"],
    "v6loop.example": ["::1"],
    "mapped.example": ["::ffff:10.1.2.3"],
    "ula.example": ["fd00::1"],
    "cgnat.example": ["100.64.1.1"],
    "public.example": ["93.184.216.34"],
    "public6.example": ["2606:2800:220:1:248:1893:25c8:1946"],
    "localhost": ["127.0.0.1", "::1"],
}


async def resolver(host: str, port: int) -> Sequence[str]:
    del port
    if host not in ZONE:
        raise OSError(f"NXDOMAIN {host}")
    return ZONE[host]


REFUSED = [
    "http://127.0.0.1/", "http://127.1/", "http://2130706433/", "http://0x7f000001/",
    "http://0177.0.0.1/", "http://0x7f.0.0.1/", "http://017700000001/", "http://127.0.0.1.:80/",
    "http://0/", "http://0.0.0.0/", "http://localhost:8080/hook", "http://[::1]/",
    "http://[::]/", "http://[::ffff:127.0.0.1]/", "http://[::ffff:7f00:1]/",
    "http://[::127.0.0.1]/", "http://[0:0:0:0:0:ffff:169.254.169.254]/",
    "http://169.254.169.254/latest/meta-data/", "http://[fe80::1]/", "http://10.0.0.1/",
    "http://172.16.5.4/", "http://192.168.0.1/", "http://100.64.0.1/", "http://224.0.0.1/",
    "http://255.255.255.255/", "http://240.0.0.1/", "http://192.0.2.1/", "http://[fc00::1]/",
    "http://[ff02::1]/", "http://[64:ff9b::7f00:1]/", "http://[2002:7f00:1::]/",
    "http://internal.example/", "http://metadata.example/", "http://loop.example/",
    "http://mixed.example/", "http://v6loop.example/", "http://mapped.example/",
    "http://ula.example/", "http://cgnat.example/", "http://nxdomain.example/",
    "http://134744072/",  # 8.8.8.8 in decimal: odd forms are refused whatever they decode to
    "ftp://public.example/", "file:///etc/passwd", "http://user:pw@public.example/",
    "gopher://127.0.0.1/", "http:///nohost",
    # issue 13 §2: what `is_global` let through, and what registration accepted
    "http://192.0.0.8/", "http://192.0.0.170/", "http://[fec0::1]/", "http://198.18.0.1/",
    "http://198.19.255.255/", "http://[2001::5efe:a00:1]/", "http://[::a00:1]/",
    "http://[100::1]/", "http://[2001:db8::1]/", "http://[3fff::1]/", "http://[5f00::1]/",
    "http://[64:ff9b:1::1]/", "http://[::ffff:0:a00:1]/", "http://[4000::1]/",
    "http://[fe80::1%25eth0]/", "http://", "http://:80/", "http://?a=1",
    "http://public.example/a\r\nX-Injected: 1", "http://public.example/\nx",
    "http://public.example/a b", "http://public.example\\@127.0.0.1/",
    "http://public.example/" + "a" * 60_000, "http://pub\u0131ic.example/",
    "http://public.example:0/", "http://public.example:22/", "http://public.example:5900/",
    "http://public.example:16509/", "http://public.example:65536/",
    "http://public.example:-1/", "http://1.2.3/", "http://public.example.123/",
    "http://08.8.8.8/", "http://[127.0.0.1]/", "HTTP://127.0.0.1/",
]
NO_ALLOW = ssrf.Guard.from_config(WebhookSinkConfig())


@pytest.mark.parametrize("url", REFUSED)
async def test_corpus_is_refused(url: str) -> None:
    with pytest.raises(ssrf.UrlRefused):
        await NO_ALLOW.resolve(url, resolver)


@pytest.mark.parametrize("url", [u for u in REFUSED if "example" not in u])
async def test_registration_refuses_what_delivery_refuses(url: str) -> None:
    with pytest.raises(ssrf.UrlRefused):
        await NO_ALLOW.check_registration(url, resolver)


def test_corpus_is_big_enough() -> None:
    assert len(REFUSED) >= 70


async def test_public_urls_are_pinned() -> None:
    t = await NO_ALLOW.resolve("https://public.example/hooks?a=1", resolver)
    assert (t.ip, t.pinned_url, t.host_header) == (
        "93.184.216.34", "https://93.184.216.34:443/hooks?a=1", "public.example")
    t6 = await NO_ALLOW.resolve("http://public6.example:8080/", resolver)
    assert t6.pinned_url == "http://[2606:2800:220:1:248:1893:25c8:1946]:8080/"
    assert t6.host_header == "public6.example:8080"
    assert (await NO_ALLOW.resolve("HTTPS://public.example/", resolver)).scheme == "https"


async def test_registration_checks_names_when_dns_answers() -> None:
    await NO_ALLOW.check_registration("https://nxdomain.example/", resolver)  # checked later
    await NO_ALLOW.check_registration("https://public.example/", resolver)
    for name in ("internal", "mixed", "mapped", "cgnat", "metadata"):
        with pytest.raises(ssrf.UrlRefused, match="resolves to"):
            await NO_ALLOW.check_registration(f"https://{name}.example/", resolver)

    async def hangs(_host: str, _port: int) -> Sequence[str]:
        import trio

        await trio.sleep_forever()
        raise AssertionError

    await NO_ALLOW.check_registration("https://slow.example/", hangs, timeout_s=0.05)


async def test_allow_list_names_host_ip_or_network() -> None:
    guard = ssrf.Guard.from_config(WebhookSinkConfig(
        allow_list=("loop.example", "10.0.0.0/8", "::1")))
    assert (await guard.resolve("http://loop.example:9000/", resolver)).ip == "127.0.0.1"
    assert (await guard.resolve("http://internal.example/", resolver)).ip == "10.0.0.5"
    assert (await guard.resolve("http://[::1]:8000/", resolver)).ip == "::1"
    with pytest.raises(ssrf.UrlRefused):
        await guard.resolve("http://127.0.0.1/", resolver)
    with pytest.raises(ssrf.UrlRefused, match="port"):  # the allow-list does not open ports
        await guard.resolve("http://loop.example:6379/", resolver)


@pytest.mark.parametrize("entry", ["10.0.0.0/99", "300.1.1.1/8", "", "  ", "foo bar",
                                   "10.0.0.0/8/8", "::1/129", "2130706433", "-bad.example"])
def test_malformed_allow_list_entry_is_a_config_error(entry: str) -> None:
    with pytest.raises(ConfigError) as err:
        ssrf.Guard.from_config(WebhookSinkConfig(allow_list=("ok.example", entry)),
                               "/etc/hostagent/config.toml")
    assert err.value.file == "/etc/hostagent/config.toml"
    assert err.value.key == "sinks.allow_list[1]"
    assert err.value.fix


@pytest.mark.parametrize(("port", "ok"), [
    (0, False), (1, False), (22, False), (79, False), (80, True), (443, True), (1023, False),
    (1024, True), (2375, False), (5432, False), (5900, False), (5999, False), (6000, True),
    (8080, True), (8443, True), (16509, False), (16514, False), (53333, False),
    (65535, True),
])
def test_default_port_policy(port: int, ok: bool) -> None:
    assert (NO_ALLOW.ports.refusal(port) is None) is ok


def test_port_policy_is_configurable_and_zero_never_allowed() -> None:
    g = ssrf.Guard.from_config(WebhookSinkConfig(allowed_ports=("1-65535",), denied_ports=()))
    assert g.ports.refusal(22) is None
    assert g.ports.refusal(0) is not None


@pytest.mark.parametrize("entry", ["0", "65536", "a", "10-5", "1-2-3", "", "-1", "80,443"])
def test_malformed_port_entry_is_a_config_error(entry: str) -> None:
    with pytest.raises(ConfigError) as err:
        ssrf.Guard.from_config(WebhookSinkConfig(allowed_ports=("80", entry)))
    assert err.value.key == "sinks.allowed_ports[1]"
    with pytest.raises(ConfigError):
        ssrf.Guard.from_config(WebhookSinkConfig(denied_ports=(entry,)))


# --- the special-purpose table, entry by entry ---------------------------------------------

def _edges(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> list[ssrf.IP]:
    return [net.network_address, net.network_address + net.num_addresses // 2,
            net.broadcast_address]


def _narrowest(ip: ssrf.IP) -> str:
    table = IPV4_REFUSED if ip.version == 4 else IPV6_REFUSED
    return max(((n.prefixlen, name) for n, name in table if ip in n), default=(0, ""))[1]


def _in_table(ip: ssrf.IP) -> bool:
    table = IPV4_REFUSED if ip.version == 4 else IPV6_REFUSED
    return any(ip in n for n, _ in table)


@pytest.mark.parametrize(("net", "name"), IPV4_REFUSED, ids=[str(n) for n, _ in IPV4_REFUSED])
def test_every_ipv4_entry_is_refused_and_its_neighbours_are_not(
        net: ipaddress.IPv4Network, name: str) -> None:
    assert any(_narrowest(ip) == name for ip in _edges(net))
    for ip in _edges(net):
        why = refusal(ip)
        assert why is not None and _narrowest(ip) in why, ip
        v4 = ipaddress.IPv4Address(ip)
        for v6 in (ipaddress.IPv6Address(f"::ffff:{v4}"),
                   ipaddress.IPv6Address(int(ipaddress.IPv6Address("64:ff9b::")) | int(v4)),
                   ipaddress.IPv6Address((0x2002 << 112) | (int(v4) << 80) | 1)):
            assert refusal(v6) is not None, v6  # the IPv4 inside decides
    for edge in (int(net.network_address) - 1, int(net.broadcast_address) + 1):
        if 0 <= edge < 2**32:
            near = ipaddress.IPv4Address(edge)
            assert (refusal(near) is None) is not _in_table(near), near


@pytest.mark.parametrize(("net", "name"), IPV6_REFUSED, ids=[str(n) for n, _ in IPV6_REFUSED])
def test_every_ipv6_entry_is_refused_and_its_neighbours_are_not(
        net: ipaddress.IPv6Network, name: str) -> None:
    assert any(_narrowest(ip) == name for ip in _edges(net))
    for ip in _edges(net):
        if embedded_ipv4(ipaddress.IPv6Address(ip)) is None:
            why = refusal(ip)
            assert why is not None and _narrowest(ip) in why, ip
    for edge in (int(net.network_address) - 1, int(net.broadcast_address) + 1):
        near = ipaddress.IPv6Address(edge % 2**128)
        inside_global = near in ipaddress.ip_network("2000::/3")
        if inside_global and not _in_table(near) and embedded_ipv4(near) is None:
            assert refusal(near) is None, near


@pytest.mark.parametrize(("net", "name"), EMBEDDING, ids=[str(n) for n, _ in EMBEDDING])
def test_embedding_prefixes_are_judged_by_the_ipv4_inside(
        net: ipaddress.IPv6Network, name: str) -> None:
    del name
    public, private = ipaddress.IPv4Address("93.184.216.34"), ipaddress.IPv4Address("10.0.0.1")
    base = int(net.network_address)
    shift = 80 if net.prefixlen == 16 else 0
    assert refusal(ipaddress.IPv6Address(base | int(public) << shift)) is None
    assert refusal(ipaddress.IPv6Address(base | int(private) << shift)) is not None


@given(st.integers(0, 2**32 - 1))
def test_ipv4_refused_exactly_when_in_the_table(n: int) -> None:
    ip = ipaddress.IPv4Address(n)
    assert (refusal(ip) is not None) is _in_table(ip)
    assert (refusal(ipaddress.IPv6Address(f"::ffff:{ip}")) is None) is (refusal(ip) is None)


@given(st.integers(0, 2**128 - 1))
def test_ipv6_allowed_only_in_global_unicast(n: int) -> None:
    ip = ipaddress.IPv6Address(n)
    if refusal(ip) is None:
        inner = embedded_ipv4(ip)
        assert inner is not None or (ip in ipaddress.ip_network("2000::/3")
                                     and not _in_table(ip))
        assert inner is None or refusal(inner) is None


@pytest.mark.parametrize(("text", "ip"), [
    ("2130706433", "127.0.0.1"), ("0x7f000001", "127.0.0.1"), ("0177.0.0.1", "127.0.0.1"),
    ("127.1", "127.0.0.1"), ("10.1.257", "10.1.1.1"), ("0", "0.0.0.0"),
])
def test_loose_ipv4_reads_like_inet_aton(text: str, ip: str) -> None:
    assert ssrf.loose_ipv4(text) == ipaddress.IPv4Address(ip)


def test_loose_ipv4_rejects_names() -> None:
    assert ssrf.loose_ipv4("example.com") is None and ssrf.loose_ipv4("1.2.3.4.5") is None
    assert ssrf.loose_ipv4("09.1.1.1") is None


@given(st.text(max_size=300))
def test_any_text_is_checked_or_refused_never_an_exception(url: str) -> None:
    with contextlib.suppress(ssrf.UrlRefused):
        NO_ALLOW.check_static(url)


@given(st.sampled_from(["http", "https", "HTTP", "ftp", ""]),
       st.text(alphabet="0123456789abcdefx.:[]%@-_ ", max_size=60),
       st.one_of(st.none(), st.integers(-5, 70000).map(str), st.text(max_size=6)),
       st.text(max_size=30))
def test_url_shaped_text_is_checked_or_refused(scheme: str, host: str, port: str | None,
                                               path: str) -> None:
    url = f"{scheme}://{host}" + ("" if port is None else f":{port}") + "/" + path
    try:
        _s, h, p, _path, literal = NO_ALLOW.check_static(url)
    except ssrf.UrlRefused:
        return
    assert 1 <= p <= 65535 and h
    assert literal is None or refusal(literal) is None
