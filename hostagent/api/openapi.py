"""The OpenAPI 3.0 document of the API (tests check every route and response against it)."""

from __future__ import annotations

from functools import cache
from typing import Any

from hostagent.api.view import RESOURCES
from hostagent.delivery.ssrf import MAX_URL_BYTES

ITEM_FIELDS = ("instance_id", "name", "uuid", "user_id", "org_id", "updated_at", "period",
               "metrics", "missing", "readings")
MAX_LIST_ITEMS = 100
MAX_PARAM_CHARS = 1024
_VALUE = r"[!-+\--~](?:[ !-+\--~]*[!-+\--~])?"  # printable ASCII but `,`; no blanks around


def csv_pattern(values: tuple[str, ...] | None) -> str:
    """1 to MAX_LIST_ITEMS comma-separated values (of `values` when given), no blanks."""
    one = f"(?:{'|'.join(values)})" if values else _VALUE
    return f"^{one}(?:,{one}){{0,{MAX_LIST_ITEMS - 1}}}$"

NULL_STR = {"type": "string", "nullable": True}
NULL_NUM = {"type": "number", "nullable": True}
NULL_INT = {"type": "integer", "nullable": True}
PROBLEM = {"$ref": "#/components/responses/Problem"}


def _json(schema: dict[str, Any], desc: str = "OK") -> dict[str, Any]:
    return {"description": desc, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(c): PROBLEM for c in (*codes, 401, 429, 431)}


def _q(name: str, desc: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": desc,
            "schema": schema or {"type": "string"}}


# A rule id: printable ASCII without spaces or `/`, so /api/v1/thresholds/{id} addresses it;
# not `.` or `..`, which clients (httpx, curl) remove from a URL as dot segments.
RULE_ID_PATTERN = rf"^(?!\.{{1,2}}$)[!-.0-~]{{1,{MAX_PARAM_CHARS}}}$"


# Any other path parameter: no control character (a NUL or a line break never reaches a
# lookup, a log line or an answer). Other characters are looked up as they are: a percent
# escape that is not UTF-8 (`%ff`, which a client may send for an id holding `%ff`) arrives
# as U+FFFD, and is simply not found.
PATH_PARAM_PATTERN = rf"^[^\u0000-\u001f\u007f-\u009f]{{1,{MAX_PARAM_CHARS}}}$"


def _path(name: str, pattern: str | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string", "minLength": 1, "maxLength": MAX_PARAM_CHARS,
                              "pattern": PATH_PARAM_PATTERN if pattern is None else pattern}
    return {"name": name, "in": "path", "required": True, "schema": schema}


def _csv_q(name: str, desc: str, values: tuple[str, ...] | None) -> dict[str, Any]:
    return _q(name, desc, {"type": "string", "maxLength": MAX_PARAM_CHARS,
                           "pattern": csv_pattern(values)})


def filters(max_page_size: int) -> list[dict[str, Any]]:
    """The filter, projection and page parameters (400 for anything else)."""
    return [
        _q("user_id", "only instances of this user",
           {"type": "string", "maxLength": MAX_PARAM_CHARS, "pattern": f"^{_VALUE}$"}),
        _csv_q("instance_id", "comma-separated instance ids", None),
        _csv_q("resource", f"comma-separated subset of {', '.join(RESOURCES)}", RESOURCES),
        _csv_q("fields", "comma-separated top-level fields of each item", ITEM_FIELDS),
        _q("limit", "page size", {"type": "integer", "minimum": 1,
                                  "maximum": max_page_size}),
        _q("offset", "items to skip", {"type": "integer", "minimum": 0, "maximum": 10**9}),
    ]

def _ci(*words: str) -> str:
    """A case-insensitive pattern of `words` (ECMA regexes have no (?i))."""
    alts = ["".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else c for c in w)
            for w in words]
    return f"^(?:{'|'.join(alts)})$"


_NONEMPTY = {"type": "string", "minLength": 1}
_AMOUNT = {"type": "number", "minimum": 0, "maximum": 1e15}  # admin_routes.MAX_NUMBER
_THRESHOLD = {"type": "object", "required": ["value"], "additionalProperties": False,
              "properties": {"value": _AMOUNT,
                             "unit": {"type": "string"}}}


def _rule_request(*, with_id: bool) -> dict[str, Any]:
    """A rule as a client sends it (seed 000 nested form or seed 001 flat form)."""
    props: dict[str, Any] = {
        "resource_type": {"type": "string", "pattern": _ci(
            "cpu", "memory", "storage", "networkegress", "network_egress", "networkingress",
            "network_ingress", "gpu")},
        "threshold_type": {"oneOf": [
            {"type": "string", "pattern": _ci("absolute", "percentage", "percent")},
            {"type": "object", "minProperties": 1, "maxProperties": 1,
             "additionalProperties": False,
             "properties": {"Percentage": _THRESHOLD, "Absolute": _THRESHOLD}}]},
        "threshold_value": _AMOUNT,
        "units": {"type": "string"}, "unit": {"type": "string"},
        "action": {"type": "string", "pattern": _ci("notify", "log", "alert")},
        "user_id": _NONEMPTY, "instance_id": {**_NONEMPTY, "nullable": True},
        "notification_channels": {"type": "array", "items": {**_NONEMPTY, "maxLength": 256}},
        "for_passes": {"type": "integer", "minimum": 1, "maximum": 1e15},
        "repeat_interval_s": _AMOUNT,
    }
    if with_id:
        props["id"] = {"type": "string", "pattern": RULE_ID_PATTERN}
    return {"type": "object", "additionalProperties": False, "properties": props,
            "required": ["resource_type", "threshold_type", "action", "user_id"],
            "description": "400 `invalid-rule` also when the parts do not fit together: the "
                           "flat form (threshold_type a string) needs threshold_value and a unit "
                           "the resource takes (units/unit); the nested form takes neither key; "
                           "a percentage of a resource that has none" +
                           ("" if with_id else "; an `id` in the body must equal the path's")}


SCHEMAS: dict[str, Any] = {
    "Problem": {"type": "object", "required": ["type", "title", "status", "detail", "instance"],
                "properties": {"type": {"type": "string"}, "title": {"type": "string"},
                               "status": {"type": "integer"}, "detail": {"type": "string"},
                               "instance": {"type": "string"}}},
    "Instance": {
        "type": "object", "description": "fields absent when projected away with `fields`",
        "properties": {
            "instance_id": {"type": "string"}, "name": {"type": "string"},
            "uuid": {"type": "string"}, "user_id": NULL_STR, "org_id": NULL_STR,
            "updated_at": NULL_STR,
            "period": {"type": "object", "nullable": True, "properties": {
                "start": {"type": "string"}, "end": {"type": "string"},
                "duration_s": {"type": "number"}}},
            "metrics": {"type": "object", "nullable": True,
                        "properties": {r: {"type": "object"} for r in RESOURCES}},
            "missing": {"type": "object", "nullable": True,
                        "additionalProperties": {"type": "string"}},
            "readings": {"type": "object", "nullable": True},
        }},
    "Page": {"type": "object", "required": ["total", "limit", "offset", "next_offset"],
             "properties": {"total": {"type": "integer"}, "limit": {"type": "integer"},
                            "offset": {"type": "integer"}, "next_offset": NULL_INT}},
    "InstanceList": {"allOf": [{"$ref": "#/components/schemas/Page"}, {
        "type": "object", "required": ["items"],
        "properties": {"items": {"type": "array",
                                 "items": {"$ref": "#/components/schemas/Instance"}}}}]},
    "UserUsage": {"allOf": [{"$ref": "#/components/schemas/Page"}, {
        "type": "object", "required": ["user_id", "totals", "instances"],
        "properties": {
            "user_id": {"type": "string"},
            "totals": {"type": "object", "required": ["instances", "cpu_seconds"],
                       "additionalProperties": {"type": "number"}},
            "instances": {"type": "array",
                          "items": {"$ref": "#/components/schemas/Instance"}}}}]},
    "HealthStatus": {"type": "object", "required": ["status", "uptime_seconds", "version",
                                                    "reasons", "components"],
                     "properties": {"status": {"type": "string", "enum": ["ok", "degraded"]},
                                    "uptime_seconds": {"type": "number"},
                                    "version": {"type": "string"},
                                    "checked_at": NULL_STR,
                                    "reasons": {"type": "array", "items": {"type": "string"}},
                                    "components": {"type": "object"}}},
    "SystemMetrics": {"type": "object", "description": "form-vm-metrics' SystemMetrics",
                      "required": ["timestamp", "instance_id", "account_id", "cpu", "memory",
                                   "disks", "network", "gpus", "load"],
                      "properties": {"timestamp": {"type": "integer"},
                                     "instance_id": {"type": "string"},
                                     "account_id": NULL_STR,
                                     "cpu": {"type": "object"}, "memory": {"type": "object"},
                                     "disks": {"type": "array", "items": {"type": "object"}},
                                     "network": {"type": "object"},
                                     "gpus": {"type": "array", "items": {"type": "object"}},
                                     "load": {"type": "object"}}},
    "WebhookRequest": {
        "type": "object", "required": ["url", "event_types"], "additionalProperties": False,
        "description": "400 `invalid-webhook` also when the SSRF guard refuses the URL: an "
                       "address that is not global unicast (unless allow-listed), a name that "
                       "resolves to one, a port outside the webhook sink's allowed_ports or in "
                       "its denied_ports, an ambiguous IPv4 form, a host that is not a valid name",
        "properties": {
            "url": {"type": "string", "maxLength": MAX_URL_BYTES,
                    "pattern": r"^[Hh][Tt][Tt][Pp][Ss]?://[!-\[\]-~]+$",
                    "description": "http(s), printable ASCII (no spaces, backslashes, CR/LF)"},
            "event_types": {"type": "array", "minItems": 1,
                            "items": {"type": "string",
                                      "enum": ["metrics", "threshold_violation"]}},
            "secret": {"type": "string", "nullable": True,
                       "pattern": r"^(?:whsec_(?:[A-Za-z0-9+/]{4}){8,21}(?:[A-Za-z0-9+/]{2}=="
                                  r"|[A-Za-z0-9+/]{3}=)?|(?!whsec_)[!-~]{1,256})$",
                       "description": "whsec_<base64 of 24-64 bytes> (Standard Webhooks) or "
                                      "1-256 printable ASCII characters"}}},
    "Webhook": {"type": "object", "required": ["id", "url", "event_types"],
                "properties": {"id": {"type": "string"}, "url": {"type": "string"},
                               "event_types": {"type": "array", "items": {"type": "string"}},
                               "secret": {"type": "string", "nullable": True,
                                          "enum": [None]},
                               "status": {"type": "string"},
                               "created_ns": {"type": "integer"}}},
    "RuleRequest": _rule_request(with_id=True),
    "RuleReplacement": _rule_request(with_id=False),
    "Rule": {"type": "object", "description": "a threshold rule in either seed format",
             "required": ["resource_type", "threshold_type", "action", "user_id"],
             "properties": {"id": {"type": "string"}, "resource_type": {"type": "string"},
                            "threshold_type": {}, "action": {"type": "string"},
                            "user_id": {"type": "string"}, "instance_id": NULL_STR,
                            "notification_channels": {"type": "array",
                                                      "items": {"type": "string"}},
                            "source": {"type": "string", "enum": ["central", "file", "api"],
                                       "readOnly": True,
                                       "description": "the layer the rule comes from"}}},
}


def _op(summary: str, responses: dict[str, Any], *, params: list[dict[str, Any]] | None = None,
        body: str | None = None, secure: bool = True) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": responses}
    if params:
        op["parameters"] = params
    if body:
        op["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{body}"}}}}
    if not secure:
        op["security"] = []
    return op


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _links(target_ops: dict[str, str], param: str) -> dict[str, Any]:
    return {name: {"operationId": op, "parameters": {param: "$response.body#/id"}}
            for name, op in target_ops.items()}


OPERATION_IDS = {
    ("/api/v1/webhooks", "post"): "registerWebhook",
    ("/api/v1/webhooks/{webhook_id}", "delete"): "deleteWebhook",
    ("/api/v1/thresholds", "post"): "createRule",
    ("/api/v1/thresholds/{rule_id}", "get"): "getRule",
    ("/api/v1/thresholds/{rule_id}", "put"): "putRule",
    ("/api/v1/thresholds/{rule_id}", "delete"): "deleteRule",
}


def _link_admin_operations(paths: dict[str, Any]) -> None:
    """operationIds, and links from what a POST created to the routes that use its id."""
    for (path, method), op_id in OPERATION_IDS.items():
        paths[path][method]["operationId"] = op_id
    paths["/api/v1/webhooks"]["post"]["responses"]["201"]["links"] = _links(
        {"DeleteWebhook": "deleteWebhook"}, "webhook_id")
    paths["/api/v1/thresholds"]["post"]["responses"]["201"]["links"] = _links(
        {"GetRule": "getRule", "PutRule": "putRule", "DeleteRule": "deleteRule"}, "rule_id")


@cache
def openapi_document(max_page_size: int = 1000) -> dict[str, Any]:
    """The document (built once per api.max_page_size)."""
    FILTERS = filters(max_page_size)
    PROJECTION = [f for f in FILTERS if f["name"] in ("resource", "fields")]
    inst = [_path("instance_id")]
    paths: dict[str, Any] = {
        "/health": {"get": _op("liveness", {"200": {"description": "healthy", "content": {
            "text/plain": {"schema": {"type": "string", "enum": ["healthy"]}}}},
            "429": PROBLEM}, secure=False)},
        "/openapi.json": {"get": _op("this document", {"200": _json({"type": "object"}),
                                                       "429": PROBLEM}, secure=False)},
        "/metrics": {"get": _op("Prometheus exposition (admin unless configured open)", {
            "200": {"description": "text exposition",
                    "content": {"text/plain": {"schema": {"type": "string"}}}},
            **_errors(403)})},
        "/get": {"get": _op("upstream's SystemMetrics of the instance named by instance_id, or "
                            "of the only visible one (400 when several)",
                            {"200": _json(_ref("SystemMetrics")), **_errors(400, 403, 404)},
                            params=FILTERS)},
        "/api/v1/health/status": {"get": _op("component health", {
            "200": _json(_ref("HealthStatus")), "503": _json(_ref("HealthStatus"), "degraded"),
            **_errors(403)})},
        "/api/v1/metrics": {"get": _op("latest readings of visible instances", {
            "200": _json(_ref("InstanceList")), **_errors(400, 403)}, params=FILTERS)},
        "/api/v1/metrics/instances/{instance_id}": {"get": _op(
            "latest readings of one instance", {"200": _json(_ref("Instance")),
                                                **_errors(400, 403, 404)},
            params=inst + PROJECTION)},
        "/api/v1/usage/instances/{instance_id}/current": {"get": _op(
            "usage of the last period of one instance", {
                "200": _json(_ref("Instance")), **_errors(400, 403, 404)},
            params=inst + PROJECTION)},
        "/api/v1/usage/users/{user_id}/current": {"get": _op(
            "totals over a user's instances on this host, with the instances", {
                "200": _json(_ref("UserUsage")), **_errors(400, 403)},
            params=[_path("user_id"), *[f for f in FILTERS if f["name"] != "user_id"]])},
        "/api/v1/webhooks": {
            "get": _op("registrations (admin)", {
                "200": _json({"type": "array", "items": _ref("Webhook")}), **_errors(403, 503)}),
            "post": _op("register (admin)", {"201": _json(_ref("Webhook"), "registered"),
                                             **_errors(400, 403, 413, 415, 503)},
                        body="WebhookRequest")},
        "/api/v1/webhooks/{webhook_id}": {"delete": _op(
            "remove (admin)", {"204": {"description": "removed"}, **_errors(400, 403, 404, 503)},
            params=[_path("webhook_id")])},
        "/api/v1/thresholds": {
            "get": _op("rules (admin)", {"200": _json({"type": "array", "items": _ref("Rule")}),
                                         **_errors(403, 503)}),
            "post": _op("create a rule (admin)", {"201": _json(_ref("Rule"), "created"),
                                                  **_errors(400, 403, 409, 413, 415, 503)},
                        body="RuleRequest")},
        "/api/v1/thresholds/{rule_id}": {
            "get": _op("one rule (admin)", {"200": _json(_ref("Rule")),
                                            **_errors(400, 403, 404, 503)},
                       params=[_path("rule_id", RULE_ID_PATTERN)]),
            "put": _op("create or replace (admin)", {
                "200": _json(_ref("Rule")), "201": _json(_ref("Rule"), "created"),
                **_errors(400, 403, 413, 415, 503)}, params=[_path("rule_id", RULE_ID_PATTERN)],
                body="RuleReplacement"),
            "delete": _op("remove an API-written rule (admin; 409 for a file/central rule)",
                          {"204": {"description": "removed"}, **_errors(400, 403, 404, 409, 503)},
                          params=[_path("rule_id", RULE_ID_PATTERN)])},
    }
    _link_admin_operations(paths)
    return {
        "openapi": "3.0.3",
        "info": {"title": "hostagent API", "version": "1.0.0",
                 "description": "Current usage, health, webhooks and threshold rules of one "
                                "KVM host. Errors are RFC 9457 problem details."},
        "paths": paths,
        "security": [{"bearer": []}, {"apiKey": []}],
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "a JWT, or an API key `hak_…`"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}},
            "schemas": SCHEMAS,
            "responses": {"Problem": {"description": "problem details", "content": {
                "application/problem+json": {"schema": _ref("Problem")}}}},
        },
    }
