"""The OpenAPI document lists every error a route can answer, as the problem+json the server sends.

Clients generated from the document, and the schemathesis suite
(``tests/integration/test_fuzz.py``), treat an undeclared status or content type
as a contract breach, so each router declares :data:`GATE` plus its own extras
with :func:`problems`.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.api.errors import PROBLEM_JSON, problem_response, request_id
from app.problems import ProblemError
from app.schemas.common import Problem

_SCHEMAS = "#/components/schemas/"
_WHEN = {
    400: "The body is not parseable as its declared content type.",
    401: "No API key, or a malformed, unknown, revoked or expired one.",
    403: "The key lacks the route's scope, or its tenant is disabled.",
    404: "No such object for the caller's tenant (another tenant's id answers the same).",
    409: "The object's state does not allow this now.",
    412: "If-Match names an older version of the object.",
    413: "The body, or the tenant's storage after this upload, is over its limit.",
    415: "The upload's format is not one the service reads (pickles are refused unopened).",
    422: "A parameter or the body is invalid; `errors` points at each field.",
    429: "Request rate, active-job or daily compute quota exceeded; retry after `Retry-After` seconds.",
    503: "The database (or, for readiness, the broker) is unreachable; retry after `Retry-After` seconds.",
    507: "The artifact store is full; nothing was kept.",
}
_RETRY_AFTER = {"Retry-After": {"required": True, "schema": {"type": "integer", "minimum": 0}}}
_HEADERS = {
    401: {"WWW-Authenticate": {"required": True, "schema": {"type": "string", "const": "Bearer"}}},
    429: _RETRY_AFTER,
    503: _RETRY_AFTER,
}


def problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries: problem+json bodies, with the headers the server always sets."""
    schema = {"$ref": _SCHEMAS + Problem.__name__}
    return {
        status: {
            "description": _WHEN[status],
            "content": {PROBLEM_JSON: {"schema": schema}},
            **({"headers": _HEADERS[status]} if status in _HEADERS else {}),
        }
        for status in statuses
    }


GATE = problems(401, 403, 422, 429, 503)
"""What any protected route can answer before or around its own logic (auth gate, validation, DB)."""


def install(app: FastAPI) -> None:
    """Add the Problem schema to the document and a 405 whose Allow lists every method of the path."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = Problem.model_json_schema(ref_template=_SCHEMAS + "{model}")
            components = build().setdefault("components", {}).setdefault("schemas", {})  # build() caches
            components.update(schema.pop("$defs", {}))
            components[Problem.__name__] = schema
        return app.openapi_schema

    app.openapi = openapi

    @app.exception_handler(405)
    async def _method_not_allowed(request: Request, exc: StarletteHTTPException):
        problem = ProblemError(
            405,
            "method-not-allowed",
            "Method not allowed",
            f"{request.method} is not allowed on {request.url.path}",
            headers={"Allow": _allow(app, request.url.path) or (exc.headers or {}).get("Allow", "")},
        )
        return problem_response(problem, request.url.path, request_id(request))


def _allow(app: FastAPI, path: str) -> str:
    """Starlette's Allow names one route's methods; a path served by several routes needs all of them,
    those of the most literal template that matches (``/v1/datasets/builtin``, not ``.../{dataset_id}``)."""
    routes = [r for r in api_routes(app.router.routes) if r.path_regex.match(path)]
    if not routes:
        return ""
    template = min((r.path for r in routes), key=lambda p: p.count("{"))
    methods = {method for route in routes if route.path == template for method in route.methods}
    return ", ".join(sorted(methods))


def api_routes(routes) -> list[APIRoute]:
    """Every APIRoute, also inside the routers FastAPI includes lazily (we include without a prefix).

    The route table itself: the 405 handler and the tests that must cover every route use it."""
    found = []
    for route in routes:
        if isinstance(route, APIRoute):
            found.append(route)
        elif hasattr(route, "original_router"):
            found += api_routes(route.original_router.routes)
    return found
