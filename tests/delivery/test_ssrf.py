"""The SSRF guard: a corpus of internal URLs (odd encodings, IPv6 forms, DNS names) is refused."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

import pytest

from hostagent.delivery import ssrf

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
]


@pytest.mark.parametrize("url", REFUSED)
async def test_corpus_is_refused(url: str) -> None:
    with pytest.raises(ssrf.UrlRefused):
        await ssrf.resolve(url, ssrf.AllowList.parse([]), resolver)


def test_corpus_is_big_enough() -> None:
    assert len(REFUSED) >= 30


async def test_public_urls_are_pinned() -> None:
    t = await ssrf.resolve("https://public.example/hooks?a=1", ssrf.AllowList.parse([]),
                           resolver)
    assert (t.ip, t.pinned_url, t.host_header) == (
        "93.184.216.34", "https://93.184.216.34:443/hooks?a=1", "public.example")
    t6 = await ssrf.resolve("http://public6.example:8080/", ssrf.AllowList.parse([]), resolver)
    assert t6.pinned_url == "http://[2606:2800:220:1:248:1893:25c8:1946]:8080/"
    assert t6.host_header == "public6.example:8080"


async def test_allow_list_names_host_ip_or_network() -> None:
    allow = ssrf.AllowList.parse(["loop.example", "10.0.0.0/8", "::1"])
    assert (await ssrf.resolve("http://loop.example:9/", allow, resolver)).ip == "127.0.0.1"
    assert (await ssrf.resolve("http://internal.example/", allow, resolver)).ip == "10.0.0.5"
    assert (await ssrf.resolve("http://[::1]:8000/", allow, resolver)).ip == "::1"
    with pytest.raises(ssrf.UrlRefused):
        await ssrf.resolve("http://127.0.0.1/", allow, resolver)
    with pytest.raises(ValueError, match="neither"):
        ssrf.AllowList.parse(["10.0.0.0/99"])


@pytest.mark.parametrize(("text", "ip"), [
    ("2130706433", "127.0.0.1"), ("0x7f000001", "127.0.0.1"), ("0177.0.0.1", "127.0.0.1"),
    ("127.1", "127.0.0.1"), ("10.1.257", "10.1.1.1"), ("0", "0.0.0.0"),
])
def test_loose_ipv4_reads_like_inet_aton(text: str, ip: str) -> None:
    assert ssrf.loose_ipv4(text) == ipaddress.IPv4Address(ip)


def test_loose_ipv4_rejects_names() -> None:
    assert ssrf.loose_ipv4("example.com") is None and ssrf.loose_ipv4("1.2.3.4.5") is None
    assert ssrf.loose_ipv4("09.1.1.1") is None
