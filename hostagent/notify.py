"""A tiny sd_notify client: tells systemd we are ready, alive, reloading or stopping.

The protocol is one AF_UNIX datagram of newline-separated ``KEY=VALUE`` lines sent to the path
in ``$NOTIFY_SOCKET`` (a leading ``@`` means the Linux abstract namespace). Without
``NOTIFY_SOCKET`` (not started by systemd, or ``Type=`` is not ``notify``) every call is a
no-op, so the daemon can call these unconditionally.

Send failures are logged and swallowed: a lost ``WATCHDOG=1`` is retried on the next pass and
an unreachable manager must never stop collection. A run of failures with the same error is
one warning (then debug lines) and its end one info line: a ``NOTIFY_SOCKET`` naming a socket
that is gone logged a warning every pass, for good.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

from hostagent.clock import Clock, SystemClock

log = logging.getLogger(__name__)

# Sends never wait: the daemon calls `send` on its event loop thread, and a manager that does
# not read (its queue holds ~10 datagrams) made every send wait out a 1 s timeout there,
# stalling the API and delivery each pass. A message the queue cannot take is dropped (and
# logged): WATCHDOG=1 comes again with the next pass, READY=1 until one gets through.


def _address(raw: str) -> bytes | None:
    """Socket address for sendto(), or None when the variable is unset or unsupported.

    The name is the environment's bytes: os.environ holds bytes that are not UTF-8 as lone
    surrogates (surrogateescape), which `str.encode()` refused (`NOTIFY_SOCKET=$'@\\xff'` was
    a UnicodeEncodeError traceback from `run`); os.fsencode gives the bytes back. A name
    that is no bytes at all (a lone surrogate in a mapping passed in) disables sd_notify."""
    if not raw:
        return None
    if raw.startswith(("@", "/")):
        try:
            name = os.fsencode(raw)
        except UnicodeEncodeError:
            log.warning("NOTIFY_SOCKET is not a file name, sd_notify disabled",
                        extra={"notify_socket": ascii(raw)})
            return None
        # Abstract namespace: the name starts with a NUL byte instead of '@'.
        return b"\0" + name[1:] if raw.startswith("@") else name
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
        self._failing: str | None = None  # the error of the failures in a row, if any

    @property
    def started(self) -> bool:
        """True once the manager got READY=1 (start-up is over for it)."""
        return self._ready_sent

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
                sock.setblocking(False)
                self._sock = sock
            self._sock.sendto(payload, self._address)
        except OSError as err:
            error = str(err)
            # once per run of the same error: a socket that is gone fails every pass
            level = logging.DEBUG if error == self._failing else logging.WARNING
            log.log(level, "sd_notify failed", extra={"fields": sorted(fields), "error": error})
            self._failing = error
            self.close()  # reopen next time: the manager may have been re-executed
            return False
        if self._failing is not None:
            log.info("sd_notify works again", extra={"after_error": self._failing})
            self._failing = None
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
