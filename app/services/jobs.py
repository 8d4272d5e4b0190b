"""Job use cases and the state machine: every transition is a compare-and-set UPDATE.

``attempt`` is a fencing token. A delivery claims a job by bumping it; only the
holder of the current attempt can heartbeat or finish, so a job that runs twice
(worker killed, lease expired, message redelivered) stores its result once.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import dispatch
from app.db.base import utcnow
from app.db.models import TERMINAL_STATES, Checkpoint, Dataset, Job, JobShard, Model
from app.db.session import retry_transaction, session_scope
from app.estimators import EstimatorError, ProblemSize, get_estimator
from app.estimators.base import group_order_hint
from app.estimators.group import as_groups
from app.estimators.valuation import LDSParams, returns_scores
from app.problems import FieldError, ProblemError, invalid_field
from app.schemas.jobs import JobCreate
from app.services import models as models_service
from app.services import tenants
from app.services.api_keys import Principal
from app.services.pagination import paginate
from app.services.validation import estimator_problem, validate_params
from app.settings import Settings

log = logging.getLogger(__name__)


TENANT_BUSY_RETRY_SECONDS = 5.0
SUBMIT_ATTEMPTS = 8  # a random free slot collides rarely; at the limit the next pass answers 429


class LeaseLost(Exception):
    """This delivery no longer owns the job (another attempt took over, or it was finished)."""


@dataclass(frozen=True)
class Claim:
    job_id: str
    kind: str
    attempt: int


def _request_hash(body: JobCreate) -> str:
    return hashlib.sha256(json.dumps(body.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def _dataset(session: Session, tenant_id: str, dataset_id: str, pointer: str) -> Dataset:
    row = session.get(Dataset, dataset_id)
    if row is None or row.tenant_id != tenant_id:
        raise invalid_field(pointer, f"no dataset {dataset_id}")
    return row


def _validate(session: Session, settings: Settings, owner: Principal, body: JobCreate) -> tuple[Model, dict]:
    """Everything that can be refused before a worker touches the job."""
    model = session.get(Model, body.model_id)
    if model is None or model.tenant_id != owner.tenant_id:
        raise invalid_field("/model_id", f"no model {body.model_id}")
    if model.state != "ready":
        raise invalid_field("/model_id", f"model is {model.state}, not ready")
    try:
        estimator = get_estimator(body.method.name)
    except EstimatorError as exc:
        raise estimator_problem(exc) from None
    params = validate_params(estimator.Params, body.method.params, "/method/params")

    train = _dataset(session, owner.tenant_id, body.train_dataset_id, "/train_dataset_id")
    query = _dataset(
        session, owner.tenant_id, body.query_dataset_id or body.train_dataset_id, "/query_dataset_id"
    )
    for ds, ptr in ((train, "/train_dataset_id"), (query, "/query_dataset_id")):
        if ds.feature_shape != train.feature_shape:
            raise invalid_field(ptr, "query and train datasets have different feature shapes")
        if model.task == "classification" and (
            ds.label_kind != "int" or (ds.num_classes or 0) > _outputs(model)
        ):
            raise invalid_field(ptr, "labels do not fit the model's classes")
    if body.query_indices is not None:
        if len(body.query_indices) > settings.max_query_indices:
            raise invalid_field("/query_indices", f"at most {settings.max_query_indices} query indices")
        bad = [i for i in body.query_indices if not 0 <= i < query.n_examples]
        if bad:
            raise invalid_field("/query_indices", f"indices out of range [0, {query.n_examples}): {bad[:5]}")
    if body.measurement == "margin" and model.task != "classification":
        raise invalid_field("/measurement", "margin is defined for classification models only")

    checkpoints = list(model.checkpoints)
    if body.checkpoint_ids is not None:
        by_id = {c.id: c for c in checkpoints}
        missing = [cid for cid in body.checkpoint_ids if cid not in by_id]
        if missing:
            raise invalid_field("/checkpoint_ids", f"not checkpoints of this model: {missing[:5]}")
        repeated = sorted(cid for cid, n in Counter(body.checkpoint_ids).items() if n > 1)
        if repeated:  # a checkpoint counted twice in a sum over the trajectory is never what was meant
            raise invalid_field("/checkpoint_ids", f"checkpoints listed more than once: {repeated[:5]}")
        checkpoints = [by_id[cid] for cid in body.checkpoint_ids]
    if estimator.needs_checkpoints and not checkpoints:
        raise invalid_field(
            "/checkpoint_ids", f"{estimator.name} needs at least one checkpoint; the model has none"
        )
    if body.output.self_influence and not estimator.supports_self_influence:
        raise invalid_field("/output/self_influence", f"{estimator.name} has no self-influence")

    n_query = len(body.query_indices) if body.query_indices is not None else query.n_examples
    size = ProblemSize(
        train.n_examples, n_query, models_service.trainable_parameters(model), len(checkpoints)
    )
    cells = float(size.n_train) * size.n_query
    if returns_scores(estimator, params) and cells > owner.limits.max_score_cells:
        raise ProblemError(
            422,
            "job-too-large",
            "The job's score matrix is too large",
            f"n_train x n_query = {cells:.3g} scores exceed the limit {owner.limits.max_score_cells:.3g} "
            f"(about {4 * cells / 2**30:.3g} GiB in float32); list fewer queries in query_indices, or "
            "split the query set over several jobs",
            [FieldError("/query_indices", "too many queries for this training set")],
        )
    cost = cells * size.n_parameters * max(1, size.n_checkpoints)
    if cost > owner.limits.max_job_cost:
        raise ProblemError(
            422,
            "job-too-large",
            "The job exceeds the cost limit",
            f"n_train x n_query x n_parameters x checkpoints = {cost:.3g} exceeds the limit "
            f"{owner.limits.max_job_cost:.3g}; use fewer queries or a smaller model",
            [FieldError("/query_indices", "too many queries for this model and training set")],
        )
    cost += _validate_evaluation(body, estimator, params, size, cost, owner.limits.max_job_cost)
    _validate_groups(body, estimator, params, size, settings)
    try:
        estimator.check(size, params)
        estimator.check_memory(size, params, settings.memory_budget_bytes)
    except EstimatorError as exc:
        raise estimator_problem(exc) from None

    spec = body.model_dump(mode="json")
    spec["checkpoint_ids"] = [c.id for c in checkpoints]
    spec["estimated_cost"] = cost
    return model, spec


def _validate_evaluation(
    body: JobCreate, estimator, params, size: ProblemSize, cost: float, limit: float
) -> float:
    """Refuse an evaluation the job cannot have; returns its cost (added to the job's).

    The LDS retrains ``n_masks`` models and measures each on the queries: about
    ``n_masks x (n_train + n_query) x n_parameters``, charged against the same limit as the job.
    """
    lds = body.evaluation.lds if body.evaluation is not None else None
    if lds is None:
        return 0.0
    if not returns_scores(estimator, params):
        raise ProblemError(
            422,
            "evaluation-unsupported",
            "The LDS evaluates score matrices",
            f"{estimator.name} returns data values (one per training example), not an m x n score matrix; "
            "the linear datamodeling score needs per-query scores",
            [FieldError("/evaluation/lds", f"not available for {estimator.name}")],
        )
    lds_params = validate_params(LDSParams, lds.model_dump(mode="json"), "/evaluation/lds")
    lds_cost = float(lds_params.n_masks) * (size.n_train + size.n_query) * size.n_parameters
    if cost + lds_cost > limit:
        raise ProblemError(
            422,
            "job-too-large",
            "The job exceeds the cost limit",
            f"the LDS evaluation's n_masks x (n_train + n_query) x n_parameters = {lds_cost:.3g} takes "
            f"the job to {cost + lds_cost:.3g}, over the limit {limit:.3g}; use fewer masks",
            [FieldError("/evaluation/lds/n_masks", "too many subsets for this model and training set")],
        )
    return lds_cost


# float64 p x G blocks a Hessian-order group solve holds at once (right-hand sides, block-CG state,
# the result), at most: what the submit check counts against the memory budget
GROUP_SOLVE_BLOCKS = 8


def _validate_groups(body: JobCreate, estimator, params, size: ProblemSize, settings: Settings) -> None:
    """Rows in range and distinct per group, a bounded total, an order this estimator gives, and
    Hessian-order solves whose p x G blocks fit the memory budget."""
    n_train = size.n_train
    spec = body.output.groups
    if spec is None:
        return
    if not returns_scores(estimator, params):
        raise invalid_field(
            "/output/groups", f"{estimator.name} returns data values, not per-query scores to group"
        )
    if sum(len(rows) for rows in spec.members.values()) > settings.max_group_rows:
        raise invalid_field(
            "/output/groups/members", f"at most {settings.max_group_rows} rows over all groups"
        )
    try:
        as_groups(spec.members, n_train)
    except EstimatorError as exc:
        raise estimator_problem(exc) from None
    if spec.order not in estimator.group_orders:
        raise invalid_field(
            "/output/groups/order",
            f"{estimator.name} gives group influence of order {', '.join(estimator.group_orders)}"
            + group_order_hint(spec.order),
        )
    needed = GROUP_SOLVE_BLOCKS * 8 * size.n_parameters * len(spec.members)
    if spec.order != "first" and needed > settings.memory_budget_bytes:
        raise invalid_field(
            "/output/groups/members",
            f"{spec.order}-order group influence solves for all {len(spec.members)} groups at once: "
            f"about {needed / 2**30:.3g} GiB for this {size.n_parameters}-parameter model, over the "
            f"worker's memory budget ({settings.memory_budget_bytes / 2**30:.3g} GiB); use fewer groups "
            "or order 'first'",
        )
    if spec.order != "first" and body.execution.train_shard_size:
        raise invalid_field(
            "/execution/train_shard_size",
            f"{spec.order}-order group influence needs the whole training set in one task; "
            "drop train_shard_size",
        )


def _outputs(model: Model) -> int:
    from app.estimators import get_architecture

    arch = get_architecture(model.architecture)
    return arch.n_outputs(validate_params(arch.Params, model.architecture_params, "/architecture/params"))


def submit_influence(
    session: Session, settings: Settings, owner: Principal, body: JobCreate, idempotency_key: str | None
) -> tuple[Job, bool]:
    """Validate, insert and publish the job. Returns (job, created).

    The INSERT is the only write, so an autocommit session runs it without BEGIN and COMMIT round
    trips, and no lock is held: the quota slot's unique index settles concurrent submissions. A
    collision (slot taken meanwhile, same Idempotency-Key won by a concurrent request, model
    deleted meanwhile) re-reads everything and decides again.
    """
    request_hash = _request_hash(body)
    for _ in range(SUBMIT_ATTEMPTS):
        if idempotency_key:
            existing = _by_idempotency_key(session, settings, owner.tenant_id, idempotency_key, request_hash)
            if existing is not None:
                return existing, False
        model, spec = _validate(session, settings, owner, body)
        tenants.check_compute_quota(session, owner.tenant_id, owner.limits)
        job = Job(
            tenant_id=owner.tenant_id,
            kind="influence",
            state="queued",
            model_id=model.id,
            train_dataset_id=body.train_dataset_id,
            query_dataset_id=body.query_dataset_id or body.train_dataset_id,
            spec=spec,
            max_attempts=settings.max_attempts,
            idempotency_key=idempotency_key,
            request_hash=request_hash,
            enqueued_at=utcnow(),
            progress={"phase": "queued", "completed_units": 0, "total_units": 0, "fraction": 0.0},
            quota_slot=tenants.pick_job_slot(session, owner.tenant_id, owner.limits),
        )
        session.add(job)
        try:
            session.commit()
        except IntegrityError as exc:
            session.rollback()
            collision = exc
            continue
        dispatch.enqueue_job(settings, job.id)
        return job, True
    raise collision


def _by_idempotency_key(
    session: Session, settings: Settings, tenant_id: str, key: str, request_hash: str
) -> Job | None:
    """The job an Idempotency-Key names, while the key is kept (``idempotency_key_ttl_seconds`` after
    its submission); an older job gives the key up, so it can name a new request.

    A concurrent request with the same key cannot see it "in flight": the job's INSERT is the whole
    submission, so the key becomes visible with the finished job (the unique index makes the loser
    re-read it and answer with the original)."""
    job = session.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key))
    kept_since = utcnow() - timedelta(seconds=settings.idempotency_key_ttl_seconds)
    if job is not None and job.created_at < kept_since:
        session.execute(
            update(Job).where(Job.id == job.id, Job.idempotency_key == key).values(idempotency_key=None)
        )
        session.commit()
        return None
    if job is not None and job.request_hash != request_hash:
        raise ProblemError(
            422,
            "idempotency-key-reused",
            "Idempotency-Key reused",
            "this Idempotency-Key was used with a different request body",
        )
    return job


def publish_after_commit(session: Session, settings: Settings, job: Job | None) -> None:
    """Commit first, then publish: a worker must never see a job id the DB does not have yet."""
    session.commit()
    if job is not None:
        dispatch.enqueue_job(settings, job.id)


def get(session: Session, tenant_id: str, job_id: str, kind: str | None = "influence") -> Job:
    """The tenant's job; another tenant's answers 404 exactly like a missing one."""
    job = session.get(Job, job_id)
    if job is None or job.tenant_id != tenant_id or (kind is not None and job.kind != kind):
        raise ProblemError(404, "not-found", "Job not found", f"no job {job_id}")
    return job


def list_page(
    session: Session,
    tenant_id: str,
    page_size: int,
    page_token: str | None,
    state: str | None,
    model_id: str | None,
):
    stmt = select(Job).where(Job.tenant_id == tenant_id, Job.kind == "influence")
    if state:
        stmt = stmt.where(Job.state == state)
    if model_id:
        stmt = stmt.where(Job.model_id == model_id)
    return paginate(session, stmt, Job, page_size, page_token)


def request_cancel(session: Session, job: Job) -> Job:
    """Queued jobs cancel at once; running ones are flagged and stop at the next batch; a fanned-out
    job ends at once (its running shards see it at their next heartbeat).

    Each step is a compare-and-set on the row as it is now: a worker may claim the job or fan it out
    after this request read it (a flag set on a job fanned out meanwhile would never be acted on), so a
    step that matches nothing re-reads the job and takes the step its new state calls for.
    """
    for _ in range(3):  # queued -> running -> fanned out: at most two changes under our feet
        if job.state in ("succeeded", "failed"):
            raise ProblemError(409, "job-finished", "Job already finished", f"the job is {job.state}")
        if job.state == "cancelled" or job.cancel_requested_at is not None or _cancel_step(session, job):
            break
        session.refresh(job)
    session.commit()
    session.refresh(job)
    return job


def _cancel_step(session: Session, job: Job) -> bool:
    """The cancel for the state ``job`` was read in, if the row is still in it."""
    now = utcnow()
    ended = {"state": "cancelled", "cancel_requested_at": now, "finished_at": now, "updated_at": now}
    if job.state == "queued":
        cancel = update(Job).where(Job.id == job.id, Job.state == "queued").values(**ended)
        return session.execute(cancel).rowcount == 1
    running = (Job.id == job.id, Job.state == "running", Job.cancel_requested_at.is_(None))
    if not job.shards_total:
        flag = update(Job).where(*running, Job.shards_total == 0)
        flag = flag.values(cancel_requested_at=now, updated_at=now)
        return session.execute(flag).rowcount == 1
    if session.execute(update(Job).where(*running, Job.shards_total > 0).values(**ended)).rowcount != 1:
        return False
    session.execute(
        update(JobShard)
        .where(JobShard.job_id == job.id, JobShard.state == "queued")
        .values(state="cancelled", updated_at=now)
    )
    return True


def delete(session: Session, job: Job) -> None:
    if job.state not in TERMINAL_STATES:
        raise ProblemError(409, "job-active", "Job is active", "cancel the job before deleting it")
    session.delete(job)
    session.commit()


# --- worker side: each call is its own short transaction -------------------------------------------


def claim(settings: Settings, job_id: str, worker_id: str) -> Claim | None:
    """Take the job if it is queued (or its lease expired). None: someone else owns it."""
    now = utcnow()
    lease_until = now + timedelta(seconds=settings.lease_seconds)
    with session_scope(settings) as session:
        if not tenants.running_slot_free(session, settings, job_id):
            log.info("job %s waits: its tenant is at its running-jobs limit", job_id)
            # this retry is the job's live message: the sweeper, which re-publishes a queued job whose
            # enqueued_at is old, must not add another copy (each would keep retrying, every few s)
            session.execute(
                update(Job).where(Job.id == job_id, Job.state == "queued").values(enqueued_at=now)
            )
            dispatch.enqueue_job(settings, job_id, countdown=TENANT_BUSY_RETRY_SECONDS)
            return None
        row = session.execute(
            update(Job)
            .where(
                Job.id == job_id,
                Job.attempt < Job.max_attempts,
                Job.cancel_requested_at.is_(None),
                (Job.state == "queued") | ((Job.state == "running") & (Job.lease_expires_at < now)),
            )
            .values(
                state="running",
                attempt=Job.attempt + 1,
                worker_id=worker_id,
                heartbeat_at=now,
                lease_expires_at=lease_until,
                started_at=now,
                updated_at=now,
                progress={
                    "phase": "starting",
                    "completed_units": 0,
                    "total_units": 0,
                    "fraction": 0.0,
                    "updated_at": now.isoformat(),
                },
            )
            .returning(Job.kind, Job.attempt)
        ).first()
    return Claim(job_id, row.kind, row.attempt) if row else None


def heartbeat(settings: Settings, claim: Claim, progress: dict | None) -> bool:
    """Extend the lease and record progress; returns True when cancellation was requested."""
    now = utcnow()
    values: dict = {"heartbeat_at": now, "lease_expires_at": now + timedelta(seconds=settings.lease_seconds)}
    if progress is not None:
        values["progress"] = progress
    with session_scope(settings) as session:
        row = session.execute(
            update(Job)
            # a fanned-out job has no lease: a heartbeat that lands after the hand-over must not give it one
            .where(
                Job.id == claim.job_id,
                Job.attempt == claim.attempt,
                Job.state == "running",
                Job.shards_total == 0,
            )
            .values(**values)
            .returning(Job.cancel_requested_at)
        ).first()
    if row is None:
        raise LeaseLost(claim.job_id)
    return row.cancel_requested_at is not None


def finish(
    settings: Settings,
    claim: Claim,
    state: str,
    *,
    error: dict | None = None,
    progress: dict | None = None,
    write: Callable[[Session], None] | None = None,
) -> bool:
    """Move running -> ``state`` and apply ``write`` in one transaction guarded by the attempt.

    Returns False (and writes nothing) when this delivery lost the job. Retried while the
    database is unreachable, so a PostgreSQL restart does not throw the computed result away.
    """
    assert state in TERMINAL_STATES

    def transaction(session: Session) -> bool:
        now = utcnow()
        values: dict = {
            "state": state,
            "finished_at": now,
            "error": error,
            "lease_expires_at": None,
            "updated_at": now,
        }
        if progress is not None:
            values["progress"] = progress
        moved = session.execute(
            update(Job)
            .where(Job.id == claim.job_id, Job.attempt == claim.attempt, Job.state == "running")
            .values(**values)
        ).rowcount
        if moved != 1:
            session.rollback()
            return False
        if write is not None:
            write(session)
        if claim.kind == "training" and state != "succeeded":
            _fail_model(session, claim.job_id, error)
        return True

    return retry_transaction(settings, transaction)


def _fail_model(session: Session, job_id: str, error: dict | None) -> None:
    job = session.get(Job, job_id)
    model = session.get(Model, job.model_id)
    model.state = "failed"
    model.error = (
        error
        or ProblemError(
            409, "training-cancelled", "Training was cancelled", "the model's training job was cancelled"
        ).to_dict()
    )


def sweep(settings: Settings, *, requeue_all_queued: bool = False) -> list[str]:
    """Re-queue expired leases, fail jobs out of attempts, re-publish stale queued jobs.

    Safe to run from several processes at once: every change is a compare-and-set.
    Returns the ids it published.
    """
    now = utcnow()
    publish: list[str] = []
    with session_scope(settings) as session:
        expired = session.execute(
            select(Job.id, Job.attempt, Job.max_attempts, Job.cancel_requested_at).where(
                Job.state == "running", Job.lease_expires_at < now
            )
        ).all()
        for job_id, attempt, max_attempts, cancel_requested_at in expired:
            guard = (Job.id == job_id) & (Job.state == "running") & (Job.attempt == attempt)
            if cancel_requested_at is not None:
                session.execute(
                    update(Job).where(guard).values(state="cancelled", finished_at=now, updated_at=now)
                )
            elif attempt < max_attempts:
                moved = session.execute(
                    update(Job)
                    .where(guard)
                    .values(
                        state="queued", enqueued_at=now, updated_at=now, lease_expires_at=None, worker_id=None
                    )
                ).rowcount
                if moved:
                    publish.append(job_id)
            else:
                problem = ProblemError(
                    500,
                    "worker-lost",
                    "The job's worker stopped",
                    f"the worker stopped heartbeating on all {max_attempts} attempts",
                )
                moved = session.execute(
                    update(Job)
                    .where(guard)
                    .values(state="failed", finished_at=now, updated_at=now, error=problem.to_dict())
                ).rowcount
                job = session.get(Job, job_id)
                if moved and job.kind == "training":
                    _fail_model(session, job_id, problem.to_dict())
        stale = select(Job.id).where(Job.state == "queued")
        if not requeue_all_queued:
            stale = stale.where(
                Job.enqueued_at < now - timedelta(seconds=settings.requeue_queued_after_seconds)
            )
        for job_id in session.scalars(stale).all():
            session.execute(
                update(Job).where(Job.id == job_id, Job.state == "queued").values(enqueued_at=now)
            )
            publish.append(job_id)
    for job_id in publish:
        dispatch.enqueue_job(settings, job_id)
    if publish:
        log.info("sweeper published %d job(s)", len(publish))
    return publish


def selected_checkpoints(session: Session, job: Job) -> list[Checkpoint]:
    ids = job.spec.get("checkpoint_ids") or []
    by_id = {c.id: c for c in session.scalars(select(Checkpoint).where(Checkpoint.id.in_(ids)))}
    return [by_id[i] for i in ids if i in by_id]


def duration_seconds(job: Job) -> float | None:
    if job.started_at is None:
        return None
    end: datetime = job.finished_at or utcnow()
    return max(0.0, (end - job.started_at).total_seconds())
