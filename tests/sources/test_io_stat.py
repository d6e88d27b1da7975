"""`sum_io_stat`, the one-regex parse of a v2 `io.stat` every pass now makes per domain, held
to the token-by-token parse it replaced, on io.stat texts shaped as the kernel writes them
(a `MAJ:MIN` first, then `key=value` tokens in any order, devices in any number)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hostagent.sources.cgroup_read import sum_io_stat


def reference(text: str) -> tuple[int, int]:
    """The parse before the regex: every token after a line's first, by `str.split`."""
    rd = wr = 0
    for line in text.splitlines():
        for token in line.split()[1:]:
            if token.startswith("rbytes="):
                rd += int(token[7:])
            elif token.startswith("wbytes="):
                wr += int(token[7:])
    return rd, wr


_KEYS = ("rbytes", "wbytes", "rios", "wios", "dbytes", "dios", "cost.usage", "rbytes_x")
_value = st.integers(min_value=0, max_value=2**64 - 1).map(str)
_token = st.tuples(st.sampled_from(_KEYS), _value).map("=".join)
_line = st.tuples(st.integers(0, 4095), st.integers(0, 1 << 20),
                  st.lists(_token, max_size=10)).map(
    lambda t: " ".join([f"{t[0]}:{t[1]}", *t[2]]))


@given(st.lists(_line, max_size=6), st.booleans())
def test_the_regex_sums_what_the_token_parse_sums(lines: list[str], final_newline: bool
                                                  ) -> None:
    text = "\n".join(lines) + ("\n" if final_newline and lines else "")
    assert sum_io_stat(text.encode()) == reference(text)


def test_a_recorded_io_stat() -> None:
    data = (b"259:0 rbytes=10742824960 wbytes=38798452160 rios=412378 wios=1318828 dbytes=0 "
            b"dios=0\n253:0 rbytes=4096 wbytes=0 rios=1 wios=0 dbytes=0 dios=0\n")
    assert sum_io_stat(data) == (10742829056, 38798452160)
    assert sum_io_stat(b"") == (0, 0)  # no device before the first I/O


@pytest.mark.parametrize("data", [b"259:0 rbytes=x wbytes=1\n", b"259:0 rbytes= wbytes=1\n",
                                  b"8:0 rbytes=1 wbytes=2e3\n"])
def test_a_value_that_is_not_a_number_is_refused(data: bytes) -> None:
    with pytest.raises(ValueError):
        sum_io_stat(data)
    with pytest.raises(ValueError):
        reference(data.decode())
