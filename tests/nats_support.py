"""Real `nats-server` processes for the NATS sink's tests: JetStream on, the store in a temp
dir, random ports on 127.0.0.1; single servers or a 3-node cluster; kill -9 and restart on the
same port and store. Plus a reader that fetches a whole stream back (subject, headers, body)."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"


def require_nats_server() -> None:
    """Skip (fail under `make test`) without the Debian nats-server."""
    if not Path(NATS_SERVER).exists():
        from tests.conftest import unavailable

        unavailable("nats-server is not installed (apt-get install nats-server)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class NatsServer:
    """One nats-server; `extra` is appended to its config file."""

    root: Path
    name: str = "n1"
    extra: str = ""
    port: int = field(default_factory=free_port)
    cluster_port: int = field(default_factory=free_port)
    routes: list[int] = field(default_factory=list)
    jetstream: bool = True  # False: the next start runs without JetStream (the store is kept)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def write_config(self) -> Path:
        store = self.root / f"store-{self.name}"
        store.mkdir(parents=True, exist_ok=True)
        cluster = ""
        if self.routes:
            routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in self.routes)
            cluster = (f"cluster {{ name: hostagent-test, listen: 127.0.0.1:{self.cluster_port},"
                       f" routes: [{routes}] }}\n")
        conf = self.root / f"{self.name}.conf"
        js = (f"jetstream {{ store_dir: \"{store}\", max_memory_store: 64MB, "
              f"max_file_store: 1GB }}\n") if self.jetstream else ""
        conf.write_text(f"server_name: {self.name}\nlisten: 127.0.0.1:{self.port}\n"
                        f"{js}{cluster}{self.extra}\n")
        return conf

    def start(self, wait: bool = True) -> NatsServer:
        conf = self.write_config()
        log = (self.root / f"{self.name}.log").open("ab")
        self.proc = subprocess.Popen([NATS_SERVER, "-c", str(conf)], stdout=log, stderr=log)
        if wait:
            self.wait_listening()
        return self

    def wait_listening(self, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited: {self.log_tail()}")
            with suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                return
            time.sleep(0.02)
        raise RuntimeError(f"nats-server not listening: {self.log_tail()}")

    def log_tail(self) -> str:
        path = self.root / f"{self.name}.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def kill(self) -> None:
        """kill -9."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.kill()
        self.start()


@contextmanager
def nats_server(root: Path, extra: str = "") -> Any:
    """A single JetStream server for the block; killed afterwards."""
    require_nats_server()
    srv = NatsServer(root, extra=extra).start()
    try:
        yield srv
    finally:
        srv.kill()


@contextmanager
def nats_cluster(root: Path) -> Any:
    """Three JetStream servers routed to each other on 127.0.0.1."""
    require_nats_server()
    servers = [NatsServer(root, name=f"n{i}") for i in range(1, 4)]
    for s in servers:
        s.routes = [o.cluster_port for o in servers if o is not s]
    try:
        for s in servers:
            s.start(wait=False)
        for s in servers:
            s.wait_listening()
        yield servers
    finally:
        for s in servers:
            s.kill()


@dataclass(frozen=True)
class Stored:
    """One message as the stream holds it."""

    seq: int
    subject: str
    headers: dict[str, str]
    data: bytes


async def _read_stream(url: str | list[str], stream: str) -> list[Stored]:
    import nats

    nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=5,
                            reconnect_time_wait=0.2)
    try:
        js = nc.jetstream(timeout=5)
        info = await js.stream_info(stream)
        out = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            m = await js.get_msg(stream, seq)
            out.append(Stored(seq, m.subject or "", dict(m.headers or {}), m.data or b""))
        return out
    finally:
        await nc.close()


def read_stream(url: str | list[str], stream: str) -> list[Stored]:
    """Every message of `stream`, in order (blocking; call from a thread under trio)."""
    return asyncio.run(_read_stream(url, stream))


async def _wait_stream_ready(url: str | list[str], stream: str, timeout_s: float) -> None:
    import nats

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            nc = await nats.connect(url, connect_timeout=1, max_reconnect_attempts=1)
            try:
                await nc.jetstream(timeout=1).account_info()
                return
            finally:
                await nc.close()
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


def wait_jetstream(url: str | list[str], timeout_s: float = 20.0) -> None:
    """Block until JetStream answers (a cluster needs a meta leader first)."""
    asyncio.run(_wait_stream_ready(url, "", timeout_s))




async def _manage(url: str | list[str], action: Any) -> Any:
    import nats

    nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=1)
    try:
        return await action(nc.jetstream(timeout=5))
    finally:
        await nc.close()


def manage(url: str | list[str], action: Any) -> Any:
    """Run `await action(js)` with a JetStream context of a fresh connection, as an operator's
    `nats stream ...` would (blocking; call from a thread under trio)."""
    return asyncio.run(_manage(url, action))
