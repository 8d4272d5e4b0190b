"""Run one job delivery: claim, compute in a sandboxed child with heartbeats, finish under the attempt guard.

Shared by the Celery task and by anything else that wants to run a job by id (tests, a notebook).
This process is trusted (it holds DB and broker credentials): it claims, loads rows, looks up and
stores the train-state and retraining-outputs caches, validates what the compute child wrote and stores
results. Tenant weights and data meet torch only in the child (worker/sandbox.py, worker/compute.py);
finalize merges shards or estimates values from stored arrays here, and the LDS evaluation is rank
arithmetic on validated arrays (scores, masks, measured outputs). Never holds a DB transaction across
compute.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from celery.exceptions import SoftTimeLimitExceeded

from app.db.models import Checkpoint as CheckpointRow
from app.db.models import Dataset, Job, Model
from app.db.session import retry_transaction
from app.estimators import (
    ORIENTATION,
    SIGN_CONVENTION,
    Cancelled,
    Checkpoint,
    Estimator,
    EstimatorError,
    Recipe,
    get_estimator,
)
from app.estimators.sharding import merge_metadata, merge_shards
from app.estimators.valuation import (
    SOLVERS,
    LDSParams,
    LDSSubsets,
    SubsetOutputs,
    SubsetSpec,
    lds_summary,
)
from app.problems import FieldError, ProblemError
from app.services import jobs as jobs_service
from app.services import models as models_service
from app.services import results as results_service
from app.services import shards as shards_service
from app.services import subset_outputs, train_state
from app.services.validation import validate_params
from app.settings import Settings
from app.storage.artifacts import ArtifactStore
from worker import sandbox
from worker.compute import job_plans

log = logging.getLogger(__name__)


class Reporter:
    """Progress callback (fed by the compute child's progress lines) plus a background heartbeat.

    The heartbeat thread extends the lease every ``heartbeat_seconds`` and
    writes the latest progress; once no heartbeat has succeeded for ``lease_seconds`` (the database
    unreachable), the lease has run out and the sweeper may give the work to another worker, so this
    one stops. The callback itself never touches the DB, it
    only raises :class:`Cancelled` or :class:`LeaseLost` once the thread has
    seen the flag, and the sandbox then kills the child. Cancel latency is
    therefore about one heartbeat.
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
        last_ok = time.monotonic()
        while not self._stop.wait(self.settings.heartbeat_seconds):
            try:
                if self._beat_fn(self.settings, self.claim, self.last_progress):
                    self.cancel.set()
                last_ok = time.monotonic()
            except jobs_service.LeaseLost:
                self.lost.set()
                return
            except Exception:  # noqa: BLE001 - DB blip: keep computing while the lease has slack
                log.warning("heartbeat failed for %s", self.claim, exc_info=True)
                if time.monotonic() - last_ok >= self.settings.lease_seconds:
                    # the lease has run out: the sweeper may hand the work to another worker, so stop
                    log.error("no heartbeat for %s in %.0f s: giving up the work", self.claim,
                              self.settings.lease_seconds)  # fmt: skip
                    self.lost.set()
                    return


@dataclass
class _Loaded:
    job: Job
    model: Model
    train: Dataset
    query: Dataset | None
    checkpoints: list


def _labels(y: np.ndarray, task: str) -> torch.Tensor:
    return torch.as_tensor(y, dtype=torch.long if task == "classification" else torch.float32)


def _load(settings: Settings, job_id: str) -> _Loaded:
    def read(session) -> _Loaded:
        job = session.get(Job, job_id)
        model = session.get(Model, job.model_id)
        return _Loaded(
            job,
            model,
            session.get(Dataset, job.train_dataset_id),
            session.get(Dataset, job.query_dataset_id) if job.query_dataset_id else None,
            jobs_service.selected_checkpoints(session, job),
        )

    return retry_transaction(settings, read)  # a dropped connection must not fail the job


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
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return sandbox.disk_full().to_dict()
    return ProblemError(500, "internal-error", "The job failed unexpectedly", type(exc).__name__).to_dict()


def run_job(settings: Settings, job_id: str, worker_id: str) -> str:
    """Run one delivery of ``job_id``; returns the outcome for logs."""
    claim = jobs_service.claim(settings, job_id, worker_id)
    if claim is None:
        log.info("job %s not claimable (finished, running elsewhere or cancelled); dropping message", job_id)
        return "skipped"
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
        return _hand_over(settings, claim, outcome, reporter.last_progress)
    write, progress = outcome
    return (
        "succeeded"
        if jobs_service.finish(settings, claim, "succeeded", write=write, progress=progress)
        else "lease-lost"
    )


def _hand_over(settings: Settings, claim, plans: list, progress: dict | None) -> str:
    """Fan the job out to its shards; a job cancelled since its last heartbeat ends cancelled instead."""
    if shards_service.fan_out(settings, claim, plans):
        return "fanned-out"
    cancelled = jobs_service.finish(settings, claim, "cancelled", progress=progress)  # fenced by attempt
    return "cancelled" if cancelled else "lease-lost"


def run_shard(settings: Settings, shard_id: str, worker_id: str) -> str:
    """Compute one shard of a fanned-out job in a sandboxed child and record its partial result."""
    claim = shards_service.claim(settings, shard_id, worker_id)
    if claim is None:
        return "skipped"
    store = ArtifactStore(settings.resolved_artifact_dir)
    plan = claim.plan
    try:
        with Reporter(settings, claim, beat=shards_service.heartbeat) as reporter:
            reporter("loading", 0, 1)
            job = _prepare(settings, store, claim.job_id)
            payload = {
                **job.payload,
                "plan": {
                    "kind": plan.kind,
                    "train_lo": plan.train_lo,
                    "train_hi": plan.train_hi,
                    "checkpoint_indices": (
                        list(plan.checkpoint_indices) if plan.checkpoint_indices is not None else None
                    ),
                },
            }
            with sandbox.acquire(settings) as box:
                out = box.run("worker.compute:shard", payload, job.inputs, reporter)
                seconds = out.number("compute_seconds")
                details = stderr_uri = None
                if plan.kind in ("subsets", "lds"):
                    scores_uri, self_uri = _store_subsets(store, out, plan.train_hi - plan.train_lo), None
                else:
                    _store_state(settings, store, job, out)
                    width = plan.train_hi - plan.train_lo
                    scores = out.optional_array("scores", (job.n_query, width), job.parameter)
                    self_influence = out.optional_array("self_influence", (width,), job.parameter)
                    stderr = out.optional_array("scores_stderr", (job.n_query, width), job.parameter)
                    scores_uri = store.put_npy(scores).uri if scores is not None else None
                    self_uri = store.put_npy(self_influence).uri if self_influence is not None else None
                    stderr_uri = store.put_npy(stderr).uri if stderr is not None else None
                    details = dict(out.mapping("metadata"))
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
    completed = shards_service.complete(settings, claim, scores_uri, self_uri, seconds, details, stderr_uri)
    return "succeeded" if completed else "lease-lost"


# Keys the merge's npz files use for themselves (np.savez's own arguments among them): a shard's
# measurement by one of these names would overwrite them or make np.savez raise.
_MERGE_KEYS = frozenset({"__info__", "file", "allow_pickle", *subset_outputs.RESERVED})


def _store_subsets(store: ArtifactStore, out: sandbox.Outputs, rows: int) -> str:
    """A retraining shard's measurements (``rows`` subsets each) as one npz, for finalize."""
    names = out.names("subsets")
    if taken := sorted(_MERGE_KEYS.intersection(names)):
        raise sandbox.invalid_output(f"a retraining shard named measurements {taken}: the merge's own keys")
    arrays = {name: out.rows(f"subset.{name}", rows) for name in names}
    if not arrays:
        raise sandbox.invalid_output("a retraining shard returned no measurements")
    info = out.mapping("info")
    return store.put_npz(**arrays, __info__=np.array(json.dumps(info))).uri


def finalize_job(settings: Settings, job_id: str) -> str:
    """Merge a fanned-out job's shards into its result; idempotent: the current attempt commits once.

    Any other error leaves the job running: the sweeper re-publishes the merge, and
    :func:`shards_service.finalize_claim` fails the job once ``max_attempts`` merges have started."""
    ready = shards_service.finalize_claim(settings, job_id)
    if ready is None:
        return "skipped"
    claim, parts = ready
    _threads(settings)
    try:
        with Reporter(settings, claim, beat=shards_service.merge_heartbeat) as reporter:  # the merge is live
            write = _merge(settings, claim, parts, reporter)
    except jobs_service.LeaseLost:  # a later merge attempt owns the job now
        return "skipped"
    except Cancelled:  # requested while a retraining estimate ran in its child
        stored = jobs_service.finish(settings, claim, "cancelled", progress=reporter.last_progress)
        return "cancelled" if stored else "skipped"
    except (ProblemError, EstimatorError) as exc:  # input, numerics or child limits: failed as run_job does
        stored = jobs_service.finish(settings, claim, "failed", error=_problem_for(exc))
        return "failed" if stored else "skipped"
    stored = jobs_service.finish(settings, claim, "succeeded", write=write, progress=_done())
    return "succeeded" if stored else "skipped"


def _merge(settings: Settings, claim, parts: list, reporter: Reporter) -> object:
    """The fanned-out job's result: merged score shards, or an estimate from the merged subset outputs.

    Like the rest of this process, the merge loads no tenant weights or data as tensors: score shards
    are validated arrays merged here; a retraining job's estimate runs in a sandboxed child
    (:func:`worker.compute.estimate`) on the outputs its shards trained."""
    job_id = claim.job_id
    store = ArtifactStore(settings.resolved_artifact_dir)
    job = _prepare(settings, store, job_id)
    spec = job.loaded.job.spec
    lds_parts = [p for p in parts if p.plan.kind == "lds"]
    parts = [p for p in parts if p.plan.kind != "lds"]
    values = values_stderr = scores_stderr = None
    details = {
        "method": spec["method"]["name"],
        "measurement": spec["measurement"],
        "sign_convention": SIGN_CONVENTION,
        "orientation": ORIENTATION,
        "shards": len(parts) + len(lds_parts),
        "compute_seconds": round(sum(p.compute_seconds or 0.0 for p in parts + lds_parts), 4),
    }
    own = None
    if parts[0].plan.kind == "subsets":  # retraining: estimate from every shard's trained outputs
        outputs = SubsetOutputs.concat(_load_outputs(store, p.scores_uri) for p in parts)
        full_plan = job.estimator.plan(_PlanProblem.of(job), job.params)
        if job.reuse.own is not None:
            _check_outputs(outputs, job.reuse.own.spec, job.n_query, job.n_train)
            outputs = SubsetOutputs(outputs.arrays, _child_info(outputs.info, len(full_plan)))
            seconds = sum(p.compute_seconds or 0.0 for p in parts)
            subset_outputs.save(settings, store, job.reuse.own, full_plan, outputs, seconds)
            own = (full_plan, outputs, "trained", job.reuse.own.key)
            details.update(_outputs_details(job.reuse.own, "trained", outputs))
        estimated = _estimate(settings, store, job, outputs, reporter)
        scores, self_influence, values, values_stderr, scores_stderr, metadata = estimated
        details = {**metadata, **details}
    else:

        def load(uri):
            return np.load(store.path(uri), allow_pickle=False) if uri else None

        scores, self_influence = merge_shards(
            job.n_query, job.n_train, ((p.plan, load(p.scores_uri), load(p.self_uri)) for p in parts)
        )
        if all(p.stderr_uri and p.plan.checkpoint_indices is None for p in parts):  # columns, not sums
            scores_stderr, _ = merge_shards(
                job.n_query, job.n_train, ((p.plan, load(p.stderr_uri), None) for p in parts)
            )
        details = {**merge_metadata([p.details or {} for p in parts]), **details}
    if job.reuse.lds is not None:
        trained = None
        if lds_parts:
            merged = SubsetOutputs.concat(_load_outputs(store, p.scores_uri) for p in lds_parts)
            merged = SubsetOutputs(merged.arrays, _child_info(merged.info, job.reuse.lds.spec.n_masks))
            trained = (merged, sum(p.compute_seconds or 0.0 for p in lds_parts))
        details["quality"] = {
            "lds": _lds_quality(settings, store, job.reuse, scores, job.n_train, own, trained)
        }
    query_ds = job.loaded.query or job.loaded.train
    query_ids = _ids(store, query_ds)
    prepared = results_service.prepare(
        store,
        scores=scores,
        scores_stderr=scores_stderr,
        self_influence=self_influence,
        query_rows=job.query_rows,
        query_ids=query_ids[job.query_rows] if query_ids is not None else None,
        train_ids=query_ids if query_ds.id == job.loaded.train.id else _ids(store, job.loaded.train),
        top=spec["output"]["top_k"],
        keep_full_matrix=spec["output"]["keep_full_matrix"],
        details=details,
        values=values,
        values_stderr=values_stderr,
        groups=spec["output"].get("groups"),
    )
    return prepared.write(job_id, claim.attempt)


@dataclass(frozen=True)
class _PlanProblem:
    """What a retraining plan reads of a problem (sizes and the training recipe), with no tensors."""

    n_train: int
    n_query: int
    recipe: dict | None
    weight_decay: float

    @classmethod
    def of(cls, job: _Job) -> _PlanProblem:
        return cls(job.n_train, job.n_query, job.payload["recipe"], job.payload["weight_decay"])


def _estimate(
    settings: Settings, store: ArtifactStore, job: _Job, outputs: SubsetOutputs, reporter: Reporter
):
    """A retraining job's scores, self-influence, values and their errors from its merged outputs,
    computed in a sandboxed child and validated here."""
    payload = {**job.payload, "fit_state": False}
    inputs = {k: v for k, v in job.inputs.items() if k not in ("state", "subset_outputs")}
    n_query, n_train, parameter = job.n_query, job.n_train, job.parameter
    with store.staging_file(".npz") as merged:
        np.savez(merged, **outputs.arrays, info=np.array(json.dumps(outputs.info)))
        inputs["merged_outputs"] = merged
        with sandbox.acquire(settings) as box:
            out = box.run("worker.compute:estimate", payload, inputs, reporter)
            scores = out.optional_array("scores", (n_query, n_train), parameter)
            scores_stderr = (
                out.optional_array("scores_stderr", (n_query, n_train), parameter)
                if scores is not None
                else None
            )
            self_influence = out.optional_array("self_influence", (n_train,), parameter)
            values = out.optional_array("values", (n_train,), parameter)
            values_stderr = (
                out.optional_array("values_stderr", (n_train,), parameter) if values is not None else None
            )
            metadata = dict(out.mapping("metadata"))
    if scores is None and values is None:
        raise sandbox.invalid_output("the estimate returned neither scores nor values")
    return scores, self_influence, values, values_stderr, scores_stderr, metadata


def _load_outputs(store: ArtifactStore, uri: str) -> SubsetOutputs:
    arrays = store.load_npz(uri)
    info = json.loads(str(arrays.pop("__info__")))
    return SubsetOutputs(arrays, info)


def _threads(settings: Settings) -> None:
    """Finalize's intra-op threads: the setting, else one per CPU."""
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


def _query_rows(spec: dict, query_ds: Dataset) -> np.ndarray:
    rows = spec["query_indices"] if spec.get("query_indices") is not None else np.arange(query_ds.n_examples)
    return np.asarray(rows, dtype=np.int64)


def _model_spec(model: Model) -> dict:
    """What the child needs to build the architecture (as models_service.build_model does)."""
    return {
        "architecture": model.architecture,
        "architecture_params": model.architecture_params,
        "seed": int(model.recipe.get("seed", 0)),
        "task": model.task,
        "loss": model.loss,
    }


def _tuning_parameter(estimator: Estimator) -> str | None:
    """The parameter to name when the estimator's output is not finite (regularisation first)."""
    fields = estimator.Params.__dataclass_fields__
    for name in ("damping", "damping_scale", "l2", "recipe"):
        if name in fields:
            return f"/method/params/{name}"
    return None


@dataclass
class _Job:
    """An influence job as the trusted side sees it: rows, the child's assignment, what to expect back."""

    loaded: _Loaded
    estimator: Estimator
    params: object
    payload: dict
    inputs: dict[str, Path]
    state: train_state.Lookup | None
    reuse: _Reuse
    query_rows: np.ndarray
    n_train: int
    parameter: str | None

    @property
    def n_query(self) -> int:
        return len(self.query_rows)


def _prepare(settings: Settings, store: ArtifactStore, job_id: str) -> _Job:
    """Rows and artifact paths for the child, and the train-state cache lookup; no tensors are loaded here."""
    loaded = _load(settings, job_id)
    spec, model = loaded.job.spec, loaded.model
    query_ds = loaded.query or loaded.train
    recipe = validate_params(Recipe, model.recipe, "/recipe")
    estimator = get_estimator(spec["method"]["name"])
    params = validate_params(estimator.Params, spec["method"]["params"], "/method/params")
    query_rows = _query_rows(spec, query_ds)
    inputs = {
        "weights": store.path(model.weights_uri),
        "train": store.path(loaded.train.uri),
        "query": store.path(query_ds.uri),
        **{f"checkpoint_{i}": store.path(c.uri) for i, c in enumerate(loaded.checkpoints)},
        **_initial_weights_input(store, model),
    }
    # a checkpoint registered without its learning rate keeps it unknown (the stored recipe holds
    # Recipe's defaults, not what the run used): the methods that weigh checkpoints by it refuse
    checkpoints = [{"step": c.step, "learning_rate": c.learning_rate} for c in loaded.checkpoints]
    state_inputs = {  # per tenant: a cache hit must not reveal another tenant's model and data
        "tenant_id": loaded.job.tenant_id,
        "weights_sha256": model.weights_sha256,
        "checkpoints_sha256": [c.sha256 for c in loaded.checkpoints],
        # the same files registered with other steps make another training record (SOURCE checks its
        # state's steps and would refuse a hit fitted on the other steps)
        "checkpoints": checkpoints,
        "train_dataset_sha256": loaded.train.sha256,
        "architecture": model.architecture,
        "architecture_params": model.architecture_params,
        "task": model.task,
        "weight_decay": recipe.weight_decay,
        # what a replay of the training run (unrolled methods) starts from and follows
        "recipe": dataclasses.asdict(recipe),
        "initial_weights_sha256": model.initial_weights_sha256,
    }
    state = train_state.lookup(settings, store, estimator, params, state_inputs)
    if state is not None and state.uri is not None:
        inputs["state"] = store.path(state.uri)
    reuse = _reuse(settings, store, loaded, estimator, params, query_rows)
    if reuse.own is not None and reuse.own.hit is not None:
        inputs["subset_outputs"] = store.path(reuse.own.hit.uri)
    execution = spec.get("execution") or {}
    hessian_groups = _hessian_groups(spec)
    payload = {
        "model": _model_spec(model),
        "recipe": dict(model.recipe),
        "weight_decay": recipe.weight_decay,
        "measurement": spec["measurement"],
        "checkpoints": checkpoints,
        "query_rows": query_rows.tolist(),
        "method": {"name": estimator.name, "params": spec["method"]["params"]},
        "runtime": {
            "device": settings.device,
            "chunk_size": settings.chunk_size,
            "memory_budget_bytes": settings.memory_budget_bytes,
        },
        "self_influence": bool(spec["output"]["self_influence"]),
        "groups": hessian_groups,
        "fit_state": state is not None and state.uri is None,
        "subsets": {"cached": reuse.own.hit is not None} if reuse.own is not None else None,
        "evaluation": (
            {
                "lds": {
                    "params": reuse.lds_block,
                    "n_masks": reuse.lds.spec.n_masks,
                    "train": reuse.lds_masks_to_train is not None,
                }
            }
            if reuse.lds is not None
            else None
        ),
        # Hessian-order group terms need the whole training set in the task that scores (a train-row
        # split is refused at submit), and a merge has no group scores: such a job runs as one task,
        # its LDS subsets included.
        "sharding": {
            "subsets_per_shard": execution.get("subsets_per_shard"),
            "train_shard_size": execution.get("train_shard_size") or settings.train_shard_size or None,
            "by_checkpoint": bool(execution.get("shard_by_checkpoint")),
        }
        if not hessian_groups
        else {"subsets_per_shard": None, "train_shard_size": None, "by_checkpoint": False},
    }
    return _Job(
        loaded,
        estimator,
        params,
        payload,
        inputs,
        state,
        reuse,
        query_rows,
        loaded.train.n_examples,
        _tuning_parameter(estimator),
    )


def _hessian_groups(spec: dict) -> dict | None:
    """The job's groups when their order needs the estimator's Hessian (computed in the child); first
    order is summed from the validated scores here (:func:`results_service.prepare`)."""
    groups = spec["output"].get("groups")
    if groups is None or groups["order"] == "first":
        return None
    return {"rows": list(groups["members"].values()), "order": groups["order"]}


def _store_state(settings: Settings, store: ArtifactStore, job: _Job, out: sandbox.Outputs) -> dict:
    """Cache a state the child fitted (once validated); returns what the result metadata says about it."""
    reported = out.mapping("state", optional=True)
    if job.state is None or reported is None:
        return {}
    if job.state.uri is not None:
        return {
            "key": job.state.key,
            "cache_hit": True,
            "fit_seconds": job.state.fit_seconds,
            "load_seconds": out.number("load_seconds", reported),
        }
    fit_seconds = out.number("fit_seconds", reported)
    with store.staging_file(".safetensors") as staged:  # copied, validated, then committed as it is
        checked = out.state_file("state", staged, job.parameter)
        train_state.save(settings, store, job.state, job.estimator, staged, fit_seconds, checked.sha256)
    return {"key": job.state.key, "cache_hit": False, "fit_seconds": fit_seconds}


def _ids(store: ArtifactStore, dataset: Dataset) -> np.ndarray | None:
    """A stored dataset's example ids, without decompressing its features."""
    with np.load(store.path(dataset.uri), allow_pickle=False) as data:
        return data["ids"] if "ids" in data.files else None


def _influence(settings: Settings, store: ArtifactStore, claim, reporter: Reporter):
    reporter("loading", 0, 1)
    job = _prepare(settings, store, claim.job_id)
    with sandbox.acquire(settings) as box:
        out = box.run("worker.compute:influence", job.payload, job.inputs, reporter)
        state_info = _store_state(settings, store, job, out)
        budget = out.integer("retrain_budget", optional=True, maximum=10**9)
        plans = job_plans(
            job.payload["sharding"],
            job.estimator,
            job.n_train,
            len(job.loaded.checkpoints),
            budget,
            job.reuse.lds_masks_to_train,
        )
        if plans:
            return plans
        reporter("writing", 0, 1)
        n_train, parameter = job.n_train, job.parameter
        scores = out.optional_array("scores", (job.n_query, n_train), parameter)
        scores_stderr = (
            out.optional_array("scores_stderr", (job.n_query, n_train), parameter)
            if scores is not None
            else None
        )
        self_influence = out.optional_array("self_influence", (n_train,), parameter)
        values = out.optional_array("values", (n_train,), parameter)
        values_stderr = (
            out.optional_array("values_stderr", (n_train,), parameter) if values is not None else None
        )
        groups = job.payload["groups"]
        group_scores = (
            out.array("group_scores", (job.n_query, len(groups["rows"])), parameter) if groups else None
        )
        if scores is None and self_influence is None and values is None:
            raise sandbox.invalid_output("the computation returned neither scores, self-influence nor values")
        details = dict(out.mapping("metadata"))
        details.update(
            compute_seconds=out.number("compute_seconds"),
            device=out.text("device"),
            chunk_size=out.integer("chunk_size"),
        )
        own = _own_outputs(settings, store, job, out, details)
        if job.reuse.lds is not None:
            trained = None
            if job.reuse.lds_masks_to_train is not None:
                reported = out.mapping("lds")
                spec = job.reuse.lds.spec
                trained = (
                    _child_outputs(out, "lds", reported, spec, job.n_query, n_train),
                    out.number("seconds", reported),
                )
            details["quality"] = {
                "lds": _lds_quality(settings, store, job.reuse, scores, n_train, own, trained)
            }
    loaded = job.loaded
    details.update(
        model_weights_sha256=loaded.model.weights_sha256,
        train_dataset_sha256=loaded.train.sha256,
        n_checkpoints=len(loaded.checkpoints),
        torch_version=torch.__version__,
    )
    if state_info:
        details["train_state"] = state_info
    query_ds = loaded.query or loaded.train
    query_ids = _ids(store, query_ds)
    prepared = results_service.prepare(
        store,
        scores=scores,
        scores_stderr=scores_stderr,
        self_influence=self_influence,
        query_rows=job.query_rows,
        query_ids=query_ids[job.query_rows] if query_ids is not None else None,
        train_ids=query_ids if query_ds.id == loaded.train.id else _ids(store, loaded.train),
        top=loaded.job.spec["output"]["top_k"],
        keep_full_matrix=loaded.job.spec["output"]["keep_full_matrix"],
        details=details,
        values=values,
        values_stderr=values_stderr,
        groups=loaded.job.spec["output"].get("groups"),
        group_scores=group_scores,
    )
    return prepared.write(claim.job_id, claim.attempt), _done()


@dataclass
class _Reuse:
    """A job's retraining outputs and their cache entries: the method's own (Downsampling and
    Datamodels) and its LDS evaluation's. ``lds_masks_to_train``: LDS subsets this job must retrain
    (None when stored outputs serve, or when the evaluation's subsets are the method's own)."""

    own: subset_outputs.Lookup | None
    lds: subset_outputs.Lookup | None
    lds_block: dict | None
    lds_masks_to_train: int | None

    @property
    def lds_shares_own(self) -> bool:
        return self.own is not None and self.lds is not None and self.own.plan_key == self.lds.plan_key


def _reuse(
    settings: Settings, store: ArtifactStore, loaded: _Loaded, estimator: Estimator, params, query_rows
) -> _Reuse:
    """Look up the stored subset outputs this job can reuse (keys as in app/services/subset_outputs.py)."""
    spec, model = loaded.job.spec, loaded.model
    lds_block = (spec.get("evaluation") or {}).get("lds")
    if not hasattr(estimator, "subset_spec") and lds_block is None:
        return _Reuse(None, None, None, None)
    recipe = validate_params(Recipe, model.recipe, "/recipe")
    query_ds = loaded.query or loaded.train
    fingerprint = subset_outputs.fingerprint(
        tenant_id=loaded.job.tenant_id,
        architecture=model.architecture,
        architecture_params=model.architecture_params,
        task=model.task,
        loss=model.loss,
        weights_sha256=model.weights_sha256,
        initial_weights_sha256=model.initial_weights_sha256,
        train_sha256=loaded.train.sha256,
        query_sha256=query_ds.sha256,
        query_rows=query_rows,
        measurement=spec["measurement"],
    )
    reuse = bool((spec.get("execution") or {}).get("reuse_subset_outputs", True))

    def lookup(subset_spec: SubsetSpec) -> subset_outputs.Lookup:
        solver = subset_outputs.resolve_solver(model.architecture, model.architecture_params, subset_spec)
        return subset_outputs.lookup(settings, store, subset_spec, fingerprint, solver, reuse=reuse)

    context = {"model_recipe": dict(model.recipe), "weight_decay": recipe.weight_decay}
    own = lds = None
    if hasattr(estimator, "subset_spec"):
        own = lookup(
            estimator.subset_spec(params, **context, self_influence=bool(spec["output"]["self_influence"]))
        )
    if lds_block is not None:
        lds_params = validate_params(LDSParams, lds_block, "/evaluation/lds")
        lds = lookup(LDSSubsets().subset_spec(lds_params, **context))
    found = _Reuse(own, lds, lds_block, None)
    if lds is not None and lds.hit is None and not found.lds_shares_own:
        found.lds_masks_to_train = lds.spec.n_masks
    return found


def _check_outputs(outputs: SubsetOutputs, spec: SubsetSpec, n_query: int, n_train: int) -> None:
    """Merged outputs hold exactly the spec's measured sets, n_masks rows each, of the right width."""
    K = spec.n_masks
    shapes = {"query": (K, n_query), "train": (K, n_train)}
    if sorted(outputs.arrays) != sorted(spec.outputs):
        raise sandbox.invalid_output(
            f"retraining returned {sorted(outputs.arrays)}, not {list(spec.outputs)}"
        )
    for name, array in outputs.arrays.items():
        if array.shape != shapes[name] or not np.isfinite(array).all():
            raise sandbox.invalid_output(
                f"retrained {name} outputs: shape {array.shape}, expected {shapes[name]}"
            )


def _child_info(info: object, rows: int) -> dict:
    """The engine's info as far as the cache keeps it: solver and models trained, checked."""
    if not isinstance(info, dict):
        raise sandbox.invalid_output("meta.json: the retraining info is not an object")
    solver, trained = info.get("solver"), info.get("n_trained")
    if (
        solver not in SOLVERS
        or isinstance(trained, bool)
        or not isinstance(trained, int)
        or not 0 <= trained <= rows
    ):
        raise sandbox.invalid_output("meta.json: the retraining info has no valid solver and model count")
    return {"solver": solver, "n_trained": trained}


def _child_outputs(
    out: sandbox.Outputs, prefix: str, reported: dict, spec: SubsetSpec, n_query: int, n_train: int
) -> SubsetOutputs:
    """A single task's retrained outputs (``<prefix>.<set>.npy``), validated against ``spec``."""
    names = reported.get("names")
    if not isinstance(names, list) or sorted(names) != sorted(spec.outputs):
        raise sandbox.invalid_output(f"meta.json: retrained sets {names!r}, expected {list(spec.outputs)}")
    shapes = {"query": (spec.n_masks, n_query), "train": (spec.n_masks, n_train)}
    arrays = {name: out.array(f"{prefix}.{name}", shapes[name]) for name in spec.outputs}
    return SubsetOutputs(arrays, _child_info(reported.get("info"), spec.n_masks))


def _outputs_details(found: subset_outputs.Lookup, status: str, outputs: SubsetOutputs) -> dict:
    """What the result says about the method's own subset outputs: reused or trained, and the entry."""
    return {
        "subset_outputs": status,
        "subset_outputs_key": found.hit.key if status == "reused" else found.key,
        "models_trained": 0 if status == "reused" else int(outputs.info.get("n_trained") or 0),
    }


def _own_outputs(settings: Settings, store: ArtifactStore, job: _Job, out: sandbox.Outputs, details: dict):
    """Single task: cache the outputs the child trained, or note the reused entry. Returns
    ``(plan, outputs, status, key)`` for an LDS evaluation on the same subsets (plan None when reused:
    the evaluation then finds the same entry itself), or None for methods without subset outputs."""
    found = job.reuse.own
    if found is None:
        return None
    if found.hit is not None:
        details.update(_outputs_details(found, "reused", SubsetOutputs({}, {})))
        return (None, None, "reused", found.hit.key)
    outputs = _child_outputs(
        out, "subset", out.mapping("subset_outputs"), found.spec, job.n_query, job.n_train
    )
    plan = found.spec.plan(job.n_train)
    subset_outputs.save(settings, store, found, plan, outputs, out.number("compute_seconds"))
    details.update(_outputs_details(found, "trained", outputs))
    return (plan, outputs, "trained", found.key)


def _lds_quality(
    settings: Settings,
    store: ArtifactStore,
    reuse: _Reuse,
    scores: np.ndarray | None,
    n_train: int,
    own,
    trained: tuple[SubsetOutputs, float] | None,
) -> dict:
    """The LDS of the job's scores on the evaluation's subsets: from the outputs this job retrained
    (then cached), its own method's outputs, or a stored entry. Arithmetic on validated arrays only."""
    found = reuse.lds
    if scores is None:
        raise ProblemError(
            422,
            "evaluation-unsupported",
            "The LDS needs a score matrix",
            "the estimator returned no m x n scores",
            [FieldError("/evaluation/lds", "the estimator returned no score matrix")],
        )
    if trained is not None:
        outputs, seconds = trained
        _check_outputs(outputs, found.spec, scores.shape[0], n_train)
        plan = found.spec.plan(n_train)
        subset_outputs.save(settings, store, found, plan, outputs, seconds)
        status, key = "trained", found.key
    elif found.hit is not None:
        plan, outputs = subset_outputs.load_outputs(store, found.hit, ("query",))
        status, key = "reused", found.hit.key
    elif reuse.lds_shares_own and own is not None and own[0] is not None:
        plan, outputs, status, key = own
    else:  # cannot happen: _reuse asks for a retrain whenever nothing else serves
        raise sandbox.invalid_output("the LDS evaluation's subsets were neither trained nor found")
    if plan.masks.shape != (found.spec.n_masks, n_train):
        raise sandbox.invalid_output("the LDS evaluation's masks do not match its plan")
    summary = lds_summary(scores, plan.masks, outputs["query"])
    return {
        **summary,
        "alpha": found.spec.alpha,
        "seed": found.spec.seed,
        "subset_outputs": status,
        "subset_outputs_key": key,
    }


def _expected_state(model_row: Model) -> dict[str, torch.Size]:
    """The architecture's state-dict shapes, built on the meta device: no memory, no tenant data."""
    module = models_service.meta_module(model_row.architecture, model_row.architecture_params)
    return {name: tensor.shape for name, tensor in module.state_dict().items()}


def _trained_state(out: sandbox.Outputs, name: str, expected: dict[str, torch.Size]) -> dict:
    tensors, _ = out.tensors(name, "/recipe/learning_rate")
    shapes = {key: tensor.shape for key, tensor in tensors.items()}
    if shapes != expected:
        raise sandbox.invalid_output(f"{name}: the tensors do not match the architecture")
    return tensors


def _initial_weights_input(store: ArtifactStore, model: Model) -> dict[str, Path]:
    """The child's ``initial_weights`` input, when the model's training started from uploaded weights."""
    return {"initial_weights": store.path(model.initial_weights_uri)} if model.initial_weights_uri else {}


def _train(settings: Settings, store: ArtifactStore, claim, reporter: Reporter):
    loaded = _load(settings, claim.job_id)
    model_row = loaded.model
    payload = {"model": _model_spec(model_row), "recipe": dict(model_row.recipe), "device": settings.device}
    expected = _expected_state(model_row)
    with sandbox.acquire(settings) as box:
        inputs = {"train": store.path(loaded.train.uri), **_initial_weights_input(store, model_row)}
        out = box.run("worker.compute:training", payload, inputs, reporter)
        weights = _trained_state(out, "weights", expected)
        listed = out.meta.get("checkpoints")
        if not isinstance(listed, list) or len(listed) > 10_000:
            raise sandbox.invalid_output("meta.json: checkpoints is not a list")
        checkpoints = []
        for i, entry in enumerate(listed):
            if not isinstance(entry, dict):
                raise sandbox.invalid_output("meta.json: a checkpoint is not an object")
            step, rate = entry.get("step"), out.number("learning_rate", entry)
            if isinstance(step, bool) or not isinstance(step, int) or step < 0:
                raise sandbox.invalid_output("meta.json: a checkpoint's step is not a non-negative integer")
            checkpoints.append(Checkpoint(step, rate, _trained_state(out, f"checkpoint_{i}", expected)))
    stored_weights = store.put_state_dict(weights)
    stored_checkpoints = [(c, store.put_state_dict(c.state)) for c in checkpoints]

    def write(session) -> None:
        model = session.get(Model, model_row.id)
        model.weights_uri, model.weights_sha256, model.state, model.error = (
            stored_weights.uri,
            stored_weights.sha256,
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
