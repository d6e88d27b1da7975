"""Fixtures of the API tests: keys on disk and a live server with three instances."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio

from hostagent.api.view import ApiView
from tests.api.support import (
    ALICE,
    BOB,
    DAVE,
    Keys,
    Server,
    api_config,
    make_keys,
    report,
    start_server,
)

OWNED = {"i-a1": ALICE, "i-a2": ALICE, "i-b1": BOB, "i-c1": "carol"}


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    """Keys generated once per session."""
    return make_keys(Path(tmp_path_factory.mktemp("keys")))


@pytest.fixture
async def server(nursery: trio.Nursery, keys: Keys) -> AsyncIterator[Server]:
    """A live server on 127.0.0.1 serving four instances (two are ALICE's)."""
    view = ApiView(authorized=lambda iid: {DAVE: "ReadOnly"} if iid == "i-c1" else {})
    view.update(report(OWNED))
    srv = await start_server(nursery, api_config(keys), view)
    yield srv
    srv.stop.set()


@pytest.fixture
async def client(server: Server) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client pointed at the server."""
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as c:
        yield c
