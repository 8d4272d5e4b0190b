from __future__ import annotations

from contextlib import ExitStack
from typing import Annotated

from fastapi import APIRouter, File, Form, Request, Response, UploadFile
from pydantic import ValidationError

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
    precondition_failed,
    require_match,
    stage_upload,
)
from app.api.openapi import GATE, problems
from app.db.models import Model
from app.estimators import ARCHITECTURES, Recipe
from app.problems import FieldError, ProblemError
from app.schemas.common import Page
from app.schemas.models import (
    ArchitectureCatalog,
    ArchitectureRead,
    CheckpointMeta,
    CheckpointRead,
    ModelCreate,
    ModelRead,
    ModelUpdate,
)
from app.services import jobs as jobs_service
from app.services import models as service
from app.services.validation import json_schema

router = APIRouter(tags=["models"], responses=GATE, route_class=CommittingRoute)


def model_read(model: Model) -> ModelRead:
    data = {c: getattr(model, c) for c in ModelRead.model_fields if c != "n_checkpoints"}
    return ModelRead(**data, n_checkpoints=len(model.checkpoints))


def _parse_spec(raw: str) -> ModelCreate:
    try:
        return ModelCreate.model_validate_json(raw)
    except ValidationError as exc:
        errors = [FieldError("/spec" + "".join(f"/{p}" for p in e["loc"]), e["msg"]) for e in exc.errors()]
        raise ProblemError(
            422,
            "invalid-request",
            "The request is invalid",
            "; ".join(f"{e.pointer}: {e.detail}" for e in errors),
            errors,
        ) from None


@router.post(
    "/v1/models",
    status_code=201,
    response_model=ModelRead,
    responses=problems(400, 413, 415, 507),
    summary="Register (and optionally train) a model",
)
def create_model(
    owner: WriteAccess,
    request: Request,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    spec: Annotated[str, Form(description="ModelCreate as JSON: architecture, task, loss, recipe, ...")],
    weights: Annotated[UploadFile | None, File(description="Final weights as .safetensors.")] = None,
    checkpoints: Annotated[
        list[UploadFile] | None, File(description="Checkpoint .safetensors files.")
    ] = None,
    initial_weights: Annotated[
        UploadFile | None,
        File(
            description="Where the service's training starts (.safetensors, with train_dataset_id and "
            "without weights): e.g. a lora_mlp's pretrained base and initial adapters. Retraining "
            "estimators start from them too."
        ),
    ] = None,
):
    """Weights must be safetensors for an architecture of the server-side registry.

    Pickles, TorchScript and torch.export archives are refused (415) without being
    opened. Without weights, the service trains the model on ``train_dataset_id``
    (state ``training``; poll the model or ``/v1/training-jobs/{training_job_id}``), from
    ``initial_weights`` when sent (only the parameters the architecture leaves trainable change).
    """
    body = _parse_spec(spec)
    with ExitStack() as stack:
        staged_weights = stage_upload(stack, store, weights, "/weights") if weights is not None else None
        staged_checkpoints = [
            stage_upload(stack, store, f, f"/checkpoints/{i}") for i, f in enumerate(checkpoints or [])
        ]
        staged_initial = (
            stage_upload(stack, store, initial_weights, "/initial_weights")
            if initial_weights is not None
            else None
        )
        model, job = service.create(
            session, store, settings, owner, body, staged_weights, staged_checkpoints, staged_initial
        )
        jobs_service.publish_after_commit(session, settings, job)
    response.headers["Location"] = str(request.url_for("get_model", model_id=model.id))
    return model_read(model)


@router.get("/v1/models", response_model=Page[ModelRead])
def list_models(
    caller: ReadAccess, session: SessionDep, page_size: PageSize = DEFAULT_PAGE, page_token: PageToken = None
):
    rows, token = service.list_page(session, caller.tenant_id, page_size, page_token)
    return Page[ModelRead](items=[model_read(r) for r in rows], next_page_token=token)


@router.get("/v1/models/{model_id}", response_model=ModelRead, responses=problems(404))
def get_model(caller: ReadAccess, model_id: str, request: Request, response: Response, session: SessionDep):
    return conditional(request, response, model_read(service.get(session, caller.tenant_id, model_id)))


@router.patch("/v1/models/{model_id}", response_model=ModelRead, responses=problems(400, 404, 412, 413))
def update_model(
    owner: WriteAccess,
    model_id: str,
    body: ModelUpdate,
    request: Request,
    response: Response,
    session: SessionDep,
):
    model = service.get(session, owner.tenant_id, model_id)
    fenced = require_match(request, model_read(model))
    renamed = service.rename(session, model, body.name, if_version=model.version if fenced else None)
    if renamed is None:
        raise precondition_failed()
    return conditional(request, response, model_read(renamed))


@router.delete("/v1/models/{model_id}", status_code=204, responses=problems(404, 409))
def delete_model(owner: WriteAccess, model_id: str, session: SessionDep) -> Response:
    service.delete(session, service.get(session, owner.tenant_id, model_id))
    return Response(status_code=204)


@router.post(
    "/v1/models/{model_id}/checkpoints",
    status_code=201,
    response_model=CheckpointRead,
    responses=problems(400, 404, 409, 413, 415, 507),
)
def add_checkpoint(
    owner: WriteAccess,
    model_id: str,
    request: Request,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    file: Annotated[UploadFile, File(description="Checkpoint weights as .safetensors.")],
    step: Annotated[int, Form(ge=0)],
    learning_rate: Annotated[float | None, Form(ge=0)] = None,
):
    model = service.get(session, owner.tenant_id, model_id)
    with ExitStack() as stack:
        staged = stage_upload(stack, store, file, "/file")
        checkpoint = service.add_checkpoint(
            session,
            store,
            settings,
            owner,
            model,
            staged,
            CheckpointMeta(step=step, learning_rate=learning_rate),
        )
    response.headers["Location"] = str(
        request.url_for("get_checkpoint", model_id=model_id, checkpoint_id=checkpoint.id)
    )
    return CheckpointRead.model_validate(checkpoint)


@router.get("/v1/models/{model_id}/checkpoints", response_model=Page[CheckpointRead], responses=problems(404))
def list_checkpoints(
    caller: ReadAccess,
    model_id: str,
    session: SessionDep,
    page_size: PageSize = DEFAULT_PAGE,
    page_token: PageToken = None,
):
    """The model's checkpoints in ascending step order, cursor-paged like the other listings."""
    model = service.get(session, caller.tenant_id, model_id)
    rows, token = service.checkpoints_page(session, model, page_size, page_token)
    return Page[CheckpointRead](items=[CheckpointRead.model_validate(c) for c in rows], next_page_token=token)


@router.get(
    "/v1/models/{model_id}/checkpoints/{checkpoint_id}",
    response_model=CheckpointRead,
    responses=problems(404),
)
def get_checkpoint(
    caller: ReadAccess,
    model_id: str,
    checkpoint_id: str,
    request: Request,
    response: Response,
    session: SessionDep,
):
    """One checkpoint (its step, learning rate and content hash); ETag and 304 like the model."""
    model = service.get(session, caller.tenant_id, model_id)
    checkpoint = CheckpointRead.model_validate(service.get_checkpoint(session, model, checkpoint_id))
    return conditional(request, response, checkpoint)


@router.get("/v1/architectures", response_model=ArchitectureCatalog, tags=["catalog"])
def list_architectures(caller: ReadAccess):
    """Architectures of the server-side registry and the training recipe schema."""
    return ArchitectureCatalog(
        architectures=[
            ArchitectureRead(name=a.name, summary=a.summary, params_schema=json_schema(a.Params))
            for a in ARCHITECTURES.values()
        ],
        recipe_schema=json_schema(Recipe),
    )
