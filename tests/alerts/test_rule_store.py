"""API-written rules: a layer in the state directory over the rules file (issue 13 §3, 17 §3).

Real files, a read-only "etc" directory, concurrent writers and a real API server on 127.0.0.1.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.lowlevel
from hypothesis import given
from hypothesis import strategies as st

from hostagent.alerts.index import Settings
from hostagent.alerts.routing import Route
from hostagent.alerts.rule_store import LayeredRuleStore
from hostagent.alerts.rules import parse_rule
from hostagent.alerts.rules_file import load_rules
from hostagent.alerts.rules_source import RulesSource, from_config
from hostagent.api.auth import Authenticator
from hostagent.api.server import make_app, serve_api
from hostagent.api.view import ApiView
from hostagent.config.schema import ThresholdsConfig
from hostagent.errors import ConfigError, RuleNotWritable
from tests.api.support import Keys, api_config, make_keys

NESTED = {"id": "cpu-high", "resource_type": "Cpu",
          "threshold_type": {"Percentage": {"value": 80.0}}, "action": "Notify",
          "user_id": "*", "notification_channels": ["queue"], "for_passes": 3}
FLAT = {"id": "disk-big", "resource_type": "storage", "threshold_type": "absolute",
        "threshold_value": 500, "units": "GB", "action": "notify", "user_id": "user_1",
        "notification_channels": ["email"]}
ROUTES = {"jsonl": Route(None, None), "queue": Route(None, frozenset({"queue"})),
          "email": Route(None, frozenset({"email"}))}


def layered(tmp_path: Path, file_rules: list[dict[str, Any]] | None = None) -> RulesSource:
    etc = tmp_path / "etc"
    etc.mkdir(exist_ok=True)
    path = None
    if file_rules is not None:
        path = etc / "rules.json"
        path.write_text(json.dumps(file_rules))
    src = RulesSource(path, Settings(), api_path=tmp_path / "state" / "api-rules.json",
                      routes=ROUTES)
    src.load_initial()
    return src


async def test_default_config_keeps_api_rules_next_to_the_state_store(tmp_path: Path) -> None:
    # The bug: no rules_path → every POST/PUT was a 500.
    src = from_config(ThresholdsConfig(), state_path=tmp_path / "state.db", routes=ROUTES)
    src.load_initial()
    store = LayeredRuleStore(src)
    assert await store.put(store.validate(NESTED)) is True
    assert [r.id for r in load_rules(tmp_path / "api-rules.json")] == ["cpu-high"]
    assert (tmp_path / "api-rules.json").stat().st_mode & 0o777 == 0o640
    again = from_config(ThresholdsConfig(), state_path=tmp_path / "state.db", routes=ROUTES)
    again.load_initial()  # a restart: the API's rules are back
    assert [r.id for r in again.index.rules] == ["cpu-high"]


async def test_read_only_etc_is_never_written(tmp_path: Path) -> None:
    # The bug: the API rewrote rules_path, PermissionError under /etc/hostagent.
    src = layered(tmp_path, [NESTED])
    etc = tmp_path / "etc"
    before = (etc / "rules.json").read_bytes()
    os.chmod(etc, 0o555)
    try:
        store = LayeredRuleStore(src)
        assert await store.put(store.validate(FLAT)) is True
    finally:
        os.chmod(etc, 0o755)
    assert (etc / "rules.json").read_bytes() == before
    assert sorted(os.listdir(etc)) == ["rules.json"]
    assert {r.id for r in src.index.rules} == {"cpu-high", "disk-big"}


async def test_layers_precedence_provenance_and_an_ansible_run(tmp_path: Path) -> None:
    src = layered(tmp_path, [NESTED, {**FLAT, "id": "file-only"}])
    store = LayeredRuleStore(src)
    src.set_layer("central", [parse_rule({**NESTED, "id": "fleet"}),
                              parse_rule({**NESTED, "for_passes": 9})])
    # the API overrides the file's cpu-high; the file overrides the central cpu-high
    assert await store.put(store.validate({**NESTED, "for_passes": 5})) is False
    by_id = {r["id"]: r for r in await store.list()}
    assert {k: v["source"] for k, v in by_id.items()} == {
        "fleet": "central", "file-only": "file", "cpu-high": "api"}
    assert by_id["cpu-high"]["for_passes"] == 5
    # ansible rewrites the file: the API layer survives it
    (tmp_path / "etc" / "rules.json").write_text(json.dumps([{**FLAT, "id": "file-2"}]))
    assert src.reload() is True
    assert {r["id"]: r["source"] for r in await store.list()} == {
        "fleet": "central", "file-2": "file", "cpu-high": "api"}
    # deleting the API override brings back the lower layer; a file rule cannot be deleted
    await store.put(store.validate({**FLAT, "id": "file-2", "threshold_value": 1}))
    assert await store.delete("file-2") is True
    got = await store.get("file-2")
    assert got is not None and got["source"] == "file"
    assert got["threshold_type"]["Absolute"]["value"] == 500
    with pytest.raises(RuleNotWritable, match="file"):
        await store.delete("file-2")
    assert await store.delete("nope") is False


async def test_concurrent_writes_all_land_and_the_file_is_always_whole(tmp_path: Path) -> None:
    src = layered(tmp_path)
    store = LayeredRuleStore(src)
    seen_bad: list[str] = []

    async def reader() -> None:
        for _ in range(200):
            p = tmp_path / "state" / "api-rules.json"
            if p.exists():
                try:
                    load_rules(p)
                except ConfigError as err:
                    seen_bad.append(str(err))
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as n:
        n.start_soon(reader)
        for i in range(40):
            n.start_soon(store.put, store.validate({**NESTED, "id": f"r{i}"}))
    assert sorted(r.id for r in load_rules(tmp_path / "state" / "api-rules.json")) == sorted(
        f"r{i}" for i in range(40))
    assert seen_bad == []
    assert [p.name for p in (tmp_path / "state").iterdir()] == ["api-rules.json"]  # no temp


async def test_a_refused_write_leaves_file_and_rules_as_they_were(tmp_path: Path) -> None:
    src = layered(tmp_path)
    store = LayeredRuleStore(src)
    await store.put(store.validate(NESTED))
    before = (tmp_path / "state" / "api-rules.json").read_bytes()
    with pytest.raises(ConfigError, match="notification_channels"):
        await store.put({**NESTED, "id": "x", "notification_channels": ["pager"]})
    assert (tmp_path / "state" / "api-rules.json").read_bytes() == before
    assert [r.id for r in src.index.rules] == ["cpu-high"]


@given(st.sampled_from([math.inf, -math.inf, math.nan, 1e308 * 10]))
def test_nan_and_infinity_are_refused_in_every_rule_number(v: float) -> None:
    # The bug: value = inf passed check-rules and the API, and was written back as null.
    for raw in ({**NESTED, "threshold_type": {"Percentage": {"value": v}}},
                {**FLAT, "threshold_value": v}, {**NESTED, "repeat_interval_s": v}):
        with pytest.raises(ConfigError, match="finite"):
            parse_rule(raw)


def test_toml_inf_and_nan_are_refused(tmp_path: Path) -> None:
    for lit in ("inf", "nan", "-inf", "+inf"):
        p = tmp_path / "rules.toml"
        p.write_text(f'[[rules]]\nid = "a"\nresource_type = "Cpu"\nthreshold_type = '
                     f'{{ Percentage = {{ value = {lit} }} }}\naction = "Alert"\nuser_id = "*"\n')
        with pytest.raises(ConfigError, match="finite"):
            load_rules(p)


# --- through the real API server ------------------------------------------------------------


@pytest.fixture(scope="module")
def api_keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return make_keys(Path(tmp_path_factory.mktemp("keys")))


@pytest.fixture
async def api(nursery: trio.Nursery, tmp_path: Path, api_keys: Keys
              ) -> AsyncIterator[tuple[httpx.AsyncClient, RulesSource]]:
    src = from_config(ThresholdsConfig(), state_path=tmp_path / "state.db", routes=ROUTES)
    src.load_initial()
    cfg = api_config(api_keys)
    stop = trio.Event()
    app = make_app(cfg, ApiView(), rules=LayeredRuleStore(src), authenticator=Authenticator(cfg))
    binds = await nursery.start(serve_api, cfg, app, stop)
    async with httpx.AsyncClient(base_url=binds[0], timeout=10,
                                 headers={"X-API-Key": api_keys.admin_key}) as c:
        yield c, src
    stop.set()


async def test_api_writes_work_with_the_default_config(
        api: tuple[httpx.AsyncClient, RulesSource]) -> None:
    client, src = api
    r = await client.post("/api/v1/thresholds", json=NESTED)
    assert r.status_code == 201, r.text
    r = await client.put("/api/v1/thresholds/disk-big", json=FLAT)
    assert r.status_code == 201, r.text
    listed = (await client.get("/api/v1/thresholds")).json()
    assert {x["id"]: x["source"] for x in listed} == {"cpu-high": "api", "disk-big": "api"}
    assert {r.id for r in src.index.rules} == {"cpu-high", "disk-big"}
    inf = await client.post("/api/v1/thresholds", headers={"Content-Type": "application/json"},
                            content=b'{"id": "i", "resource_type": "Cpu", "threshold_type": '
                                    b'{"Percentage": {"value": 1e999}}, "action": "Alert", '
                                    b'"user_id": "*"}')
    assert inf.status_code == 400
    silent = await client.post("/api/v1/thresholds",
                               json={**NESTED, "id": "p", "notification_channels": ["pager"]})
    assert silent.status_code == 400
    assert "pager" in silent.json()["detail"]
    src.set_layer("central", [parse_rule({**NESTED, "id": "fleet"})])
    gone = await client.delete("/api/v1/thresholds/fleet")
    assert gone.status_code == 409
    assert gone.json()["type"].endswith("rule-not-writable")
