"""The JWT shape check: one spelling per token, numeric time claims (hypothesis)."""

from __future__ import annotations

import base64
import json

from hypothesis import given
from hypothesis import strategies as st

from hostagent.api.token_shape import canonical_segment, shape_error

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def enc(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@given(st.binary(max_size=300))
def test_canonical_segments_round_trip(raw: bytes) -> None:
    assert canonical_segment(enc(raw)) == raw


@given(st.binary(min_size=1, max_size=300), st.integers(1, 3))
def test_other_spellings_are_refused(raw: bytes, bit: int) -> None:
    seg = enc(raw)
    if len(seg) % 4:
        assert canonical_segment(seg + "=" * (-len(seg) % 4)) is None  # padded
        last = ALPHABET.index(seg[-1])
        unused = 4 if len(seg) % 4 == 2 else 2  # bits the last character does not carry
        if bit < 1 << unused:
            assert canonical_segment(seg[:-1] + ALPHABET[last ^ bit]) is None
    assert canonical_segment(seg + "=") is None
    assert canonical_segment(seg.replace("-", "+").replace("_", "/") + "+") is None


@given(st.text(max_size=200))
def test_any_text_gets_an_answer_never_an_exception(text: str) -> None:
    assert shape_error(text) is None or isinstance(shape_error(text), str)


@given(st.sampled_from(["exp", "nbf", "iat"]),
       st.one_of(st.text(), st.booleans(), st.none(), st.lists(st.integers())))
def test_time_claims_must_be_numbers(claim: str, value: object) -> None:
    header = enc(json.dumps({"alg": "RS256"}).encode())
    payload = enc(json.dumps({"sub": "x", claim: value}).encode())
    assert shape_error(f"{header}.{payload}.{enc(b'sig')}") is not None


@given(st.integers(-(2**53), 2**53) | st.floats(allow_nan=False, allow_infinity=False))
def test_numeric_time_claims_pass(value: float) -> None:
    header = enc(json.dumps({"alg": "RS256"}).encode())
    payload = enc(json.dumps({"sub": "x", "exp": value}).encode())
    assert shape_error(f"{header}.{payload}.{enc(b'sig')}") is None
