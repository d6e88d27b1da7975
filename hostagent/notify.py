"""A tiny sd_notify client: tells systemd we are ready, alive, reloading or stopping.

The protocol is one AF_UNIX datagram of newline-separated ``KEY=VALUE`` lines sent to the path
in ``$NOTIFY_SOCKET`` (a leading ``@`` means the Linux abstract namespace). Without
``NOTIFY_SOCKET`` (not started by systemd, or ``Type=`` is not ``notify``) every call is a
no-op, so the daemon can call these unconditionally.

Send failures are logged and swallowed: a lost ``WATCHDOG=1`` is retried on the next pass and
an unreachable manager must never stop collection.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

from hostagent.clock import Clock, SystemClock

log = logging.getLogger(__name__)

# A datagram to the manager never blocks for long; past this the message is dropped.
_SEND_TIMEOUT_S = 1.0


def _address(raw: str) -> str | bytes | None:
    """Socket address for sendto(), or None when the variable is unset or unsupported."""
    if not raw:
        return None
    if raw.startswith("@"):
        # Abstract namespace: the name starts with a NUL byte instead of '@'.
        return b"\0" + raw[1:].encode()
    if raw.startswith("/"):
        return raw
    log.warning("unsupported NOTIFY_SOCKET, sd_notify disabled", extra={"notify_socket": raw})
    return None


def watchdog_interval_s(
    env: Mapping[str, str] | None = None, pid: int | None = None
) -> float | None:
    """The systemd watchdog period in seconds, or None when no watchdog is armed for us."""
    env = os.environ if env is None else env
    raw_usec = env.get("WATCHDOG_USEC", "")
    if not raw_usec:
        return None
    raw_pid = env.get("WATCHDOG_PID", "")
    if raw_pid:
        try:
            if int(raw_pid) != (os.getpid() if pid is None else pid):
                return None  # the watchdog belongs to another process (e.g. our parent)
        except ValueError:
            return None
    try:
        usec = int(raw_usec)
    except ValueError:
        return None
    return usec / 1e6 if usec > 0 else None


class Notifier:
    """Sends sd_notify messages to the service manager; every method is a no-op without it."""

    def __init__(self, env: Mapping[str, str] | None = None, clock: Clock | None = None) -> None:
        env = os.environ if env is None else env
        self._address = _address(env.get("NOTIFY_SOCKET", ""))
        self._clock: Clock = clock or SystemClock()
        self._sock: socket.socket | None = None
        self._ready_sent = False

    @property
    def enabled(self) -> bool:
        """True when a notification socket was given to us."""
        return self._address is not None

    def send(self, **fields: str | int) -> bool:
        """Send one message of KEY=VALUE fields; True when the manager got it."""
        if self._address is None:
            return False
        # Values are single lines by protocol: a newline would start a bogus field.
        lines = [f"{key}={str(value).replace(chr(10), ' ')}" for key, value in fields.items()]
        payload = "\n".join(lines).encode()
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sock.settimeout(_SEND_TIMEOUT_S)
                self._sock = sock
            self._sock.sendto(payload, self._address)
        except OSError as err:
            log.warning("sd_notify failed", extra={"fields": sorted(fields), "error": str(err)})
            self.close()  # reopen next time: the manager may have been re-executed
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """READY=1: startup (or a reload) finished; optionally with a STATUS line."""
        sent = self.send(READY=1) if status is None else self.send(READY=1, STATUS=status)
        self._ready_sent = self._ready_sent or sent
        return sent

    def pass_done(self, status: str) -> bool:
        """After each pass, ONE message (one wake-up of the service manager, not three):
        WATCHDOG=1 and the STATUS line, with READY=1 until the manager got it once (start-up
        is done once the first pass was tried; a READY lost on the way is sent again)."""
        if self._ready_sent:
            return self.send(WATCHDOG=1, STATUS=status)
        self._ready_sent = self.send(READY=1, WATCHDOG=1, STATUS=status)
        return self._ready_sent

    def extend_start(self, seconds: float, status: str) -> bool:
        """EXTEND_TIMEOUT_USEC with a STATUS line: start-up needs `seconds` more than
        TimeoutStartSec allows (upgrading a large state store)."""
        return self.send(EXTEND_TIMEOUT_USEC=int(seconds * 1e6), STATUS=status)

    def stopping(self) -> bool:
        """STOPPING=1: shutdown has begun."""
        return self.send(STOPPING=1)

    def reloading(self) -> bool:
        """RELOADING=1 with MONOTONIC_USEC (Type=notify-reload); send ready() when done."""
        usec = self._clock.now().monotonic_ns // 1000
        return self.send(RELOADING=1, MONOTONIC_USEC=usec)

    def close(self) -> None:
        """Close the socket; a later send opens a new one."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
