"""create_app(): routers, problem+json handlers, body limits, and the lease sweeper."""

from __future__ import annotations

import gc
import logging
import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app import dispatch
from app.api import errors, openapi
from app.api.auth import AuthGate, PrincipalCache, install_log_redaction
from app.api.ratelimit import RequestRateLimiter
from app.api.routers import datasets, health, jobs, models, tenants
from app.services import api_keys
from app.settings import Settings, get_settings
from app.storage.artifacts import ArtifactStore

log = logging.getLogger(__name__)
UPLOAD_PATHS = r"/v1/datasets|/v1/models|/v1/models/[^/]+/checkpoints"


def _sweeper(settings: Settings, stop: threading.Event) -> None:
    """Re-queue jobs whose worker vanished; first pass also re-publishes every queued job."""
    from app.services import jobs, shards

    first = True
    while True:
        try:
            jobs.sweep(settings, requeue_all_queued=first)
            shards.sweep(settings)
            first = False
        except Exception:  # noqa: BLE001 - DB or broker down: try again next round
            log.warning("sweeper pass failed", exc_info=True)
        if stop.wait(settings.sweep_interval_seconds):
            return


def _settle_heap(settings: Settings) -> None:
    """Before the first request: load what it would load lazily, then freeze the heap.

    A process holds some 270,000 long-lived objects (torch, SQLAlchemy, pydantic); each full
    collection walks them all, a 100 ms pause of every request in flight, several times a minute
    under load. Frozen, the collector never walks them again.
    """
    dispatch.warm_up(settings)
    gc.collect()
    gc.freeze()


def create_app(
    settings: Settings | None = None, *, run_sweeper: bool = True, settle_heap: bool = False
) -> FastAPI:
    """The API. ``settle_heap``: for a server process, not for an app built inside tests."""
    settings = settings or get_settings()
    api_keys.pepper(settings)  # fail at start, not at the first request, when the secret is missing

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if settle_heap:
            _settle_heap(settings)
        stop = threading.Event()
        thread = None
        if run_sweeper and settings.sweep_interval_seconds > 0:
            thread = threading.Thread(target=_sweeper, args=(settings, stop), name="sweeper", daemon=True)
            thread.start()
        yield
        stop.set()
        if thread is not None:
            thread.join(timeout=5)

    app = FastAPI(
        title="Influence service",
        version="0.1.0",
        summary="Which training examples made a model predict what it predicts.",
        description=(
            "Register datasets and models, submit influence jobs, poll them, fetch results. "
            "Scores are query-major (row = query, column = training example); positive = proponent. "
            "Every error is application/problem+json (RFC 9457); docs/problems.md lists every `code`."
        ),
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.store = ArtifactStore(settings.resolved_artifact_dir)
    app.state.rate_limiter = RequestRateLimiter(settings.rate_limit_storage_url)
    errors.install(app)
    app.add_middleware(
        errors.BodyLimitMiddleware,
        default_limit=settings.max_json_body_bytes,
        upload_limit=settings.max_upload_bytes,
        upload_paths=UPLOAD_PATHS,
    )
    install_log_redaction()
    app.state.principal_cache = PrincipalCache(settings.auth_cache_seconds)
    app.add_middleware(
        AuthGate, settings=settings, cache=app.state.principal_cache
    )  # outermost: nothing is read before the key is checked
    for router in (health.router, tenants.router, datasets.router, models.router, jobs.router):
        app.include_router(router)
    openapi.install(app)
    return app


def serve_app() -> FastAPI:
    """The factory each ``influence serve --processes N`` process builds its app with."""
    return create_app(settle_heap=True)
