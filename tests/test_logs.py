"""Structured logging: one JSON object per line with every extra field; text for humans."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from hostagent import logs
from hostagent.errors import ConfigError

TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture(autouse=True)
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


def lines(buf: io.StringIO) -> list[dict[str, object]]:
    text = buf.getvalue()
    assert text.endswith("\n")
    return [orjson.loads(line) for line in text.splitlines()]


def test_json_line_with_extras() -> None:
    buf = io.StringIO()
    logs.setup("info", "json", stream=buf)
    logging.getLogger("hostagent.delivery.sinks.base").warning(
        "sink down", extra={"sink": "queue", "attempt": 3, "lag_s": 1.5, "ok": False,
                            "path": Path("/x"), "tags": {"b", "a"}},
    )
    (rec,) = lines(buf)
    assert TS.match(str(rec.pop("ts")))
    assert rec == {
        "level": "warning", "logger": "hostagent.delivery.sinks.base", "msg": "sink down",
        "sink": "queue", "attempt": 3, "lag_s": 1.5, "ok": False, "path": "/x",
        "tags": ["a", "b"],
    }


def test_timestamp_is_utc_milliseconds() -> None:
    assert logs._ts(1_700_000_000.1239) == "2023-11-14T22:13:20.123Z"
    assert logs._ts(0.0) == "1970-01-01T00:00:00.000Z"


def test_level_filters_and_message_args() -> None:
    buf = io.StringIO()
    logs.setup("WARNING", "json", stream=buf)
    log = logging.getLogger("hostagent.x")
    log.info("hidden")
    log.error("pass took %d ms", 42)
    (rec,) = lines(buf)
    assert rec["msg"] == "pass took 42 ms"
    assert rec["level"] == "error"


def test_exception_is_one_line_with_exc_field() -> None:
    buf = io.StringIO()
    logs.setup("debug", "json", stream=buf)
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        logging.getLogger("hostagent.y").exception("boom", extra={"domain": "vm1"})
    (rec,) = lines(buf)  # the multi-line traceback stays inside one JSON string
    assert rec["msg"] == "boom"
    assert rec["domain"] == "vm1"
    assert "Traceback" in str(rec["exc"])
    assert "ValueError: bad\nthing" in str(rec["exc"])


def test_colliding_and_unencodable_extras_do_not_break_the_line() -> None:
    buf = io.StringIO()
    logs.setup("info", "json", stream=buf)
    log = logging.getLogger("hostagent.z")
    log.info("collide", extra={"level": "mine", "ts": 1})
    log.info("huge", extra={"n": 2**70, "k": {1: "one"}})
    first, second = lines(buf)
    assert first["level"] == "info"
    assert first["extra.level"] == "mine"
    assert first["extra.ts"] == 1
    assert second["msg"] == "huge"
    assert second["n"] == repr(2**70)


def test_standard_attributes_are_not_leaked() -> None:
    buf = io.StringIO()
    logs.setup("info", "json", stream=buf)
    logging.getLogger("hostagent").info("plain")
    (rec,) = lines(buf)
    assert set(rec) == {"ts", "level", "logger", "msg"}


def test_setup_again_replaces_handler() -> None:
    first, second = io.StringIO(), io.StringIO()
    logs.setup("info", "json", stream=first)
    logs.setup("debug", "json", stream=second)  # e.g. after SIGHUP
    logging.getLogger("hostagent").debug("once")
    assert first.getvalue() == ""
    assert len(lines(second)) == 1


def test_text_format() -> None:
    buf = io.StringIO()
    logs.setup("info", "text", stream=buf)
    logging.getLogger("hostagent.api").info(
        "listening", extra={"port": 9464, "addr": "127.0.0.1", "note": "two words"}
    )
    line = buf.getvalue().rstrip("\n")
    clock, rest = line.split(" ", 1)
    assert re.fullmatch(r"\d\d:\d\d:\d\d", clock)
    assert rest == 'info    listening port=9464 addr=127.0.0.1 note="two words"'


class Tty(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_auto_is_text_on_a_terminal_and_json_elsewhere() -> None:
    term, pipe = Tty(), io.StringIO()
    logs.setup("info", "auto", stream=term)
    logging.getLogger("hostagent").warning("sink down", extra={"sink": "queue"})
    assert term.getvalue().split(" ", 1)[1] == "warning sink down sink=queue\n"
    logs.setup("info", "auto", stream=pipe)
    logging.getLogger("hostagent").warning("sink down", extra={"sink": "queue"})
    assert lines(pipe)[0]["sink"] == "queue"


def test_default_stream_is_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup("info", "json")
    logging.getLogger("hostagent").info("hello")
    out = capsys.readouterr()
    assert out.out == ""
    assert orjson.loads(out.err)["msg"] == "hello"


def test_a_pinned_format_survives_a_reload() -> None:
    buf = Tty()
    logs.setup("info", "json", stream=buf, pin=True)      # --log-format json
    logs.setup("debug", "text", stream=buf)                # SIGHUP with [log] format = "text"
    logging.getLogger("hostagent").debug("after reload")
    assert lines(buf)[0]["msg"] == "after reload"


def test_text_format_exception() -> None:
    buf = io.StringIO()
    logs.setup("info", "text", stream=buf)
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        logging.getLogger("hostagent").exception("failed")
    assert "failed\nTraceback" in buf.getvalue()
    assert "ZeroDivisionError" in buf.getvalue()


@pytest.mark.parametrize(("level", "fmt"), [("verbose", "json"), ("info", "xml"), ("info", "")])
def test_bad_arguments(level: str, fmt: str) -> None:
    with pytest.raises(ConfigError) as info:
        logs.setup(level, fmt, stream=io.StringIO())  # type: ignore[arg-type]
    # Every choice is named in the fix, as the config's own choice errors do (before: none).
    key, choices = (("level", logs.LEVELS) if level == "verbose" else ("format", logs.FORMATS))
    names = [f'"{c}"' for c in choices]
    assert info.value.fix == f"set {key} = " + ", ".join(names[:-1]) + " or " + names[-1]


def test_the_default_handler_follows_a_replaced_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    first = io.StringIO()
    monkeypatch.setattr("sys.stderr", first)
    logs.setup("info", "json")
    first.close()                      # e.g. a test's capture, closed after the test
    second = io.StringIO()
    monkeypatch.setattr("sys.stderr", second)
    logging.getLogger("hostagent").info("still logged")
    assert lines(second)[0]["msg"] == "still logged"
