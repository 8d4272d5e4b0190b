"""Tenants and their quotas: every quota is checked inside the transaction that would exceed it.

Storage and running-jobs checks lock the tenant row (``SELECT ... FOR UPDATE`` on PostgreSQL;
SQLite serialises writers anyway) before counting, so two concurrent requests cannot both take
the last unit. The active-jobs quota, checked on every submission, takes no lock: a partial unique
index hands out a fixed number of slots (:func:`pick_job_slot`).
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.db.models import ACTIVE_STATES, Dataset, Job, JobShard, Model, Tenant
from app.problems import ProblemError
from app.schemas.tenants import EffectiveLimits, TenantCreate, TenantLimits
from app.services.pagination import paginate
from app.settings import Settings

QUOTA_RETRY_SECONDS = 10


def effective_limits(settings: Settings, tenant: Tenant) -> EffectiveLimits:
    overrides = TenantLimits.model_validate(tenant.limits or {}).model_dump(exclude_none=True)
    defaults = {
        "max_active_jobs": settings.tenant_max_active_jobs,
        "max_running_jobs": settings.tenant_max_running_jobs,
        "max_storage_bytes": settings.tenant_max_storage_bytes,
        "read_requests_per_second": settings.tenant_read_requests_per_second,
        "write_requests_per_second": settings.tenant_write_requests_per_second,
        "max_job_cost": settings.max_job_cost,
        "max_score_cells": settings.max_score_cells,
        "max_compute_seconds_per_day": settings.tenant_max_compute_seconds_per_day,
    }
    return EffectiveLimits(**{**defaults, **overrides})


def create(session: Session, body: TenantCreate) -> Tenant:
    tenant = Tenant(name=body.name, limits=body.limits.model_dump(exclude_none=True))
    session.add(tenant)
    try:
        session.flush()
    except IntegrityError:
        session.rollback()
        raise ProblemError(409, "conflict", "Tenant exists", f"a tenant named {body.name!r} exists") from None
    return tenant


def get(session: Session, tenant_id: str) -> Tenant:
    tenant = session.get(Tenant, tenant_id)
    if tenant is None:
        raise ProblemError(404, "not-found", "Tenant not found", f"no tenant {tenant_id}")
    return tenant


def by_name(session: Session, name: str) -> Tenant | None:
    return session.scalar(select(Tenant).where(Tenant.name == name))


def list_page(session: Session, page_size: int, page_token: str | None):
    return paginate(session, select(Tenant), Tenant, page_size, page_token)


def set_limits(session: Session, tenant: Tenant, limits: TenantLimits) -> Tenant:
    tenant.limits = limits.model_dump(exclude_none=True)
    session.flush()
    return tenant


def _lock(session: Session, tenant_id: str) -> None:
    session.execute(select(Tenant.id).where(Tenant.id == tenant_id).with_for_update())


def storage_used(session: Session, tenant_id: str) -> int:
    datasets = session.scalar(
        select(func.coalesce(func.sum(Dataset.size_bytes), 0)).where(Dataset.tenant_id == tenant_id)
    )
    models = session.scalar(
        select(func.coalesce(func.sum(Model.size_bytes), 0)).where(Model.tenant_id == tenant_id)
    )
    return int(datasets) + int(models)


def active_jobs(session: Session, tenant_id: str) -> int:
    return int(
        session.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.tenant_id == tenant_id, Job.state.in_(ACTIVE_STATES))
        )
    )


def reserve_storage(session: Session, tenant_id: str, limits: EffectiveLimits, incoming_bytes: int) -> None:
    """Refuse (413) an upload that would take the tenant past its storage quota."""
    _lock(session, tenant_id)
    used = storage_used(session, tenant_id)
    if used + incoming_bytes > limits.max_storage_bytes:
        raise ProblemError(
            413,
            "storage-quota-exceeded",
            "Storage quota exceeded",
            f"{incoming_bytes} more bytes would exceed the tenant's quota of {limits.max_storage_bytes} "
            f"({used} used); delete datasets or models, or ask for a larger quota",
        )


def pick_job_slot(session: Session, tenant_id: str, limits: EffectiveLimits) -> int:
    """A free one of the tenant's ``max_active_jobs`` admission slots for a new job; 429 when none is.

    No lock: the partial unique index on (tenant, slot) over queued and running jobs admits at most
    one job per slot, so two submissions that pick the same slot collide on insert and the loser
    picks again. A job frees its slot by leaving the active states; nothing has to be decremented.
    While the tenant holds at most a quarter of its slots a random pick is almost always free, so
    the taken ones are read only when the tenant is near its limit. Jobs admitted under a higher
    limit hold slots above a lowered one: they still count, so the count check refuses new jobs
    until enough end (only submissions racing each other in that window can exceed the new limit).
    """
    limit = limits.max_active_jobs
    active = active_jobs(session, tenant_id)
    if active >= limit:
        raise _job_quota_exceeded(active, limit)
    if 4 * active <= limit:
        return random.randrange(limit)
    taken = set(
        session.scalars(
            select(Job.quota_slot).where(
                Job.tenant_id == tenant_id, Job.state.in_(ACTIVE_STATES), Job.quota_slot.is_not(None)
            )
        )
    )
    free = [slot for slot in range(limit) if slot not in taken]
    if not free:
        raise _job_quota_exceeded(active, limit)
    return random.choice(free)


COMPUTE_WINDOW = timedelta(hours=24)
COMPUTE_RETRY_SECONDS = 600


def compute_seconds_used(session: Session, tenant_id: str, now: datetime | None = None) -> float:
    """Running time of the tenant's work within the last 24 hours: each job's claim-to-end interval
    (up to now while it runs), and for a fanned-out job its shards' intervals instead (they run in
    parallel), clipped to the window."""
    now = now or utcnow()
    since = now - COMPUTE_WINDOW
    recent = (Job.finished_at.is_(None)) | (Job.finished_at > since)
    spans = session.execute(
        select(Job.started_at, Job.finished_at).where(
            Job.tenant_id == tenant_id, Job.started_at.is_not(None), Job.shards_total == 0, recent
        )
    ).all()
    spans += session.execute(
        select(JobShard.started_at, JobShard.finished_at)
        .join(Job, Job.id == JobShard.job_id)
        .where(
            Job.tenant_id == tenant_id,
            JobShard.started_at.is_not(None),
            (JobShard.finished_at.is_(None)) | (JobShard.finished_at > since),
        )
    ).all()
    return sum(max(0.0, ((end or now) - max(start, since)).total_seconds()) for start, end in spans)


def check_compute_quota(session: Session, tenant_id: str, limits: EffectiveLimits) -> None:
    """429 ``compute-quota-exceeded`` when the tenant used its daily compute seconds (0 = no limit)."""
    limit = limits.max_compute_seconds_per_day
    if not limit:
        return
    used = compute_seconds_used(session, tenant_id)
    if used >= limit:
        raise ProblemError(
            429,
            "compute-quota-exceeded",
            "Daily compute quota used",
            f"the tenant's jobs ran {used:.0f} s in the last 24 hours (limit {limit:.0f} s); "
            "submit again once earlier work ages out of the window, or ask for a larger quota",
            headers={"Retry-After": str(COMPUTE_RETRY_SECONDS)},
        )


def _job_quota_exceeded(active: int, limit: int) -> ProblemError:
    return ProblemError(
        429,
        "job-quota-exceeded",
        "Too many active jobs",
        f"the tenant has {active} queued or running jobs (limit {limit}); "
        "wait for some to finish or cancel them",
        headers={"Retry-After": str(QUOTA_RETRY_SECONDS)},
    )


def running_slot_free(session: Session, settings: Settings, job_id: str) -> bool:
    """Whether a queued job's tenant may start one more job now (checked under the tenant lock at claim).

    Jobs that are not queued answer True: whether they can be claimed is the claim's own business.
    """
    row = session.execute(
        select(Job.state, Tenant).join(Tenant, Job.tenant_id == Tenant.id).where(Job.id == job_id)
    ).first()
    if row is None or row.state != "queued":
        return True
    _lock(session, row.Tenant.id)
    running = session.scalar(  # a running row whose lease expired is a dead worker's: it computes nothing
        select(func.count())
        .select_from(Job)
        .where(
            Job.tenant_id == row.Tenant.id,
            Job.state == "running",
            # a fanned-out job holds no lease of its own: its shards and merge run under theirs
            (Job.lease_expires_at > utcnow()) | (Job.shards_total > 0),
        )
    )
    return int(running) < effective_limits(settings, row.Tenant).max_running_jobs
