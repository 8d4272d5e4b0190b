from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Index, String, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base, IdMixin, TimestampMixin

TERMINAL_STATES = ("succeeded", "failed", "cancelled")
ACTIVE_STATES = ("queued", "running")
_ACTIVE = text("state IN ('queued', 'running')")


class Job(IdMixin, TimestampMixin, Base):
    """A unit of asynchronous work (``influence`` or ``training``) and its lease.

    PostgreSQL is the source of truth: a delivery claims the job by bumping
    ``attempt`` (a fencing token); only the holder of the current attempt may
    write progress or the final state.
    """

    __tablename__ = "job"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key"),
        # At most one active job per (tenant, slot): the tenant's active-jobs quota without a lock.
        Index(
            "uq_job_active_quota_slot",
            "tenant_id",
            "quota_slot",
            unique=True,
            postgresql_where=_ACTIVE,
            sqlite_where=_ACTIVE,
        ),
    )

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenant.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(20), index=True)  # influence | training
    state: Mapped[str] = mapped_column(String(20), index=True, default="queued")
    model_id: Mapped[str] = mapped_column(ForeignKey("model.id", ondelete="CASCADE"), index=True)
    train_dataset_id: Mapped[str] = mapped_column(ForeignKey("dataset.id", ondelete="RESTRICT"))
    query_dataset_id: Mapped[str | None] = mapped_column(ForeignKey("dataset.id", ondelete="RESTRICT"))
    spec: Mapped[dict] = mapped_column(
        default=dict
    )  # the validated request: method, measurement, output, ...

    attempt: Mapped[int] = mapped_column(default=0)
    max_attempts: Mapped[int] = mapped_column(default=3)
    worker_id: Mapped[str | None] = mapped_column(String(200))
    heartbeat_at: Mapped[datetime | None] = mapped_column()
    lease_expires_at: Mapped[datetime | None] = mapped_column(index=True)
    enqueued_at: Mapped[datetime | None] = mapped_column()
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    cancel_requested_at: Mapped[datetime | None] = mapped_column()
    progress: Mapped[dict] = mapped_column(default=dict)
    error: Mapped[dict | None] = mapped_column()

    shards_total: Mapped[int] = mapped_column(default=0, server_default="0")  # 0: the job runs as one task
    shards_done: Mapped[int] = mapped_column(default=0, server_default="0")
    # merges of the shards' results started (finalize deliveries); capped at max_attempts
    merge_attempts: Mapped[int] = mapped_column(default=0, server_default="0")

    # One of the tenant's max_active_jobs admission slots while queued or running (influence jobs).
    quota_slot: Mapped[int | None] = mapped_column()
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_hash: Mapped[str | None] = mapped_column(String(64))
