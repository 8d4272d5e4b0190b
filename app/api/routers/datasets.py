from __future__ import annotations

from contextlib import ExitStack
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Request, Response, UploadFile

from app.api.auth import ReadAccess, WriteAccess
from app.api.deps import (
    DEFAULT_PAGE,
    CommittingRoute,
    PageSize,
    PageToken,
    SessionDep,
    SettingsDep,
    StoreDep,
    conditional,
    stage_upload,
)
from app.api.openapi import GATE, problems
from app.problems import invalid_field
from app.schemas.common import Page
from app.schemas.datasets import BuiltinDatasetCreate, DatasetRead
from app.services import datasets as service

router = APIRouter(prefix="/v1/datasets", tags=["datasets"], responses=GATE, route_class=CommittingRoute)

_SUFFIX_FORMATS = {".npz": "npz", ".safetensors": "safetensors", ".parquet": "parquet", ".pq": "parquet"}


def _infer_format(filename: str | None) -> str:
    name = (filename or "").lower()
    for suffix, fmt in _SUFFIX_FORMATS.items():
        if name.endswith(suffix):
            return fmt
    raise invalid_field(
        "/format",
        "cannot tell the format from the file name; send format=npz|safetensors|parquet",
        status=415,
        code="unsupported-format",
    )


@router.post(
    "",
    status_code=201,
    response_model=DatasetRead,
    responses=problems(400, 413, 415, 507),
    summary="Upload a dataset (.npz, .safetensors, Parquet)",
)
def upload_dataset(
    owner: WriteAccess,
    request: Request,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    file: Annotated[
        UploadFile, File(description="npz with X, y[, ids]; safetensors with X, y[, ids]; or Parquet.")
    ],
    name: Annotated[str | None, Form(max_length=200)] = None,
    format: Annotated[Literal["npz", "safetensors", "parquet"] | None, Form()] = None,
    label_column: Annotated[str, Form(description="Parquet: the label column.")] = "label",
    id_column: Annotated[str | None, Form(description="Parquet: optional integer id column.")] = None,
):
    """Validated completely (dtypes, shapes, finiteness, sizes) before anything is stored."""
    fmt = format or _infer_format(file.filename)
    with ExitStack() as stack:
        staged = stage_upload(stack, store, file, "/file")
        row = service.create_from_upload(
            session,
            store,
            owner,
            path=staged.path,
            upload_sha256=staged.sha256,
            fmt=fmt,
            name=name or file.filename or "dataset",
            label_column=label_column,
            id_column=id_column,
            max_bytes=settings.max_upload_bytes,
        )
    response.headers["Location"] = str(request.url_for("get_dataset", dataset_id=row.id))
    return DatasetRead.model_validate(row)


@router.post(
    "/builtin",
    status_code=201,
    response_model=DatasetRead,
    responses=problems(400, 413, 507),
    summary="Register a bundled sklearn dataset",
)
def create_builtin_dataset(
    owner: WriteAccess,
    body: BuiltinDatasetCreate,
    request: Request,
    response: Response,
    session: SessionDep,
    store: StoreDep,
):
    row = service.create_builtin(session, store, owner, body)
    response.headers["Location"] = str(request.url_for("get_dataset", dataset_id=row.id))
    return DatasetRead.model_validate(row)


@router.get("", response_model=Page[DatasetRead])
def list_datasets(
    caller: ReadAccess, session: SessionDep, page_size: PageSize = DEFAULT_PAGE, page_token: PageToken = None
):
    rows, token = service.list_page(session, caller.tenant_id, page_size, page_token)
    return Page[DatasetRead](items=[DatasetRead.model_validate(r) for r in rows], next_page_token=token)


@router.get("/{dataset_id}", response_model=DatasetRead, responses=problems(404))
def get_dataset(
    caller: ReadAccess, dataset_id: str, request: Request, response: Response, session: SessionDep
):
    row = service.get(session, caller.tenant_id, dataset_id)
    return conditional(request, response, DatasetRead.model_validate(row))
