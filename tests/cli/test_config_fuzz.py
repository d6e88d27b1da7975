"""Generated TOML documents against `check-config` and `run --once` (issue 13 §4).

Each document either passes both or is refused by both with exit 2 and one error line: no
traceback, and `check-config` accepts exactly what `run` starts with (the ansible role
validates with it). Keys are drawn from the real schema and made up, values of every TOML
type (nan and ±inf included), nested. What could reach beyond this process is pinned before
`run`: libvirt's test driver, loopback port 0 for the API, files under a fresh directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import tempfile
from pathlib import Path
from typing import Any

import tomli_w
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hostagent.cli.main import main
from hostagent.config.load import Config
from hostagent.config.sinks import SINK_TYPES

DEFAULTS: dict[str, dict[str, Any]] = {
    f.name: {g.name: getattr(f.default_factory(), g.name)  # type: ignore[misc]
             for g in dataclasses.fields(f.default_factory())}  # type: ignore[misc]
    for f in dataclasses.fields(Config) if f.name not in ("sinks", "source")
}
SECTIONS = {name: sorted(keys) for name, keys in DEFAULTS.items()}
SINK_KEYS = sorted({g.name for cls in SINK_TYPES.values() for g in dataclasses.fields(cls)})

names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1,
                max_size=12)
scalars = (st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats()
           | st.text(max_size=30) | st.sampled_from(["", "/", "..", "127.0.0.1", "uuid",
                                                      "metadata", "formation", "debug"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(names, inner, max_size=3), max_leaves=8)


def like(default: Any) -> st.SearchStrategy[Any]:
    """Values of the default's own type, so that many documents get past the type checks."""
    if isinstance(default, bool):
        return st.booleans()
    if isinstance(default, int):
        return st.integers(-10, 100_000) | st.just(default)
    if isinstance(default, float):
        return st.floats(-10, 1e6) | st.sampled_from([default, float("nan"), float("inf")])
    if isinstance(default, tuple):
        return st.lists(st.text(max_size=10), max_size=3) | st.just(list(default))
    return st.text(max_size=20) | st.just(default)


@st.composite
def section(draw: st.DrawFn, name: str) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for key in draw(st.lists(st.sampled_from(SECTIONS[name]), max_size=4, unique=True)):
        default = DEFAULTS[name][key]
        table[key] = draw(st.one_of(values, like(default), like(default),
                                    st.just(list(default) if isinstance(default, tuple)
                                            else default)))
    if draw(st.integers(0, 7)) == 7:
        table[draw(names)] = draw(values)  # an unknown key
    return table


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for name in draw(st.lists(st.sampled_from(sorted(SECTIONS)), max_size=4, unique=True)):
        doc[name] = draw(values) if draw(st.integers(0, 7)) == 7 else draw(section(name))
    if draw(st.integers(0, 5)) == 5:
        doc[draw(names)] = draw(values)  # an unknown section or top-level key
    if draw(st.booleans()):
        sink = st.dictionaries(st.sampled_from(SINK_KEYS) | names, values, max_size=4)
        typed = st.fixed_dictionaries({"type": st.sampled_from([*SINK_TYPES, "bogus"])})
        doc["sinks"] = draw(st.lists(st.one_of(sink, typed.map(dict)), max_size=2))
    return doc


def pin(doc: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """Keep `run` on this machine: test driver, loopback API, files under `tmp`, no owners."""
    doc = dict(doc)
    for section, key, value in (("libvirt", "uri", "test:///default"),
                                ("collector", "state_path", f"{tmp}/state.db"),
                                ("owners", "enabled", False),
                                ("api", "bind", "127.0.0.1"), ("api", "port", 0)):
        table = doc.get(section)
        if table is None:
            doc[section] = {key: value}
        elif isinstance(table, dict):
            doc[section] = {**table, key: value}
    sinks = doc.get("sinks")
    if isinstance(sinks, list):
        doc["sinks"] = [
            {**s, "path": f"{tmp}/events-{i}.jsonl"} if s.get("type") == "jsonl"
            else {**s, "type": "jsonl", "path": f"{tmp}/events-{i}.jsonl"}
            if s.get("type") == "formation-queue" else s
            for i, s in enumerate(sinks) if isinstance(s, dict)]
    else:
        doc["sinks"] = [{"type": "jsonl", "path": f"{tmp}/events.jsonl"}]
    return doc


def invoke(argv: list[str]) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, err.getvalue()


def assert_clean(rc: int, err: str) -> None:
    assert "Traceback" not in err, err
    if rc != 0:
        lines = [line for line in err.splitlines() if line.startswith("hostagent:")]
        assert rc == 2, err
        assert len(lines) == 1, err


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents())
def test_generated_documents_pass_both_or_fail_both_in_one_line(doc: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        path = tmp / "hostagent.toml"
        try:
            path.write_text(tomli_w.dumps(pin(doc, tmp)))
        except (TypeError, ValueError):  # not representable in TOML (e.g. mixed arrays)
            return
        check_rc, check_err = invoke(["check-config", str(path)])
        assert_clean(check_rc, check_err)
        run_rc, run_err = invoke(["run", "--once", "--config", str(path)])
        assert_clean(run_rc, run_err)
        event(f"exit {run_rc}")
        assert run_rc == check_rc, (check_err, run_err)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_arbitrary_text_is_checked_in_one_line(text: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "hostagent.toml"
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        rc, err = invoke(["check-config", str(path)])
        assert_clean(rc, err)


def test_a_central_rules_source_run_would_refuse_is_refused_by_check_config(
        tmp_path: Path) -> None:
    """Found by the generated documents: `thresholds.source_url = "0"` passed check-config and
    failed at start-up; so did a signed source without a key."""
    for table, key in (({"source_url": "0"}, "thresholds.source_url"),
                       ({"source_url": "http://127.0.0.1:9/rules", "source_signed": True},
                        "thresholds.source_signed")):
        path = tmp_path / "hostagent.toml"
        path.write_text(tomli_w.dumps(pin({"thresholds": table}, tmp_path)))
        for argv in (["check-config", str(path)], ["run", "--once", "--config", str(path)]):
            rc, err = invoke(argv)
            assert_clean(rc, err)
            assert rc == 2 and f"[{key}]" in err, (argv, err)
