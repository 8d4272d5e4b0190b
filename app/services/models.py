"""Register models: architecture from the server-side registry, safetensors weights, optional checkpoints."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.db.models import Checkpoint, Dataset, Job, Model
from app.estimators import EstimatorError, Recipe, TaskSpec, get_architecture, init_model
from app.estimators.training import checkpoint_epochs
from app.problems import FieldError, ProblemError, invalid_field
from app.schemas.models import CheckpointMeta, ModelCreate
from app.services import tenants
from app.services.api_keys import Principal
from app.services.pagination import decode_token, encode_token, paginate
from app.services.validation import estimator_problem, validate_params
from app.settings import Settings
from app.storage.artifacts import ArtifactStore
from app.storage.formats import read_state_dict


@dataclass
class WeightsUpload:
    """An uploaded file already streamed to the artifact store's staging area."""

    path: Path
    sha256: str
    pointer: str


def build_model(model: Model) -> torch.nn.Module:
    arch = get_architecture(model.architecture)
    params = validate_params(arch.Params, model.architecture_params, "/architecture/params")
    return init_model(arch, params, seed=int(model.recipe.get("seed", 0)))


def meta_module(architecture: str, architecture_params: dict) -> torch.nn.Module:
    """The architecture built on the meta device: its modules and shapes, no memory, no weights."""
    arch = get_architecture(architecture)
    params = validate_params(arch.Params, architecture_params, "/architecture/params")
    with torch.device("meta"):
        return init_model(arch, params)


def trainable_parameters(model: Model) -> int:
    """What the estimators call p: the architecture's trainable parameters (a LoRA model's frozen base
    is not among them)."""
    module = meta_module(model.architecture, model.architecture_params)
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _check_state(module: torch.nn.Module, state: dict[str, torch.Tensor], pointer: str) -> None:
    """strict=True semantics, with a problem that names the tensor; floating tensors must be floating
    (integer buffers such as num_batches_tracked integers). The reader refused values float32 cannot hold."""
    expected = module.state_dict()
    errors = [FieldError(pointer, f"missing tensor {k!r}") for k in expected if k not in state]
    errors += [FieldError(pointer, f"unexpected tensor {k!r}") for k in state if k not in expected]
    errors += [
        FieldError(
            pointer, f"tensor {k!r} has shape {list(v.shape)}, architecture expects {list(expected[k].shape)}"
        )
        for k, v in state.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    errors += [
        FieldError(
            pointer,
            f"tensor {k!r} has dtype {str(v.dtype).removeprefix('torch.')}, the architecture's is "
            f"{'floating point' if expected[k].is_floating_point() else 'integer'}",
        )
        for k, v in state.items()
        if k in expected and v.is_floating_point() != expected[k].is_floating_point()
    ]
    errors += [
        FieldError(pointer, f"tensor {k!r} (a batch-norm variance) has negative values")
        for k, v in state.items()
        if k in expected and k.endswith("running_var") and v.numel() and float(v.min()) < 0
    ]
    if errors:
        raise ProblemError(
            422,
            "weights-mismatch",
            "Weights do not fit the architecture",
            "; ".join(e.detail for e in errors),
            errors,
        )
    module.load_state_dict(state, strict=True)


def _check_dataset_fits(arch, params, task: TaskSpec, dataset: Dataset, pointer: str) -> None:
    n_features = 1
    for d in dataset.feature_shape:
        n_features *= d
    if n_features != arch.n_features(params):
        raise invalid_field(
            pointer,
            f"dataset has {n_features} features per example, architecture expects {arch.n_features(params)}",
        )
    outputs = arch.n_outputs(params)
    if task.kind == "classification":
        if dataset.label_kind != "int":
            raise invalid_field(pointer, "classification needs integer labels")
        if dataset.num_classes is not None and dataset.num_classes > outputs:
            raise invalid_field(
                pointer, f"labels go up to {dataset.num_classes - 1}, model has {outputs} outputs"
            )
    elif outputs != 1:
        raise invalid_field("/spec/architecture/params", "regression models need exactly one output")


def create(
    session: Session,
    store: ArtifactStore,
    settings: Settings,
    owner: Principal,
    spec: ModelCreate,
    weights: WeightsUpload | None,
    checkpoints: list[WeightsUpload],
    initial_weights: WeightsUpload | None = None,
) -> tuple[Model, Job | None]:
    """Validate everything, store artifacts, and queue a training job when no weights were sent
    (starting from ``initial_weights`` when given, else from the architecture's seeded init)."""
    try:
        arch = get_architecture(spec.architecture.name)
        task = TaskSpec(kind=spec.task, loss=spec.loss)
    except EstimatorError as exc:
        raise estimator_problem(exc, "/spec") from None
    params = validate_params(arch.Params, spec.architecture.params, "/spec/architecture/params")
    recipe = validate_params(Recipe, spec.recipe, "/spec/recipe")
    try:
        with torch.device("meta"):  # counted before anything is allocated in this process
            shape_only = init_model(arch, params)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise invalid_field("/spec/architecture/params", f"cannot build the architecture: {exc}") from None
    n_parameters = sum(p.numel() for p in shape_only.parameters())
    if n_parameters > settings.max_model_parameters:
        raise invalid_field(
            "/spec/architecture/params",
            f"{n_parameters} parameters exceed the limit of {settings.max_model_parameters}",
        )
    module = init_model(arch, params, seed=recipe.seed)

    dataset = None
    if spec.train_dataset_id is not None:
        dataset = session.get(Dataset, spec.train_dataset_id)
        if dataset is None or dataset.tenant_id != owner.tenant_id:
            raise invalid_field("/spec/train_dataset_id", f"no dataset {spec.train_dataset_id}")
        _check_dataset_fits(arch, params, task, dataset, "/spec/train_dataset_id")
    if weights is None and dataset is None:
        raise invalid_field(
            "/weights", "upload weights, or give train_dataset_id so the service trains the model"
        )
    if initial_weights is not None and (weights is not None or dataset is None):
        raise invalid_field(
            "/initial_weights",
            "initial weights are where the service's training starts: send them with train_dataset_id "
            "and without weights",
        )
    if len(checkpoints) != len(spec.checkpoints):
        raise invalid_field(
            "/spec/checkpoints",
            f"{len(checkpoints)} checkpoint files but {len(spec.checkpoints)} entries in spec.checkpoints",
        )

    uploads = [u for u in (weights, initial_weights) if u is not None] + checkpoints
    size_bytes = sum(upload.path.stat().st_size for upload in uploads)
    if weights is None:  # the training job will store the weights and its checkpoints: count them now
        state_bytes = sum(t.numel() * t.element_size() for t in module.state_dict().values())
        size_bytes += state_bytes * (1 + len(checkpoint_epochs(recipe)))  # at most one per epoch
    tenants.reserve_storage(session, owner.tenant_id, owner.limits, size_bytes)
    model = Model(
        tenant_id=owner.tenant_id,
        name=spec.name,
        architecture=arch.name,
        architecture_params=asdict(params),
        task=task.kind,
        loss=task.loss,
        recipe=asdict(recipe),
        state="ready" if weights is not None else "training",
        n_parameters=n_parameters,
        train_dataset_id=spec.train_dataset_id,
        size_bytes=size_bytes,
    )
    _check_unique_steps(spec.checkpoints)
    # Validate every file before storing any, so a bad checkpoint leaves no orphaned weights behind.
    for upload in uploads:
        _check_state(module, _read_weights(upload, settings), upload.pointer)
    if weights is not None:
        stored = store.commit(weights.path, ".safetensors", weights.sha256)
        model.weights_uri, model.weights_sha256 = stored.uri, stored.sha256
    if initial_weights is not None:
        stored = store.commit(initial_weights.path, ".safetensors", initial_weights.sha256)
        model.initial_weights_uri, model.initial_weights_sha256 = stored.uri, stored.sha256
    for upload, meta in zip(checkpoints, spec.checkpoints, strict=True):
        stored = store.commit(upload.path, ".safetensors", upload.sha256)
        model.checkpoints.append(
            Checkpoint(step=meta.step, learning_rate=meta.learning_rate, uri=stored.uri, sha256=stored.sha256)
        )
    session.add(model)
    session.flush()

    job = None
    if weights is None:
        tenants.check_compute_quota(session, owner.tenant_id, owner.limits)
        job = Job(
            tenant_id=owner.tenant_id,
            kind="training",
            model_id=model.id,
            train_dataset_id=dataset.id,
            spec={},
            max_attempts=settings.max_attempts,
            enqueued_at=utcnow(),  # what the sweeper ages: a lost message is re-published after a while
        )
        session.add(job)
        session.flush()
        model.training_job_id = job.id
    return model, job


def _read_weights(upload: WeightsUpload, settings: Settings) -> dict[str, torch.Tensor]:
    # I64 admits BatchNorm's num_batches_tracked buffer; _check_state then pins every tensor's shape.
    return read_state_dict(
        upload.path,
        pointer=upload.pointer,
        max_bytes=settings.max_upload_bytes,
        allowed_dtypes=("F32", "F16", "BF16", "F64", "I64"),
    )


def _check_unique_steps(checkpoints: list[CheckpointMeta]) -> None:
    steps = [c.step for c in checkpoints]
    if len(set(steps)) != len(steps):
        raise invalid_field("/spec/checkpoints", "checkpoint steps must be unique")


def add_checkpoint(
    session: Session,
    store: ArtifactStore,
    settings: Settings,
    owner: Principal,
    model: Model,
    upload: WeightsUpload,
    meta: CheckpointMeta,
) -> Checkpoint:
    taken = ProblemError(
        409, "conflict", "Checkpoint exists", f"model already has a checkpoint at step {meta.step}"
    )
    if model.state == "training":  # its training writes the checkpoints: mixing in others corrupts both
        raise ProblemError(
            409,
            "conflict",
            "Model is training",
            "the service is training this model; add checkpoints once it is ready",
        )
    if any(c.step == meta.step for c in model.checkpoints):
        raise taken
    _check_state(build_model(model), _read_weights(upload, settings), upload.pointer)
    size_bytes = upload.path.stat().st_size
    tenants.reserve_storage(session, owner.tenant_id, owner.limits, size_bytes)  # locks the tenant row
    # again under the lock: an upload at the same step that passed the check above has committed now
    same_step = select(Checkpoint.id).where(Checkpoint.model_id == model.id, Checkpoint.step == meta.step)
    if session.scalar(same_step) is not None:
        raise taken
    stored = store.commit(upload.path, ".safetensors", upload.sha256)
    model.size_bytes += size_bytes
    checkpoint = Checkpoint(
        step=meta.step, learning_rate=meta.learning_rate, uri=stored.uri, sha256=stored.sha256
    )
    model.checkpoints.append(checkpoint)
    try:
        session.flush()
    except IntegrityError:  # SQLite has no row lock: the unique (model, step) index decides
        raise taken from None
    return checkpoint


def get(session: Session, tenant_id: str, model_id: str) -> Model:
    """The tenant's model; another tenant's answers 404 exactly like a missing one."""
    row = session.get(Model, model_id)
    if row is None or row.tenant_id != tenant_id:
        raise ProblemError(404, "not-found", "Model not found", f"no model {model_id}")
    return row


def list_page(session: Session, tenant_id: str, page_size: int, page_token: str | None):
    return paginate(session, select(Model).where(Model.tenant_id == tenant_id), Model, page_size, page_token)


def get_checkpoint(session: Session, model: Model, checkpoint_id: str) -> Checkpoint:
    """One of ``model``'s checkpoints (the caller already resolved the model for its tenant)."""
    row = session.get(Checkpoint, checkpoint_id)
    if row is None or row.model_id != model.id:
        raise ProblemError(
            404, "not-found", "Checkpoint not found", f"model {model.id} has no checkpoint {checkpoint_id}"
        )
    return row


def checkpoints_page(session: Session, model: Model, page_size: int, page_token: str | None):
    """Return (checkpoints, next_page_token) of ``model`` in step order, the order TracInCP sums them in.

    The cursor is the last step served (steps are unique per model), in the same opaque token format as
    the other listings.
    """
    stmt = select(Checkpoint).where(Checkpoint.model_id == model.id)
    if page_token:
        (after,) = decode_token(page_token, int)
        stmt = stmt.where(Checkpoint.step > after)
    rows = list(session.scalars(stmt.order_by(Checkpoint.step).limit(page_size + 1)))
    if len(rows) <= page_size:
        return rows, None
    rows = rows[:page_size]
    return rows, encode_token(rows[-1].step)


def rename(session: Session, model: Model, name: str, *, if_version: int | None = None) -> Model | None:
    """Rename in one UPDATE that bumps ``version``; with ``if_version``, only if the row still has that
    version (None when another update got there first: the caller's precondition failed)."""
    guard = [Model.id == model.id] + ([Model.version == if_version] if if_version is not None else [])
    updated = session.execute(
        update(Model)
        .where(*guard)
        .values(name=name, version=Model.version + 1)  # updated_at: the column's onupdate
        .execution_options(synchronize_session=False)
    )
    if updated.rowcount == 0:
        return None
    session.refresh(model)
    return model


def delete(session: Session, model: Model) -> None:
    active = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(Job.model_id == model.id, Job.state.in_(("queued", "running")), Job.kind == "influence")
    )
    if active or model.state == "training":
        raise ProblemError(409, "model-in-use", "Model in use", "the model has queued or running jobs")
    session.delete(model)
    session.flush()


def load_state(store: ArtifactStore, uri: str) -> dict[str, torch.Tensor]:
    """Load one of *our* stored safetensors artifacts (validated at upload)."""
    return load_file(str(store.path(uri)))
