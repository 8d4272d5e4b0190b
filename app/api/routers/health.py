from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from app.api.deps import SettingsDep
from app.db.session import get_engine
from app.dispatch import client

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process answers")
def healthz():
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: database and broker answer")
def readyz(settings: SettingsDep):
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
    ok = all(v == "ok" for v in checks.values())
    body = {"status": "ok" if ok else "unavailable", "checks": checks}
    if ok:
        return body
    return JSONResponse(
        {
            "type": "https://influence-service.dev/problems/not-ready",
            "title": "Service unavailable",
            "status": 503,
            "detail": "; ".join(f"{k}: {v}" for k, v in checks.items()),
            "code": "not-ready",
            **body,
        },
        status_code=503,
        media_type="application/problem+json",
        headers={"Retry-After": "5"},
    )
