"""Threshold rules and alerts: the public names of the three modules they are split into.

* `threshold_rules`: the `Rule` model, both seed formats, units (`parse_rule`, `parse_rules`);
* `threshold_index`: what a rule measures (`measure`), its `Levels`, the `RuleIndex`;
* `threshold_state`: the alert state machine (`AlertState`, `step`) and the pass (`evaluate`).

New code imports from those modules; this one re-exports them for the importers that predate
the split (the API backends and some tests).
"""

from __future__ import annotations

from hostagent.threshold_index import (
    NS_PER_S,
    Bucket,
    Levels,
    MeasureKey,
    RuleIndex,
    Settings,
    build_index,
    levels_of,
    measure,
    measure_value,
)
from hostagent.threshold_rules import (
    WILDCARD,
    Action,
    Kind,
    Resource,
    Rule,
    parse_rule,
    parse_rules,
)
from hostagent.threshold_state import (
    AlertState,
    Evaluation,
    Gate,
    Status,
    Transition,
    TransitionKind,
    evaluate,
    fingerprint,
    load_states,
    next_status,
    step,
)

__all__ = [
    "NS_PER_S",
    "WILDCARD",
    "Action",
    "AlertState",
    "Bucket",
    "Evaluation",
    "Gate",
    "Kind",
    "Levels",
    "MeasureKey",
    "Resource",
    "Rule",
    "RuleIndex",
    "Settings",
    "Status",
    "Transition",
    "TransitionKind",
    "build_index",
    "evaluate",
    "fingerprint",
    "levels_of",
    "load_states",
    "measure",
    "measure_value",
    "next_status",
    "parse_rule",
    "parse_rules",
    "step",
]
