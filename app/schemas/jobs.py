from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import Field

from app.schemas.common import ReadModel, RequestModel, next_page_token_field

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class MethodSpec(RequestModel):
    name: str = Field(description="Estimator name from GET /v1/estimators.")
    params: dict[str, Any] = Field(default_factory=dict)


class GroupSpec(RequestModel):
    """Group influence: the effect on each query of removing a whole set of training rows at once
    (a data source, an annotator, a class), ESTIMATORS.md 2.22."""

    members: dict[str, list[int]] = Field(
        min_length=1,
        max_length=1000,
        description="Group name -> rows of the training dataset (distinct, at least one each).",
    )
    order: Literal["first", "second", "newton"] = Field(
        "first",
        description="first: the sum of the group's pointwise scores (every estimator that scores); "
        "second: adds the interactions between the group's members (Basu et al. 2020); newton: one "
        "Newton step on the objective without the group, exact for ridge regression. second and newton "
        "need the Hessian (if_exact, or if_cg's Hessian-vector products) and run unsharded.",
    )


class OutputSpec(RequestModel):
    top_k: int = Field(10, ge=1, le=1000, description="Proponents and opponents kept per query.")
    keep_full_matrix: bool = Field(
        False, description="Store the full query-major m x n score matrix as an artifact."
    )
    self_influence: bool = Field(False, description="Also compute each training example's self-influence.")
    groups: GroupSpec | None = Field(None, description="Also score named groups of training rows.")


class ExecutionSpec(RequestModel):
    """How to split the work; results are identical either way."""

    train_shard_size: int | None = Field(
        None, ge=1, description="Training rows per shard task (default: the server's IA_TRAIN_SHARD_SIZE)."
    )
    shard_by_checkpoint: bool = Field(
        False, description="Also one shard per checkpoint, for estimators whose scores sum over checkpoints."
    )
    subsets_per_shard: int | None = Field(
        None,
        ge=1,
        description="Retraining methods with a fixed subset plan (downsampling, datamodels, banzhaf_msr) "
        "and the LDS evaluation: subsets trained per shard task.",
    )
    reuse_subset_outputs: bool = Field(
        True,
        description="Reuse stored retraining outputs (the trained models' measurements on a fixed-fraction "
        "subset plan, shared by downsampling, datamodels and the LDS evaluation) when an earlier job trained "
        "the same subsets on the same model, data, queries and measurement; false retrains "
        "(and still stores).",
    )


class LDSSpec(RequestModel):
    """Linear Datamodeling Score (TRAK paper): retrain on random subsets and rank-correlate each query's
    measured objective with the sum of its scores over the subset. Same plan and retraining fields as
    ``datamodels``, so an evaluation reuses (or leaves behind) the outputs a datamodels/downsampling job
    with the same plan trains."""

    n_masks: int = Field(100, ge=4, le=100_000, description="Random subsets (models) to retrain.")
    alpha: float = Field(0.5, gt=0, le=0.99, description="Subset size as a fraction of the training set.")
    seed: int = Field(
        0,
        ge=0,
        description="Seed of the subset sampler (use another seed than the method's "
        "own plan to evaluate a datamodel on held-out subsets).",
    )
    train_seed: int | None = Field(
        None, ge=0, description="Training seed of every retrain; null: the recipe's seed."
    )
    seed_per_mask: bool = Field(False, description="Derive a different training seed for every subset.")
    solver: Literal["auto", "newton", "batched", "sequential"] = Field(
        "auto", description="How the subsets are retrained (as the retraining methods' `solver`)."
    )
    recipe: dict[str, Any] | None = Field(
        None, description="Training recipe replayed on every subset; null: the model's own recipe."
    )
    n_models_per_batch: int = Field(64, ge=1, description="Models trained together (memory/speed trade-off).")


class EvaluationSpec(RequestModel):
    """Quality measures computed after the scores, reported in the result's ``details.quality``."""

    lds: LDSSpec | None = Field(
        None,
        description="Linear Datamodeling Score of the score matrix (estimators returning m x n scores only; "
        "not the data-valuation methods). Result: `details.quality.lds` with the mean, its standard error "
        "over queries and the per-query values.",
    )


class JobCreate(RequestModel):
    model_id: str
    checkpoint_ids: list[str] | None = Field(
        None, description="Checkpoints to use (default: all of the model's)."
    )
    train_dataset_id: str
    query_dataset_id: str | None = Field(
        None, description="Default: the training dataset (with query_indices)."
    )
    query_indices: list[int] | None = Field(None, description="Rows of the query dataset (default: all).")
    method: MethodSpec
    measurement: Literal["loss", "margin"] = "loss"
    output: OutputSpec = Field(default_factory=OutputSpec)
    execution: ExecutionSpec = Field(default_factory=ExecutionSpec)
    evaluation: EvaluationSpec | None = Field(
        None, description='Opt-in quality evaluation of the scores, e.g. `{"lds": {"n_masks": 50}}`.'
    )


class Progress(ReadModel):
    phase: str | None = None
    completed_units: int = 0
    total_units: int = 0
    fraction: float = 0.0
    eta_seconds: float | None = None
    updated_at: datetime | None = None
    shard_phase: str | None = Field(
        None, description="Fanned-out jobs: what the most recently heard-from shard is doing."
    )


class JobRead(ReadModel):
    id: str
    kind: Literal["influence", "training"]
    state: JobState
    model_id: str
    train_dataset_id: str
    query_dataset_id: str | None
    spec: dict[str, Any]
    attempt: int
    max_attempts: int
    progress: Progress
    error: dict[str, Any] | None
    cancel_requested_at: datetime | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None
    duration_seconds: float | None
    links: dict[str, str]


class Influence(ReadModel):
    train_index: int = Field(description="Row of the training dataset.")
    train_id: int | None = Field(None, description="The dataset's own id of that row, when it has ids.")
    score: float
    stderr: float | None = Field(
        None,
        description="Standard error of the score, for estimators whose scores are sample estimates "
        "(downsampling; loo with repeats >= 2); null otherwise.",
    )


class QueryResultRead(ReadModel):
    query_index: int = Field(
        description="Position of the query within this job's query list (row of the matrix)."
    )
    query_row: int = Field(description="Row of the query dataset.")
    query_id: int | None = Field(None, description="The query dataset's own id of that row, when it has ids.")
    proponents: list[Influence]
    opponents: list[Influence]


class ResultsPage(ReadModel):
    job_id: str
    method: str
    measurement: str
    sign_convention: str
    orientation: str
    n_queries: int
    n_train: int
    details: dict[str, Any]
    items: list[QueryResultRead]
    next_page_token: str | None = next_page_token_field()


class EstimatorRead(ReadModel):
    name: str
    summary: str
    needs_checkpoints: bool
    supports_self_influence: bool
    group_orders: list[str] = Field(
        description="Orders of output.groups this estimator gives (empty: it returns data values only)."
    )
    params_schema: dict[str, Any]


class DataValue(ReadModel):
    rank: int = Field(description="Position in the requested order (0 = lowest value for order=asc).")
    train_index: int
    train_id: int | None = None
    value: float
    stderr: float = Field(description="Monte-Carlo standard error (0 for exact methods).")


class ValuesPage(ReadModel):
    job_id: str
    method: str
    order: Literal["asc", "desc"]
    n_train: int
    items: list[DataValue]
    next_page_token: str | None = next_page_token_field()


class GroupRead(ReadModel):
    name: str
    size: int = Field(description="Training rows in the group.")


class GroupScoresRead(ReadModel):
    query_index: int = Field(description="Position of the query in this job (0..n_queries-1).")
    query_row: int = Field(description="Row of the query dataset.")
    scores: list[float] = Field(description="One score per group, in the order of `groups`.")


class GroupInfluencePage(ReadModel):
    job_id: str
    method: str
    measurement: str
    order: Literal["first", "second", "newton"]
    sign_convention: str = Field(
        description="positive = removing the group would raise the query loss (lower its margin)"
    )
    groups: list[GroupRead]
    items: list[GroupScoresRead]
    next_page_token: str | None = next_page_token_field()
