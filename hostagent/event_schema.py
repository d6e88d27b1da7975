"""The packaged JSON Schema (draft 2020-12) of the `resource_usage` v1.0 event.

Reads a file shipped in the package, so it lives outside the pure `accounting` package; the
cross-field rules JSON Schema cannot state are `accounting.events.semantic_errors`.
"""

from __future__ import annotations

import functools
import importlib.resources
from typing import Any

import orjson


@functools.cache
def _schema_bytes() -> bytes:
    """The packaged schema file, read once."""
    ref = importlib.resources.files("hostagent").joinpath("schemas/resource_usage.v1.json")
    return ref.read_bytes()


def load_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of the event, a fresh dict per call."""
    schema: dict[str, Any] = orjson.loads(_schema_bytes())
    return schema
