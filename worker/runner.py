"""Run one job delivery: claim, compute with heartbeats, finish under the attempt guard.

Shared by the Celery task and by anything else that wants to run a job by id
(tests, a notebook). Never holds a DB transaction across compute.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import torch
from celery.exceptions import SoftTimeLimitExceeded

from app.db.models import Checkpoint as CheckpointRow
from app.db.models import Dataset, Job, Model
from app.db.session import session_scope
from app.estimators import (
    ORIENTATION,
    SIGN_CONVENTION,
    Cancelled,
    Checkpoint,
    Estimator,
    EstimatorError,
    InfluenceProblem,
    Recipe,
    Runtime,
    TaskSpec,
    get_estimator,
    train,
)
from app.estimators.sharding import ShardPlan, merge_shards, plan_shards, plan_subset_shards
from app.estimators.valuation.engine import SubsetOutputs
from app.problems import FieldError, ProblemError
from app.services import datasets as datasets_service
from app.services import jobs as jobs_service
from app.services import models as models_service
from app.services import results as results_service
from app.services import shards as shards_service
from app.services import train_state
from app.services.validation import validate_params
from app.settings import Settings
from app.storage.artifacts import ArtifactStore

log = logging.getLogger(__name__)


class Reporter:
    """Progress callback for estimators plus a background heartbeat.

    The heartbeat thread extends the lease every ``heartbeat_seconds`` and
    writes the latest progress; the callback itself never touches the DB, it
    only raises :class:`Cancelled` or :class:`LeaseLost` once the thread has
    seen the flag. Cancel latency is therefore one heartbeat plus one batch.
    """

    def __init__(self, settings: Settings, claim, beat=jobs_service.heartbeat) -> None:
        self.settings = settings
        self.claim = claim
        self._beat_fn = beat
        self.cancel = threading.Event()
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._progress: dict | None = None
        self._phase: str | None = None
        self._phase_started = time.monotonic()
        self._thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)

    def __enter__(self) -> Reporter:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def __call__(self, phase: str, done: int, total: int) -> None:
        now = time.monotonic()
        if phase != self._phase:
            self._phase, self._phase_started = phase, now
        fraction = done / total if total else 0.0
        elapsed = now - self._phase_started
        eta = elapsed * (total - done) / done if done and total else None
        with self._lock:
            self._progress = {
                "phase": phase,
                "completed_units": int(done),
                "total_units": int(total),
                "fraction": round(fraction, 4),
                "eta_seconds": None if eta is None else round(eta, 1),
                "updated_at": datetime.now(UTC).isoformat(),
            }
        self.check()

    def check(self) -> None:
        if self.lost.is_set():
            raise jobs_service.LeaseLost(self.claim)
        if self.cancel.is_set():
            raise Cancelled(self.claim)

    @property
    def last_progress(self) -> dict | None:
        with self._lock:
            return dict(self._progress) if self._progress else None

    def _beat(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_seconds):
            try:
                if self._beat_fn(self.settings, self.claim, self.last_progress):
                    self.cancel.set()
            except jobs_service.LeaseLost:
                self.lost.set()
                return
            except Exception:  # noqa: BLE001 - DB blip: keep computing, the lease has slack
                log.warning("heartbeat failed for %s", self.claim, exc_info=True)


@dataclass
class _Loaded:
    job: Job
    model: Model
    train: Dataset
    query: Dataset | None
    checkpoints: list


def _device(settings: Settings) -> torch.device:
    if settings.device == "cuda" or (settings.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def _labels(y: np.ndarray, task: str) -> torch.Tensor:
    return torch.as_tensor(y, dtype=torch.long if task == "classification" else torch.float32)


def _load(settings: Settings, job_id: str) -> _Loaded:
    with session_scope(settings) as session:
        job = session.get(Job, job_id)
        model = session.get(Model, job.model_id)
        return _Loaded(
            job,
            model,
            session.get(Dataset, job.train_dataset_id),
            session.get(Dataset, job.query_dataset_id) if job.query_dataset_id else None,
            jobs_service.selected_checkpoints(session, job),
        )


def _problem_for(exc: BaseException) -> dict:
    if isinstance(exc, ProblemError):
        return exc.to_dict()
    if isinstance(exc, EstimatorError):
        errors = [FieldError(exc.parameter, exc.detail)] if exc.parameter else []
        return ProblemError(422, exc.code, "The job could not be computed", exc.detail, errors).to_dict()
    if isinstance(exc, SoftTimeLimitExceeded):
        return ProblemError(
            500, "timeout", "The job ran out of time", "the job exceeded the worker's time limit"
        ).to_dict()
    if isinstance(exc, MemoryError):
        return ProblemError(
            500, "resource-limit", "The job ran out of memory", "reduce chunk size, queries or model size"
        ).to_dict()
    return ProblemError(500, "internal-error", "The job failed unexpectedly", type(exc).__name__).to_dict()


def run_job(settings: Settings, job_id: str, worker_id: str) -> str:
    """Run one delivery of ``job_id``; returns the outcome for logs."""
    claim = jobs_service.claim(settings, job_id, worker_id)
    if claim is None:
        log.info("job %s not claimable (finished, running elsewhere or cancelled); dropping message", job_id)
        return "skipped"
    _threads(settings)
    store = ArtifactStore(settings.resolved_artifact_dir)
    reporter = Reporter(settings, claim)
    try:
        with reporter:
            if claim.kind == "training":
                outcome = _train(settings, store, claim, reporter)
            else:
                outcome = _influence(settings, store, claim, reporter)
            reporter.check()
    except jobs_service.LeaseLost:
        log.warning("job %s attempt %d lost its lease; discarding its work", job_id, claim.attempt)
        return "lease-lost"
    except Cancelled:
        jobs_service.finish(settings, claim, "cancelled", progress=reporter.last_progress)
        return "cancelled"
    except BaseException as exc:
        if not isinstance(exc, ProblemError | EstimatorError):
            log.exception("job %s failed", job_id)
        jobs_service.finish(
            settings, claim, "failed", error=_problem_for(exc), progress=reporter.last_progress
        )
        if not isinstance(exc, Exception):
            raise
        return "failed"
    if isinstance(outcome, list):  # shard plans: hand the job over to its shards
        return "fanned-out" if shards_service.fan_out(settings, claim, outcome) else "lease-lost"
    write, progress = outcome
    return (
        "succeeded"
        if jobs_service.finish(settings, claim, "succeeded", write=write, progress=progress)
        else "lease-lost"
    )


def run_shard(settings: Settings, shard_id: str, worker_id: str) -> str:
    """Compute one shard of a fanned-out job and record its partial result."""
    claim = shards_service.claim(settings, shard_id, worker_id)
    if claim is None:
        return "skipped"
    _threads(settings)
    store = ArtifactStore(settings.resolved_artifact_dir)
    try:
        with Reporter(settings, claim, beat=shards_service.heartbeat) as reporter:
            ctx = _context(settings, store, claim.job_id)
            problem = ctx.problem
            if claim.plan.checkpoint_indices is not None:
                problem = dataclasses.replace(
                    problem, checkpoints=[problem.checkpoints[i] for i in claim.plan.checkpoint_indices]
                )
            runtime = _runtime(settings, ctx, reporter)
            started = time.perf_counter()
            if claim.plan.kind == "subsets":
                subsets = ctx.estimator.plan(
                    ctx.problem, ctx.params, start=claim.plan.train_lo, stop=claim.plan.train_hi
                )
                outputs = ctx.estimator.train_subsets(ctx.problem, ctx.params, subsets, runtime)
                reporter.check()
                uri = store.put_npz(
                    **outputs.arrays, __info__=np.array(json.dumps(outputs.info, default=str))
                ).uri
                seconds = time.perf_counter() - started
                return (
                    "succeeded"
                    if shards_service.complete(settings, claim, uri, None, seconds)
                    else "lease-lost"
                )
            state = train_state.get_or_fit(
                settings, store, ctx.estimator, ctx.params, ctx.problem, runtime, ctx.state_inputs
            ).state
            attribution = ctx.estimator.attribute(
                problem,
                ctx.params,
                want_scores=True,
                want_self_influence=ctx.output["self_influence"],
                runtime=runtime,
                state=state,
                train_range=(claim.plan.train_lo, claim.plan.train_hi),
            )
            seconds = time.perf_counter() - started
            reporter.check()
    except jobs_service.LeaseLost:
        return "lease-lost"
    except Cancelled:
        shards_service.stop_job(settings, claim, "cancelled")
        return "cancelled"
    except BaseException as exc:
        if not isinstance(exc, ProblemError | EstimatorError):
            log.exception("shard %s failed", shard_id)
        shards_service.stop_job(settings, claim, "failed", _problem_for(exc))
        if not isinstance(exc, Exception):
            raise
        return "failed"
    scores_uri = store.put_npy(attribution.scores).uri if attribution.scores is not None else None
    self_uri = (
        store.put_npy(attribution.self_influence).uri if attribution.self_influence is not None else None
    )
    return (
        "succeeded"
        if shards_service.complete(settings, claim, scores_uri, self_uri, seconds)
        else "lease-lost"
    )


def finalize_job(settings: Settings, job_id: str) -> str:
    """Merge a fanned-out job's shards into its result; idempotent: the current attempt commits once."""
    ready = shards_service.finalize_claim(settings, job_id)
    if ready is None:
        return "skipped"
    claim, parts = ready
    _threads(settings)
    store = ArtifactStore(settings.resolved_artifact_dir)
    ctx = _context(settings, store, job_id)
    spec = ctx.loaded.job.spec
    values = values_stderr = None
    details = {
        "method": spec["method"]["name"],
        "measurement": spec["measurement"],
        "sign_convention": SIGN_CONVENTION,
        "orientation": ORIENTATION,
        "shards": len(parts),
        "compute_seconds": round(sum(p.compute_seconds or 0.0 for p in parts), 4),
    }
    if parts[0].plan.kind == "subsets":  # retraining: estimate from every shard's trained outputs
        outputs = SubsetOutputs.concat(_load_outputs(store, p.scores_uri) for p in parts)
        full_plan = ctx.estimator.plan(ctx.problem, ctx.params)
        attribution = ctx.estimator.estimate(ctx.problem, ctx.params, full_plan, outputs)
        scores, self_influence = attribution.scores, attribution.self_influence
        values, values_stderr = attribution.values, attribution.values_stderr
        details = {**attribution.metadata, **details}
    else:

        def load(uri):
            return np.load(store.path(uri), allow_pickle=False) if uri else None

        scores, self_influence = merge_shards(
            ctx.problem.n_query,
            ctx.problem.n_train,
            ((p.plan, load(p.scores_uri), load(p.self_uri)) for p in parts),
        )
    prepared = results_service.prepare(
        store,
        scores=scores,
        self_influence=self_influence,
        query_rows=ctx.query_rows,
        query_ids=ctx.query_ids,
        train_ids=ctx.train_ids,
        top=ctx.output["top_k"],
        keep_full_matrix=ctx.output["keep_full_matrix"],
        details=details,
        values=values,
        values_stderr=values_stderr,
    )
    stored = jobs_service.finish(
        settings, claim, "succeeded", write=prepared.write(job_id, claim.attempt), progress=_done()
    )
    return "succeeded" if stored else "skipped"


def _load_outputs(store: ArtifactStore, uri: str) -> SubsetOutputs:
    arrays = store.load_npz(uri)
    info = json.loads(str(arrays.pop("__info__")))
    return SubsetOutputs(arrays, info)


def _threads(settings: Settings) -> None:
    """The child's intra-op threads: the setting, else one per CPU (the parent ran single-threaded)."""
    torch.set_num_threads(
        settings.torch_threads if settings.torch_threads > 0 else max(1, os.cpu_count() or 1)
    )


def _done(phase: str = "done") -> dict:
    return {
        "phase": phase,
        "completed_units": 1,
        "total_units": 1,
        "fraction": 1.0,
        "eta_seconds": 0.0,
        "updated_at": datetime.now(UTC).isoformat(),
    }


@dataclass
class _Context:
    """An influence job's inputs, loaded and ready for the estimator."""

    loaded: _Loaded
    problem: InfluenceProblem
    estimator: Estimator
    params: object
    output: dict
    query_rows: np.ndarray
    query_ids: np.ndarray | None
    train_ids: np.ndarray | None
    state_inputs: dict


def _query_rows(spec: dict, query_ds: Dataset) -> np.ndarray:
    rows = spec["query_indices"] if spec.get("query_indices") is not None else np.arange(query_ds.n_examples)
    return np.asarray(rows, dtype=np.int64)


def _context(settings: Settings, store: ArtifactStore, job_id: str) -> _Context:
    loaded = _load(settings, job_id)
    spec, model = loaded.job.spec, loaded.model
    train_arrays = datasets_service.load_arrays(store, loaded.train)
    query_ds = loaded.query or loaded.train
    query_arrays = (
        train_arrays if query_ds.id == loaded.train.id else datasets_service.load_arrays(store, query_ds)
    )
    query_rows = _query_rows(spec, query_ds)
    recipe = validate_params(Recipe, model.recipe, "/recipe")
    checkpoints = [
        Checkpoint(
            step=c.step,
            learning_rate=c.learning_rate if c.learning_rate is not None else recipe.learning_rate,
            state=models_service.load_state(store, c.uri),
        )
        for c in loaded.checkpoints
    ]
    problem = InfluenceProblem(
        model=models_service.build_model(model),
        task=TaskSpec(kind=model.task, loss=model.loss),
        weights=models_service.load_state(store, model.weights_uri),
        train_x=torch.as_tensor(train_arrays.x),
        train_y=_labels(train_arrays.y, model.task),
        query_x=torch.as_tensor(query_arrays.x[query_rows]),
        query_y=_labels(query_arrays.y[query_rows], model.task),
        measurement=spec["measurement"],
        checkpoints=checkpoints,
        weight_decay=recipe.weight_decay,
        recipe=dict(model.recipe),
    )
    estimator = get_estimator(spec["method"]["name"])
    params = validate_params(estimator.Params, spec["method"]["params"], "/method/params")
    state_inputs = {
        "weights_sha256": model.weights_sha256,
        "checkpoints_sha256": [c.sha256 for c in loaded.checkpoints],
        "train_dataset_sha256": loaded.train.sha256,
        "architecture": model.architecture,
        "architecture_params": model.architecture_params,
        "task": model.task,
        "weight_decay": recipe.weight_decay,
    }
    return _Context(
        loaded,
        problem,
        estimator,
        params,
        spec["output"],
        query_rows,
        query_arrays.ids[query_rows] if query_arrays.ids is not None else None,
        train_arrays.ids,
        state_inputs,
    )


def _runtime(settings: Settings, ctx: _Context, reporter: Reporter) -> Runtime:
    """Chunk size bounded by the memory budget: a chunk of per-sample gradients is rows x p floats."""
    n_params = sum(p.numel() for p in ctx.problem.model.parameters())
    bytes_per_row = 4 * n_params * 4  # the gradient chunk plus vmap's intermediates, float32
    chunk = max(1, min(settings.chunk_size, settings.memory_budget_bytes // max(bytes_per_row, 1)))
    return Runtime(device=_device(settings), chunk_size=int(chunk), progress=reporter)


def _shard_plans(settings: Settings, ctx: _Context) -> list[ShardPlan]:
    """How to split the job: subset rows for retraining plans, else training rows x checkpoints."""
    execution = ctx.loaded.job.spec.get("execution") or {}
    budget = ctx.estimator.retrain_budget(ctx.problem, ctx.params)
    if budget is not None and execution.get("subsets_per_shard"):
        return plan_subset_shards(budget, execution["subsets_per_shard"])
    if not ctx.estimator.shardable_by_rows:
        return []
    return plan_shards(
        ctx.problem.n_train,
        len(ctx.problem.checkpoints),
        train_shard_size=execution.get("train_shard_size") or settings.train_shard_size or None,
        by_checkpoint=bool(execution.get("shard_by_checkpoint")) and ctx.estimator.checkpoint_additive,
    )


def _influence(settings: Settings, store: ArtifactStore, claim, reporter: Reporter):
    reporter("loading", 0, 1)
    ctx = _context(settings, store, claim.job_id)
    runtime = _runtime(settings, ctx, reporter)
    outcome = train_state.get_or_fit(
        settings, store, ctx.estimator, ctx.params, ctx.problem, runtime, ctx.state_inputs
    )
    plans = _shard_plans(settings, ctx)
    if len(plans) > 1:
        return plans
    started = time.perf_counter()
    attribution = ctx.estimator.attribute(
        ctx.problem,
        ctx.params,
        want_scores=True,
        want_self_influence=ctx.output["self_influence"],
        runtime=runtime,
        state=outcome.state,
    )
    compute_seconds = time.perf_counter() - started
    reporter("writing", 0, 1)
    details = dict(attribution.metadata)
    details.update(
        compute_seconds=round(compute_seconds, 4),
        device=str(runtime.device),
        chunk_size=runtime.chunk_size,
        model_weights_sha256=ctx.loaded.model.weights_sha256,
        train_dataset_sha256=ctx.loaded.train.sha256,
        n_checkpoints=len(ctx.problem.checkpoints),
        torch_version=torch.__version__,
    )
    if outcome.info:
        details["train_state"] = outcome.info
    prepared = results_service.prepare(
        store,
        scores=attribution.scores,
        self_influence=attribution.self_influence,
        query_rows=ctx.query_rows,
        query_ids=ctx.query_ids,
        train_ids=ctx.train_ids,
        top=ctx.output["top_k"],
        keep_full_matrix=ctx.output["keep_full_matrix"],
        details=details,
        values=attribution.values,
        values_stderr=attribution.values_stderr,
    )
    return prepared.write(claim.job_id, claim.attempt), _done()


def _train(settings: Settings, store: ArtifactStore, claim, reporter: Reporter):
    loaded = _load(settings, claim.job_id)
    model_row = loaded.model
    arrays = datasets_service.load_arrays(store, loaded.train)
    recipe = validate_params(Recipe, model_row.recipe, "/recipe")
    result = train(
        models_service.build_model(model_row),
        TaskSpec(kind=model_row.task, loss=model_row.loss),
        torch.as_tensor(arrays.x),
        _labels(arrays.y, model_row.task),
        recipe,
        progress=reporter,
        device=_device(settings),
    )
    weights = store.put_state_dict(result.weights)
    stored_checkpoints = [(c, store.put_state_dict(c.state)) for c in result.checkpoints]

    def write(session) -> None:
        model = session.get(Model, model_row.id)
        model.weights_uri, model.weights_sha256, model.state, model.error = (
            weights.uri,
            weights.sha256,
            "ready",
            None,
        )
        for checkpoint, artifact in stored_checkpoints:
            model.checkpoints.append(
                CheckpointRow(
                    step=checkpoint.step,
                    learning_rate=checkpoint.learning_rate,
                    uri=artifact.uri,
                    sha256=artifact.sha256,
                )
            )

    return write, _done("trained")
