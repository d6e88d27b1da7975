"""RFC 9457 problem details: the one error shape every route answers with."""

from __future__ import annotations

from collections.abc import Mapping

import orjson
from starlette.responses import Response

PROBLEM_TYPE_BASE = "https://hostagent.dev/problems/"
TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class Problem(Exception):
    """Raised inside a route; the app turns it into an application/problem+json response."""

    def __init__(self, status: int, detail: str, *, kind: str | None = None,
                 headers: Mapping[str, str] | None = None,
                 extra: Mapping[str, object] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.kind = kind or TITLES.get(status, "error").lower().replace(" ", "-")
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})


def problem_response(p: Problem, instance: str) -> Response:
    """The problem+json response for `p` at request path `instance`."""
    body: dict[str, object] = {
        "type": PROBLEM_TYPE_BASE + p.kind,
        "title": TITLES.get(p.status, "Error"),
        "status": p.status,
        "detail": p.detail,
        "instance": instance,
        **p.extra,
    }
    return Response(orjson.dumps(body), status_code=p.status, headers=p.headers,
                    media_type="application/problem+json")


def json_response(body: object, status: int = 200) -> Response:
    """orjson-encoded JSON response."""
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")
