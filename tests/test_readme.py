"""The README stays true: its config table is the code's, and it documents every subcommand."""

from __future__ import annotations

import re
from pathlib import Path

from hostagent.config.load import reference_markdown

README = Path(__file__).resolve().parents[1] / "README.md"


def test_config_table_matches_the_code() -> None:
    text = README.read_text()
    m = re.search(r"<!-- config-reference:start -->\n(.*?)\n<!-- config-reference:end -->",
                  text, re.S)
    assert m, "README lost its config-reference markers"
    assert m.group(1).strip() == reference_markdown(), (
        "README config table is stale: run `python -m hostagent.config` and paste it")


def test_readme_names_the_two_commands_and_ci_runs_the_test_one() -> None:
    text = README.read_text()
    demo = "bash deploy/bootstrap.sh demo"
    test = "bash deploy/bootstrap.sh test"
    assert demo in text
    assert test in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert test in ci.splitlines()


def test_readme_documents_every_subcommand() -> None:
    text = README.read_text()
    for cmd in ("hostagent dump", "hostagent top", "hostagent run", "hostagent check-config",
                "hostagent check-rules",
                "hostagent outbox status", "hostagent outbox dead-letters",
                "hostagent outbox replay", "hostagent sink check"):
        assert cmd in text, cmd
