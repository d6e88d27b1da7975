"""The API inside the daemon: started once with the daemon, restarted after a failure, never the
end of the passes.

The API runs in the daemon's nursery, so anything that escapes the HTTP server ended the
collector with it: the adversarial sweep found four requests (an HTTP/2 body after the answer, a
WebSocket handshake with non-ASCII headers, ...) that made hypercorn's own protocol code raise
out of a connection, which ends its trio server (hostagent/api/wire_guards.py keeps those
out). `serve_in_daemon` is the net under the next one: before the server listens, a failure is
the daemon's start failing (an address in use is a ConfigError naming `api.port`); once it has
listened, a failure is logged as an error with its traceback and the server starts again after
RESTART_S, while the passes, delivery and alerts go on. A cancellation or a KeyboardInterrupt is
never caught (a BaseExceptionGroup holding one is not an Exception).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable

import trio

from hostagent.config.schema import ApiConfig
from hostagent.errors import ConfigError

log = logging.getLogger(__name__)

RESTART_S = 1.0
# An address this process cannot listen on: another program's, or none of this host's.
BIND_ERRNOS = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES})

Serve = Callable[..., Awaitable[None]]  # server.serve_api's shape: (cfg, app, stop, *, task_status)


def bind_error(err: BaseException) -> OSError | None:
    """The address-in-use (or not available, or not permitted) error in `err`, if any."""
    if isinstance(err, BaseExceptionGroup):
        return next((c for e in err.exceptions if (c := bind_error(e)) is not None), None)
    if isinstance(err, OSError) and err.errno in BIND_ERRNOS:
        return err
    return None


class _Started:
    """The server's task status across restarts: the daemon's nursery is told once (its start
    waits for the first), `on_urls` every time (a restart on port 0 listens elsewhere)."""

    def __init__(self, first: trio.TaskStatus[list[str]],
                 on_urls: Callable[[list[str]], None]) -> None:
        self._first: trio.TaskStatus[list[str]] | None = first
        self._on_urls = on_urls
        self.listened = False

    def started(self, value: list[str] | None = None) -> None:
        urls = list(value or [])
        self.listened = True
        self._on_urls(urls)
        if self._first is not None:
            first, self._first = self._first, None
            first.started(urls)


async def serve_in_daemon(serve: Serve, api: ApiConfig, app: object, stop: trio.Event, *,
                          source: str, on_urls: Callable[[list[str]], None],
                          task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED
                          ) -> None:
    """Serve until `stop`; restart the server after a failure once it has listened (`on_urls`
    is told where it listens each time)."""
    status = _Started(task_status, on_urls)
    restarts = 0
    while True:
        try:
            await serve(api, app, stop, task_status=status)
            return
        except BaseException as err:
            if not status.listened:  # the start failing: an address in use is the config's
                if (cause := bind_error(err)) is None:  # hypercorn's nursery wraps it
                    raise
                raise ConfigError(source, "api.port", "an address and port to listen on",
                                  f"{api.bind}:{api.port}: {cause.strerror or cause}",
                                  "stop what listens there, or change api.bind/api.port"
                                  ) from err
            if not isinstance(err, Exception):
                raise  # a cancellation (or one inside a group): never swallowed
            failure = err
        restarts += 1
        log.error("api server failed: it starts again; the passes go on", exc_info=failure,
                  extra={"error": repr(failure)[:300], "restarts": restarts,
                         "again_in_s": RESTART_S})
        with trio.move_on_after(RESTART_S):
            await stop.wait()
        if stop.is_set():
            return
