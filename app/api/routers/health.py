from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from app.api.deps import SettingsDep
from app.api.errors import PROBLEM_JSON, request_id
from app.api.openapi import problems
from app.db.session import get_engine
from app.dispatch import client
from app.problems import ProblemError

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process answers")
def healthz():
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: database and broker answer", responses=problems(503))
def readyz(request: Request, settings: SettingsDep):
    checks: dict[str, str] = {}
    try:
        with get_engine(settings).connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # noqa: BLE001 - report, don't raise
        checks["database"] = f"unavailable: {type(exc).__name__}"
    try:
        with client(settings).connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        checks["broker"] = "ok"
    except Exception as exc:  # noqa: BLE001
        checks["broker"] = f"unavailable: {type(exc).__name__}"
    if all(v == "ok" for v in checks.values()):
        return {"status": "ok", "checks": checks}
    problem = ProblemError(
        503,
        "not-ready",
        "Service unavailable",
        "; ".join(f"{k}: {v}" for k, v in checks.items()),
        headers={"Retry-After": "5"},
    )
    # RFC 9457 reserves "status" for the HTTP status, so the checks travel as an extension member.
    body = {**problem.to_dict(instance=request.url.path, request_id=request_id(request)), "checks": checks}
    return JSONResponse(body, status_code=503, media_type=PROBLEM_JSON, headers=problem.headers)
