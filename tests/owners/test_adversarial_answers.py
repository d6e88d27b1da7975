"""An adversarial sweep of the account-service client: what a broken or hostile server sends.

Real sockets on 127.0.0.1: the scripted raw server (tests/delivery/raw_http.py) for answers no
well-behaved HTTP server writes, the stand-in (tests/standins/accounts.py) for the rest.
test_account_client.py and test_hostile_answers.py hold the earlier corpus; nothing is repeated.
"""

from __future__ import annotations

import gzip
import logging
import socket
import threading
import time
import tracemalloc
import zlib
from collections.abc import Iterator
from contextlib import contextmanager

import orjson
import pytest
import trio

from hostagent.clock import SystemClock
from hostagent.config.schema import OwnersConfig
from hostagent.errors import OwnerLookupError
from hostagent.logs import JsonFormatter
from hostagent.owners.account_client import AccountClient
from hostagent.owners.accounts import Account, parse_account_list
from hostagent.owners.index import build_index
from hostagent.owners.resolver import Owners
from tests.clocks import FakeClock
from tests.delivery.raw_http import Answer, RawServer, drip, reset_after, response, send
from tests.owners.test_service import ALICE, BOB, NODE_KEY, running, state, until
from tests.standins.accounts import account, instance, serve_accounts

MiB = 1024 * 1024


def listing(*accounts: tuple[str, list[str]]) -> bytes:
    """An account/list body."""
    return orjson.dumps({"success": True, "total": len(accounts), "accounts": [
        {"address": a, "owned_instances": owned} for a, owned in accounts]})


GOOD = listing((ALICE, ["i-1"]))


@contextmanager
def raw_server(*answers: Answer) -> Iterator[RawServer]:
    srv = RawServer(list(answers)).start()
    try:
        yield srv
    finally:
        srv.stop()


def client(url: str, **kw: object) -> AccountClient:
    opts: dict[str, object] = {"enabled": True, "url": url, "prefix": "/v1", "timeout_s": 1.0,
                               **kw}
    return AccountClient(OwnersConfig(**opts), FakeClock())  # type: ignore[arg-type]


async def list_error(url: str, **kw: object) -> str:
    """The OwnerLookupError message of one account/list (fails if there is none)."""
    c = client(url, **kw)
    try:
        with pytest.raises(OwnerLookupError) as info:
            await c.list_accounts()
    finally:
        await c.aclose()
    return str(info.value)


def log_sizes(caplog: pytest.LogCaptureFixture) -> list[int]:
    """Each captured record as the daemon writes it (one JSON line), in characters."""
    fmt = JsonFormatter()
    return [len(fmt.format(r)) for r in caplog.records]


# --- compression ----------------------------------------------------------------------------

@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_compression_bomb_costs_no_more_memory_than_the_cap(encoding: str) -> None:
    blank = b" " * (100 * MiB)
    bomb = gzip.compress(blank, 9) if encoding == "gzip" else zlib.compress(blank, 9)
    assert len(bomb) < 200_000
    with raw_server(send(response(200, bomb, (f"Content-Encoding: {encoding}",)))) as srv:
        await list_error(srv.url, max_response_bytes=MiB)  # warm: httpx's lazy imports
        tracemalloc.start()
        try:
            message = await list_error(srv.url, max_response_bytes=MiB)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert message == "GET /v1/account/list: body exceeds max_response_bytes=1048576"
    # Before: httpx inflated each 64 KiB read whole, 64 MiB at a time, past a 1 MiB cap.
    assert peak < 8 * MiB, peak


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "x-gzip"])
async def test_a_compressed_answer_within_the_cap_is_used(encoding: str) -> None:
    body = gzip.compress(GOOD) if "gzip" in encoding else zlib.compress(GOOD)
    with raw_server(send(response(200, body, (f"Content-Encoding: {encoding}",)))) as srv:
        c = client(srv.url)
        got = await c.list_accounts()
        await c.aclose()
    assert [a.address for a in got.accounts] == [ALICE]


@pytest.mark.parametrize(("encoding", "body", "message"), [
    ("br", b"\x1b\x00\x00", "unsupported Content-Encoding 'br'"),
    ("gzip, gzip", gzip.compress(gzip.compress(GOOD)), "unsupported Content-Encoding"),
    ("gzip", b"\x1f\x8b\x08\x00garbage" * 10, "bad gzip body"),
])
async def test_an_undecodable_encoding_is_a_clear_error(encoding: str, body: bytes,
                                                        message: str) -> None:
    with raw_server(send(response(200, body, (f"Content-Encoding: {encoding}",)))) as srv:
        assert message in await list_error(srv.url)


async def test_a_bomb_between_good_answers_leaves_the_index_to_the_next_good_one() -> None:
    bomb = gzip.compress(b" " * (50 * MiB), 9)
    answers = [send(response(200, GOOD)),
               send(response(200, bomb, ("Content-Encoding: gzip",))),
               send(response(200, listing((BOB, ["i-1"]))))]
    with raw_server(*answers) as srv:
        cfg = OwnersConfig(enabled=True, url=srv.url, timeout_s=1.0, refresh_s=0.05,
                           max_response_bytes=MiB)
        clock = SystemClock()
        owners = Owners(cfg, clock, AccountClient(cfg, clock))
        async with trio.open_nursery() as nursery:
            await nursery.start(owners.run)
            await until(lambda: owners.health()["refresh_failed"] == 1)
            assert "max_response_bytes=1048576" in str(owners.health()["last_error"])
            assert owners.resolve("i-1", None).user_id == ALICE  # stale-while-error
            await until(lambda: owners.resolve("i-1", None).user_id == BOB)
            nursery.cancel_scope.cancel()


# --- a very long instance id ----------------------------------------------------------------

async def test_a_very_long_instance_id_is_a_failed_lookup_with_a_short_message() -> None:
    with serve_accounts([account(ALICE, ["i-1"])], [instance("i-1", ALICE)],
                        admins={NODE_KEY.address}) as svc:
        c = AccountClient(OwnersConfig(enabled=True, url=svc.url, timeout_s=1.0),
                          FakeClock(), NODE_KEY)
        for ask in (c.get_instance, c.get_by_build_id):
            # Before: httpx.InvalidURL ("URL too long"), which is no httpx.HTTPError, escaped.
            with pytest.raises(OwnerLookupError) as info:
                await ask("i" * 200_000)
            assert "InvalidURL: URL too long" in str(info.value)
            assert len(str(info.value)) < 300
        with pytest.raises(OwnerLookupError, match=r"HTTP 4\d\d: <!DOCTYPE HTML> <html") as info:
            await c.get_instance("i" * 60_000)  # short enough for httpx, not for the server
        # Before: the 60,000-character path, whole, and the HTML error page on 11 lines.
        assert len(str(info.value)) < 500
        assert str(info.value).isprintable()
        await c.aclose()


async def test_a_very_long_instance_id_is_unassigned_and_not_asked_at_every_pass(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="hostagent.owners")
    long_id = "i" * 200_000
    with serve_accounts([account(ALICE, ["i-1"])], [instance("i-1", ALICE)],
                        admins={NODE_KEY.address}) as svc:
        async with running(svc, signer=NODE_KEY) as owners:
            await until(lambda: state(owners) == "fresh")
            owners.resolve(long_id, None)
            await until(lambda: owners.health()["lookup_failed"] == 1
                        or owners.health()["unexpected_errors"] == 1)
            for _ in range(5):  # five passes
                assert owners.resolve(long_id, None).user_id == "unassigned"
                await until(lambda: owners.health()["pending_lookups"] == 0)
                await trio.sleep(0.05)
            health = owners.health()
    # Before: an "unexpected" error with a 200 kB traceback, and no negative entry, so each
    # pass asked again.
    assert health["unexpected_errors"] == 0
    assert health["lookup_failed"] == 1
    assert max(log_sizes(caplog)) < 2_000


# --- answers whose error message once carried the whole answer ------------------------------

def test_a_huge_authorized_instance_id_gives_a_short_error() -> None:
    body = orjson.dumps({"success": True, "accounts": [
        {"address": ALICE, "authorized_instances": {"k" * 5_000_000: 5}}]})
    with pytest.raises(OwnerLookupError) as info:
        parse_account_list(body)
    message = str(info.value)
    assert message.startswith("accounts[0].authorized_instances['kkkk")
    assert "(5000002 characters)" in message
    assert len(message) < 400  # before: 5,000,069 characters, in /health and the log


async def test_a_huge_authorized_instance_id_keeps_health_small() -> None:
    with serve_accounts([account(ALICE, ["i-1"])]) as svc:
        async with running(svc) as owners:
            await until(lambda: state(owners) == "fresh")
            svc.set_fault("body", "account_list", status=200, body=orjson.dumps(
                {"success": True, "accounts": [
                    {"address": BOB, "authorized_instances": {"k" * 1_000_000: 5}}]}))
            await until(lambda: state(owners) == "stale")
            assert len(str(owners.health()["last_error"])) < 400
            assert owners.resolve("i-1", None).user_id == ALICE  # the last good index serves
            svc.clear_fault()
            svc.set_accounts([account(BOB, ["i-1"])])
            await until(lambda: owners.resolve("i-1", None).user_id == BOB)


def test_a_conflict_warning_names_a_few_claimants_and_how_many(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="hostagent.owners.resolver")
    accounts = [Account(f"{n:040x}", ("i-1", "i" * 100_000)) for n in range(1, 3001)]
    owners = Owners(OwnersConfig(), FakeClock(), None)
    owners.install_index(build_index(accounts))
    warnings = [r for r in caplog.records if "several accounts" in r.getMessage()]
    assert len(warnings) == 2
    for record in warnings:
        assert record.__dict__["claimants_count"] == 3000
        assert record.__dict__["claimants"] == [f"{n:040x}" for n in range(1, 11)]
    assert max(log_sizes(caplog)) < 2_000  # before: 132 kB a line (2.9 MB at 30,000)


# --- faults that were already handled: kept so -----------------------------------------------

def _never(conn: socket.socket) -> bool:
    """Accept the request and never answer (until the test ends)."""
    _gone.wait(10)
    return False


_gone = threading.Event()


@pytest.mark.parametrize(("answer", "message"), [
    (send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n" + GOOD[:16] + b"\r\n"),
     "incomplete chunked read"),
    (send(response(200, GOOD).replace(b"Content-Length: %d" % len(GOOD),
                                      b"Content-Length: 99999")), "expected 99999"),
    (send(b"HTTP/1.1 200 OK\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n" + GOOD),
     "bad Content-Length"),
    (reset_after(response(200, GOOD)[:-10]), "Connection reset by peer"),
    (send(b"HTTP/1.1 101 Switching\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n" + GOOD),
     "RemoteProtocolError"),
    (send(b"SSH-2.0-OpenSSH_9.6\r\n"), "RemoteProtocolError"),
    (send(response(429, b'{"error": "slow down"}', ("Retry-After: 99999999999999999999",))),
     "HTTP 429: slow down"),
    (send(response(200, b"[" * 100_000 + b"]" * 100_000)), "depth limit exceeded"),
    (send(response(200, b'{"success": true, "accounts": [{"address": "\xff\xfe"}]}')),
     "malformed JSON"),
    (send(response(200, b'{"success": true, "total": 1e400, "accounts": []}')), "JSON"),
    # Before: these came out on several lines, the ESC raw (a terminal's clear-screen).
    (send(response(502, b"<html>\r\n<body>\x1b[2J\tBad  gateway</body>\n</html>")),
     r"HTTP 502: <html> <body>\x1b[2J Bad gateway</body> </html>"),
    (send(response(500, b'{"error": "db\\nlocked\\u001b[31m"}')),
     r"HTTP 500: db locked\x1b[31m"),
    (send(response(200, b'{"success": false, "error": "state\\r\\nnot ready"}')),
     "success: false: state not ready"),
])
async def test_a_broken_answer_is_one_short_owner_lookup_error(answer: Answer,
                                                               message: str) -> None:
    with raw_server(answer) as srv:
        text = await list_error(srv.url)
    assert message in text
    assert len(text) < 400
    assert text.isprintable()  # one line, whatever the server wrote


@pytest.mark.parametrize("answer", [_never, drip(response(200, GOOD), 0.05)])
async def test_a_server_that_never_finishes_costs_the_deadline_only(answer: Answer) -> None:
    _gone.clear()
    with raw_server(answer) as srv:
        t0 = time.monotonic()
        text = await list_error(srv.url, timeout_s=0.3)
        elapsed = time.monotonic() - t0
    _gone.set()
    assert "no complete answer within 0.3s" in text
    assert 0.25 < elapsed < 1.0


async def test_an_http_1_0_answer_delimited_by_close_is_used() -> None:
    with raw_server(send(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n"
                         + GOOD)) as srv:
        c = client(srv.url)
        got = await c.list_accounts()
        await c.aclose()
    assert [a.owned_instances for a in got.accounts] == [("i-1",)]


async def test_a_redirect_to_another_host_is_not_followed() -> None:
    with raw_server(send(response(200, listing((BOB, ["i-1"]))))) as elsewhere, \
            raw_server(send(response(302, b"", (f"Location: {elsewhere.url}/v1/account/list",
                                                ))),
                       send(response(307, b"", (f"Location: {elsewhere.url}/x",)))) as srv:
        assert "HTTP 302" in await list_error(srv.url)
        assert "HTTP 307" in await list_error(srv.url)
    assert elsewhere.requests == []


async def test_duplicate_keys_take_the_last_as_form_state_would_not_send_them() -> None:
    """orjson keeps the last of duplicate keys: documented here, not a fault of ours."""
    body = b'{"success": false, "success": true, "accounts": [], "accounts": [{"address": "x"}]}'
    with raw_server(send(response(200, body))) as srv:
        c = client(srv.url)
        got = await c.list_accounts()
        await c.aclose()
    assert [a.address for a in got.accounts] == ["x"]
