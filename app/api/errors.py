"""Every 4xx/5xx leaves as ``application/problem+json`` (RFC 9457); no ``{"detail": ...}`` leaks."""

from __future__ import annotations

import logging
import re
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.problems import FieldError, ProblemError

PROBLEM_JSON = "application/problem+json"
log = logging.getLogger(__name__)

_TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Content too large",
    415: "Unsupported media type",
    422: "The request is invalid",
    429: "Too many requests",
    500: "Internal server error",
    503: "Service unavailable",
}
_CODES = {
    400: "bad-request",
    404: "not-found",
    405: "method-not-allowed",
    413: "too-large",
    415: "unsupported-media-type",
}


def request_id(request: Request | None = None, scope: Scope | None = None) -> str:
    scope = scope if scope is not None else request.scope
    return scope.setdefault("state", {}).setdefault("request_id", uuid.uuid4().hex)


def problem_response(problem: ProblemError, instance: str, rid: str) -> JSONResponse:
    return JSONResponse(
        problem.to_dict(instance=instance, request_id=rid),
        status_code=problem.status,
        media_type=PROBLEM_JSON,
        headers=problem.headers or None,
    )


def database_unavailable() -> ProblemError:
    return ProblemError(
        503,
        "database-unavailable",
        "Service unavailable",
        "the database is not reachable; retry shortly",
        headers={"Retry-After": "5"},
    )


def _pointer(loc: tuple) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header", "form"):
        where, parts = parts[0], parts[1:]
        if where != "body":
            parts = [where, *parts]
    return "/" + "/".join(parts)


def install(app: FastAPI) -> None:
    @app.exception_handler(ProblemError)
    async def _problem(request: Request, exc: ProblemError):
        return problem_response(exc, request.url.path, request_id(request))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = [FieldError(_pointer(tuple(e["loc"])), e["msg"]) for e in exc.errors()]
        problem = ProblemError(
            422,
            "invalid-request",
            "The request is invalid",
            "; ".join(f"{e.pointer}: {e.detail}" for e in errors),
            errors,
        )
        return problem_response(problem, request.url.path, request_id(request))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        problem = ProblemError(
            exc.status_code,
            _CODES.get(exc.status_code, f"http-{exc.status_code}"),
            _TITLES.get(exc.status_code, "Error"),
            str(exc.detail),
            headers=dict(exc.headers or {}),
        )
        return problem_response(problem, request.url.path, request_id(request))

    @app.exception_handler(OperationalError)
    async def _db_down(request: Request, exc: OperationalError):
        log.warning("database unavailable: %s", exc.__class__.__name__)
        return problem_response(database_unavailable(), request.url.path, request_id(request))

    @app.exception_handler(DBAPIError)
    async def _db_error(request: Request, exc: DBAPIError):
        if exc.connection_invalidated:
            return await _db_down(request, exc)
        return await _unhandled(request, exc)

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        problem = ProblemError(
            500,
            "internal-error",
            "Internal server error",
            f"an unexpected error occurred (request {request_id(request)})",
        )
        return problem_response(problem, request.url.path, request_id(request))


class BodyLimitMiddleware:
    """413 problem+json as soon as Content-Length or the streamed body passes the route's cap.

    Upload routes (``upload_paths``, a regex) get ``upload_limit``; everything else
    gets ``default_limit``. The streamed check raises an HTTPException so FastAPI's
    body parsing re-raises it unchanged and the handler above renders it.
    """

    def __init__(self, app: ASGIApp, *, default_limit: int, upload_limit: int, upload_paths: str):
        self.app = app
        self.default_limit = default_limit
        self.upload_limit = upload_limit
        self.upload_paths = re.compile(upload_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        is_upload = scope.get("method") == "POST" and self.upload_paths.fullmatch(scope.get("path", ""))
        limit = self.upload_limit if is_upload else self.default_limit
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            problem = ProblemError(413, "too-large", "Content too large", _too_large(limit))
            response = problem_response(problem, scope.get("path", ""), request_id(scope=scope))
            return await response(scope, receive, send)
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise StarletteHTTPException(413, _too_large(limit))
            return message

        await self.app(scope, limited_receive, send)


def _too_large(limit: int) -> str:
    return f"the request body exceeds the limit of {limit} bytes for this route"
