"""The account list parsed as it is read (owners/json_stream.py) answers as a whole-body orjson
parse does (the parser it replaced, kept here as the reference): the same accounts, or the
same error, on generated answers and on those answers cut short or with a byte changed."""

from __future__ import annotations

import re
import tracemalloc
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from hostagent.errors import OwnerLookupError
from hostagent.model import usable_owner_id
from hostagent.owners import json_stream
from hostagent.owners.accounts import (
    Account,
    AccountList,
    bad_field,
    envelope,
    json_body,
    parse_account,
    parse_account_list,
)


def whole_body(body: bytes) -> AccountList:
    """The parser before: orjson builds the whole document, then each account is checked."""
    doc = envelope(json_body(body))
    raw = doc.get("accounts")
    if not isinstance(raw, list):
        raise bad_field("accounts", "an array", raw)
    total = doc.get("total")
    if total is not None and (isinstance(total, bool) or total != len(raw)):
        raise bad_field("total", f"{len(raw)} (the number of accounts)", total)
    accounts: list[Account] = []
    unknown = unusable = 0
    for i, item in enumerate(raw):
        acct, skipped = parse_account(item, f"accounts[{i}]")
        if not usable_owner_id(acct.address):
            unusable += 1
            continue
        accounts.append(acct)
        unknown += skipped
    return AccountList(tuple(accounts), unknown, unusable)


def outcome(parse: Any, body: bytes) -> tuple[str, Any]:
    try:
        return "ok", parse(body)
    except OwnerLookupError as err:
        text = str(err)
        # How a malformed body is described is each JSON library's own wording.
        return "error", "malformed JSON" if text.startswith("malformed JSON") else text


def same_answer(body: bytes) -> None:
    # Where the two JSON libraries differ by design, not by us: a lone UTF-16 surrogate
    # escape (orjson refuses it; such a string is never a usable owner id anyway) and
    # integers beyond 64 bits (orjson refuses them).
    assume(not re.search(rb"\\u[dD][89a-fA-F]", body))
    assume(not re.search(rb"[0-9]{19}", body))
    assert outcome(parse_account_list, body) == outcome(whole_body, body)


texts = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
addresses = st.one_of(st.from_regex(r"0x[0-9a-f]{40}", fullmatch=True), texts)
accounts = st.fixed_dictionaries(
    {"address": addresses},
    optional={
        "owned_instances": st.one_of(st.lists(texts, max_size=3), st.none(), texts),
        "authorized_instances": st.one_of(
            st.dictionaries(texts, st.sampled_from(["Owner", "Manager", "Operator",
                                                    "ReadOnly", "Janitor"]), max_size=3),
            st.dictionaries(texts, st.integers(-9, 9), max_size=1), st.none()),
        "is_global_admin": st.one_of(st.booleans(), st.none(), st.integers(0, 2)),
        "name": texts, "credits": st.integers(-(2**40), 2**40),
        "created_at": st.floats(allow_nan=False, allow_infinity=False),
    })


@st.composite
def answers(draw: st.DrawFn) -> bytes:
    items = draw(st.lists(st.one_of(accounts, accounts, accounts, st.integers(-9, 9), texts),
                          max_size=6))
    members: list[tuple[str, Any]] = [
        ("success", draw(st.sampled_from([True, True, True, False, None, 1]))),
        ("accounts", items if draw(st.integers(0, 9)) else draw(st.one_of(texts, st.none()))),
    ]
    if draw(st.booleans()):
        members.append(("total", draw(st.sampled_from([len(items), len(items) + 1, True,
                                                       None, "3"]))))
    if draw(st.booleans()):
        members.append(("message", draw(texts)))
    if draw(st.booleans()):
        members.append(("error", draw(texts)))
    if draw(st.integers(0, 3)) == 0:  # a key given twice: the last one counts
        members.append(("accounts", draw(st.lists(accounts, max_size=2))))
    order = draw(st.permutations(members))
    space = draw(st.sampled_from(["", " ", "\n  ", "\t"]))
    return ("{" + space + ("," + space).join(
        orjson.dumps(k).decode() + space + ":" + space + orjson.dumps(v).decode()
        for k, v in order) + space + "}").encode()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(answers())
def test_generated_answers_parse_as_the_whole_body_parse_does(body: bytes) -> None:
    same_answer(body)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(answers(), st.data())
def test_cut_or_changed_answers_fail_or_parse_as_the_whole_body_parse_does(
        body: bytes, data: st.DataObject) -> None:
    if data.draw(st.booleans()):
        body = body[:data.draw(st.integers(0, len(body)))]
    else:
        at = data.draw(st.integers(0, len(body) - 1))
        byte = data.draw(st.sampled_from(b'{}[],:" \\0a-eE.\xff'))
        body = body[:at] + bytes([byte]) + body[at + 1:]
    same_answer(body)


@pytest.mark.parametrize("body", [
    b"", b" ", b"[]", b"null", b'"x"', b"{", b"{}", b'{"success": true}',
    b'{"success": true, "accounts": []} x', b'{"success": true, "accounts": [] ,}',
    b'{"success": true, "accounts": [1,]}', b'{"success": true, "accounts": NaN}',
    b'{"success": true, "accounts": [], "total": Infinity}',
    b'{"success": true, "accounts": [], "total": 1e400}',
    b'{"success": true "accounts": []}', b'{"success": true, "accounts": [{}]}',
    b'{"success": true, "accounts": [{"address": "a"}] }', b"\xef\xbb\xbf{}",
    b'{"success": true, "accounts": [{"address": "a"}], "accounts": [{"address": "b"}]}',
    b'{"success": true, "accounts": [{"address": 1}], "accounts": [{"address": "b"}]}',
    b'{"success": true, "accounts": [{"address": "a"}], "accounts": 3}',
    b'{"success": true, "accounts": ' + b"[" * 5000 + b"]" * 5000 + b"}",
])
def test_edge_answers_parse_as_the_whole_body_parse_does(body: bytes) -> None:
    assert outcome(parse_account_list, body) == outcome(whole_body, body)


def test_a_large_list_is_never_held_whole() -> None:
    """16 MiB of minimal accounts: the whole-body parse peaked at 277 MB of Python objects
    (tracemalloc), the streamed one at the body, its text and the accounts kept."""
    body = orjson.dumps({"success": True, "accounts": [
        {"address": f"0x{i:040x}", "owned_instances": [f"i-{i:08d}"]} for i in range(20_000)],
        "total": 20_000})
    tracemalloc.start()
    try:
        whole_body(body)
        whole_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        got = parse_account_list(body)
        streamed_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(got.accounts) == 20_000
    assert streamed_peak < whole_peak / 2, (streamed_peak, whole_peak)


def test_the_walk_hands_over_items_in_order_and_keeps_the_other_members() -> None:
    seen: list[tuple[int, Any]] = []
    got = json_stream.walk_object(b' {"a": [1, {"b": 2}], "c": "d"} ', "a",
                                  lambda i, v: seen.append((i, v)), seen.clear)
    assert got is not None and got.array_seen and got.members == {"c": "d"}
    assert seen == [(0, 1), (1, {"b": 2})]
    assert json_stream.walk_object(b"[1]", "a", lambda i, v: None, lambda: None) is None
