"""Admin routes: webhook registrations (FORMATION.md §4) and threshold rules, over seams.

Both need the `admin` scope: a webhook receives every instance's events on this host, and a
rule changes what alerts fire for everyone. Bodies are JSON, size-capped by api.max_body_bytes.
"""

from __future__ import annotations

import contextlib
import math
import re
from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from hostagent.api.auth import Principal
from hostagent.api.openapi import MAX_PARAM_CHARS, RULE_ID_PATTERN
from hostagent.api.pass_gate import PassGate
from hostagent.api.problems import Problem, json_response
from hostagent.delivery.ssrf import UrlRefused
from hostagent.errors import ConfigError, RuleExists, RuleNotWritable, StateError

if TYPE_CHECKING:
    from hostagent.api.app import Api


# Nesting deeper than this is no webhook registration or rule: 400 before any walk over it
# (orjson parses up to 1,024 levels, deeper than Python's recursion limit allows a walk).
MAX_JSON_DEPTH = 32


async def read_json(request: Request, max_bytes: int, gate: PassGate | None = None,
                    gate_wait_s: float = 0.0) -> Any:
    """The JSON body, refusing (413) past `max_bytes` before reading it all, 415 if not JSON
    or encoded, 400 when it is cut off (the client left, or fell silent past the server's
    read timeout: server.READ_TIMEOUT_S) or nested too deep. While it waits for the client's
    bytes the request is not in flight for `gate`: a pass does not wait for a client slow to
    send (`gate_wait_s`: PassGate.away)."""
    # Every Content-Type and Content-Encoding header the client sent, not the first: a second
    # `Content-Encoding: gzip` after an `identity` one was let through. A charset, if named,
    # must be UTF-8 (RFC 8259 §8.1): the body is read as UTF-8.
    ctypes = request.headers.getlist("content-type")
    if len(ctypes) != 1 or _media_type(ctypes[0]) != ("application/json", "utf-8"):
        raise Problem(415, "send the body as application/json (UTF-8), one Content-Type")
    for value in request.headers.getlist("content-encoding"):
        if any(c.strip().lower() not in ("", "identity") for c in value.split(",")):
            raise Problem(415, "send the body without a Content-Encoding")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() \
            and int(declared) > max_bytes:
        raise Problem(413, f"body larger than {max_bytes} bytes")
    buf = bytearray()
    async with contextlib.AsyncExitStack() as stack:
        if gate is not None:
            await stack.enter_async_context(gate.away(gate_wait_s))
        try:
            async for chunk in request.stream():
                buf += chunk
                if len(buf) > max_bytes:
                    raise Problem(413, f"body larger than {max_bytes} bytes")
        except ClientDisconnect as err:
            raise Problem(400, "the request body ended before it was complete") from err
    try:
        body = orjson.loads(buf)
    except orjson.JSONDecodeError as err:
        raise Problem(400, f"body is not valid JSON: {err}") from err
    if too_deep(body, MAX_JSON_DEPTH):
        raise Problem(400, f"body nests arrays and objects deeper than {MAX_JSON_DEPTH} levels")
    return body


def _media_type(value: str) -> tuple[str, str]:
    """(type, charset) of a Content-Type value, lowercased; the charset "utf-8" when none is
    named."""
    kind, *params = value.split(";")
    charset = "utf-8"
    for p in params:
        key, _, val = p.partition("=")
        if key.strip().lower() == "charset":
            charset = val.strip().strip('"').lower()
    return kind.strip().lower(), "utf-8" if charset == "utf8" else charset


def too_deep(value: Any, max_depth: int) -> bool:
    """A JSON value nests arrays and objects deeper than `max_depth` (walked without
    recursion)."""
    todo: list[tuple[Any, int]] = [(value, 1)]
    while todo:
        v, depth = todo.pop()
        if isinstance(v, dict | list):
            if depth > max_depth:
                return True
            todo.extend((c, depth + 1) for c in (v.values() if isinstance(v, dict) else v))
    return False


READS = ("GET", "HEAD")  # starlette serves HEAD wherever GET is: a read, never a write
MAX_NUMBER = 1e15  # larger numbers in a rule overflow when scaled (GB → bytes, s → ns)
_RULE_ID = re.compile(RULE_ID_PATTERN)  # an id /api/v1/thresholds/{id} can address again


def out_of_range(value: Any, where: str = "") -> str | None:
    """The first number in a JSON value that is not finite or past ±MAX_NUMBER, by path."""
    if isinstance(value, dict):
        return next((p for k, v in value.items() if (p := out_of_range(v, f"{where}.{k}"))),
                    None)
    if isinstance(value, list):
        return next((p for i, v in enumerate(value) if (p := out_of_range(v, f"{where}[{i}]"))),
                    None)
    if isinstance(value, int | float) and not isinstance(value, bool) \
            and not (math.isfinite(value) and abs(value) <= MAX_NUMBER):
        return where.lstrip(".") or "body"
    return None


class AdminRoutes:
    """Handlers of /api/v1/webhooks and /api/v1/thresholds."""

    def __init__(self, api: Api) -> None:
        self.api = api

    async def _body(self, request: Request) -> Any:
        cfg = self.api.cfg
        return await read_json(request, cfg.max_body_bytes, self.api.gate,
                               cfg.yield_to_pass_max_s)

    def _need(self, what: str, seam: Any) -> Any:
        if seam is None:
            raise Problem(503, f"{what} are not available on this host", kind="not-configured")
        return seam

    async def webhooks(self, request: Request, _p: Principal) -> Response:
        """GET: bare array of registrations; POST: register → 201."""
        reg = self._need("webhooks", self.api.webhooks)
        if request.method in READS:
            return json_response([{**w, "secret": None} for w in await reg.list()])
        body = await self._body(request)
        if not isinstance(body, dict):
            raise Problem(400, "body must be an object {url, event_types, secret?}")
        url, types, secret = body.get("url"), body.get("event_types"), body.get("secret")
        unknown = sorted(set(body) - {"url", "event_types", "secret"})
        if unknown:
            raise Problem(400, f"unknown key {unknown[0]!r}")
        if not isinstance(url, str) or not isinstance(types, list) \
                or not all(isinstance(t, str) for t in types) \
                or not (secret is None or isinstance(secret, str)):
            raise Problem(400, "url must be a string, event_types an array of strings, "
                               "secret a string or absent")
        try:
            item = await reg.register(url, types, secret)
        except UrlRefused as err:
            raise Problem(400, str(err), kind="invalid-webhook", extra={"key": "url"}) from err
        except ConfigError as err:
            raise Problem(400, str(err), kind="invalid-webhook",
                          extra={"key": err.key, "expected": err.expected}) from err
        return json_response({**item, "secret": None, "status": "registered"}, 201)

    async def webhook_delete(self, request: Request, _p: Principal) -> Response:
        """DELETE /api/v1/webhooks/{id}: 204, or 404 for an unknown id."""
        reg = self._need("webhooks", self.api.webhooks)
        if not await reg.delete(request.path_params["webhook_id"]):
            raise Problem(404, "no such webhook", kind="webhook-not-found")
        return Response(status_code=204)

    def _validate(self, rules: Any, raw: Any) -> dict[str, Any]:
        bad = out_of_range(raw)
        if bad is not None:
            raise Problem(400, f"`{bad}` must be a finite number within ±{MAX_NUMBER:g}",
                          kind="invalid-rule", extra={"key": bad})
        try:
            out: dict[str, Any] = rules.validate(raw)
        except ConfigError as err:
            # The body is one rule: its keys, not `rules[0].` as a rules file's are named.
            key = err.key.removeprefix("rules[0].")
            said = ConfigError("request body", key, err.expected, err.found, err.fix) \
                if key != err.key else err
            raise Problem(400, str(said), kind="invalid-rule",
                          extra={"key": key, "expected": err.expected}) from err
        if not _RULE_ID.fullmatch(out["id"]):
            raise Problem(400, f"`id` must be 1 to {MAX_PARAM_CHARS} printable ASCII characters "
                               "without spaces or `/`, and not `.` or `..` (the rule's URL is "
                               "/api/v1/thresholds/{id})",
                          kind="invalid-rule", extra={"key": "id"})
        return out

    async def _write(self, op: Any) -> Any:
        """Run a rule-store write: refused set → 400, file/central rule → 409, I/O → 503."""
        try:
            return await op
        except ConfigError as err:
            raise Problem(400, str(err), kind="invalid-rule",
                          extra={"key": err.key, "expected": err.expected}) from err
        except RuleNotWritable as err:
            raise Problem(409, str(err), kind="rule-not-writable") from err
        except RuleExists as err:
            raise Problem(409, str(err), kind="rule-exists") from err
        except (StateError, OSError) as err:
            raise Problem(503, f"threshold rules cannot be written on this host: {err}",
                          kind="rules-not-writable") from err

    async def thresholds(self, request: Request, _p: Principal) -> Response:
        """GET: every rule (with its `source`); POST: create (409 when the id exists)."""
        rules = self._need("threshold rules", self.api.rules)
        if request.method in READS:
            return json_response(list(await rules.list()))
        rule = self._validate(rules, await self._body(request))
        await self._write(rules.put(rule, create=True))  # 409 when the id is in force
        return json_response(await rules.get(rule["id"]) or rule, 201)  # as in force: + source

    async def threshold_one(self, request: Request, _p: Principal) -> Response:
        """GET / PUT (create or replace) / DELETE one rule by id."""
        rules = self._need("threshold rules", self.api.rules)
        rid = request.path_params["rule_id"]
        if request.method in READS:
            rule = await rules.get(rid)
            if rule is None:
                raise Problem(404, "no such rule", kind="rule-not-found")
            return json_response(rule)
        if request.method == "DELETE":
            if not await self._write(rules.delete(rid)):
                raise Problem(404, "no such rule", kind="rule-not-found")
            return Response(status_code=204)
        raw = await self._body(request)
        if not isinstance(raw, dict):
            raise Problem(400, "body must be a rule object")
        if raw.get("id", rid) != rid:
            raise Problem(400, "the body's id differs from the path's")
        rule = self._validate(rules, {**raw, "id": rid})
        created = await self._write(rules.put(rule))
        return json_response(await rules.get(rid) or rule, 201 if created else 200)
