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


@given(st.integers(-(10**15), 10**15) | st.floats(-1e15, 1e15))
def test_numeric_time_claims_pass(value: float) -> None:
    header = enc(json.dumps({"alg": "RS256"}).encode())
    payload = enc(json.dumps({"sub": "x", "exp": value}).encode())
    assert shape_error(f"{header}.{payload}.{enc(b'sig')}") is None


@given(st.sampled_from(["exp", "nbf", "iat"]),
       st.integers(10**15 + 1, 10**500) | st.floats(1e15, 1e308, exclude_min=True),
       st.booleans())
def test_time_claims_past_any_date_are_refused_not_raised(claim: str, size: float,
                                                         negative: bool) -> None:
    """An integer too large for a float (10**400) once raised OverflowError: a 500 for anyone
    holding no credentials at all."""
    header = enc(json.dumps({"alg": "HS256"}).encode())
    payload = enc(b'{"sub": "x", "%s": %s}' % (claim.encode(),
                                              str(-size if negative else size).encode()))
    why = shape_error(f"{header}.{payload}.{enc(b'sig')}")
    assert why is not None and claim in why


@given(st.integers(900, 5000), st.booleans())
def test_json_nested_past_the_stack_is_refused_not_raised(depth: int, in_header: bool) -> None:
    """The json module recurses: nesting past the stack raised RecursionError (a 500)."""
    deep = enc(b"[" * depth + b"]" * depth)
    plain = enc(json.dumps({"alg": "HS256"}).encode())
    token = f"{deep}.{plain}.{enc(b'sig')}" if in_header else f"{plain}.{deep}.{enc(b'sig')}"
    why = shape_error(token)  # not JSON (too deep) or not an object: refused either way
    assert why is not None and why.startswith("token header and payload must be JSON")
