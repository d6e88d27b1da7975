"""Rules file loading (JSON and TOML, both formats) and reload that never installs a bad set."""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
from pathlib import Path

import orjson
import pytest
import trio

from hostagent.alerts import rules_source
from hostagent.alerts.index import Settings
from hostagent.alerts.routing import Route
from hostagent.alerts.rules_file import load_rules
from hostagent.alerts.rules_source import RulesSource
from hostagent.errors import ConfigError
from tests.alerts.test_rules_index import FLAT, NESTED
from tests.concurrency import turns_of

TOML = """
[[rules]]
id = "disk-big"
resource_type = "Storage"
threshold_type = { Absolute = { value = 500, unit = "GB" } }
action = "Notify"
user_id = "user_123456"
notification_channels = ["email", "api_callback"]

[[rules]]
id = "cpu-high"
resource_type = "cpu"
threshold_type = "percentage"
threshold_value = 80
action = "alert"
user_id = "*"
"""


def test_json_and_toml_load_the_same_rules(tmp_path: Path) -> None:
    j = tmp_path / "rules.json"
    j.write_bytes(orjson.dumps({"rules": [FLAT]}))
    bare = tmp_path / "bare.json"
    bare.write_bytes(orjson.dumps([NESTED]))
    t = tmp_path / "rules.toml"
    t.write_text(TOML)
    assert load_rules(j) == load_rules(bare) == load_rules(t)[:1]
    assert [r.id for r in load_rules(t)] == ["disk-big", "cpu-high"]


def test_errors_name_file_index_and_key(tmp_path: Path) -> None:
    p = tmp_path / "rules.json"
    p.write_bytes(orjson.dumps([FLAT, {**FLAT, "id": "x", "units": "parsecs"}]))
    with pytest.raises(ConfigError) as e:
        load_rules(p)
    assert e.value.file == str(p) and e.value.key == "rules[1].units"
    p.write_text("{not json")
    with pytest.raises(ConfigError, match="valid JSON"):
        load_rules(p)
    with pytest.raises(ConfigError, match="readable"):
        load_rules(tmp_path / "absent.json")


def test_reload_keeps_the_valid_set(tmp_path: Path) -> None:
    p = tmp_path / "rules.json"
    p.write_bytes(orjson.dumps([FLAT]))
    src = RulesSource(p, Settings())
    src.load_initial()
    assert [r.id for r in src.index.rules] == ["disk-big"]
    assert src.check() is None  # unchanged
    p.write_bytes(orjson.dumps([FLAT, {**FLAT, "id": "bad", "action": "Page"}]))
    os.utime(p, ns=(1, 1))
    assert src.check() is False
    assert [r.id for r in src.index.rules] == ["disk-big"] and "rules[1].action" in (
        src.last_error or "")
    p.write_bytes(orjson.dumps([{**FLAT, "id": "new"}]))
    os.utime(p, ns=(2, 2))
    assert src.check() is True and [r.id for r in src.index.rules] == ["new"]
    assert src.last_error is None
    p.unlink()
    assert src.check() is False and [r.id for r in src.index.rules] == ["new"]


async def test_sighup_reloads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rules_source, "DirWatch", no_inotify)  # only SIGHUP can reload it
    p = tmp_path / "rules.json"
    p.write_bytes(orjson.dumps([FLAT]))
    src = RulesSource(p, Settings(), reload_check_s=3600)
    src.load_initial()
    async with trio.open_nursery() as nursery:
        await nursery.start(src.run)
        p.write_bytes(orjson.dumps([{**FLAT, "id": "after-hup"}]))
        os.kill(os.getpid(), signal.SIGHUP)
        with trio.fail_after(5):
            while src.loads < 2:  # noqa: ASYNC110 -- polling a plain counter
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert [r.id for r in src.index.rules] == ["after-hup"]


def no_inotify(paths: object) -> None:
    raise OSError(38, "inotify is not available")


async def reloads_after_change(src: RulesSource, p: Path, rule_id: str) -> float:
    """Seconds from an atomic replace of `p` until `src` has loaded it."""
    before = src.loads
    tmp = p.with_name(".rules.tmp")
    tmp.write_bytes(orjson.dumps([{**FLAT, "id": rule_id}]))
    t0 = trio.current_time()
    tmp.replace(p)
    with trio.fail_after(5):
        while src.loads == before:  # noqa: ASYNC110 -- polling a plain counter
            await trio.sleep(0.005)
    assert [r.id for r in src.index.rules] == [rule_id]
    return trio.current_time() - t0


async def test_a_changed_file_is_reloaded_at_once_and_an_unchanged_one_costs_no_wake_up(
        tmp_path: Path) -> None:
    p = tmp_path / "rules.json"
    p.write_bytes(orjson.dumps([FLAT]))
    api = tmp_path / "state" / "api-rules.json"
    api.parent.mkdir()
    src = RulesSource(p, Settings(), reload_check_s=0.02, api_path=api)
    src.load_initial()
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(src.run, sighup=False))
        assert await reloads_after_change(src, p, "seen-at-once") < 0.5
        turns = await turns_of(functools.partial(trio.sleep, 0.5))  # polled: 25 turns and more
        assert turns <= 2, turns  # the sleep's own
        (api.parent / "state.db-wal").write_bytes(b"x")  # a neighbour: no reload
        api.write_bytes(orjson.dumps([{**FLAT, "id": "from-the-api"}]))
        with trio.fail_after(5):
            while "from-the-api" not in src.index.by_id:  # noqa: ASYNC110
                await trio.sleep(0.005)
        nursery.cancel_scope.cancel()


async def test_where_inotify_cannot_watch_the_files_are_polled(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rules_source, "DirWatch", no_inotify)
    p = tmp_path / "rules.json"
    p.write_bytes(orjson.dumps([FLAT]))
    src = RulesSource(p, Settings(), reload_check_s=0.05)
    src.load_initial()
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(src.run, sighup=False))
        turns = await turns_of(functools.partial(trio.sleep, 0.5))
        assert turns >= 5  # what the watch saves
        assert await reloads_after_change(src, p, "polled") < 2
        nursery.cancel_scope.cancel()


async def test_a_rules_directory_created_after_the_start_is_watched_from_then_on(
        tmp_path: Path) -> None:
    p = tmp_path / "etc" / "rules.json"
    src = RulesSource(p, Settings(), reload_check_s=0.05)
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(src.run, sighup=False))
        await trio.sleep(0.1)  # polled: no directory to watch
        p.parent.mkdir()
        assert await reloads_after_change(src, p, "first") < 2
        await trio.sleep(0.2)
        turns = await turns_of(functools.partial(trio.sleep, 0.3))
        assert turns <= 2, turns  # watched now, no longer polled
        assert await reloads_after_change(src, p, "second") < 0.5
        nursery.cancel_scope.cancel()


def test_from_config(tmp_path: Path) -> None:
    from hostagent.alerts.rules_source import from_config, storm_from
    from hostagent.config.load import from_mapping

    p = tmp_path / "r.toml"
    p.write_text(TOML)
    cfg = from_mapping({"thresholds": {"rules_path": str(p), "cooldown_s": 60,
                                              "approaching_fraction": 0.8}}).thresholds
    src = from_config(cfg)
    src.load_initial()
    assert len(src.index.rules) == 2 and src.index.settings.cooldown_s == 60
    assert src.index.levels["cpu-high"].approach == pytest.approx(64.0)
    assert storm_from(cfg).per_minute == 60


def test_an_api_write_does_not_hide_a_change_of_the_rules_file(tmp_path: Path) -> None:
    p = tmp_path / "rules.json"
    p.write_bytes(orjson.dumps([FLAT]))
    src = RulesSource(p, Settings(), api_path=tmp_path / "api-rules.json")
    src.load_initial()
    p.write_bytes(orjson.dumps([{**FLAT, "id": "edited"}]))  # by the operator, meanwhile
    os.utime(p, ns=(5, 5))
    src.write_api([dataclasses.replace(src.index.rules[0], id="from-api")])
    assert "edited" not in src.index.by_id  # the API write installed what it read before
    assert src.check() is True and {"edited", "from-api"} <= set(src.index.by_id)


async def test_a_watched_api_write_is_installed_once(tmp_path: Path) -> None:
    p = tmp_path / "rules.json"
    p.write_bytes(orjson.dumps([FLAT]))
    src = RulesSource(p, Settings(), api_path=tmp_path / "api-rules.json")
    src.load_initial()
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(src.run, sighup=False))
        before = src.loads
        rule = src.index.rules[0]
        for k in range(5):  # the watch sees each write at once: no second load beside it
            new = dataclasses.replace(rule, id=f"api-{k}")
            await trio.to_thread.run_sync(src.write_api, [new])
            await trio.sleep(0.1)
        assert src.loads == before + 5
        nursery.cancel_scope.cancel()


def test_an_unserved_channel_is_named_in_its_own_layer_file(tmp_path: Path) -> None:
    """A sink removed from the config while api-rules.json still names its channel."""
    def rule(rid: str, channel: str) -> dict[str, object]:
        return {**NESTED, "id": rid, "notification_channels": [channel]}

    rules, api = tmp_path / "rules.json", tmp_path / "api-rules.json"
    rules.write_bytes(orjson.dumps([rule("a", "queue"), rule("b", "queue")]))
    api.write_bytes(orjson.dumps([rule("b", "queue"), rule("c", "email")]))
    routes = {"queue": Route(frozenset({"threshold_violation"}), frozenset({"queue"}))}
    src = RulesSource(rules, Settings(), api_path=api, routes=routes)
    with pytest.raises(ConfigError) as err:
        src.load_initial()
    # Before: "rules.json: [rules[2].notification_channels]", a rule the file does not have
    # (the index was the merged set's), so the operator looked in the wrong file.
    assert (err.value.file, err.value.key) == (str(api), "rules[1].notification_channels")
    # A rule overridden by a higher layer is not in force: its channels do not matter.
    rules.write_bytes(orjson.dumps([rule("a", "queue"), rule("c", "email")]))
    api.write_bytes(orjson.dumps([rule("c", "queue")]))
    src.load_initial()
    assert sorted(src.origin.items()) == [("a", "file"), ("c", "api")]
