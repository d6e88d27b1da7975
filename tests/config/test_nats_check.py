"""The NATS subject grammar the sink and check-config share: wildcard matching against a
regex reference, subject-safe tokens, rendering."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from hostagent.config.nats_check import (
    covered,
    render_subject,
    subject_matches,
    subject_token,
    subject_valid,
)

TOKENS = st.sampled_from(["a", "b", "usage", "host-1", "x_y"])
SUBJECTS = st.lists(TOKENS, min_size=1, max_size=5).map(".".join)
PATTERNS = st.lists(st.one_of(TOKENS, st.just("*")), min_size=1, max_size=5).flatmap(
    lambda toks: st.sampled_from([".".join(toks), ".".join([*toks[:-1], ">"])]))


def reference(pattern: str, subject: str) -> bool:
    parts = []
    for tok in pattern.split("."):
        parts.append(r"[^.]+" if tok == "*" else r"[^.]+(\.[^.]+)*" if tok == ">"
                     else re.escape(tok))
    return re.fullmatch(r"\.".join(parts), subject) is not None


@given(PATTERNS, SUBJECTS)
def test_subject_matches_agrees_with_a_regex_reference(pattern: str, subject: str) -> None:
    assert subject_valid(pattern, wildcards=True)
    assert subject_matches(pattern, subject) == reference(pattern, subject)


@given(st.text(max_size=20))
def test_subject_token_is_always_one_valid_token(value: str) -> None:
    tok = subject_token(value)
    assert subject_valid(tok)
    assert "." not in tok


def test_render_and_cover() -> None:
    assert render_subject("hostagent.usage.{node_id}", node_id="rack1.host 7",
                          kind="resource_usage") == "hostagent.usage.rack1_host_7"
    assert render_subject("h.{kind}.{node_id}", node_id="n", kind="x") == "h.x.n"
    assert covered(["hostagent.>"], "hostagent.usage.n")
    assert not covered(["hostagent.usage.*"], "hostagent.alerts.n")
    assert not subject_valid("a.>.b", wildcards=True)
    assert not subject_valid("a.*")
