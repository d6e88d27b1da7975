"""Byte-for-byte: what a varied accounting history sends and persists never changes.

golden/pass_history.jsonl was recorded before the accounting step was made faster (issue 16);
every event payload, event_id, baseline `to_dict()` and sample summary must match it exactly.
"""

from __future__ import annotations

from tests.accounting.golden_scenario import GOLDEN, everything


def test_a_varied_history_sends_and_persists_exactly_the_golden_bytes() -> None:
    expected = GOLDEN.read_bytes().split(b"\n")[:-1]
    got = everything()
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g == e, f"line {i + 1} differs"
