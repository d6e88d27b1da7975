"""Rules files: read (never blocking, bounded), parsed and written atomically.

Formats (by suffix; `.toml` is TOML, anything else JSON)::

    JSON:  [ {rule}, ... ]   or   {"rules": [ {rule}, ... ]}
    TOML:  [[rules]]
           id = "cpu-high"
           resource_type = "Cpu"
           threshold_type = { Percentage = { value = 80.0 } }
           ...

Each rule is either seed format (see hostagent.alerts.rules). A file that cannot be read or
has one invalid rule raises `ConfigError` naming the file, `rules[i].key`, what was expected and
the fix; `RulesSource` then keeps serving the last valid set (and says so in `last_error`).
A file that disappears is an error too (rules are not silently dropped); an empty `rules_path`
means no rules.
"""

from __future__ import annotations

import os
import stat
import tempfile
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from hostagent.alerts.rules import Rule, parse_rules, table_fix
from hostagent.config.load import decode_utf8
from hostagent.config.schema import MAX_REPEAT_S
from hostagent.errors import ConfigError

# Far past any real rule set (10,000 rules are ~3 MB): a bound, so that a log file or an image
# put at the path is refused instead of read whole into memory.
MAX_RULES_FILE_BYTES = 16 << 20
_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISSOCK, "a socket"))


def _unreadable(p: Path, err: OSError, key: str | None) -> ConfigError:
    missing = isinstance(err, FileNotFoundError)
    if key is None:  # named on the command line (check-rules FILE): no config key to fix
        fix = ("pass the path of an existing rules file (JSON, or TOML named *.toml)" if missing
               else "pass the path of a rules file you can read (check its permissions)")
    else:
        fix = (f"create it, or fix {key}" if missing
               else f"make it readable by the daemon's user, or fix {key}")
    return ConfigError(str(p), "-", "a readable rules file", err.strerror or str(err), fix)


def read_rules_file(p: Path, *, key: str | None = None) -> bytes:
    """A rules file's bytes; ConfigError unless it is a readable regular file of at most
    MAX_RULES_FILE_BYTES. Never blocks: a FIFO put at the path is refused (opened
    non-blocking), where reading it once stalled the daemon's whole event loop.

    `key`: the config key that named the file, for the fix (None: the file was named on the
    command line, `hostagent check-rules FILE`)."""
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as err:
        raise _unreadable(p, err, key) from err
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = next((name for test, name in _FILE_KINDS if test(st.st_mode)), "no file")
            raise ConfigError(str(p), "-", "a regular rules file", kind,
                              "pass the path of a JSON or TOML rules file" if key is None
                              else f"put a JSON or TOML rules file there, or fix {key}")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(MAX_RULES_FILE_BYTES + 1)
    except OSError as err:
        raise _unreadable(p, err, key) from err
    finally:
        os.close(fd)
    if len(data) > MAX_RULES_FILE_BYTES:
        raise ConfigError(str(p), "-", f"a rules file of at most {MAX_RULES_FILE_BYTES} bytes",
                          "a larger file", "pass the path of a rules file (10,000 rules take "
                          "about 3 MB)" if key is None else f"split the rules or fix {key}")
    return data


def load_rules(path: str | Path, *, key: str | None = None) -> tuple[Rule, ...]:
    """Parse a rules file; ConfigError names file, rule index and key (`key`: the config key
    that named the file, for the fix; None: named on the command line)."""
    p = Path(path)
    data = read_rules_file(p, key=key)
    return parse_document(data, source=str(p), toml=p.suffix.lower() == ".toml")


def parse_document(data: bytes, *, source: str, toml: bool = False) -> tuple[Rule, ...]:
    """A rules document (JSON or TOML bytes) → rules; ConfigError when any rule is invalid."""
    p = source
    doc: Any
    if data.startswith(b"\xef\xbb\xbf"):
        raise ConfigError(p, "-", "UTF-8 text without a byte order mark", "a UTF-8 BOM",
                          "save the file as UTF-8 without a BOM")
    text = decode_utf8(data, p)  # before the parsers: orjson's message names no place
    if toml:
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(p, "-", "valid TOML", str(err), "fix the syntax") from err
        # An integer past Python's 4,300-digit conversion limit, which tomllib raises as a
        # ValueError, not as a TOMLDecodeError (its text says to raise a Python limit).
        except ValueError as err:
            raise ConfigError(p, "-", "numbers of at most a few thousand digits",
                              "a longer one", "shorten it: no rule takes a number that long"
                              ) from err
        except RecursionError as err:  # tomllib recurses once per nesting level
            raise ConfigError(p, "-", "TOML nested at most a few hundred levels deep",
                              "deeper nesting", "flatten the arrays or tables") from err
    else:
        try:
            doc = orjson.loads(text)  # refuses nesting past 1024 levels (JSONDecodeError)
        except orjson.JSONDecodeError as err:
            raise ConfigError(p, "-", "valid JSON", str(err), "fix the syntax") from err
    if isinstance(doc, dict):
        unknown = sorted(set(doc) - {"rules"})
        if unknown:
            raise ConfigError(p, unknown[0], "only a `rules` array", unknown[0],
                              "remove the key (is this the rules file?); "
                              + table_fix(toml))
        doc = doc.get("rules", [])
    rules = parse_rules(doc, source=p, toml=toml)
    check_limits(rules, source=p)
    return rules


def check_limits(rules: Sequence[Rule], *, source: str) -> None:
    """Refuse what parses but could not be evaluated: a `repeat_interval_s` past
    `[thresholds] repeat_interval_s`'s maximum (it becomes nanoseconds in a 64-bit range)."""
    for i, r in enumerate(rules):
        if r.repeat_interval_s is not None and r.repeat_interval_s > MAX_REPEAT_S:
            raise ConfigError(source, f"rules[{i}].repeat_interval_s",
                              f"a value <= {MAX_REPEAT_S} (a year)", r.repeat_interval_s,
                              f"use a value from 0 to {MAX_REPEAT_S} seconds (0: never "
                              "repeat), or remove the key for [thresholds] repeat_interval_s")


def rule_dict(rule: Rule) -> dict[str, Any]:
    """A rule as the rules files and the API hold it (seed 000 form plus our optional keys)."""
    out = rule.config_dict()
    if out.get("instance_id") is None:
        out.pop("instance_id", None)
    if rule.for_passes is not None:
        out["for_passes"] = rule.for_passes
    if rule.repeat_interval_s is not None:
        out["repeat_interval_s"] = rule.repeat_interval_s
    return out


def atomic_write(path: Path, data: bytes, mode: int = 0o640) -> None:
    """Write `data` to `path` by temp file, fsync and rename: readers see old or new, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
