from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import FileResponse, StreamingResponse
from sqlalchemy.orm import Session

from app.api.auth import ReadAccess, WriteAccess
from app.api.deps import (
    DEFAULT_PAGE,
    CommittingRoute,
    PageSize,
    SessionDep,
    StoreDep,
    conditional_json,
    in_session,
    json_response,
)
from app.api.openapi import GATE, problems
from app.db.models import TERMINAL_STATES, Job
from app.estimators import ORIENTATION, REGISTRY, SIGN_CONVENTION
from app.problems import PROBLEM_BASE_URI, PROBLEM_TYPES, ProblemError
from app.schemas.common import Page, ProblemTypeRead
from app.schemas.jobs import (
    DataValue,
    EstimatorRead,
    GroupInfluencePage,
    GroupRead,
    GroupScoresRead,
    JobCreate,
    JobRead,
    JobState,
    Progress,
    QueryResultRead,
    ResultsPage,
    ValuesPage,
)
from app.services import jobs as service
from app.services import results as results_service
from app.services.api_keys import Principal
from app.services.pagination import decode_token, encode_token
from app.services.validation import json_schema
from app.settings import Settings
from app.storage.formats import safetensors_stream

router = APIRouter(tags=["influence-jobs"], responses=GATE, route_class=CommittingRoute)
POLL_SECONDS = "2"


def job_read(job: Job) -> JobRead:
    base = "/v1/influence-jobs/" if job.kind == "influence" else "/v1/training-jobs/"
    links = {"self": base + job.id}
    if job.kind == "influence":
        links.update(
            cancel=base + job.id + "/cancel",
            results=base + job.id + "/results",
            scores=base + job.id + "/artifacts/scores",
        )
    return JobRead(
        id=job.id,
        kind=job.kind,
        state=job.state,
        model_id=job.model_id,
        train_dataset_id=job.train_dataset_id,
        query_dataset_id=job.query_dataset_id,
        spec=job.spec,
        attempt=job.attempt,
        max_attempts=job.max_attempts,
        progress=Progress.model_validate(job.progress or {}),
        error=job.error,
        cancel_requested_at=job.cancel_requested_at,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        heartbeat_at=job.heartbeat_at,
        duration_seconds=service.duration_seconds(job),
        links=links,
    )


def _read_status(session: Session, tenant_id: str, job_id: str, kind: str) -> JobRead:
    return job_read(service.get(session, tenant_id, job_id, kind=kind))


async def _status_response(request: Request, tenant_id: str, job_id: str, kind: str) -> Response:
    """The status poll, the hottest route: one thread hop, no transaction, JSON serialised once."""
    job = await in_session(request, _read_status, tenant_id, job_id, kind, autocommit=True)
    headers = {} if job.state in TERMINAL_STATES else {"Retry-After": POLL_SECONDS}
    # a running job's duration grows by the request: between heartbeats its status is the same
    return conditional_json(request, job, headers, volatile=frozenset({"duration_seconds"}))


@router.post(
    "/v1/influence-jobs",
    status_code=202,
    response_model=JobRead,
    responses=problems(400, 413),
    summary="Submit an influence job",
)
async def submit_job(
    owner: WriteAccess,
    body: JobCreate,
    request: Request,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
):
    """Validated and costed at submit time; runs asynchronously on a worker.

    Same ``Idempotency-Key`` and body returns the original job; same key with a
    different body is a 422. A key is kept for ``IA_IDEMPOTENCY_KEY_TTL_SECONDS`` (24 h).
    """
    settings = request.app.state.settings
    job = await in_session(request, _submit, settings, owner, body, idempotency_key, autocommit=True)
    headers = {"Location": f"/v1/influence-jobs/{job.id}", "Retry-After": POLL_SECONDS}
    return json_response(job, 202, headers)


def _submit(
    session: Session, settings: Settings, owner: Principal, body: JobCreate, idempotency_key: str | None
) -> JobRead:
    return job_read(service.submit_influence(session, settings, owner, body, idempotency_key)[0])


@router.get("/v1/influence-jobs", response_model=Page[JobRead])
def list_jobs(
    caller: ReadAccess,
    request: Request,
    session: SessionDep,
    state: JobState | None = None,
    model_id: str | None = None,
    page_size: PageSize = DEFAULT_PAGE,
    page_token: str | None = None,
):
    rows, token = service.list_page(session, caller.tenant_id, page_size, page_token, state, model_id)
    return Page[JobRead](items=[job_read(j) for j in rows], next_page_token=token)


@router.get(
    "/v1/influence-jobs/{job_id}",
    response_model=JobRead,
    responses=problems(404),
    summary="Job status, progress and error",
)
async def get_job(caller: ReadAccess, job_id: str, request: Request):
    return await _status_response(request, caller.tenant_id, job_id, "influence")


@router.get(
    "/v1/training-jobs/{job_id}",
    response_model=JobRead,
    responses=problems(404),
    summary="Status of a model's training job",
)
async def get_training_job(caller: ReadAccess, job_id: str, request: Request):
    return await _status_response(request, caller.tenant_id, job_id, "training")


@router.post(
    "/v1/influence-jobs/{job_id}/cancel",
    status_code=202,
    response_model=JobRead,
    responses=problems(404, 409),
)
def cancel_job(owner: WriteAccess, job_id: str, request: Request, session: SessionDep):
    """Idempotent. A running job stops at its next batch; 409 once it succeeded or failed."""
    return job_read(service.request_cancel(session, service.get(session, owner.tenant_id, job_id)))


@router.delete("/v1/influence-jobs/{job_id}", status_code=204, responses=problems(404, 409))
def delete_job(owner: WriteAccess, job_id: str, session: SessionDep) -> Response:
    service.delete(session, service.get(session, owner.tenant_id, job_id))
    return Response(status_code=204)


@router.get(
    "/v1/influence-jobs/{job_id}/results",
    response_model=ResultsPage,
    responses=problems(404, 409),
    summary="Top-k proponents and opponents per query",
)
def get_results(
    caller: ReadAccess,
    job_id: str,
    session: SessionDep,
    page_size: PageSize = DEFAULT_PAGE,
    page_token: str | None = None,
    query_index: Annotated[int | None, Query(ge=0)] = None,
):
    job = service.get(session, caller.tenant_id, job_id)
    result = results_service.get_result(session, job)
    after = None
    if page_token:
        (after,) = decode_token(page_token, int)
    rows, more = results_service.page(session, job, page_size, after, query_index)
    details = dict(result.details)
    return ResultsPage(
        job_id=job.id,
        method=job.spec["method"]["name"],
        measurement=job.spec["measurement"],
        sign_convention=details.pop("sign_convention", SIGN_CONVENTION),
        orientation=details.pop("orientation", ORIENTATION),
        n_queries=result.n_queries,
        n_train=result.n_train,
        details=details,
        items=[QueryResultRead.model_validate(r) for r in rows],
        next_page_token=encode_token(rows[-1].query_index) if more else None,
    )


_KEPT_BY = {
    "scores": ("scores_uri", "submit with output.keep_full_matrix=true"),
    "self_influence": ("self_influence_uri", "submit with output.self_influence=true"),
    "group_scores": ("group_scores_uri", "submit with output.groups"),
}


def _artifact(
    session,
    store,
    tenant_id: str,
    job_id: str,
    which: Literal["scores", "self_influence", "group_scores"],
    fmt: str,
):
    job = service.get(session, tenant_id, job_id)
    result = results_service.get_result(session, job)
    column, hint = _KEPT_BY[which]
    uri = getattr(result, column)
    if uri is None:
        raise ProblemError(
            404, "artifact-not-kept", "Artifact not kept", f"this job did not keep {which}; {hint}"
        )
    path = store.path(uri)
    filename = f"{job_id}-{which}"
    if fmt == "npy":
        return FileResponse(path, media_type="application/octet-stream", filename=filename + ".npy")
    size, chunks = safetensors_stream(
        path, which, {"orientation": ORIENTATION, "sign_convention": SIGN_CONVENTION}
    )
    return StreamingResponse(
        chunks,
        media_type="application/octet-stream",
        headers={
            "Content-Disposition": f'attachment; filename="{filename}.safetensors"',
            "Content-Length": str(size),
        },
    )


def _offset(page_token: str | None) -> int:
    """The position a results listing resumes at (0 without a token).

    Positions suit results where CONVENTIONS' cursors suit tables: a finished job's result never
    changes, so no row shifts between pages."""
    if not page_token:
        return 0
    (offset,) = decode_token(page_token, int)
    return offset


ArtifactFormat = Annotated[Literal["npy", "safetensors"], Query(description="File format of the download.")]


@router.get(
    "/v1/influence-jobs/{job_id}/artifacts/scores",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}}, **problems(404, 409)},
    summary="The full query-major m x n score matrix",
)
def get_scores(
    caller: ReadAccess, job_id: str, session: SessionDep, store: StoreDep, format: ArtifactFormat = "npy"
):
    return _artifact(session, store, caller.tenant_id, job_id, "scores", format)


@router.get(
    "/v1/influence-jobs/{job_id}/artifacts/self-influence",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}}, **problems(404, 409)},
    summary="Self-influence of every training example (length n)",
)
def get_self_influence(
    caller: ReadAccess, job_id: str, session: SessionDep, store: StoreDep, format: ArtifactFormat = "npy"
):
    return _artifact(session, store, caller.tenant_id, job_id, "self_influence", format)


@router.get(
    "/v1/influence-jobs/{job_id}/artifacts/group-scores",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}}, **problems(404, 409)},
    summary="The query-major m x G group-score matrix (jobs with output.groups)",
)
def get_group_scores_artifact(
    caller: ReadAccess, job_id: str, session: SessionDep, store: StoreDep, format: ArtifactFormat = "npy"
):
    return _artifact(session, store, caller.tenant_id, job_id, "group_scores", format)


@router.get(
    "/v1/influence-jobs/{job_id}/group-influence",
    response_model=GroupInfluencePage,
    responses=problems(404, 409),
    summary="Each query's score for each group of training rows (jobs with output.groups)",
)
def get_group_influence(
    caller: ReadAccess,
    job_id: str,
    session: SessionDep,
    store: StoreDep,
    page_size: PageSize = DEFAULT_PAGE,
    page_token: str | None = None,
):
    """The predicted change of each query's loss (or minus its margin) when a whole group is removed."""
    job = service.get(session, caller.tenant_id, job_id)
    result = results_service.get_result(session, job)
    offset = _offset(page_token)
    query_rows = job.spec.get("query_indices") or range(result.n_queries)
    info, items, more = results_service.group_page(store, result, query_rows, page_size, offset)
    return GroupInfluencePage(
        job_id=job.id,
        method=job.spec["method"]["name"],
        measurement=job.spec["measurement"],
        order=info["order"],
        sign_convention=SIGN_CONVENTION,
        groups=[GroupRead(name=n, size=k) for n, k in zip(info["names"], info["sizes"], strict=True)],
        items=[GroupScoresRead(**i) for i in items],
        next_page_token=encode_token(offset + page_size) if more else None,
    )


@router.get(
    "/v1/influence-jobs/{job_id}/values",
    response_model=ValuesPage,
    responses=problems(404, 409),
    summary="Data values per training example (valuation methods), lowest first by default",
)
def get_values(
    caller: ReadAccess,
    job_id: str,
    session: SessionDep,
    store: StoreDep,
    order: Annotated[Literal["asc", "desc"], Query(description="asc: least valuable first.")] = "asc",
    page_size: PageSize = DEFAULT_PAGE,
    page_token: str | None = None,
):
    """Lowest values first: the training examples most likely mislabeled or harmful."""
    job = service.get(session, caller.tenant_id, job_id)
    result = results_service.get_result(session, job)
    offset = _offset(page_token)
    train_ids = results_service.train_ids(session, store, job)
    items, more = results_service.values_page(
        store, result, train_ids, order=order, page_size=page_size, offset=offset
    )
    return ValuesPage(
        job_id=job.id,
        method=job.spec["method"]["name"],
        order=order,
        n_train=result.n_train,
        items=[DataValue(**i) for i in items],
        next_page_token=encode_token(offset + page_size) if more else None,
    )


@router.get("/v1/problem-types", response_model=list[ProblemTypeRead], tags=["catalog"])
def list_problem_types(caller: ReadAccess):
    """Every problem ``code`` this service answers with (docs/problems.md, as data)."""
    return [
        ProblemTypeRead(
            code=code, type=PROBLEM_BASE_URI + code, statuses=list(pt.statuses), description=pt.description
        )
        for code, pt in sorted(PROBLEM_TYPES.items())
    ]


@router.get("/v1/estimators", response_model=list[EstimatorRead], tags=["catalog"])
def list_estimators(caller: ReadAccess):
    """Every estimator with its parameters as JSON Schema."""
    return [
        EstimatorRead(
            name=e.name,
            summary=e.summary,
            needs_checkpoints=e.needs_checkpoints,
            supports_self_influence=e.supports_self_influence,
            group_orders=list(e.group_orders),
            params_schema=json_schema(e.Params),
        )
        for e in sorted(REGISTRY.values(), key=lambda e: e.name)
    ]
