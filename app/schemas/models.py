from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import Field

from app.schemas.common import ReadModel, RequestModel


class ArchitectureSpec(RequestModel):
    name: str = Field(description="An architecture from the server-side registry (GET /v1/architectures).")
    params: dict[str, Any] = Field(
        default_factory=dict, description="Keyword parameters of that architecture."
    )


class CheckpointMeta(RequestModel):
    step: int = Field(ge=0)
    learning_rate: float | None = Field(
        None,
        ge=0,
        description="Learning rate in effect at this step (eta_t). Without it, methods that weigh "
        "checkpoints by it (tracincp, source) refuse the job unless told not to.",
    )


class ModelCreate(RequestModel):
    """Sent as the JSON ``spec`` part of the multipart request."""

    name: str = Field(max_length=200)
    architecture: ArchitectureSpec
    task: Literal["classification", "regression"] = "classification"
    loss: Literal["cross_entropy", "mse"] = "cross_entropy"
    recipe: dict[str, Any] = Field(
        default_factory=dict,
        description="Training recipe (optimizer, lr, schedule, epochs, ...); see GET /v1/architectures.",
    )
    train_dataset_id: str | None = Field(
        None,
        description="Training dataset; without weights, the service trains the model on it.",
    )
    checkpoints: list[CheckpointMeta] = Field(
        default_factory=list, description="Step and learning rate of each uploaded checkpoint file, in order."
    )


class ModelUpdate(RequestModel):
    name: str = Field(max_length=200)


class CheckpointRead(ReadModel):
    id: str
    model_id: str
    step: int
    learning_rate: float | None
    uri: str
    sha256: str
    created_at: datetime


class ModelRead(ReadModel):
    id: str
    name: str
    architecture: str
    architecture_params: dict[str, Any]
    task: str
    loss: str
    recipe: dict[str, Any]
    state: Literal["training", "ready", "failed"]
    n_parameters: int
    train_dataset_id: str | None
    training_job_id: str | None
    weights_uri: str | None
    weights_sha256: str | None
    initial_weights_uri: str | None
    initial_weights_sha256: str | None
    error: dict[str, Any] | None
    n_checkpoints: int
    created_at: datetime
    updated_at: datetime


class ArchitectureRead(ReadModel):
    name: str
    summary: str
    params_schema: dict[str, Any]


class ArchitectureCatalog(ReadModel):
    architectures: list[ArchitectureRead]
    recipe_schema: dict[str, Any]
