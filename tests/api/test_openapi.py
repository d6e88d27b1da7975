"""The OpenAPI document matches the app: same operations, and real responses validate."""

from __future__ import annotations

import copy
from typing import Any

import httpx
import jsonschema
import pytest

from hostagent.api.openapi import openapi_document
from hostagent.api.server import make_app
from hostagent.api.view import ApiView
from tests.api.support import ALICE, Keys, api_config


def nullable_to_jsonschema(node: Any) -> Any:
    """OpenAPI 3.0 `nullable` → JSON Schema type lists (for jsonschema)."""
    if isinstance(node, dict):
        out = {k: nullable_to_jsonschema(v) for k, v in node.items() if k != "nullable"}
        if node.get("nullable") and "type" in node:
            out["type"] = [node["type"], "null"]
        if node.get("nullable") and "enum" in node and None not in node["enum"]:
            out["enum"] = [*node["enum"], None]
        return out
    if isinstance(node, list):
        return [nullable_to_jsonschema(v) for v in node]
    return node


def validate(body: Any, path: str, method: str, status: int) -> None:
    doc = openapi_document()
    resp = doc["paths"][path][method]["responses"][str(status)]
    if "$ref" in resp:
        resp = doc["components"]["responses"][resp["$ref"].rsplit("/", 1)[1]]
    schema = next(iter(resp["content"].values()))["schema"]
    root = {**copy.deepcopy(schema),
            "components": nullable_to_jsonschema(doc["components"])}
    jsonschema.validate(body, nullable_to_jsonschema(root))


def test_document_lists_exactly_the_app_routes(keys: Keys) -> None:
    app = make_app(api_config(keys), ApiView())
    served = set()
    for route in app.routes:
        path = getattr(route, "path", "")
        for m in getattr(route, "methods", None) or ():
            if m != "HEAD":
                served.add((path, m.lower()))
    documented = {(p, m) for p, ops in openapi_document()["paths"].items() for m in ops}
    assert served == documented


def test_every_operation_documents_its_errors() -> None:
    for path, ops in openapi_document()["paths"].items():
        for method, op in ops.items():
            assert "429" in op["responses"], (path, method)
            if op.get("security") != []:
                assert {"401", "403"} <= set(op["responses"]), (path, method)
            for name in (p["name"] for p in op.get("parameters", []) if p["in"] == "path"):
                assert "{" + name + "}" in path


@pytest.mark.parametrize(("path", "doc_path", "status"), [
    ("/api/v1/metrics", "/api/v1/metrics", 200),
    ("/api/v1/metrics?fields=instance_id,period", "/api/v1/metrics", 200),
    ("/get?instance_id=i-a1", "/get", 200),
    ("/get", "/get", 400),
    ("/api/v1/metrics/instances/i-a1", "/api/v1/metrics/instances/{instance_id}", 200),
    ("/api/v1/usage/instances/i-a1/current",
     "/api/v1/usage/instances/{instance_id}/current", 200),
    ("/api/v1/usage/instances/i-zz/current",
     "/api/v1/usage/instances/{instance_id}/current", 404),
    (f"/api/v1/usage/users/{ALICE}/current", "/api/v1/usage/users/{user_id}/current", 200),
    ("/api/v1/metrics?limit=0", "/api/v1/metrics", 400),
    ("/api/v1/webhooks", "/api/v1/webhooks", 200),
    ("/api/v1/thresholds", "/api/v1/thresholds", 200),
    ("/api/v1/health/status", "/api/v1/health/status", 503),
])
async def test_real_responses_match_the_document(client: httpx.AsyncClient, keys: Keys,
                                                 path: str, doc_path: str, status: int) -> None:
    r = await client.get(path, headers={"X-API-Key": keys.admin_key})
    assert r.status_code == status, r.text
    validate(r.json(), doc_path, "get", status)


async def test_served_document_is_the_document(client: httpx.AsyncClient) -> None:
    r = await client.get("/openapi.json")
    assert r.json() == openapi_document()
