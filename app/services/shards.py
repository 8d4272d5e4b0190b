"""Fan-out of a job into shards, their leases, and the hand-over to ``finalize``.

The DB is the coordinator (no Celery chords): each shard commits its partial
result and bumps ``job.shards_done`` in one transaction guarded by the shard's
attempt; the shard that completes the set publishes ``finalize``. A fanned-out
job keeps ``state='running'`` with no lease of its own; its shards carry leases
and the sweeper re-queues them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select, update

from app import dispatch
from app.db.base import utcnow
from app.db.models import Job, JobShard
from app.db.session import retry_transaction, session_scope
from app.estimators.sharding import ShardPlan
from app.problems import ProblemError
from app.services.jobs import Claim, LeaseLost, finish
from app.settings import Settings


@dataclass(frozen=True)
class ShardOutput:
    plan: ShardPlan
    scores_uri: str | None
    self_uri: str | None
    compute_seconds: float | None
    details: dict | None = None
    stderr_uri: str | None = None


@dataclass(frozen=True)
class ShardClaim:
    shard_id: str
    job_id: str
    attempt: int
    plan: ShardPlan


def _plan(shard: JobShard) -> ShardPlan:
    indices = tuple(shard.checkpoint_indices) if shard.checkpoint_indices is not None else None
    return ShardPlan(shard.index, shard.train_lo, shard.train_hi, indices, shard.kind)


def fan_out(settings: Settings, claim: Claim, plans: list[ShardPlan]) -> bool:
    """Create the shard rows and hand the job over to them; False if this delivery lost the job or a
    cancel was requested since its last heartbeat (shards never start for such a job, and a fanned-out
    job has no lease for the sweeper to expire: handed over, it would stay running)."""
    now = utcnow()
    with session_scope(settings) as session:
        moved = session.execute(
            update(Job)
            .where(
                Job.id == claim.job_id,
                Job.attempt == claim.attempt,
                Job.state == "running",
                Job.cancel_requested_at.is_(None),
            )
            .values(
                shards_total=len(plans),
                shards_done=0,
                merge_attempts=0,
                lease_expires_at=None,
                updated_at=now,
                progress={
                    "phase": "shards",
                    "completed_units": 0,
                    "total_units": len(plans),
                    "fraction": 0.0,
                    "updated_at": now.isoformat(),
                },
            )
        ).rowcount
        if moved != 1:
            session.rollback()
            return False
        session.execute(
            JobShard.__table__.delete().where(JobShard.job_id == claim.job_id)
        )  # an earlier attempt's
        ids = []
        for plan in plans:
            shard = JobShard(
                job_id=claim.job_id,
                index=plan.index,
                train_lo=plan.train_lo,
                train_hi=plan.train_hi,
                checkpoint_indices=list(plan.checkpoint_indices) if plan.checkpoint_indices else None,
                kind=plan.kind,
                state="queued",
                max_attempts=settings.max_attempts,
                enqueued_at=now,
            )
            session.add(shard)
            session.flush()
            ids.append(shard.id)
    for shard_id in ids:
        dispatch.enqueue_shard(settings, shard_id)
    return True


def claim(settings: Settings, shard_id: str, worker_id: str) -> ShardClaim | None:
    now = utcnow()
    with session_scope(settings) as session:
        shard = session.get(JobShard, shard_id)
        if shard is None:
            return None
        job = session.get(Job, shard.job_id)
        if job.state != "running" or job.cancel_requested_at is not None:
            return None
        row = session.execute(
            update(JobShard)
            .where(
                JobShard.id == shard_id,
                JobShard.attempt < JobShard.max_attempts,
                (JobShard.state == "queued")
                | ((JobShard.state == "running") & (JobShard.lease_expires_at < now)),
            )
            .values(
                state="running",
                attempt=JobShard.attempt + 1,
                worker_id=worker_id,
                started_at=now,
                heartbeat_at=now,
                lease_expires_at=now + timedelta(seconds=settings.lease_seconds),
                updated_at=now,
            )
            .returning(JobShard.attempt)
        ).first()
        if row is None:
            return None
        return ShardClaim(shard_id, shard.job_id, row.attempt, _plan(shard))


def heartbeat(settings: Settings, claim: ShardClaim, progress: dict | None) -> bool:
    """Extend the shard's lease; True when the job's cancellation was requested."""
    now = utcnow()
    with session_scope(settings) as session:
        moved = session.execute(
            update(JobShard)
            .where(
                JobShard.id == claim.shard_id, JobShard.attempt == claim.attempt, JobShard.state == "running"
            )
            .values(heartbeat_at=now, lease_expires_at=now + timedelta(seconds=settings.lease_seconds))
        ).rowcount
        if moved != 1:
            raise LeaseLost(claim.shard_id)
        job = session.get(Job, claim.job_id)
        if progress is not None and job.state == "running" and job.shards_total:
            job.progress = {
                **(job.progress or {}),
                "shard_phase": progress.get("phase"),
                "updated_at": now.isoformat(),
            }
        return job.cancel_requested_at is not None or job.state != "running"


def complete(
    settings: Settings,
    claim: ShardClaim,
    scores_uri: str | None,
    self_uri: str | None,
    compute_seconds: float,
    details: dict | None = None,
    stderr_uri: str | None = None,
) -> bool:
    """Record the partial result and count it; the last shard publishes finalize. False: lease lost.

    Retried while the database is unreachable, like ``jobs.finish``.
    """

    def transaction(session) -> tuple[int, int] | None:
        now = utcnow()
        moved = session.execute(
            update(JobShard)
            .where(
                JobShard.id == claim.shard_id, JobShard.attempt == claim.attempt, JobShard.state == "running"
            )
            .values(
                state="succeeded",
                finished_at=now,
                lease_expires_at=None,
                scores_uri=scores_uri,
                self_influence_uri=self_uri,
                compute_seconds=compute_seconds,
                details=details,
                scores_stderr_uri=stderr_uri,
                updated_at=now,
            )
        ).rowcount
        if moved != 1:
            session.rollback()
            mine = ("succeeded", claim.attempt, scores_uri)
            row = session.execute(
                select(JobShard.state, JobShard.attempt, JobShard.scores_uri).where(
                    JobShard.id == claim.shard_id
                )
            ).first()
            if row is None or tuple(row) != mine:
                return None
            # a retry after a commit whose acknowledgement was lost: counted already; still publish
            # the merge below if this was the last shard
            job = session.get(Job, claim.job_id)
            return job.shards_done, job.shards_total
        done, total = session.execute(
            update(Job)
            .where(Job.id == claim.job_id)
            .values(shards_done=Job.shards_done + 1, updated_at=now)
            .returning(Job.shards_done, Job.shards_total)
        ).one()
        job = session.get(Job, claim.job_id)
        job.progress = {
            "phase": "shards",
            "completed_units": done,
            "total_units": total,
            "fraction": round(done / total, 4),
            "updated_at": now.isoformat(),
        }
        return done, total

    counted = retry_transaction(settings, transaction)
    if counted is None:
        return False
    done, total = counted
    if done == total:
        dispatch.enqueue_finalize(settings, claim.job_id)
    return True


def stop_job(settings: Settings, claim: ShardClaim, state: str, error: dict | None = None) -> None:
    """A shard failed or saw a cancel: end the shard and the job, drop the job's other queued shards."""
    now = utcnow()
    with session_scope(settings) as session:
        moved = session.execute(
            update(JobShard)
            .where(
                JobShard.id == claim.shard_id, JobShard.attempt == claim.attempt, JobShard.state == "running"
            )
            .values(state=state, finished_at=now, lease_expires_at=None, updated_at=now)
        ).rowcount
        if moved:  # a late delivery whose shard was handed to another attempt ends nothing
            _end_job(session, claim.job_id, state, error, now)


def _end_job(session, job_id: str, state: str, error: dict | None, now) -> None:
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == "running")
        .values(state=state, error=error, finished_at=now, updated_at=now)
    )
    session.execute(
        update(JobShard)
        .where(JobShard.job_id == job_id, JobShard.state == "queued")
        .values(state="cancelled", updated_at=now)
    )


def finalize_claim(settings: Settings, job_id: str) -> tuple[Claim, list[ShardOutput]] | None:
    """The job's claim (current attempt) and its shards' partial results, if it is ready to merge.

    Each call that returns a claim starts a merge and counts it in ``job.merge_attempts``; None while
    another merge of the job heartbeats (a duplicate delivery), and once ``max_attempts`` merges have
    started without finishing (their worker died each time) the job fails with ``merge-failed``.
    """
    now = utcnow()
    with session_scope(settings) as session:
        job = session.get(Job, job_id)
        if (
            job is None
            or job.state != "running"
            or not job.shards_total
            or job.shards_done < job.shards_total
        ):
            return None
        shards = session.scalars(
            select(JobShard).where(JobShard.job_id == job_id).order_by(JobShard.index)
        ).all()
        if any(s.state != "succeeded" for s in shards):
            return None
        claim = Claim(job.id, job.kind, job.attempt)
        started, limit = job.merge_attempts, job.max_attempts
        beat = job.heartbeat_at
        if started and beat is not None and beat > now - timedelta(seconds=settings.lease_seconds):
            return None  # an earlier merge still heartbeats: this delivery is a duplicate
        if started < limit:
            moved = session.execute(
                update(Job)
                .where(
                    Job.id == job_id,
                    Job.state == "running",
                    Job.attempt == job.attempt,
                    Job.merge_attempts == started,
                )
                .values(merge_attempts=started + 1, heartbeat_at=now, updated_at=now)
            ).rowcount
            if moved != 1:
                return None
            outputs = [
                ShardOutput(
                    _plan(s),
                    s.scores_uri,
                    s.self_influence_uri,
                    s.compute_seconds,
                    s.details,
                    s.scores_stderr_uri,
                )
                for s in shards
            ]
            return claim, outputs
    problem = ProblemError(
        500,
        "merge-failed",
        "Merging the job's shards failed",
        f"the merge of the shards' results stopped before finishing on all {limit} attempts",
    )
    finish(settings, claim, "failed", error=problem.to_dict())
    return None


def merge_heartbeat(settings: Settings, claim: Claim, progress: dict | None) -> bool:
    """Mark the job's merge as live (and keep the sweeper from re-publishing it); True when the job's
    cancellation was requested. LeaseLost when the job is no longer running this attempt."""
    now = utcnow()
    with session_scope(settings) as session:
        row = session.execute(
            update(Job)
            .where(Job.id == claim.job_id, Job.attempt == claim.attempt, Job.state == "running")
            .values(heartbeat_at=now, updated_at=now)
            .returning(Job.cancel_requested_at)
        ).first()
    if row is None:
        raise LeaseLost(claim.job_id)
    return row.cancel_requested_at is not None


def sweep(settings: Settings) -> tuple[list[str], list[str]]:
    """Re-queue shards whose lease expired (or fail their job); re-publish stuck finalizes.

    Returns (shard ids, job ids to finalize) it published.
    """
    now = utcnow()
    shards_out: list[str] = []
    finalize_out: list[str] = []
    with session_scope(settings) as session:
        expired = session.execute(
            select(JobShard.id, JobShard.job_id, JobShard.attempt, JobShard.max_attempts).where(
                JobShard.state == "running", JobShard.lease_expires_at < now
            )
        ).all()
        for shard_id, job_id, attempt, max_attempts in expired:
            guard = (JobShard.id == shard_id) & (JobShard.state == "running") & (JobShard.attempt == attempt)
            if attempt < max_attempts:
                if session.execute(
                    update(JobShard)
                    .where(guard)
                    .values(state="queued", enqueued_at=now, lease_expires_at=None, worker_id=None)
                ).rowcount:
                    shards_out.append(shard_id)
            else:
                failed = update(JobShard).where(guard).values(state="failed", finished_at=now)
                if not session.execute(failed).rowcount:
                    continue  # the shard completed since the select: its job stands
                problem = ProblemError(
                    500,
                    "worker-lost",
                    "A shard's worker stopped",
                    f"shard {shard_id} stopped heartbeating on all {max_attempts} attempts",
                )
                _end_job(session, job_id, "failed", problem.to_dict(), now)
        stale = now - timedelta(seconds=settings.requeue_queued_after_seconds)
        for shard_id in session.scalars(
            select(JobShard.id)
            .join(Job, Job.id == JobShard.job_id)
            .where(JobShard.state == "queued", JobShard.enqueued_at < stale, Job.state == "running")
        ).all():
            session.execute(update(JobShard).where(JobShard.id == shard_id).values(enqueued_at=now))
            shards_out.append(shard_id)
        finalize_out = list(
            session.scalars(
                select(Job.id).where(
                    Job.state == "running",
                    Job.shards_total > 0,
                    Job.shards_done >= Job.shards_total,
                    Job.updated_at < stale,
                )
            ).all()
        )
        if finalize_out:
            session.execute(update(Job).where(Job.id.in_(finalize_out)).values(updated_at=now))
    for shard_id in shards_out:
        dispatch.enqueue_shard(settings, shard_id)
    for job_id in finalize_out:
        dispatch.enqueue_finalize(settings, job_id)
    return shards_out, finalize_out
