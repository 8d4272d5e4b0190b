"""Authentication (a deny-by-default gate), scopes and request rates.

:class:`AuthGate` is an ASGI middleware: it verifies the key and counts the
tenant's request rate *before* FastAPI reads a body, so an unauthenticated
client cannot make the server parse or spool an upload. Routes then declare
one of :data:`ReadAccess`, :data:`WriteAccess` or :data:`AdminAccess`, which
check the scope and hand the route its :class:`Principal`;
``tests/unit/test_auth.py`` walks the route table and fails for any route that
forgets. The key travels only in a header and is never logged.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.exc import DBAPIError
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.errors import database_unavailable, problem_response, request_id
from app.db.session import get_sessionmaker, leave_tenant_scope, tenant_scope
from app.problems import ProblemError
from app.services import api_keys
from app.services.api_keys import Principal
from app.settings import Settings

log = logging.getLogger(__name__)
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
_READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

# Declared on every protected route so the OpenAPI document lists both ways to send a key.
bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer iak_...`")
api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="`X-API-Key: iak_...`")


class RedactApiKeys(logging.Filter):
    """Mask key-shaped text in log lines: a client may put a key in a URL; we refuse it, uvicorn logs it."""

    _pattern = re.compile(r"iak_[0-9A-Za-z_]+")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "iak_" in message:
            record.msg, record.args = self._pattern.sub("iak_[redacted]", message), None
        return True


def install_log_redaction() -> None:
    for name in ("uvicorn.access", "uvicorn.error", "app", "worker"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactApiKeys) for f in logger.filters):
            logger.addFilter(RedactApiKeys())


def presented_token(headers: dict[bytes, bytes]) -> str | None:
    authorization = headers.get(b"authorization", b"").decode("latin-1")
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    header_key = headers.get(b"x-api-key", b"").decode("latin-1").strip()
    return header_key or None


class PrincipalCache:
    """Verified keys for a few seconds, so a polling client costs no key lookup per request.

    Keyed by a hash of the token (the token itself is never kept). A revocation through this
    process's API takes effect at once (:meth:`forget`); elsewhere within ``ttl`` seconds.
    """

    def __init__(self, ttl: float, max_entries: int = 10_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: dict[str, tuple[Principal, float]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _key(token: str) -> str:
        return hashlib.sha256(token.encode()).hexdigest()

    def get(self, token: str) -> Principal | None:
        entry = self._entries.get(self._key(token))
        if entry is None or entry[1] < time.monotonic():
            return None
        return entry[0]

    def put(self, token: str, principal: Principal) -> None:
        if self.ttl <= 0:
            return
        valid_until = time.monotonic() + self.ttl
        if principal.expires_at is not None:  # never serve a key past its expiry
            valid_until = min(valid_until, time.monotonic() + principal.seconds_to_expiry())
        with self._lock:
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
            self._entries[self._key(token)] = (principal, valid_until)

    def forget(self, key_id: str) -> None:
        with self._lock:
            self._entries = {k: v for k, v in self._entries.items() if v[0].key_id != key_id}


class AuthGate:
    """Resolve the caller of every non-public request, or answer 401/403/429/503 problem+json."""

    def __init__(self, app: ASGIApp, *, settings: Settings, cache: PrincipalCache) -> None:
        self.app = app
        self.settings = settings
        self.cache = cache

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in PUBLIC_PATHS:
            return await self.app(scope, receive, send)
        try:
            token = presented_token(dict(scope.get("headers") or []))
            principal = self.cache.get(token) if token else None
            if principal is None:
                principal = await run_in_threadpool(self._authenticate, token)
                self.cache.put(token, principal)
            await self._count(scope, principal)
        except ProblemError as problem:
            response = problem_response(problem, scope.get("path", ""), request_id(scope=scope))
            return await response(scope, receive, send)
        except DBAPIError as exc:
            log.warning("database unavailable while authenticating: %s", type(exc).__name__)
            response = problem_response(
                database_unavailable(), scope.get("path", ""), request_id(scope=scope)
            )
            return await response(scope, receive, send)
        scope.setdefault("state", {})["principal"] = principal
        with tenant_scope(principal.tenant_id):  # row-level security: the tenant's rows only
            await self.app(scope, receive, send)

    def _authenticate(self, token: str | None) -> Principal:
        session = get_sessionmaker(self.settings)()
        try:
            principal = api_keys.authenticate(session, self.settings, token)
            session.commit()
            return principal
        finally:
            session.close()

    async def _count(self, scope: Scope, principal: Principal) -> None:
        read = scope.get("method") in _READ_METHODS
        kind = "read" if read else "write"
        limits = principal.limits
        per_second = limits.read_requests_per_second if read else limits.write_requests_per_second
        wait = await scope["app"].state.rate_limiter.retry_after(principal.tenant_id, kind, per_second)
        if wait is not None:
            raise ProblemError(
                429,
                "rate-limited",
                "Too many requests",
                f"more than {per_second} {kind} requests per second for this tenant",
                headers={"Retry-After": str(wait)},
            )


async def authenticated(  # async: no threadpool hop for a lookup in request.state
    request: Request,
    _bearer: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
    _header: Annotated[str | None, Security(api_key_header)],
) -> Principal:
    """The caller the gate resolved (the Security parameters only document the scheme)."""
    principal = getattr(request.state, "principal", None)
    if principal is None:  # the app was assembled without AuthGate: refuse rather than serve
        raise ProblemError(401, "unauthenticated", "Unauthorized", "no authenticated caller")
    return principal


def _require(scope: str):
    async def check(principal: Annotated[Principal, Depends(authenticated)]) -> Principal:
        if not principal.allows(scope):
            raise ProblemError(
                403,
                "insufficient-scope",
                "Forbidden",
                f"this route needs the '{scope}' scope; the key has {sorted(principal.scopes)}",
            )
        return principal

    check.__name__ = f"require_{scope}"
    return check


async def _require_admin(principal: Annotated[Principal, Depends(_require("admin"))]) -> Principal:
    leave_tenant_scope()  # admin routes manage every tenant's keys (async: in the request's own context)
    return principal


require_read, require_write, require_admin = _require("read"), _require("write"), _require_admin
ReadAccess = Annotated[Principal, Depends(require_read)]
WriteAccess = Annotated[Principal, Depends(require_write)]
AdminAccess = Annotated[Principal, Depends(require_admin)]
