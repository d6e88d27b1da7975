"""sd_notify client against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostagent.notify import Notifier, watchdog_interval_s
from tests.clocks import FakeClock


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket playing the service manager; yields (socket, NOTIFY_SOCKET)."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2.0)
    yield sock, str(path)
    sock.close()


def recv_fields(sock: socket.socket) -> dict[str, str]:
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.split("\n"))


def test_each_message(manager: tuple[socket.socket, str]) -> None:
    sock, addr = manager
    clock = FakeClock(monotonic_ns=123_456_789_000)
    n = Notifier({"NOTIFY_SOCKET": addr}, clock=clock)
    assert n.enabled

    assert n.ready()
    assert recv_fields(sock) == {"READY": "1"}
    assert n.ready(status="first pass done")
    assert recv_fields(sock) == {"READY": "1", "STATUS": "first pass done"}
    assert n.send(WATCHDOG=1)
    assert recv_fields(sock) == {"WATCHDOG": "1"}
    assert n.send(STATUS="12 domains, 0 pending\nsecond line")
    assert recv_fields(sock) == {"STATUS": "12 domains, 0 pending second line"}
    assert n.stopping()
    assert recv_fields(sock) == {"STOPPING": "1"}
    assert n.reloading()
    assert recv_fields(sock) == {"RELOADING": "1", "MONOTONIC_USEC": "123456789"}
    assert n.extend_start(90.5, "upgrading the state store")
    assert recv_fields(sock) == {"EXTEND_TIMEOUT_USEC": "90500000",
                                 "STATUS": "upgrading the state store"}
    n.close()


def test_a_pass_is_one_message_ready_only_with_the_first(
        manager: tuple[socket.socket, str]) -> None:
    sock, addr = manager
    n = Notifier({"NOTIFY_SOCKET": addr})
    assert n.pass_done("8 domains, 8 events, pass 0.01s")
    assert recv_fields(sock) == {"READY": "1", "WATCHDOG": "1",
                                 "STATUS": "8 domains, 8 events, pass 0.01s"}
    assert n.pass_done("8 domains, 8 events, pass 0.02s")
    assert recv_fields(sock) == {"WATCHDOG": "1", "STATUS": "8 domains, 8 events, pass 0.02s"}
    sock.settimeout(0.05)
    with pytest.raises(TimeoutError):  # nothing else was sent
        sock.recv(4096)
    n.close()


def test_after_an_explicit_ready_a_pass_does_not_repeat_it(
        manager: tuple[socket.socket, str]) -> None:
    sock, addr = manager
    n = Notifier({"NOTIFY_SOCKET": addr})
    assert n.ready()
    assert recv_fields(sock) == {"READY": "1"}
    assert n.pass_done("0 domains, 0 events, pass 0.00s, error: source unavailable")
    assert recv_fields(sock) == {"WATCHDOG": "1",
                                 "STATUS": "0 domains, 0 events, pass 0.00s, error: source "
                                           "unavailable"}
    n.close()


def test_a_ready_the_manager_did_not_get_is_sent_again_with_the_next_pass(
        tmp_path: Path) -> None:
    path = tmp_path / "notify"
    n = Notifier({"NOTIFY_SOCKET": str(path)})
    assert not n.pass_done("first pass")  # nobody listens yet: lost
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2.0)
    try:
        assert n.pass_done("second pass")
        assert recv_fields(sock) == {"READY": "1", "WATCHDOG": "1", "STATUS": "second pass"}
        assert n.pass_done("third pass")
        assert recv_fields(sock) == {"WATCHDOG": "1", "STATUS": "third pass"}
    finally:
        sock.close()
        n.close()


def test_abstract_namespace() -> None:
    name = f"hostagent-test-{os.getpid()}-{id(object())}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(2.0)
    try:
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert n.ready()
        assert recv_fields(sock) == {"READY": "1"}
        n.close()
    finally:
        sock.close()


def test_reloading_uses_the_real_monotonic_clock(manager: tuple[socket.socket, str]) -> None:
    sock, addr = manager
    n = Notifier({"NOTIFY_SOCKET": addr})
    before_us = socket_time_us()
    assert n.reloading()
    after_us = socket_time_us()
    assert before_us <= int(recv_fields(sock)["MONOTONIC_USEC"]) <= after_us
    n.close()


def socket_time_us() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def test_without_socket_everything_is_a_noop() -> None:
    n = Notifier({})
    assert not n.enabled
    assert not n.ready()
    assert not n.pass_done("x")
    assert not n.stopping()
    assert not n.reloading()


def test_unsupported_address_disables() -> None:
    n = Notifier({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not n.enabled
    assert not n.ready()


def test_vanished_manager_is_survived(tmp_path: Path) -> None:
    path = tmp_path / "gone"
    n = Notifier({"NOTIFY_SOCKET": str(path)})
    assert not n.send(WATCHDOG=1)  # nobody listens: logged, not raised
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2.0)
    try:
        assert n.send(WATCHDOG=1)  # the manager came back: the next send reaches it
        assert recv_fields(sock) == {"WATCHDOG": "1"}
    finally:
        sock.close()
        n.close()


@pytest.mark.parametrize(
    ("env", "pid", "expected"),
    [
        ({}, 10, None),
        ({"WATCHDOG_USEC": "120000000"}, 10, 120.0),
        ({"WATCHDOG_USEC": "120000000", "WATCHDOG_PID": "10"}, 10, 120.0),
        ({"WATCHDOG_USEC": "120000000", "WATCHDOG_PID": "11"}, 10, None),
        ({"WATCHDOG_USEC": "garbage"}, 10, None),
        ({"WATCHDOG_USEC": "0"}, 10, None),
        ({"WATCHDOG_USEC": "5000", "WATCHDOG_PID": "x"}, 10, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], pid: int, expected: float | None) -> None:
    assert watchdog_interval_s(env, pid=pid) == expected


def test_watchdog_interval_defaults_to_own_pid() -> None:
    env = {"WATCHDOG_USEC": "1500000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval_s(env) == 1.5


@pytest.mark.parametrize("where", ["abstract", "path"])
def test_a_name_that_is_not_utf8_reaches_its_socket(tmp_path: Path, where: str) -> None:
    # os.environ holds such bytes as lone surrogates: str.encode() raised UnicodeEncodeError
    name = f"hostagent-\xff-{os.getpid()}-{id(object())}".encode("latin-1")
    address = b"\0" + name if where == "abstract" else bytes(tmp_path) + b"/" + name
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(2.0)
    try:
        n = Notifier({"NOTIFY_SOCKET": ("@" + os.fsdecode(name)) if where == "abstract"
                      else os.fsdecode(address)})
        assert n.ready()
        assert recv_fields(sock) == {"READY": "1"}
        n.close()
    finally:
        sock.close()


def test_a_name_that_is_no_bytes_disables() -> None:
    n = Notifier({"NOTIFY_SOCKET": "@\ud800"})  # a lone surrogate no file name decodes to
    assert not n.enabled
    assert not n.ready()
